// distillation_loss_cpu.cpp: the CPU kernel of the fused distillation loss (contract and math:
// distillation_loss.h). Per row r: loss[r] and, when grad is non-null, grad[r, :K], from one read of the
// row's student and teacher logits.
//
// Parallel decomposition: rows are split statically over OpenMP threads. Each thread owns fp32 scratch
// rows of K floats, reused row after row:
//   capped   cs = c(z_s)              exp_student  e_s = exp(cs/T - max)   (q = e_s / Z_s)
//   teacher  t = c(z_t)/T             exp_teacher  e_t = exp(t - max)      (p = e_t / Z_t)
//   exp_hard e_h = exp(cs - max)      (only with a hard term; q1 = e_h / Z_h)
// 500 KiB (625 KiB with a hard term) for K = 32000: they stay in L2. Passes per row: convert + max and
// exp + sum for each softmax (the only exps); then without a gradient a D pass, with one a C pass (none
// for forward_kl: C = -1) and the gradient pass, which also sums D. Memory traffic per row: K * (student +
// teacher bytes) read once, K * student bytes of gradient and 4 bytes of loss (8 more with the parts)
// written; every other pass runs on the scratch rows.
//
// The loops are plain j = 0..K-1 loops over float pointers calling branch-free inline functions, so GCC
// vectorizes them at -O3; `omp simd reduction` lets it vectorize the sums and maxima, which it would not
// reorder on its own without -ffast-math. Row sums accumulate in double. The row function is compiled for
// AVX-512, AVX2 and baseline x86-64, picked at load time (TSA_CPU_CLONES, numerics.h).
#include <algorithm>
#include <climits>
#include <cmath>
#include <vector>

#include "distillation_loss.h"

