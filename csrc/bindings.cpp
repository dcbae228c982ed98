// bindings.cpp: the pybind11 module tsa_fast._C. No torch here: Python passes raw data pointers
// (tensor.data_ptr()) as ints, row strides in elements and dtype codes (0 float32, 1 float16, 2 bfloat16);
// DistillationParams in distillation_loss.h is the contract. Unknown dtype or divergence codes raise
// ValueError (the dispatch throws std::invalid_argument), CUDA errors RuntimeError.
#include <pybind11/pybind11.h>

#include <cstdint>

#ifdef __linux__
#include <sys/mman.h>
#endif

#include "distillation_loss.h"

namespace py = pybind11;
using tsa_fast::DistillationParams;

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
            float beta, float inv_temperature, float soft_scale, float hard_weight, float label_smoothing,
            float softcap, int64_t ignore_index, Extra... extra) {
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
                                        soft_scale,
                                        hard_weight,
                                        label_smoothing,
                                        softcap,
                                        ignore_index};
        run(params, extra...);
      },
      doc, py::arg("student_ptr"), py::arg("student_dtype"), py::arg("student_row_stride"), py::arg("teacher_ptr"),
      py::arg("teacher_dtype"), py::arg("teacher_row_stride"), py::arg("labels_ptr"), py::arg("loss_ptr"),
      py::arg("grad_ptr"), py::arg("grad_row_stride"), py::arg("n_rows"), py::arg("n_cols"), py::arg("divergence"),
      py::arg("beta"), py::arg("inv_temperature"), py::arg("soft_scale"), py::arg("hard_weight"),
      py::arg("label_smoothing"), py::arg("softcap"), py::arg("ignore_index"), extra_args...);
}

void forward_cpu_without_gil(const DistillationParams& params) {
  py::gil_scoped_release no_gil;
  tsa_fast::distillation_loss_forward_cpu(params);
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
}
