// cross_tokenizer_loss_cpu.cpp: the CPU kernels of the cross-tokenizer loss (contract: cross_tokenizer_loss.h).
//
// Rows (groups) are split statically over OpenMP threads; each thread converts a row to fp32 scratch once and
// runs its passes there. The statistics sweep reads each row once: convert + max, exp + sum (and again at
// T = 1 for the hard term), then the top k from the maxima of blocks of 16 columns (`top_k`). The softmax sweep reads each row once and writes its
// gradient row once and, for a group's row, right after it (the row and its gradient in cache) the exact
// term, which gathers only the mapped columns of the group's two rows through the map (sorted by student id
// by the caller, so that the student row is read and its gradient row updated in increasing order).
// The per-column math (fast_exp, half_log_prob, divergence_terms) is the distillation loss's
// (numerics.h, distillation_loss.h).
#include "cross_tokenizer_loss.h"

#include <algorithm>
#include <cmath>
#include <functional>
#include <utility>
#include <vector>

#include "distillation_loss.h"

namespace tsa_fast {
namespace {

// Per-thread buffers of the top-k selection, reused row after row.
struct TopKScratch {
  std::vector<float> block_max, selected;
  std::vector<std::pair<float, int64_t>> candidates;
};

// out_j = z_j as fp32 for a row of n; returns their max.
template <class T>
TSA_ALWAYS_INLINE float load_row(const T* z, int64_t n, float* out) {
  float max = -INFINITY;
#pragma omp simd reduction(max : max)
  for (int64_t j = 0; j < n; ++j) {
    out[j] = to_float(z[j]);
    max = out[j] > max ? out[j] : max;
  }
  return max;
}

// log sum_j exp(scale x_j) from max(x) (scale > 0), the sum in double.
TSA_ALWAYS_INLINE float scaled_logsumexp(const float* x, int64_t n, float max, float scale) {
  const float shift = max * scale;
  double sum = 0.0;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < n; ++j) sum += fast_exp(x[j] * scale - shift);
  return shift + float(std::log(sum));
}

// The k largest of x (k <= n) in decreasing order, with their columns. With the maxima of blocks of kBlock
// columns, tau = the k-th largest block maximum bounds the k-th largest entry from below (k blocks hold an entry
// >= tau), so the top k lie in the blocks whose maximum is >= tau, at entries >= tau: a vectorized pass for
// the maxima, a selection among n / kBlock of them, and one among the few candidates.
TSA_ALWAYS_INLINE void top_k(const float* x, int64_t n, int64_t k, TopKScratch& scratch, float* values,
                             int64_t* indices) {
  constexpr int64_t kBlock = 16;
  const int64_t n_blocks = (n + kBlock - 1) / kBlock;
  auto& maxima = scratch.block_max;
  maxima.resize(size_t(n_blocks));
  for (int64_t b = 0; b < n_blocks; ++b) {
    const int64_t begin = b * kBlock, end = std::min(n, begin + kBlock);
    float block_max = -INFINITY;
#pragma omp simd reduction(max : block_max)
    for (int64_t j = begin; j < end; ++j) block_max = x[j] > block_max ? x[j] : block_max;
    maxima[size_t(b)] = block_max;
  }
  float tau = -INFINITY;
  if (n_blocks > k) {
    scratch.selected.assign(maxima.begin(), maxima.end());
    std::nth_element(scratch.selected.begin(), scratch.selected.begin() + (k - 1), scratch.selected.end(),
                     std::greater<float>());
    tau = scratch.selected[size_t(k - 1)];
  }
  auto& candidates = scratch.candidates;
  candidates.clear();
  for (int64_t b = 0; b < n_blocks; ++b) {
    if (!(maxima[size_t(b)] >= tau)) continue;
    for (int64_t j = b * kBlock; j < std::min(n, (b + 1) * kBlock); ++j)
      if (x[j] >= tau) candidates.emplace_back(x[j], j);
  }
  if (candidates.size() < size_t(k)) {  // NaNs compare false: then every column is a candidate
    candidates.clear();
    for (int64_t j = 0; j < n; ++j) candidates.emplace_back(x[j] == x[j] ? x[j] : -INFINITY, j);
  }
  // Ties broken by column, so that every run selects alike.
  const auto before = [](const std::pair<float, int64_t>& a, const std::pair<float, int64_t>& b) {
    return a.first > b.first || (a.first == b.first && a.second < b.second);
  };
  std::partial_sort(candidates.begin(), candidates.begin() + k, candidates.end(), before);
  for (int64_t i = 0; i < k; ++i) {
    values[i] = candidates[size_t(i)].first;
    indices[i] = candidates[size_t(i)].second;
  }
}

template <class T>
TSA_CPU_CLONES void statistics_row(const LogitRows& logits, int64_t row, float inv_t, int64_t k, float* lse,
                                   float* lse_hard, float* top_values, int64_t* top_indices, float* scratch,
                                   TopKScratch& top_scratch) {
  const int64_t n = logits.n_cols;
  const T* z = static_cast<const T*>(logits.data) + row * logits.row_stride;
  const float max = load_row(z, n, scratch);
  lse[row] = scaled_logsumexp(scratch, n, max, inv_t);
  if (lse_hard != nullptr) lse_hard[row] = scaled_logsumexp(scratch, n, max, 1.0f);
  top_k(scratch, n, k, top_scratch, top_values + row * k, top_indices + row * k);
}

template <class T>
TSA_CPU_CLONES void softmax_row(const LogitRows& logits, int64_t row, float inv_t, const float* lse,
                                const float* coefficient, const float* lse_hard, const float* coefficient_hard,
                                float* grad) {
  const int64_t n = logits.n_cols;
  const T* z = static_cast<const T*>(logits.data) + row * logits.row_stride;
  const float a = coefficient[row], shift = lse[row];
  if (lse_hard == nullptr) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) grad[j] = a * fast_exp(to_float(z[j]) * inv_t - shift);
  } else {
    const float h = coefficient_hard[row], shift_hard = lse_hard[row];
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      const float x = to_float(z[j]);
      grad[j] = a * fast_exp(x * inv_t - shift) + h * fast_exp(x - shift_hard);
    }
  }
}

