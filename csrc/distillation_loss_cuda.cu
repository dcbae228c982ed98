// distillation_loss_cuda.cu: the CUDA kernel of the fused distillation loss (contract and math:
// distillation_loss.h). Per row r: loss[r] and, when grad is non-null, grad[r, :K]; launched
// asynchronously on the caller's stream.
//
// Parallel decomposition: one block of kThreads threads per row; thread i walks columns i, i + kThreads, ...
// (coalesced loads, any K, any alignment). Passes over the row:
//   1. online (max, sum of exp) of s = c(z_s)/T, of t = c(z_t)/T and, with a hard term, of c(z_s) (T = 1)
//      with sum_j c(z_s_j); merged across the block (warp shuffles and shared memory, cub::BlockReduce);
//      all sums are doubles, as on the CPU;
//   2. with a gradient, for divergences other than forward_kl (C = -1): C = sum_j qg_j;
//   3. D, and the gradient when requested.
// Rows are not staged in shared memory (a 32k-vocabulary fp32 row pair is 256 KiB): each pass rereads the
// logits (from L2 when it holds them). Memory traffic per row: K * (student + teacher bytes) read twice
// (three times with pass 2), K * student bytes of gradient and 4 bytes of loss (8 more with the parts)
// written. Ignored rows read nothing and write zeros.
#include <cuda_runtime.h>

#include <climits>
#include <cub/block/block_reduce.cuh>
#include <stdexcept>
#include <string>

#include "distillation_loss.h"

namespace tsa_fast {
namespace {

constexpr int kThreads = 256;

// Running max and sum_i exp(x_i - max) over a set of values; -inf values add nothing. The sum is a double:
// in a row dominated by a few columns, a float sum would lose the small terms' digits.
struct MaxSum {
  float max;
  double sum;

  __device__ static MaxSum empty() { return {-INFINITY, 0.0}; }

  __device__ void add(float x) {
    if (x > max) {  // rescale the sum to the new max (exp(-inf) = 0 for the first value)
      sum = sum * expf(max - x) + 1.0;
      max = x;
    } else if (x != -INFINITY) {
      sum += expf(x - max);
    }
  }

