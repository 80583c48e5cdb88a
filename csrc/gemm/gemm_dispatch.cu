// linear_act: whether a kernel takes the params, and the dtype switch onto the Hopper kernel's instances
// (sm90/linear_act_sm90_*.cu).
#include "common/host/launch.h"
#include "gemm/gemm.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace fusedkernels::gemm {

template <typename T>
bool linear_act_sm90_available();
template <typename T>
cudaError_t launch_linear_act_sm90(const LinearActParams& p, cudaStream_t stream);

namespace {

// What the copy engine reads: 16-byte aligned rows a multiple of 16 bytes apart.
bool tma_rows(const void* base, int64_t row_stride) { return is_aligned(base, 16) && row_stride % 8 == 0; }

}  // namespace

bool linear_act_supported(const LinearActParams& p) {
  if (p.dtype != DType::kFloat16 && p.dtype != DType::kBFloat16) return false;
  if (p.k == 0 || p.k % 8 != 0 || p.n % 8 != 0) return false;
  if (!tma_rows(p.x, p.x_row_stride) || !tma_rows(p.weight, p.weight_row_stride)) return false;
  // the epilogue stores out and pre_activation, and loads the residual, through the copy engine too
  if (!tma_rows(p.out, p.out_row_stride) ||
      (p.pre_activation != nullptr && !tma_rows(p.pre_activation, p.pre_activation_row_stride)) ||
      (p.residual != nullptr && !tma_rows(p.residual, p.residual_row_stride))) {
    return false;
  }
  if (p.bias != nullptr && !is_aligned(p.bias, 4)) return false;
  return p.dtype == DType::kBFloat16 ? linear_act_sm90_available<__nv_bfloat16>() : linear_act_sm90_available<__half>();
}

cudaError_t linear_act(const LinearActParams& p, cudaStream_t stream) {
  return p.dtype == DType::kBFloat16 ? launch_linear_act_sm90<__nv_bfloat16>(p, stream)
                                     : launch_linear_act_sm90<__half>(p, stream);
}

}  // namespace fusedkernels::gemm