template <class Student, class Teacher, int kDivergence>
TSA_CPU_CLONES void exact_group(const LogitRows& student, const LogitRows& teacher, int64_t student_row,
                                int64_t teacher_row, const int64_t* vocab_map, int64_t n_map, float beta, float inv_t,
                                float grad_scale, float* grad, float* out, float* s, float* t, float* e_t,
                                float* g) {
  const Student* z_s = static_cast<const Student*>(student.data) + student_row * student.row_stride;
  const Teacher* z_t = static_cast<const Teacher*>(teacher.data) + teacher_row * teacher.row_stride;
  // Gather the mapped columns at T (the only reads of the rows) into contiguous scratch, so that every later
  // pass vectorizes; then both maxima and sums.
  for (int64_t j = 0; j < n_map; ++j) {
    s[j] = to_float(z_s[vocab_map[2 * j]]) * inv_t;
    t[j] = to_float(z_t[vocab_map[2 * j + 1]]) * inv_t;
  }
  float max_s = -INFINITY, max_t = -INFINITY;
#pragma omp simd reduction(max : max_s, max_t)
  for (int64_t j = 0; j < n_map; ++j) {
    max_s = s[j] > max_s ? s[j] : max_s;
    max_t = t[j] > max_t ? t[j] : max_t;
  }
  // The exps once, kept (in g and e_t) for the probabilities of the later passes.
  double sum_s = 0.0, sum_t = 0.0;
#pragma omp simd reduction(+ : sum_s, sum_t)
  for (int64_t j = 0; j < n_map; ++j) {
    g[j] = fast_exp(s[j] - max_s);
    e_t[j] = fast_exp(t[j] - max_t);
    sum_s += g[j];
    sum_t += e_t[j];
  }
  const float log_z_s = float(std::log(sum_s)), log_z_t = float(std::log(sum_t));
  const float inv_z_s = float(1.0 / sum_s), inv_z_t = float(1.0 / sum_t);
  const auto terms = [&](int64_t j) {
    return divergence_terms<kDivergence>(e_t[j] * inv_z_t, half_log_prob(t[j], max_t, log_z_t), g[j] * inv_z_s,
                                         half_log_prob(s[j], max_s, log_z_s), beta);
  };
  // C = sum_j qg_j of the softmax chain rule (forward KL: -1).
  double c_sum = -1.0;
  if (kDivergence != kForwardKL) {
    c_sum = 0.0;
#pragma omp simd reduction(+ : c_sum)
    for (int64_t j = 0; j < n_map; ++j) c_sum += terms(j).q_grad;
  }
  const float c = float(c_sum);
  double divergence = 0.0;
#pragma omp simd reduction(+ : divergence)
  for (int64_t j = 0; j < n_map; ++j) {
    const DivergenceTerms column = terms(j);
    divergence += column.value;
    g[j] = grad_scale * (column.q_grad - g[j] * inv_z_s * c);  // g held e_s: read before it is overwritten
  }
  for (int64_t j = 0; j < n_map; ++j) grad[vocab_map[2 * j]] += g[j];  // ids distinct: one add per entry
  *out = float(divergence);
}

}  // namespace