  // log sum_i exp(x_i - max): log-probabilities are (x - max) - log_sum(), exact near the max.
  __device__ float log_sum() const { return float(log(sum)); }
};

__device__ MaxSum merge(const MaxSum& a, const MaxSum& b) {
  const float max = fmaxf(a.max, b.max);
  if (max == -INFINITY) return MaxSum::empty();
  return {max, a.sum * expf(a.max - max) + b.sum * expf(b.max - max)};
}

// What pass 1 gathers about a row.
struct RowStats {
  MaxSum student;    // s = c(z_s) / T
  MaxSum teacher;    // t = c(z_t) / T
  MaxSum hard;       // c(z_s), with a hard term
  double capped_sum;  // sum_j c(z_s_j), with a hard term
};

struct MergeRowStats {
  __device__ RowStats operator()(const RowStats& a, const RowStats& b) const {
    return {merge(a.student, b.student), merge(a.teacher, b.teacher), merge(a.hard, b.hard),
            a.capped_sum + b.capped_sum};
  }
};

struct Sum {
  __device__ double operator()(double a, double b) const { return a + b; }
};

// Reduces one value per thread with `combine`; every thread gets the result. The closing barrier also
// makes the shared storage reusable by the next call with the same T and Combine.
template <class T, class Combine>
__device__ T block_all_reduce(const T& value, Combine combine) {
  using BlockReduce = cub::BlockReduce<T, kThreads>;
  __shared__ typename BlockReduce::TempStorage storage;
  __shared__ T result;
  const T reduced = BlockReduce(storage).Reduce(value, combine);
  if (threadIdx.x == 0) result = reduced;
  __syncthreads();
  return result;
}

template <class Student, class Teacher, int kDivergence>
__global__ void __launch_bounds__(kThreads) distillation_loss_kernel(const DistillationParams params) {
  const int64_t row = blockIdx.x;
  const int64_t n = params.n_cols;
  using Grad = GradStorage<Student>;
  Grad* grad = params.grad == nullptr ? nullptr : static_cast<Grad*>(params.grad) + row * params.grad_row_stride;
  const int64_t label = params.labels == nullptr ? -1 : params.labels[row];
  if (params.labels != nullptr && label == params.ignore_index) {
    if (grad != nullptr) {
      for (int64_t j = threadIdx.x; j < n; j += kThreads) grad[j] = from_float<Grad>(0.0f);
    }
    if (threadIdx.x == 0) store_row_loss(params, row, RowParts{0.0, 0.0});
    return;
  }
  const auto* z_student = static_cast<const Student*>(params.student) + row * params.student_row_stride;
  const auto* z_teacher = static_cast<const Teacher*>(params.teacher) + row * params.teacher_row_stride;
  const RowTemperature temperature = row_temperature(params, row);
  const float inv_t = temperature.inv_t, soft_scale = temperature.soft_scale;
  const float softcap = params.softcap;
  const float inv_softcap = softcap > 0.0f ? 1.0f / softcap : 0.0f;
  const bool hard = params.hard_weight > 0.0f;
  const auto capped = [&](float z) { return softcap > 0.0f ? softcapped(z, softcap, inv_softcap) : z; };

  // Pass 1: softmax statistics.
  RowStats stats{MaxSum::empty(), MaxSum::empty(), MaxSum::empty(), 0.0};
  for (int64_t j = threadIdx.x; j < n; j += kThreads) {
    const float capped_student = capped(to_float(z_student[j]));
    stats.student.add(capped_student * inv_t);
    stats.teacher.add(capped(to_float(z_teacher[j])) * inv_t);
    if (hard) {
      stats.hard.add(capped_student);
      stats.capped_sum += capped_student;
    }
  }
  stats = block_all_reduce(stats, MergeRowStats{});
  const float log_sum_student = stats.student.log_sum();
  const float log_sum_teacher = stats.teacher.log_sum();
  const float log_sum_hard = stats.hard.log_sum();

  // Column j: c(z_s_j), q_j and its divergence terms (passes 2 and 3 recompute them from the logits).
  struct Column {
    float capped_student;
    float q;
    DivergenceTerms terms;
  };
  const auto column = [&](int64_t j) {
    const float capped_student = capped(to_float(z_student[j]));
    const float half_log_q = half_log_prob(capped_student * inv_t, stats.student.max, log_sum_student);
    const float half_log_p = half_log_prob(capped(to_float(z_teacher[j])) * inv_t, stats.teacher.max, log_sum_teacher);
    const float q = expf(2.0f * half_log_q);
    return Column{capped_student, q,
                  divergence_terms<kDivergence>(expf(2.0f * half_log_p), half_log_p, q, half_log_q, params.beta)};
  };

  // Pass 2 (gradient, divergences other than forward_kl): C = sum_j qg_j, needed before the gradient.
  double c_sum = -1.0;  // forward_kl: C = -sum_j p_j
  if (grad != nullptr && kDivergence != kForwardKL) {
    double partial = 0.0;
    for (int64_t j = threadIdx.x; j < n; j += kThreads) partial += column(j).terms.q_grad;
    c_sum = block_all_reduce(partial, Sum{});
  }

  // Pass 3: D, and the gradient.
  const float eps = params.label_smoothing;
  const GradientScales scales{soft_scale * inv_t, float(c_sum), params.hard_weight, 1.0f - eps,
                              eps / float(n)};
  double partial = 0.0;
  for (int64_t j = threadIdx.x; j < n; j += kThreads) {
    const Column c = column(j);
    partial += c.terms.value;
    if (grad != nullptr) {
      const float q1 = hard ? expf((c.capped_student - stats.hard.max) - log_sum_hard) : 0.0f;
      const float g = student_gradient(scales, c.terms.q_grad, c.q, q1, j == label,
                                       softcap_slope(c.capped_student, inv_softcap));
      grad[j] = from_float<Grad>(g);
    }
  }
  const double divergence = block_all_reduce(partial, Sum{});

  if (threadIdx.x == 0) {
    const double cross_entropy =
        hard ? smoothed_cross_entropy(double(stats.hard.max) + log(stats.hard.sum), capped(to_float(z_student[label])),
                                      stats.capped_sum / double(n), params.label_smoothing)
             : 0.0;
    store_row_loss(params, row, row_parts(soft_scale, divergence, params.hard_weight, cross_entropy));
  }
}

}  // namespace

void distillation_loss_forward_cuda(const DistillationParams& params, std::uintptr_t stream) {
  if (params.n_rows > INT_MAX) {
    throw std::invalid_argument("tsa_fast: at most " + std::to_string(INT_MAX) + " rows per CUDA launch, got " +
                                std::to_string(params.n_rows));
  }
  dispatch_dtype(params.student_dtype, [&](auto student) {
    dispatch_dtype(params.teacher_dtype, [&](auto teacher) {
      dispatch_divergence(params.divergence, [&](auto divergence) {
        using Student = typename decltype(student)::type;
        using Teacher = typename decltype(teacher)::type;
        if (params.n_rows == 0) return;  // (after the dispatch, which rejects unknown codes)
        distillation_loss_kernel<Student, Teacher, decltype(divergence)::value>
            <<<unsigned(params.n_rows), kThreads, 0, reinterpret_cast<cudaStream_t>(stream)>>>(params);
      });
    });
  });
  const cudaError_t error = cudaGetLastError();
  if (error != cudaSuccess) {
    throw std::runtime_error(std::string("tsa_fast: distillation loss CUDA kernel failed: ") +
                             cudaGetErrorString(error));
  }
}

}  // namespace tsa_fast