namespace tsa_fast {
namespace {

// Stores out_j = c(z_j) * scale and returns their max.
template <class T>
TSA_ALWAYS_INLINE float load_capped(const T* z, int n, float softcap, float scale, float* out) {
  float max = -INFINITY;
  if (softcap > 0.0f) {
    const float inv_softcap = 1.0f / softcap;
#pragma omp simd reduction(max : max)
    for (int j = 0; j < n; ++j) {
      out[j] = softcapped(to_float(z[j]), softcap, inv_softcap) * scale;
      max = out[j] > max ? out[j] : max;
    }
  } else {
#pragma omp simd reduction(max : max)
    for (int j = 0; j < n; ++j) {
      out[j] = to_float(z[j]) * scale;
      max = out[j] > max ? out[j] : max;
    }
  }
  return max;
}

// sum_j column(j) for j in [0, n), accumulated in double (float partial sums of a row dominated by a
// few columns lose the small ones' digits).
template <class Column>
TSA_ALWAYS_INLINE double column_sum(int n, const Column& column) {
  double sum = 0.0;
#pragma omp simd reduction(+ : sum)
  for (int j = 0; j < n; ++j) sum += column(j);
  return sum;
}

// Stores exps_j = e^(scale x_j - shift) and returns their sum.
TSA_ALWAYS_INLINE double exp_and_sum(const float* x, int n, float scale, float shift, float* exps) {
  return column_sum(n, [&](int j) {
    exps[j] = fast_exp(x[j] * scale - shift);
    return exps[j];
  });
}

template <class Student, class Teacher, int kDivergence>
TSA_CPU_CLONES void distillation_loss_row(const DistillationParams& params, int64_t row, float* scratch) {
  const int n = int(params.n_cols);  // < 2^31, checked by the entry point
  using Grad = GradStorage<Student>;
  Grad* grad = params.grad == nullptr ? nullptr : static_cast<Grad*>(params.grad) + row * params.grad_row_stride;
  const int64_t label = params.labels == nullptr ? -1 : params.labels[row];
  if (params.labels != nullptr && label == params.ignore_index) {
    store_row_loss(params, row, RowParts{0.0, 0.0});
    if (grad != nullptr) std::fill(grad, grad + n, from_float<Grad>(0.0f));
    return;
  }
  const auto* z_student = static_cast<const Student*>(params.student) + row * params.student_row_stride;
  const auto* z_teacher = static_cast<const Teacher*>(params.teacher) + row * params.teacher_row_stride;
  const RowTemperature temperature = row_temperature(params, row);
  const float inv_t = temperature.inv_t, soft_scale = temperature.soft_scale;
  const float beta = params.beta;  // a local: the gradient stores could alias params
  const bool hard = params.hard_weight > 0.0f;
  const auto scratch_row = [&](int64_t i) { return scratch + i * n; };
  float* capped = scratch_row(0);
  float* exp_student = scratch_row(1);
  float* teacher = scratch_row(2);
  float* exp_teacher = scratch_row(3);
  // Without a hard term, q1 reads exp_student: any finite values do, as its weight is 0.
  float* exp_hard = hard ? scratch_row(4) : exp_student;

  // Softmax statistics: max, log Z, and 1 / Z to turn the stored exps into probabilities. Log-probabilities
  // are (x - max) - log Z: x - max is exact near the max, where rounding max + log Z would cost digits.
  const float max_capped = load_capped(z_student, n, params.softcap, 1.0f, capped);
  const float max_student = max_capped * inv_t;  // max(cs / T) for T > 0
  const double z_s = exp_and_sum(capped, n, inv_t, max_student, exp_student);
  const float log_z_student = float(std::log(z_s));
  const float inv_z_student = float(1.0 / z_s);

  const float max_teacher = load_capped(z_teacher, n, params.softcap, inv_t, teacher);
  const double z_t = exp_and_sum(teacher, n, 1.0f, max_teacher, exp_teacher);
  const float log_z_teacher = float(std::log(z_t));
  const float inv_z_teacher = float(1.0 / z_t);

  double cross_entropy = 0.0;
  float inv_z_hard = 0.0f;
  if (hard) {
    const double z_h = exp_and_sum(capped, n, 1.0f, max_capped, exp_hard);
    inv_z_hard = float(1.0 / z_h);
    const double mean_capped = column_sum(n, [&](int j) { return capped[j]; }) / double(n);
    cross_entropy = smoothed_cross_entropy(max_capped + std::log(z_h), capped[label], mean_capped,
                                           params.label_smoothing);
  }

  const auto student_prob = [&](int j) { return exp_student[j] * inv_z_student; };
  const auto column_terms = [&](int j) {
    return divergence_terms<kDivergence>(exp_teacher[j] * inv_z_teacher,
                                         half_log_prob(teacher[j], max_teacher, log_z_teacher), student_prob(j),
                                         half_log_prob(capped[j] * inv_t, max_student, log_z_student), beta);
  };
  double divergence;
  if (grad == nullptr) {
    divergence = column_sum(n, [&](int j) { return column_terms(j).value; });
  } else {
    // C = sum_j qg_j, needed before the gradient (forward_kl: -1, no pass); D comes with the gradient.
    const double c_sum =
        kDivergence == kForwardKL ? -1.0 : column_sum(n, [&](int j) { return column_terms(j).q_grad; });
    const float eps = params.label_smoothing;
    const GradientScales scales{soft_scale * inv_t, float(c_sum), params.hard_weight, 1.0f - eps,
                                eps / float(n)};
    const int label_column = hard ? int(label) : -1;  // 32-bit, so that the compare vectorizes
    const float inv_softcap = params.softcap > 0.0f ? 1.0f / params.softcap : 0.0f;
    divergence = column_sum(n, [&](int j) {
      const DivergenceTerms terms = column_terms(j);
      grad[j] = from_float<Grad>(student_gradient(scales, terms.q_grad, student_prob(j), exp_hard[j] * inv_z_hard,
                                                     j == label_column, softcap_slope(capped[j], inv_softcap)));
      return terms.value;
    });
  }
  store_row_loss(params, row, row_parts(soft_scale, divergence, params.hard_weight, cross_entropy));
}

template <class Student, class Teacher, int kDivergence>
void distillation_loss_rows(const DistillationParams& params) {
  const int64_t scratch_rows = params.hard_weight > 0.0f ? 5 : 4;
#pragma omp parallel
  {
    std::vector<float> scratch(size_t(scratch_rows * params.n_cols));
#pragma omp for schedule(static)
    for (int64_t row = 0; row < params.n_rows; ++row)
      distillation_loss_row<Student, Teacher, kDivergence>(params, row, scratch.data());
  }
}

}  // namespace

void distillation_loss_forward_cpu(const DistillationParams& params) {
  if (params.n_cols > INT_MAX) {
    throw std::invalid_argument("tsa_fast: at most " + std::to_string(INT_MAX) + " columns, got " +
                                std::to_string(params.n_cols));
  }
  dispatch_dtype(params.student_dtype, [&](auto student) {
    dispatch_dtype(params.teacher_dtype, [&](auto teacher) {
      dispatch_divergence(params.divergence, [&](auto divergence) {
        using Student = typename decltype(student)::type;
        using Teacher = typename decltype(teacher)::type;
        distillation_loss_rows<Student, Teacher, decltype(divergence)::value>(params);
      });
    });
  });
}

}  // namespace tsa_fast
