// distillation_loss.h: the math of the fused distillation loss, shared by the CPU kernel
// (distillation_loss_cpu.cpp) and the CUDA kernel (distillation_loss_cuda.cu).
//
// Contract (DistillationParams): n_rows rows of student logits z_s and teacher logits z_t, each fp32, fp16
// or bf16 (independently), column stride 1, row strides in elements; only the first K = n_cols columns are
// read. Optional int64 labels (rows whose label is ignore_index are skipped: loss 0, zero parts, zero
// gradient row, logits not read; labels must otherwise be in [0, K), the caller checks). Written: loss[r] in
// fp32; when parts is non-null, the two terms of the loss below, which loss[r] sums, from the same pass:
// parts[r] = soft_scale * D and parts[n_rows + r] = hard_weight * CE (fp32); when grad is non-null,
// grad[r, :K] = d loss[r] / d z_s[r, :K] in GradStorage<student dtype>: fp32 for an fp16 student, else the
// student dtype.
//
// Math in fp32, row sums in double: c(z) = softcap * tanh(z / softcap) (identity without softcap),
// q = softmax(c(z_s) / T), p = softmax(c(z_t) / T) (T one number, or one per row: RowTemperature),
// loss = soft_scale * D(p, q) + hard_weight * CE(softmax(c(z_s)), label); a term of weight 0 adds nothing.
// With qg_j = q_j dD/dq_j and C = sum_j qg_j, the softmax Jacobian gives dD/ds_j = qg_j - q_j C.
//
// Everything computed per column lives here, as TSA_HOST_DEVICE functions, so both kernels share one
// implementation of it; the kernels own only their loops and reductions.
#pragma once

#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "numerics.h"  // TSA_HOST_DEVICE, dtypes and their conversions, fast_exp, dispatch_dtype

