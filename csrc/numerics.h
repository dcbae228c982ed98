// numerics.h: what every kernel of tsa_fast._C shares: the dtype codes of the Python side, bit casts,
// fp16/bf16 storage types with their conversions to and from fp32, a vectorizable e^x for the CPU, and
// the dispatch from a runtime dtype code to a template argument. Host and device under nvcc.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>

// Per-element functions: host and device under nvcc; always inlined by the C++ compiler, so that the CPU
// kernels' loops vectorize whatever the inlining budget of the function around them.
#ifdef __CUDACC__
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#define TSA_HOST_DEVICE __host__ __device__
#elif defined(__GNUC__)
#define TSA_HOST_DEVICE __attribute__((always_inline))
#else
#define TSA_HOST_DEVICE
#endif

// Runtime ISA dispatch for CPU kernels (GCC on x86-64 Linux): a function marked TSA_CPU_CLONES is compiled
// for x86-64-v4 (AVX-512), x86-64-v3 (AVX2, FMA) and baseline x86-64, and the dynamic loader picks the best
// the CPU runs (ifunc). Helpers marked TSA_ALWAYS_INLINE are inlined into it, so compiled for each.
// TSA_FAST_NATIVE builds (-march=native) need no clones.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__GLIBC__) && !defined(TSA_FAST_NATIVE)
#define TSA_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define TSA_CPU_CLONES
#endif
#define TSA_ALWAYS_INLINE inline __attribute__((always_inline))

