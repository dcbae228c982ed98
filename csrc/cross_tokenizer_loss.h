// cross_tokenizer_loss.h: the contract of the CPU kernels of the cross-tokenizer loss
// (cross_tokenizer_loss_cpu.cpp), the row sweeps of tsa_fast.ops.cross_tokenizer_loss; the same math as the
// Triton kernels (kernels/cross_tokenizer_loss.py), with the top k selected here as well.
//
// Logits are (n_rows, n_cols) fp32/fp16/bf16 (DTypeCode), column stride 1, row stride in elements; all math
// in fp32, row sums in double. T > 0 is given as inv_t = 1 / T.
#pragma once

#include <cstdint>

namespace tsa_fast {

struct LogitRows {
  const void* data;
  int dtype;
  int64_t row_stride;
  int64_t n_rows, n_cols;
};

// Per row r: lse[r] = log sum_j exp(z_rj / T); lse_hard[r] = log sum_j exp(z_rj) when lse_hard is non-null;
// the k <= n_cols largest logits of the row in decreasing order (top_values, fp32) and their columns
// (top_indices, int64), both (n_rows, k) contiguous.
void cross_tokenizer_statistics_cpu(const LogitRows& logits, float inv_t, int64_t k, float* lse, float* lse_hard,
                                    float* top_values, int64_t* top_indices);

// The exact-match term of the groups (ExactTerm): with g = row_groups[r] >= 0 (student rows of groups, one group
// each), t = teacher_rows[g] and the map's (n_map, 2) int64 rows (a_j, b_j), ids distinct per column:
// out[g] = D(softmax(z_t[t, b] / T), softmax(z_s[r, a] / T)) (the DivergenceCode `divergence`, jsd mixing
// `beta`), and grad[r, a_j] += grad_scale * dD / d(z_s[r, a_j] / T). row_groups null or n_map 0: no exact term.
struct ExactTerm {
  LogitRows teacher;
  const int64_t* row_groups;   // (n_rows of the student,)
  const int64_t* teacher_rows;  // (G,)
  const int64_t* vocab_map;     // (n_map, 2)
  int64_t n_map;
  int divergence;
  float beta;
  float grad_scale;
  float* out;  // (G,)
};

// grad[r, j] = coefficient[r] exp(z_rj / T - lse[r]) (+ coefficient_hard[r] exp(z_rj - lse_hard[r]) when those are
// non-null): every row of the gradient written once, fp32, row stride grad_row_stride; plus the exact term.
void cross_tokenizer_gradient_cpu(const LogitRows& student, float inv_t, const float* lse, const float* coefficient,
                                  const float* lse_hard, const float* coefficient_hard, float* grad,
                                  int64_t grad_row_stride, const ExactTerm& exact);

}  // namespace tsa_fast
