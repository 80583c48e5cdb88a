// The gated linear unit's backward in one pass: for z = gate | up (the GEMM's saved pre-activation) and the
// output's gradient dy, dz = (dy * up * act'(gate)) | (dy * act(gate)), in fp32 from the 16-bit inputs, one
// rounding per element. The same formula in PyTorch ops takes five passes over the data (a product, act's
// backward, act itself, a product, a concatenation); this reads dy and z once and writes dz once.
#include "common/device/vec.cuh"
#include "common/host/launch.h"
#include "common/host/static_switch.h"
#include "gemm/activation.cuh"
#include "gemm/gemm.h"

namespace fusedkernels::gemm {
namespace {

template <typename T, Activation kAct>
__global__ void gated_backward_kernel(const GatedBackwardParams p) {
  constexpr int kVec = kVec16<T>;
  const int64_t vectors_per_row = p.n / kVec, total = p.rows * vectors_per_row;
  const T* dy = static_cast<const T*>(p.dy);
  const T* z = static_cast<const T*>(p.z);
  T* dz = static_cast<T*>(p.dz);
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t row = i / vectors_per_row, col = (i - row * vectors_per_row) * kVec;
    Vec<T, kVec> d, gate, up, dgate, dup;
    d.load(dy + row * p.dy_row_stride + col);
    gate.load(z + row * p.z_row_stride + col);
    up.load(z + row * p.z_row_stride + p.n + col);
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      float act, slope;
      activation_and_slope<kAct>(gate.get(j), act, slope);
      const float g = d.get(j);
      // relu: a select, as torch's threshold_backward
      dgate.set(j, kAct == Activation::kRelu ? (slope != 0.0f ? g * up.get(j) : 0.0f) : g * up.get(j) * slope);
      dup.set(j, g * act);
    }
    T* out = dz + row * 2 * p.n;
    dgate.store(out + col);
    dup.store(out + p.n + col);
  }
}

}  // namespace

bool gated_backward_supported(const GatedBackwardParams& p) {
  const auto aligned = [](const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; };
  return (p.dtype == DType::kFloat16 || p.dtype == DType::kBFloat16) && p.n % 8 == 0 &&
         p.dy_row_stride % 8 == 0 && p.z_row_stride % 8 == 0 && aligned(p.dy) && aligned(p.z) && aligned(p.dz) &&
         (p.activation == Activation::kSilu || p.activation == Activation::kGelu ||
          p.activation == Activation::kGeluTanh || p.activation == Activation::kRelu);
}

cudaError_t gated_backward(const GatedBackwardParams& p, cudaStream_t stream) {
  if (p.rows == 0 || p.n == 0) return cudaSuccess;
  constexpr int kThreads = 256;
  const int64_t vectors = p.rows * (p.n / 8);
  const int64_t blocks = std::min<int64_t>(ceil_div(vectors, kThreads), int64_t(sm_count()) * 16);
  return type_switch<DType::kFloat16, DType::kBFloat16>(p.dtype, [&]<typename T>() {
    switch (p.activation) {
      case Activation::kSilu: gated_backward_kernel<T, Activation::kSilu><<<blocks, kThreads, 0, stream>>>(p); break;
      case Activation::kGelu: gated_backward_kernel<T, Activation::kGelu><<<blocks, kThreads, 0, stream>>>(p); break;
      case Activation::kGeluTanh:
        gated_backward_kernel<T, Activation::kGeluTanh><<<blocks, kThreads, 0, stream>>>(p);
        break;
      default: gated_backward_kernel<T, Activation::kRelu><<<blocks, kThreads, 0, stream>>>(p); break;
    }
    return cudaGetLastError();
  });
}

}  // namespace fusedkernels::gemm