namespace tsa_fast {

enum DivergenceCode : int { kForwardKL = 0, kReverseKL = 1, kSymmetricKL = 2, kJSD = 3, kTVD = 4 };

struct DistillationParams {
  const void* student;  // (n_rows, student_row_stride), student_dtype
  int student_dtype;
  int64_t student_row_stride;
  const void* teacher;  // (n_rows, teacher_row_stride), teacher_dtype
  int teacher_dtype;
  int64_t teacher_row_stride;
  const int64_t* labels;  // (n_rows,), or null: every row counts (then hard_weight must be 0)
  float* loss;            // (n_rows,) out
  float* parts;           // (2, n_rows) out: soft then hard part of each row, or null: not asked
  void* grad;             // (n_rows, grad_row_stride) out in GradStorage<student dtype>, or null: no gradient
  int64_t grad_row_stride;
  int64_t n_rows;
  int64_t n_cols;  // K
  int divergence;  // DivergenceCode
  float beta;      // jsd mixing weight
  float inv_temperature;     // 1 / T of every row, unless temperature is set
  const float* temperature;  // (n_rows,) T per row, or null
  float soft_scale;  // weight of D: with one T its T^2 included by the caller; with T per row see scale_by_t2
  bool scale_by_t2;  // with T per row: row r's D also times T_r^2
  float hard_weight;
  float label_smoothing;
  float softcap;  // 0: none
  int64_t ignore_index;
};

// The gradient's storage type: fp32 for an fp16 student, whose d(row loss)/dz is often below fp16's normal
// range at LLM vocabularies: stored in fp16 and then scaled by the incoming gradient (a loss scale), it would
// be rounded twice and often flushed to zero; the caller rounds the scaled product once. bf16 has fp32's range.
template <class Student>
using GradStorage = std::conditional_t<std::is_same_v<Student, Half>, float, Student>;

// The kernels (the CUDA one exists only in builds with TSA_FAST_WITH_CUDA; stream is a cudaStream_t).
void distillation_loss_forward_cpu(const DistillationParams& params);
void distillation_loss_forward_cuda(const DistillationParams& params, std::uintptr_t stream);

// 1 / T and the weight of D for one row.
struct RowTemperature {
  float inv_t;
  float soft_scale;
};

TSA_HOST_DEVICE inline RowTemperature row_temperature(const DistillationParams& params, int64_t row) {
  if (params.temperature == nullptr) return {params.inv_temperature, params.soft_scale};
  const float t = params.temperature[row];
  return {1.0f / t, params.scale_by_t2 ? params.soft_scale * t * t : params.soft_scale};
}

// ---- tanh, softcap -----------------------------------------------------------------------------------

// tanh in fp32 (CUDA: tanhf). Host: Cephes' tanhf, branch-free: an odd polynomial for |x| < 0.625,
// 1 - 2 / (e^(2|x|) + 1) with the sign of x above.
TSA_HOST_DEVICE inline float fast_tanh(float x) {
#ifdef __CUDA_ARCH__
  return tanhf(x);
#else
  const float x2 = x * x;
  float poly = -5.70498872745e-3f;
  poly = poly * x2 + 2.06390887954e-2f;
  poly = poly * x2 - 5.37397155531e-2f;
  poly = poly * x2 + 1.33314422036e-1f;
  poly = poly * x2 - 3.33332819422e-1f;
  const float small = poly * x2 * x + x;
  const uint32_t sign = float_bits(x) & 0x80000000u;
  const float magnitude = bits_float(float_bits(x) ^ sign);
  const float large = 1.0f - 2.0f / (fast_exp(2.0f * magnitude) + 1.0f);
  return magnitude < 0.625f ? small : bits_float(float_bits(large) | sign);
#endif
}

// c(z) = softcap * tanh(z / softcap).
TSA_HOST_DEVICE inline float softcapped(float z, float softcap, float inv_softcap) {
  return softcap * fast_tanh(z * inv_softcap);
}

// c'(z) = 1 - tanh^2(z / softcap), from the capped value c(z). inv_softcap = 0 (no softcap) gives 1, also
// for c(z) = -inf (a masked column), where capped * inv_softcap would be -inf * 0 = nan.
TSA_HOST_DEVICE inline float softcap_slope(float capped, float inv_softcap) {
  const float tanh = capped * inv_softcap;
  return inv_softcap > 0.0f ? 1.0f - tanh * tanh : 1.0f;
}

// ---- Divergences -------------------------------------------------------------------------------------

struct DivergenceTerms {
  float value;   // d_j: column j's share of D
  float q_grad;  // qg_j = q_j * dD/dq_j
};

// Column j's terms of D(p, q) for DivergenceCode kDivergence (p: teacher, q: student), from the probabilities
// and half their logs (half_log_prob: log-probabilities may pass fp32's range where the terms do not).
template <int kDivergence>
TSA_HOST_DEVICE inline DivergenceTerms divergence_terms(float p, float log_p, float q, float log_q, float beta) {
  if constexpr (kDivergence == kForwardKL) {  // KL(p || q)
    return {xlog_ratio(p, log_p, log_q), -p};
  } else if constexpr (kDivergence == kReverseKL) {  // KL(q || p)
    const float reverse = xlog_ratio(q, log_q, log_p);
    return {reverse, reverse + q};
  } else if constexpr (kDivergence == kSymmetricKL) {  // (KL(p || q) + KL(q || p)) / 2, halves summed
    const float half_reverse = half_xlog_ratio(q, log_q, log_p);
    return {half_xlog_ratio(p, log_p, log_q) + half_reverse, half_reverse + 0.5f * (q - p)};
  } else if constexpr (kDivergence == kJSD) {  // beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q
    // log(p/m) and log(q/m) from r = log(p/q), not as log p - log m: log m of the rounded p and q would
    // disagree with the log-probabilities where p ~ q ~ 1 (a peaked row). For the larger of p, q, say p:
    // m/p = 1 + (1 - beta) expm1(-r), so log(p/m) = -log1p((1 - beta) expm1(-r)); the smaller's log is that
    // minus |r|. A nan r takes the second branch (and stays nan).
    const float r = 2.0f * (log_p - log_q);
    const bool p_larger = r > 0.0f;
    const float log_larger_m =
        -accurate_log1p((p_larger ? 1.0f - beta : beta) * accurate_expm1(p_larger ? -r : r));
    const float log_pm = p_larger ? log_larger_m : log_larger_m + r;
    const float log_qm = p_larger ? log_larger_m - r : log_larger_m;
    const float student_part = q != 0.0f ? q * log_qm : 0.0f;
    const float teacher_part = p != 0.0f ? p * log_pm : 0.0f;
    return {beta * teacher_part + (1.0f - beta) * student_part, (1.0f - beta) * student_part};
  } else {  // kTVD: sum |p - q| / 2
    static_assert(kDivergence == kTVD, "unknown divergence");
    const float sign = float(q > p) - float(q < p) + 0.0f * p;  // nan for a nan p (0 * p)
    return {0.5f * fabsf(p - q), 0.5f * q * sign};
  }
}

// ---- Gradient and hard term --------------------------------------------------------------------------

// weight * value, where a weight of 0 contributes nothing, also for an infinite or nan value (not 0 * inf).
TSA_HOST_DEVICE inline float weighted(float weight, float value) { return weight != 0.0f ? weight * value : 0.0f; }

// Per-row constants of the gradient.
struct GradientScales {
  float soft;            // soft_scale / T
  float c_sum;           // C = sum_j qg_j
  float hard;            // hard_weight
  float label_weight;    // 1 - eps
  float uniform_weight;  // eps / K
};

// d loss / d z_s_j = (soft_scale/T (qg_j - q_j C) + hard_weight (q1_j - (1-eps)[j = y] - eps/K)) c'(z_s_j),
// with q1 = softmax(c(z_s)) at T = 1.
TSA_HOST_DEVICE inline float student_gradient(const GradientScales& scales, float q_grad, float q, float q1,
                                              bool is_label, float slope) {
  const float soft = weighted(scales.soft, q_grad - q * scales.c_sum);
  const float hard = weighted(scales.hard, q1 - (is_label ? scales.label_weight : 0.0f) - scales.uniform_weight);
  return (soft + hard) * slope;
}

// Cross-entropy with label smoothing eps at T = 1 from lse = logsumexp_j c_j:
// (1 - eps) (lse - c_y) + eps (lse - mean_j c_j); without smoothing a -inf logit is +inf only at the label.
// In double: lse - c passes fp32's range for logits near its limit.
TSA_HOST_DEVICE inline double smoothed_cross_entropy(double lse, double label_logit, double mean_logit, double eps) {
  return (1.0 - eps) * (lse - label_logit) + (eps != 0.0 ? eps * (lse - mean_logit) : 0.0);
}

// A row's loss as its two terms, in double until stored.
struct RowParts {
  double soft;  // soft_scale * D
  double hard;  // hard_weight * CE
};

// The parts from the terms; a term of weight 0 contributes nothing.
TSA_HOST_DEVICE inline RowParts row_parts(float soft_scale, double divergence, float hard_weight,
                                          double cross_entropy) {
  return {soft_scale != 0.0f ? soft_scale * divergence : 0.0,
          hard_weight != 0.0f ? hard_weight * cross_entropy : 0.0};
}

// Stores row r's loss (its parts summed, rounded once) and, when params.parts is set, each part.
TSA_HOST_DEVICE inline void store_row_loss(const DistillationParams& params, int64_t row,
                                           const RowParts& parts) {
  params.loss[row] = float(parts.soft + parts.hard);
  if (params.parts != nullptr) {
    params.parts[row] = float(parts.soft);
    params.parts[params.n_rows + row] = float(parts.hard);
  }
}

// ---- Dispatch from a runtime divergence code to a template argument (host) ---------------------------

// f(std::integral_constant<int, code>{}) for a DivergenceCode.
template <class F>
void dispatch_divergence(int code, F&& f) {
  switch (code) {
    case kForwardKL: return f(std::integral_constant<int, kForwardKL>{});
    case kReverseKL: return f(std::integral_constant<int, kReverseKL>{});
    case kSymmetricKL: return f(std::integral_constant<int, kSymmetricKL>{});
    case kJSD: return f(std::integral_constant<int, kJSD>{});
    case kTVD: return f(std::integral_constant<int, kTVD>{});
  }
  throw std::invalid_argument("tsa_fast: unknown divergence code " + std::to_string(code) +
                              " (0: forward_kl, 1: reverse_kl, 2: symmetric_kl, 3: jsd, 4: tvd)");
}

}  // namespace tsa_fast
