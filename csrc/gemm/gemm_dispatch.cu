// linear_act: whether a kernel takes the params, and the choice between the Hopper kernel
// (sm90/linear_act_sm90_*.cu) and the portable mma.sync one (instances/linear_act_sm80_*.cu), one instance per
// dtype each.
#include <cstdlib>
#include <cstring>

#include "common/host/launch.h"
#include "common/host/static_switch.h"
#include "gemm/gemm.h"

namespace fusedkernels::gemm {

template <typename T>
bool linear_act_sm90_available();
template <typename T>
cudaError_t launch_linear_act_sm90(const LinearActParams& p, cudaStream_t stream);
template <typename T>
int linear_act_sm90_split_k(const LinearActParams& p);
template <typename T>
bool linear_act_sm80_available();
template <typename T>
cudaError_t launch_linear_act_sm80(const LinearActParams& p, cudaStream_t stream);

namespace {

// 16-byte aligned rows a multiple of 16 bytes apart: what the copy engine and cp.async read and write, and
// what the epilogues move 16 bytes at a time.
bool vector_rows(const void* base, int64_t row_stride) { return is_aligned(base, 16) && row_stride % 8 == 0; }

// FUSEDKERNELS_GEMM_KERNEL=portable keeps the mma.sync kernel on Hopper too (tests and benchmarks of that
// path); read per call, so a test can set it in-process.
bool portable_kernel_forced() {
  const char* choice = std::getenv("FUSEDKERNELS_GEMM_KERNEL");
  return choice != nullptr && std::strcmp(choice, "portable") == 0;
}

template <typename T>
bool use_sm90() {
  return !portable_kernel_forced() && linear_act_sm90_available<T>();
}

template <typename Fn>
decltype(auto) with_type(DType dtype, Fn&& fn) {
  return type_switch<DType::kFloat16, DType::kBFloat16>(dtype, std::forward<Fn>(fn));
}

}  // namespace

bool linear_act_supported(const LinearActParams& p) {
  if (p.dtype != DType::kFloat16 && p.dtype != DType::kBFloat16) return false;
  if (p.k == 0 || p.k % 8 != 0 || p.n % 8 != 0) return false;
  if (!vector_rows(p.x, p.x_row_stride) || !vector_rows(p.weight, p.weight_row_stride) ||
      !vector_rows(p.out, p.out_row_stride) ||
      (p.pre_activation != nullptr && !vector_rows(p.pre_activation, p.pre_activation_row_stride)) ||
      (p.residual != nullptr && !vector_rows(p.residual, p.residual_row_stride)) ||
      (p.bias != nullptr && !is_aligned(p.bias, 16))) {
    return false;
  }
  if (p.gated_grad || p.act_grad) {  // the Hopper kernel's epilogues only, without bias or gate
    return p.bias == nullptr && !p.gated && !(p.gated_grad && p.act_grad) && p.residual != nullptr &&
           (!p.act_grad || p.activation != Activation::kNone) &&
           with_type(p.dtype, [&]<typename T>() { return use_sm90<T>(); });
  }
  return with_type(p.dtype, [&]<typename T>() { return use_sm90<T>() || linear_act_sm80_available<T>(); });
}

int linear_act_split_k(const LinearActParams& p) {
  return with_type(p.dtype, [&]<typename T>() { return use_sm90<T>() ? linear_act_sm90_split_k<T>(p) : 1; });
}

cudaError_t linear_act(const LinearActParams& p, cudaStream_t stream) {
  return with_type(p.dtype, [&]<typename T>() {
    return use_sm90<T>() ? launch_linear_act_sm90<T>(p, stream) : launch_linear_act_sm80<T>(p, stream);
  });
}

}  // namespace fusedkernels::gemm
