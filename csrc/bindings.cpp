// bindings.cpp: the pybind11 module tsa_fast._C. No torch here: Python passes raw data pointers
// (tensor.data_ptr()) as ints, strides in elements and dtype codes (0 float32, 1 float16, 2 bfloat16);
// DistillationParams (distillation_loss.h), AttentionTransferParams (attention_transfer_loss.h) and the
// cross-tokenizer kernels' LogitRows and ExactTerm (cross_tokenizer_loss.h) are the contracts. Unknown dtype or
// divergence codes raise ValueError (the dispatch throws std::invalid_argument), CUDA errors RuntimeError.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <tuple>

#ifdef __linux__
#include <sys/mman.h>
#endif

#include "attention_transfer_loss.h"
#include "cross_tokenizer_loss.h"
#include "distillation_loss.h"

namespace py = pybind11;
using tsa_fast::AttentionTransferParams;
using tsa_fast::DistillationParams;
using tsa_fast::HeadTensor;

namespace {

// Defines `name`(student_ptr, ..., ignore_index, extra...) calling run(params, extra...).
template <class... Extra, class... ExtraArgs>
void def_forward(py::module_& m, const char* name, const char* doc, void (*run)(const DistillationParams&, Extra...),
                 ExtraArgs... extra_args) {
  m.def(
      name,
      [run](std::uintptr_t student_ptr, int student_dtype, int64_t student_row_stride, std::uintptr_t teacher_ptr,
            int teacher_dtype, int64_t teacher_row_stride, std::uintptr_t labels_ptr, std::uintptr_t loss_ptr,
            std::uintptr_t grad_ptr, int64_t grad_row_stride, int64_t n_rows, int64_t n_cols, int divergence,
            float beta, float inv_temperature, std::uintptr_t temperature_ptr, float soft_scale, bool scale_by_t2,
            float hard_weight, float label_smoothing, float softcap, int64_t ignore_index, Extra... extra) {
        const DistillationParams params{reinterpret_cast<const void*>(student_ptr),
                                        student_dtype,
                                        student_row_stride,
                                        reinterpret_cast<const void*>(teacher_ptr),
                                        teacher_dtype,
                                        teacher_row_stride,
                                        reinterpret_cast<const int64_t*>(labels_ptr),
                                        reinterpret_cast<float*>(loss_ptr),
                                        reinterpret_cast<void*>(grad_ptr),
                                        grad_row_stride,
                                        n_rows,
                                        n_cols,
                                        divergence,
                                        beta,
                                        inv_temperature,
                                        reinterpret_cast<const float*>(temperature_ptr),
                                        soft_scale,
                                        scale_by_t2,
                                        hard_weight,
                                        label_smoothing,
                                        softcap,
                                        ignore_index};
        run(params, extra...);
      },
      doc, py::arg("student_ptr"), py::arg("student_dtype"), py::arg("student_row_stride"), py::arg("teacher_ptr"),
      py::arg("teacher_dtype"), py::arg("teacher_row_stride"), py::arg("labels_ptr"), py::arg("loss_ptr"),
      py::arg("grad_ptr"), py::arg("grad_row_stride"), py::arg("n_rows"), py::arg("n_cols"), py::arg("divergence"),
      py::arg("beta"), py::arg("inv_temperature"), py::arg("temperature_ptr"), py::arg("soft_scale"),
      py::arg("scale_by_t2"), py::arg("hard_weight"),
      py::arg("label_smoothing"), py::arg("softcap"), py::arg("ignore_index"), extra_args...);
}

void forward_cpu_without_gil(const DistillationParams& params) {
  py::gil_scoped_release no_gil;
  tsa_fast::distillation_loss_forward_cpu(params);
}

// A (B, H, N, D) tensor from Python: (data_ptr, dtype code, stride_b, stride_h, stride_n), unit D stride.
using HeadTuple = std::tuple<std::uintptr_t, int, int64_t, int64_t, int64_t>;

HeadTensor head_tensor(const HeadTuple& t) {
  return {reinterpret_cast<void*>(std::get<0>(t)), std::get<1>(t), std::get<2>(t), std::get<3>(t), std::get<4>(t)};
}

// Defines `name`(q_s, k_s, q_t, k_t, mask_ptr, ..., dq_s, dk_s) calling run(params) without the GIL. The
// forward and the backward take the same arguments; each reads or writes the ones the contract gives it
// (unused pointers may be 0).
void def_attention_transfer(py::module_& m, const char* name, const char* doc,
                            void (*run)(const AttentionTransferParams&)) {
  m.def(
      name,
      [run](HeadTuple q_s, HeadTuple k_s, HeadTuple q_t, HeadTuple k_t, std::uintptr_t mask_ptr, int64_t mask_stride_b,
            int64_t batch, int64_t heads, int64_t n_q, int64_t n_k, int64_t d_s, int64_t d_t, float scale_s,
            float scale_t, bool causal, std::uintptr_t kl_ptr, std::uintptr_t lse_s_ptr, std::uintptr_t lse_t_ptr,
            std::uintptr_t row_weights_ptr, HeadTuple dq_s, HeadTuple dk_s) {
        const AttentionTransferParams params{head_tensor(q_s),
                                             head_tensor(k_s),
                                             head_tensor(q_t),
                                             head_tensor(k_t),
                                             reinterpret_cast<const uint8_t*>(mask_ptr),
                                             mask_stride_b,
                                             batch,
                                             heads,
                                             n_q,
                                             n_k,
                                             d_s,
                                             d_t,
                                             scale_s,
                                             scale_t,
                                             causal,
                                             reinterpret_cast<float*>(kl_ptr),
                                             reinterpret_cast<float*>(lse_s_ptr),
                                             reinterpret_cast<float*>(lse_t_ptr),
                                             reinterpret_cast<const float*>(row_weights_ptr),
                                             head_tensor(dq_s),
                                             head_tensor(dk_s)};
        py::gil_scoped_release no_gil;
        run(params);
      },
      doc, py::arg("q_s"), py::arg("k_s"), py::arg("q_t"), py::arg("k_t"), py::arg("mask_ptr"),
      py::arg("mask_stride_b"), py::arg("batch"), py::arg("heads"), py::arg("n_q"), py::arg("n_k"), py::arg("d_s"),
      py::arg("d_t"), py::arg("scale_s"), py::arg("scale_t"), py::arg("causal"), py::arg("kl_ptr"),
      py::arg("lse_s_ptr"), py::arg("lse_t_ptr"), py::arg("row_weights_ptr"), py::arg("dq_s"), py::arg("dk_s"));
}

// (N, V) logits from Python: (data_ptr, dtype code, row stride, n_rows, n_cols), unit column stride.
using RowsTuple = std::tuple<std::uintptr_t, int, int64_t, int64_t, int64_t>;

tsa_fast::LogitRows logit_rows(const RowsTuple& t) {
  return {reinterpret_cast<const void*>(std::get<0>(t)), std::get<1>(t), std::get<2>(t), std::get<3>(t),
          std::get<4>(t)};
}

template <class T>
T* pointer(std::uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

void def_cross_tokenizer(py::module_& m) {
  m.def(
      "cross_tokenizer_statistics_cpu",
      [](RowsTuple logits, float inv_t, int64_t k, std::uintptr_t lse, std::uintptr_t lse_hard,
         std::uintptr_t top_values, std::uintptr_t top_indices) {
        py::gil_scoped_release no_gil;
        tsa_fast::cross_tokenizer_statistics_cpu(logit_rows(logits), inv_t, k, pointer<float>(lse),
                                                 pointer<float>(lse_hard), pointer<float>(top_values),
                                                 pointer<int64_t>(top_indices));
      },
      "Per row of host logits: log-sum-exp at T (and at 1), the top k logits and their columns.", py::arg("logits"),
      py::arg("inv_t"), py::arg("k"), py::arg("lse_ptr"), py::arg("lse_hard_ptr"), py::arg("top_values_ptr"),
      py::arg("top_indices_ptr"));
  m.def(
      "cross_tokenizer_gradient_cpu",
      [](RowsTuple student, float inv_t, std::uintptr_t lse, std::uintptr_t coefficient, std::uintptr_t lse_hard,
         std::uintptr_t coefficient_hard, std::uintptr_t grad, int64_t grad_row_stride, RowsTuple teacher,
         std::uintptr_t row_groups, std::uintptr_t teacher_rows, std::uintptr_t vocab_map, int64_t n_map,
         int divergence, float beta, float grad_scale, std::uintptr_t out) {
        const tsa_fast::ExactTerm exact{logit_rows(teacher),
                                        pointer<const int64_t>(row_groups),
                                        pointer<const int64_t>(teacher_rows),
                                        pointer<const int64_t>(vocab_map),
                                        n_map,
                                        divergence,
                                        beta,
                                        grad_scale,
                                        pointer<float>(out)};
        py::gil_scoped_release no_gil;
        tsa_fast::cross_tokenizer_gradient_cpu(logit_rows(student), inv_t, pointer<const float>(lse),
                                               pointer<const float>(coefficient), pointer<const float>(lse_hard),
                                               pointer<const float>(coefficient_hard), pointer<float>(grad),
                                               grad_row_stride, exact);
      },
      "Gradient rows = coefficient * softmax(z / T) (+ coefficient_hard * softmax(z)), fp32, and the groups' "
      "exact-match divergence with its gradient added (row_groups_ptr 0 or n_map 0: none), for host logits.",
      py::arg("student"), py::arg("inv_t"), py::arg("lse_ptr"), py::arg("coefficient_ptr"), py::arg("lse_hard_ptr"),
      py::arg("coefficient_hard_ptr"), py::arg("grad_ptr"), py::arg("grad_row_stride"), py::arg("teacher"),
      py::arg("row_groups_ptr"), py::arg("teacher_rows_ptr"), py::arg("vocab_map_ptr"), py::arg("n_map"),
      py::arg("divergence"), py::arg("beta"), py::arg("grad_scale"), py::arg("out_ptr"));
}

// Ask Linux to back the 2 MiB pages inside [ptr, ptr + nbytes) with transparent huge pages. Called on
// a fresh, untouched output buffer, it turns the first-touch page faults of the kernel's writes (one per
// 4 KiB: ~200 ms for a 512 MiB gradient) into one per 2 MiB. A no-op where unsupported.
void advise_huge_pages(std::uintptr_t ptr, std::size_t nbytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr std::uintptr_t kHugePage = std::uintptr_t(2) << 20;
  const std::uintptr_t begin = (ptr + kHugePage - 1) & ~(kHugePage - 1);
  const std::uintptr_t end = (ptr + nbytes) & ~(kHugePage - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)ptr;
  (void)nbytes;
#endif
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "tsa_fast kernels (C++ with OpenMP, and CUDA when built with it), called with raw pointers";
#ifdef TSA_FAST_WITH_CUDA
  m.attr("has_cuda") = true;
  def_forward(m, "distillation_loss_forward_cuda",
              "Per-row distillation losses (float32) and optionally their gradient, for CUDA device memory; "
              "launched asynchronously on `stream` (a cudaStream_t as int).",
              &tsa_fast::distillation_loss_forward_cuda, py::arg("stream"));
#else
  m.attr("has_cuda") = false;
#endif
  m.def("advise_huge_pages", &advise_huge_pages,
        "Back the untouched host buffer [ptr, ptr + nbytes) with transparent huge pages (Linux; else no-op).",
        py::arg("ptr"), py::arg("nbytes"));
  def_forward(m, "distillation_loss_forward_cpu",
              "Per-row distillation losses (float32) and optionally their gradient, for host memory.",
              &forward_cpu_without_gil);
  def_cross_tokenizer(m);
  def_attention_transfer(m, "attention_transfer_forward_cpu",
                         "Per-row KL(A_t || A_s), lse_s, lse_t (float32) of host tensors, without N x N maps.",
                         &tsa_fast::attention_transfer_forward_cpu);
  def_attention_transfer(m, "attention_transfer_backward_cpu",
                         "dq_s, dk_s of sum(row_weights * kl) for host tensors, recomputing the scores.",
                         &tsa_fast::attention_transfer_backward_cpu);
}