namespace tsa_fast {

enum DTypeCode : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// ---- Bit casts and 16-bit floats ---------------------------------------------------------------------

TSA_HOST_DEVICE inline uint32_t float_bits(float x) {
#ifdef __CUDA_ARCH__
  return __float_as_uint(x);
#else
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  return bits;
#endif
}

TSA_HOST_DEVICE inline float bits_float(uint32_t bits) {
#ifdef __CUDA_ARCH__
  return __uint_as_float(bits);
#else
  float x;
  std::memcpy(&x, &bits, sizeof x);
  return x;
#endif
}

struct Half {  // IEEE binary16, as stored
  uint16_t bits;
};
struct BFloat16 {  // bfloat16, as stored
  uint16_t bits;
};

TSA_HOST_DEVICE inline float to_float(float x) { return x; }

TSA_HOST_DEVICE inline float to_float(BFloat16 x) { return bits_float(uint32_t(x.bits) << 16); }

TSA_HOST_DEVICE inline float to_float(Half x) {
#ifdef __CUDA_ARCH__
  return __half2float(__ushort_as_half(x.bits));
#else
  // Move exponent and mantissa into place and rebias the exponent (15 -> 127). Inf/nan need the largest
  // exponent; subnormals are rebuilt as (2^-14 + m 2^-24) - 2^-14 (F. Giesen's half_to_float_fast).
  const uint32_t sign = uint32_t(x.bits & 0x8000u) << 16;
  const uint32_t shifted = uint32_t(x.bits & 0x7fffu) << 13;
  const uint32_t exponent = shifted & 0x0f800000u;
  const uint32_t normal = shifted + (112u << 23);
  const uint32_t inf_nan = normal + (112u << 23);
  const uint32_t subnormal = float_bits(bits_float(normal + (1u << 23)) - bits_float(113u << 23));
  const uint32_t magnitude = exponent == 0x0f800000u ? inf_nan : (exponent == 0 ? subnormal : normal);
  return bits_float(magnitude | sign);
#endif
}

// float -> T, rounding to nearest even.
template <class T>
TSA_HOST_DEVICE inline T from_float(float x);

template <>
TSA_HOST_DEVICE inline float from_float<float>(float x) {
  return x;
}

template <>
TSA_HOST_DEVICE inline BFloat16 from_float<BFloat16>(float x) {
#ifdef __CUDA_ARCH__
  return {__bfloat16_as_ushort(__float2bfloat16_rn(x))};
#else
  // Add half an ulp of bf16 (less one when the kept mantissa is even) and truncate; nan stays a quiet nan.
  const uint32_t bits = float_bits(x);
  const uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
  return {uint16_t(x != x ? (bits >> 16) | 0x40u : rounded)};
#endif
}

template <>
TSA_HOST_DEVICE inline Half from_float<Half>(float x) {
#ifdef __CUDA_ARCH__
  return {__half_as_ushort(__float2half_rn(x))};
#else
  // F. Giesen's float_to_half_fast3_rtne, branch-free.
  const uint32_t bits = float_bits(x);
  const uint32_t sign = (bits >> 16) & 0x8000u;
  const uint32_t magnitude = bits & 0x7fffffffu;
  // |x| >= 2^16 (or inf/nan): inf, or a quiet nan.
  const uint32_t overflow = magnitude > 0x7f800000u ? 0x7e00u : 0x7c00u;
  // |x| < 2^-14 (subnormal half): adding 0.5, whose ulp is 2^-24, makes the FPU round at the right bit.
  const uint32_t subnormal = float_bits(bits_float(magnitude) + 0.5f) - 0x3f000000u;
  // Normal: rebias the exponent (127 -> 15), add half an ulp (less one when the kept mantissa is even),
  // truncate; a carry into the exponent is the correct rounding (up to inf above 65504).
  const uint32_t normal = (magnitude - (112u << 23) + 0xfffu + ((magnitude >> 13) & 1u)) >> 13;
  const uint32_t half = magnitude >= 0x47800000u ? overflow : (magnitude < 0x38800000u ? subnormal : normal);
  return {uint16_t(half | sign)};
#endif
}

// ---- exp, a log(a / b) ------------------------------------------------------------------------------

// e^x in fp32 (CUDA: expf). Host: within 1 ulp on [-87.3, 88.3]: x = n ln2 + r with |r| <= ln2 / 2
// (Cody-Waite split of ln2), e^r by Cephes' expf polynomial, 2^n built in the exponent bits. Returns 0
// below -87.34 (subnormal results) and for -inf, +inf above 88.3, nan for nan. Branch-free, so GCC
// vectorizes the loops that call it.
TSA_HOST_DEVICE inline float fast_exp(float x) {
#ifdef __CUDA_ARCH__
  return expf(x);
#else
  constexpr float kLowest = -87.3365f, kHighest = 88.3f;
  const bool below = x < kLowest, above = x > kHighest;  // both false for nan, which flows through
  const float clamped = below ? kLowest : (above ? kHighest : x);
  // n = round(x / ln2): adding 1.5 * 2^23 rounds to an integer and leaves n in the low mantissa bits.
  constexpr float kRoundToInt = 12582912.0f;
  const float shifted = clamped * 1.44269504088896341f + kRoundToInt;
  const float n = shifted - kRoundToInt;
  const float r = (clamped - n * 0.693359375f) - n * -2.12194440e-4f;
  float poly = 1.9875691500e-4f;
  poly = poly * r + 1.3981999507e-3f;
  poly = poly * r + 8.3334519073e-3f;
  poly = poly * r + 4.1665795894e-2f;
  poly = poly * r + 1.6666665459e-1f;
  poly = poly * r + 5.0000001201e-1f;
  const float exp_r = poly * r * r + r + 1.0f;
  const uint32_t two_n = (float_bits(shifted) - float_bits(kRoundToInt) + 127u) << 23;
  return below ? 0.0f : (above ? INFINITY : exp_r * bits_float(two_n));
#endif
}

// Half a log-softmax entry, (x - max - log Z) / 2, as (x/2 - max/2) - log Z/2: for x near the fp32 limit
// (+-3.4e38) x - max and log-probabilities pass fp32's range (-6e38) where their ratio to another model's
// still gives a finite q log(q / p). Halving is exact, so elsewhere this is exactly half the log-probability.
TSA_HOST_DEVICE inline float half_log_prob(float x, float max, float log_z) {
  return (0.5f * x - 0.5f * max) - 0.5f * log_z;
}

// a log(a / b) (and half of it) from half_log_a = log(a) / 2 and half_log_b = log(b) / 2 (half_log_prob),
// finite wherever the result is; 0 log 0 = 0 (a masked key or a -inf logit: a = 0, log a = -inf); nan for a nan a (a nan or +inf
// logit, a row of only -inf).
TSA_HOST_DEVICE inline float half_xlog_ratio(float a, float half_log_a, float half_log_b) {
  return a != 0.0f ? a * (half_log_a - half_log_b) : 0.0f;  // a log(a / b) / 2
}

TSA_HOST_DEVICE inline float xlog_ratio(float a, float half_log_a, float half_log_b) {
  return 2.0f * half_xlog_ratio(a, half_log_a, half_log_b);
}

// log x in fp32 (CUDA: logf). Host: within 1 ulp for normal x > 0: x = m 2^e with m in [sqrt(1/2), sqrt(2)),
// log m by Cephes' logf polynomial, e ln2 added in two parts; -inf for 0, +inf for inf, nan for negative or
// nan x (subnormal x, which the callers never pass, read as 0). Branch-free, so the loops that call it
// vectorize (a libm logf call would not).
TSA_HOST_DEVICE inline float fast_log(float x) {
#ifdef __CUDA_ARCH__
  return logf(x);
#else
  const uint32_t bits = float_bits(x);
  const bool low = (bits & 0x007fffffu) < 0x003504f3u;  // mantissa below sqrt(2): m in [1, sqrt 2), else halved
  const float m = bits_float((bits & 0x007fffffu) | (low ? 0x3f800000u : 0x3f000000u)) - 1.0f;
  const float e = float(int((bits >> 23) & 0xffu) - (low ? 127 : 126));
  const float z = m * m;
  float poly = 7.0376836292e-2f;
  poly = poly * m - 1.1514610310e-1f;
  poly = poly * m + 1.1676998740e-1f;
  poly = poly * m - 1.2420140846e-1f;
  poly = poly * m + 1.4249322787e-1f;
  poly = poly * m - 1.6668057665e-1f;
  poly = poly * m + 2.0000714765e-1f;
  poly = poly * m - 2.4999993993e-1f;
  poly = poly * m + 3.3333331174e-1f;
  const float y = poly * m * z + e * -2.12194440e-4f - 0.5f * z;
  const float log = m + y + e * 0.693359375f;
  const bool normal = x >= 1.17549435e-38f && x < INFINITY;  // false for nan
  return normal ? log : (x == 0.0f ? -INFINITY : (x == INFINITY ? INFINITY : NAN));
#endif
}

// log(1 + x) and e^x - 1 in fp32 to a few ulps where 1 + x and e^x round to near 1 (CUDA: log1pf, expm1f).
// Host: log1p by Kahan's quotient, in which the rounding of u = 1 + x cancels; expm1 by its Taylor series to
// x^8 / 8! for |x| < 1/2 (truncation below 1e-8 relative), e^x - 1 above, where it does not cancel.
// Branch-free (fast_log, fast_exp), so the loops that call them vectorize.
TSA_HOST_DEVICE inline float accurate_log1p(float x) {
#ifdef __CUDA_ARCH__
  return log1pf(x);
#else
  const float u = 1.0f + x;
  return u == 1.0f ? x : fast_log(u) * (x / (u - 1.0f));
#endif
}

TSA_HOST_DEVICE inline float accurate_expm1(float x) {
#ifdef __CUDA_ARCH__
  return expm1f(x);
#else
  float poly = 1.0f / 40320.0f;
  poly = poly * x + 1.0f / 5040.0f;
  poly = poly * x + 1.0f / 720.0f;
  poly = poly * x + 1.0f / 120.0f;
  poly = poly * x + 1.0f / 24.0f;
  poly = poly * x + 1.0f / 6.0f;
  poly = poly * x + 0.5f;
  const float small = (poly * x) * x + x;
  return fabsf(x) < 0.5f ? small : fast_exp(x) - 1.0f;
#endif
}

// ---- Dispatch from a runtime dtype code to a template argument (host) --------------------------------

template <class T>
struct TypeTag {
  using type = T;
};

// f(TypeTag<float | Half | BFloat16>{}) for a DTypeCode.
template <class F>
void dispatch_dtype(int code, F&& f) {
  switch (code) {
    case kFloat32: return f(TypeTag<float>{});
    case kFloat16: return f(TypeTag<Half>{});
    case kBFloat16: return f(TypeTag<BFloat16>{});
  }
  throw std::invalid_argument("tsa_fast: unknown dtype code " + std::to_string(code) +
                              " (0: float32, 1: float16, 2: bfloat16)");
}

}  // namespace tsa_fast
