// fusedkernels::sm90_double: the arch-axis check (smoke.h). CUDA only.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "common/torch/checks.h"
#include "common/torch/ops.h"
#include "smoke/smoke.h"

TORCH_LIBRARY_FRAGMENT(fusedkernels, m) {
  // 2 * x through an sm_90a-only kernel; x: contiguous float32 CUDA tensor, numel a multiple of 4.
  m.def("sm90_double(Tensor x) -> Tensor");
}

namespace fusedkernels::smoke {
namespace {

at::Tensor sm90_double_cuda(const at::Tensor& x) {
  const char* op = "sm90_double";
  TORCH_CHECK_VALUE(x.is_cuda() && x.scalar_type() == at::kFloat && x.is_contiguous(), op,
                    ": x must be a contiguous float32 CUDA tensor");
  TORCH_CHECK_VALUE(x.numel() % 4 == 0 && is_aligned_16(x), op, ": x must hold a multiple of 4 floats, 16-byte aligned");
  const c10::cuda::CUDAGuard guard(x.device());
  TORCH_CHECK_NOT_IMPLEMENTED(sm90_double_available(), op, ": needs an sm_90 GPU and a build with sm_90a code ",
                              "(FUSEDKERNELS_CUDA_ARCHS including 90a)");
  at::Tensor y = at::empty_like(x);
  check_launch(sm90_double(x.data_ptr<float>(), y.data_ptr<float>(), x.numel(), c10::cuda::getCurrentCUDAStream()),
               op);
  return y;
}

at::Tensor sm90_double_meta(const at::Tensor& x) { return at::empty_like(x); }

}  // namespace

TORCH_LIBRARY_IMPL(fusedkernels, CUDA, m) { m.impl("sm90_double", &sm90_double_cuda); }
TORCH_LIBRARY_IMPL(fusedkernels, Meta, m) { m.impl("sm90_double", &sm90_double_meta); }

}  // namespace fusedkernels::smoke