void cross_tokenizer_statistics_cpu(const LogitRows& logits, float inv_t, int64_t k, float* lse, float* lse_hard,
                                    float* top_values, int64_t* top_indices) {
  if (k < 1 || k > logits.n_cols) throw std::invalid_argument("tsa_fast: top k must be in [1, n_cols]");
  dispatch_dtype(logits.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
#pragma omp parallel
    {
      std::vector<float> scratch(size_t(logits.n_cols));
      TopKScratch top_scratch;
#pragma omp for schedule(static)
      for (int64_t row = 0; row < logits.n_rows; ++row)
        statistics_row<T>(logits, row, inv_t, k, lse, lse_hard, top_values, top_indices, scratch.data(), top_scratch);
    }
  });
}

void cross_tokenizer_gradient_cpu(const LogitRows& student, float inv_t, const float* lse, const float* coefficient,
                                  const float* lse_hard, const float* coefficient_hard, float* grad,
                                  int64_t grad_row_stride, const ExactTerm& exact) {
  const bool has_exact = exact.row_groups != nullptr && exact.n_map > 0;
  dispatch_dtype(student.dtype, [&](auto student_tag) {
    dispatch_dtype(has_exact ? exact.teacher.dtype : student.dtype, [&](auto teacher_tag) {
      dispatch_divergence(exact.divergence, [&](auto code) {
        using Student = typename decltype(student_tag)::type;
        using Teacher = typename decltype(teacher_tag)::type;
#pragma omp parallel
        {
          std::vector<float> scratch(has_exact ? size_t(4 * exact.n_map) : 0);
          float* const s = scratch.data();
#pragma omp for schedule(static)
          for (int64_t row = 0; row < student.n_rows; ++row) {
            float* const grad_row = grad + row * grad_row_stride;
            softmax_row<Student>(student, row, inv_t, lse, coefficient, lse_hard, coefficient_hard, grad_row);
            // A group's row: its exact term now, while the row and its gradient row are still in cache.
            const int64_t group = has_exact ? exact.row_groups[row] : -1;
            if (group >= 0)
              exact_group<Student, Teacher, decltype(code)::value>(
                  student, exact.teacher, row, exact.teacher_rows[group], exact.vocab_map, exact.n_map, exact.beta,
                  inv_t, exact.grad_scale, grad_row, exact.out + group, s, s + exact.n_map, s + 2 * exact.n_map,
                  s + 3 * exact.n_map);
          }
        }
      });
    });
  });
}

}  // namespace tsa_fast
