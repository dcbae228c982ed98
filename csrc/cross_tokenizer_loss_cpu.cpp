// cross_tokenizer_loss_cpu.cpp: the CPU kernels of the cross-tokenizer loss (contract: cross_tokenizer_loss.h).
//
// Rows (groups) are split statically over OpenMP threads; each thread converts a row to fp32 scratch once and
// runs its passes there. The statistics sweep reads each row once: convert + max, exp + sum (and again at
// T = 1 for the hard term), then the top k by a size-k min-heap whose root is the threshold a column must
// beat (almost every column fails the one compare). The softmax sweep reads each row once and writes its
// gradient row once. The exact sweep gathers only the mapped columns of a group's two rows through the map.
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

// The k largest of x (k <= n) in decreasing order, with their columns. A size-k min-heap whose root, the k-th
// largest so far, is the threshold; blocks of 16 columns none of which beats it (almost all of them) cost one
// vectorized max.
TSA_ALWAYS_INLINE void top_k(const float* x, int64_t n, int64_t k, std::vector<std::pair<float, int64_t>>& heap,
                             float* values, int64_t* indices) {
  using Entry = std::pair<float, int64_t>;
  const auto greater = [](const Entry& a, const Entry& b) { return a.first > b.first; };
  heap.clear();
  for (int64_t j = 0; j < k; ++j) heap.emplace_back(x[j], j);
  std::make_heap(heap.begin(), heap.end(), greater);
  float threshold = heap.front().first;
  const auto offer = [&](int64_t j) {
    if (x[j] > threshold) {
      std::pop_heap(heap.begin(), heap.end(), greater);
      heap.back() = {x[j], j};
      std::push_heap(heap.begin(), heap.end(), greater);
      threshold = heap.front().first;
    }
  };
  constexpr int64_t kBlock = 16;
  int64_t j = k;
  for (; j + kBlock <= n; j += kBlock) {
    float block_max = -INFINITY;
#pragma omp simd reduction(max : block_max)
    for (int64_t i = 0; i < kBlock; ++i) block_max = x[j + i] > block_max ? x[j + i] : block_max;
    if (block_max > threshold) {
      for (int64_t i = 0; i < kBlock; ++i) offer(j + i);
    }
  }
  for (; j < n; ++j) offer(j);
  std::sort_heap(heap.begin(), heap.end(), greater);  // decreasing
  for (int64_t i = 0; i < k; ++i) {
    values[i] = heap[i].first;
    indices[i] = heap[i].second;
  }
}

template <class T>
TSA_CPU_CLONES void statistics_row(const LogitRows& logits, int64_t row, float inv_t, int64_t k, float* lse,
                                   float* lse_hard, float* top_values, int64_t* top_indices, float* scratch,
                                   std::vector<std::pair<float, int64_t>>& heap) {
  const int64_t n = logits.n_cols;
  const T* z = static_cast<const T*>(logits.data) + row * logits.row_stride;
  const float max = load_row(z, n, scratch);
  lse[row] = scaled_logsumexp(scratch, n, max, inv_t);
  if (lse_hard != nullptr) lse_hard[row] = scaled_logsumexp(scratch, n, max, 1.0f);
  top_k(scratch, n, k, heap, top_values + row * k, top_indices + row * k);
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
                                float grad_scale, float* grad, float* out, float* s, float* t, float* g) {
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
  double sum_s = 0.0, sum_t = 0.0;
#pragma omp simd reduction(+ : sum_s, sum_t)
  for (int64_t j = 0; j < n_map; ++j) {
    sum_s += fast_exp(s[j] - max_s);
    sum_t += fast_exp(t[j] - max_t);
  }
  const float log_z_s = float(std::log(sum_s)), log_z_t = float(std::log(sum_t));
  const auto terms = [&](int64_t j) {
    const float half_log_q = half_log_prob(s[j], max_s, log_z_s), half_log_p = half_log_prob(t[j], max_t, log_z_t);
    return divergence_terms<kDivergence>(fast_exp(2.0f * half_log_p), half_log_p, fast_exp(2.0f * half_log_q),
                                         half_log_q, beta);
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
    g[j] = grad_scale * (column.q_grad - fast_exp(2.0f * half_log_prob(s[j], max_s, log_z_s)) * c);
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
      std::vector<std::pair<float, int64_t>> heap;
      heap.reserve(size_t(k));
#pragma omp for schedule(static)
      for (int64_t row = 0; row < logits.n_rows; ++row)
        statistics_row<T>(logits, row, inv_t, k, lse, lse_hard, top_values, top_indices, scratch.data(), heap);
    }
  });
}

void cross_tokenizer_softmax_rows_cpu(const LogitRows& logits, float inv_t, const float* lse, const float* coefficient,
                                      const float* lse_hard, const float* coefficient_hard, float* grad,
                                      int64_t grad_row_stride) {
  dispatch_dtype(logits.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
#pragma omp parallel for schedule(static)
    for (int64_t row = 0; row < logits.n_rows; ++row)
      softmax_row<T>(logits, row, inv_t, lse, coefficient, lse_hard, coefficient_hard, grad + row * grad_row_stride);
  });
}

void cross_tokenizer_exact_cpu(const LogitRows& student, const LogitRows& teacher, const int64_t* student_rows,
                               const int64_t* teacher_rows, const int64_t* vocab_map, int64_t n_groups, int64_t n_map,
                               int divergence, float beta, float inv_t, float grad_scale, float* grad,
                               int64_t grad_row_stride, float* out) {
  dispatch_dtype(student.dtype, [&](auto student_tag) {
    dispatch_dtype(teacher.dtype, [&](auto teacher_tag) {
      dispatch_divergence(divergence, [&](auto code) {
        using Student = typename decltype(student_tag)::type;
        using Teacher = typename decltype(teacher_tag)::type;
#pragma omp parallel
        {
          std::vector<float> scratch(size_t(3 * n_map));
#pragma omp for schedule(static)
          for (int64_t g = 0; g < n_groups; ++g)
            exact_group<Student, Teacher, decltype(code)::value>(
                student, teacher, student_rows[g], teacher_rows[g], vocab_map, n_map, beta, inv_t, grad_scale,
                grad + student_rows[g] * grad_row_stride, out + g, scratch.data(), scratch.data() + n_map,
                scratch.data() + 2 * n_map);
        }
      });
    });
  });
}

}  // namespace tsa_fast
