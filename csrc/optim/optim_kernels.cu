// AdamW / Adam, SGD, grad norms and grad scaling over a TensorTable. Per element the arithmetic is
// fp32 whatever the storage types, and follows torch.optim's formulas operation for operation.
#include <algorithm>
#include <type_traits>

#include "common/device/reduce.cuh"
#include "optim/multi_tensor.cuh"

namespace fusedkernels::optim {
namespace {

// P: param storage, S: state storage, kHasMaster: fp32 master copies in the kMaster slot (P is then
// 16-bit).
template <typename P, typename S, bool kHasMaster>
__global__ void __launch_bounds__(kThreads) adam_kernel(const __grid_constant__ TensorTable t, const AdamParams p) {
  constexpr int N = kElemsFor<P, S, WeightType<P, kHasMaster>>;
  if (step_skipped(p.s)) return;
  const GradFactor gf = grad_factor(p.s);
  const float lr = p.s.lr_ptr ? *p.s.lr_ptr : p.s.lr;
  for_each_chunk(t, [&](int tensor, int64_t begin, int64_t end) {
    const float step = *t.step[tensor] + 1.f;
    const float step_size = lr / (1.f - powf(p.beta1, step));
    const float bc2_sqrt = sqrtf(1.f - powf(p.beta2, step));
    for_each_group<N>(t, tensor, begin, end, [&](int64_t i, int count, bool vec) {
      float g[N], w[N], m[N], v[N], vmax[N];
      load_group<P>(t.ptr[kGrad][tensor], i, count, vec, g);
      load_weights<P, kHasMaster>(t, tensor, i, count, vec, w);
      load_group<S>(t.ptr[kState0][tensor], i, count, vec, m);
      load_group<S>(t.ptr[kState1][tensor], i, count, vec, v);
      if (p.amsgrad) load_group<S>(t.ptr[kState2][tensor], i, count, vec, vmax);
      if (p.s.write_back_grad) write_back_unscaled<P>(t, tensor, i, count, vec, g, gf.unscale);
#pragma unroll
      for (int k = 0; k < N; ++k) {
        float grad = g[k] * gf.total;
        if (p.weight_decay != 0.f) {
          if (p.decoupled) {
            w[k] *= 1.f - lr * p.weight_decay;
          } else {
            grad += p.weight_decay * w[k];
          }
        }
        m[k] += (1.f - p.beta1) * (grad - m[k]);  // exp_avg.lerp_(grad, 1 - beta1)
        v[k] = p.beta2 * v[k] + (1.f - p.beta2) * grad * grad;
        float second = v[k];
        if (p.amsgrad) {
          vmax[k] = fmaxf(vmax[k], v[k]);
          second = vmax[k];
        }
        w[k] -= step_size * m[k] / (sqrtf(second) / bc2_sqrt + p.eps);
      }
      store_weights<P, kHasMaster>(t, tensor, i, count, vec, w);
      store_group<S>(t.ptr[kState0][tensor], i, count, vec, m);
      store_group<S>(t.ptr[kState1][tensor], i, count, vec, v);
      if (p.amsgrad) store_group<S>(t.ptr[kState2][tensor], i, count, vec, vmax);
    });
  });
}

// With master weights the momentum buffer is fp32 too; otherwise it has the param's dtype, as in torch.
template <typename P, bool kHasMaster>
__global__ void __launch_bounds__(kThreads) sgd_kernel(const __grid_constant__ TensorTable t, const SgdParams p) {
  using B = WeightType<P, kHasMaster>;
  constexpr int N = kElemsFor<P, B>;
  if (step_skipped(p.s)) return;
  const GradFactor gf = grad_factor(p.s);
  const float lr = p.s.lr_ptr ? *p.s.lr_ptr : p.s.lr;
  const bool has_momentum = p.momentum != 0.f;
  for_each_chunk(t, [&](int tensor, int64_t begin, int64_t end) {
    // The buffer of a tensor's first step (counted on the device, so a skipped step does not count)
    // starts from the grad; it is not read, so it may hold anything.
    const bool first_step = has_momentum && *t.step[tensor] == 0.f;
    for_each_group<N>(t, tensor, begin, end, [&](int64_t i, int count, bool vec) {
      float g[N], w[N], buf[N];
      load_group<P>(t.ptr[kGrad][tensor], i, count, vec, g);
      load_weights<P, kHasMaster>(t, tensor, i, count, vec, w);
      if (has_momentum && !first_step) load_group<B>(t.ptr[kState0][tensor], i, count, vec, buf);
      if (p.s.write_back_grad) write_back_unscaled<P>(t, tensor, i, count, vec, g, gf.unscale);
#pragma unroll
      for (int k = 0; k < N; ++k) {
        float grad = g[k] * gf.total;
        if (p.weight_decay != 0.f) grad += p.weight_decay * w[k];
        if (has_momentum) {
          buf[k] = first_step ? grad : p.momentum * buf[k] + (1.f - p.dampening) * grad;
          grad = p.nesterov ? grad + p.momentum * buf[k] : buf[k];
        }
        w[k] -= lr * grad;
      }
      store_weights<P, kHasMaster>(t, tensor, i, count, vec, w);
      if (has_momentum) store_group<B>(t.ptr[kState0][tensor], i, count, vec, buf);
    });
  });
}

// max that keeps NaN, as torch's inf-norm does
__device__ __forceinline__ float nan_max(float a, float b) { return (a > b || a != a) ? a : b; }

template <typename G>
__global__ void __launch_bounds__(kThreads) grad_norm_kernel(const __grid_constant__ TensorTable t, const NormParams p) {
  constexpr int N = kElemsFor<G>;
  __shared__ float scratch[kThreads / 32];
  float acc = 0.f;
  for_each_chunk(t, [&](int tensor, int64_t begin, int64_t end) {
    for_each_group<N>(t, tensor, begin, end, [&](int64_t i, int count, bool vec) {
      float g[N];
      load_group<G>(t.ptr[kGrad][tensor], i, count, vec, g);
#pragma unroll
      for (int k = 0; k < N; ++k) acc = p.inf_norm ? nan_max(acc, fabsf(g[k])) : acc + g[k] * g[k];
    });
  });
  // Block result in a fixed order: warp shuffles, then warp 0 over the warps' values.
  if (p.inf_norm) {
#pragma unroll
    for (int o = 16; o > 0; o /= 2) acc = nan_max(acc, __shfl_xor_sync(0xffffffffu, acc, o));
    if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = acc;
    __syncthreads();
    if (threadIdx.x == 0) {
      float m = 0.f;
      for (int w = 0; w < kThreads / 32; ++w) m = nan_max(m, scratch[w]);
      p.partials[blockIdx.x] = m;
    }
  } else {
    const float total = block_sum<kThreads>(acc, scratch);
    if (threadIdx.x == 0) p.partials[blockIdx.x] = total;
  }
}

__global__ void __launch_bounds__(1024) grad_norm_finish_kernel(const float* partials, int count, bool inf_norm,
                                                                 float max_norm, float* total, float* coef) {
  __shared__ float scratch[32];
  float acc = 0.f;
  for (int i = threadIdx.x; i < count; i += 1024) acc = inf_norm ? nan_max(acc, partials[i]) : acc + partials[i];
  float result;
  if (inf_norm) {
#pragma unroll
    for (int o = 16; o > 0; o /= 2) acc = nan_max(acc, __shfl_xor_sync(0xffffffffu, acc, o));
    if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = acc;
    __syncthreads();
    result = 0.f;
    for (int w = 0; w < 32; ++w) result = nan_max(result, scratch[w]);
  } else {
    result = sqrtf(block_sum<1024>(acc, scratch));
  }
  if (threadIdx.x == 0) {
    *total = result;
    if (coef) *coef = fminf(max_norm / (result + 1e-6f), 1.f);
  }
}

template <typename G>
__global__ void __launch_bounds__(kThreads) scale_kernel(const __grid_constant__ TensorTable t, const float* coef) {
  constexpr int N = kElemsFor<G>;
  const float c = *coef;
  for_each_chunk(t, [&](int tensor, int64_t begin, int64_t end) {
    for_each_group<N>(t, tensor, begin, end, [&](int64_t i, int count, bool vec) {
      float g[N];
      load_group<G>(t.ptr[kGrad][tensor], i, count, vec, g);
#pragma unroll
      for (int k = 0; k < N; ++k) g[k] *= c;
      store_group<G>(t.ptr[kGrad][tensor], i, count, vec, g);
    });
  });
}

__global__ void __launch_bounds__(kTableTensors) increment_steps_kernel(const __grid_constant__ TensorTable t,
                                                                        const float* found_inf) {
  if (found_inf && *found_inf != 0.f) return;
  if (int(threadIdx.x) < t.num_tensors) *t.step[threadIdx.x] += 1.f;
}

// The norm's grid is fixed per device (not per input), so the partials are always added in the same order.
constexpr int kNormBlocksPerSm = 4;  // 2048 threads an SM: with 2, bf16 grads read at 3.0 TB/s, with 4 at 4.0

}  // namespace

int norm_partials() { return sm_count() * kNormBlocksPerSm; }

void increment_steps(const TensorTable& t, const float* found_inf, cudaStream_t stream) {
  increment_steps_kernel<<<1, kTableTensors, 0, stream>>>(t, found_inf);
}

cudaError_t adam_step(const TensorTable& t, const AdamParams& p, cudaStream_t stream) {
  float_type_switch(p.param_dtype, [&]<typename P>() {
    type_switch<DType::kFloat32, DType::kBFloat16>(p.state_dtype, [&]<typename S>() {
      if constexpr (!std::is_same_v<P, float>) {
        if (p.master) return launch<adam_kernel<P, S, true>>(t, p, stream);
      }
      launch<adam_kernel<P, S, false>>(t, p, stream);
    });
  });
  increment_steps(t, p.s.found_inf, stream);
  return cudaGetLastError();
}

cudaError_t sgd_step(const TensorTable& t, const SgdParams& p, cudaStream_t stream) {
  float_type_switch(p.param_dtype, [&]<typename P>() {
    if constexpr (!std::is_same_v<P, float>) {
      if (p.master) return launch<sgd_kernel<P, true>>(t, p, stream);
    }
    launch<sgd_kernel<P, false>>(t, p, stream);
  });
  if (p.momentum != 0.f) increment_steps(t, p.s.found_inf, stream);
  return cudaGetLastError();
}

cudaError_t grad_norm_partials(const TensorTable& t, const NormParams& p, cudaStream_t stream) {
  // Always the full grid: blocks without chunks write the identity, so the partials are all defined.
  float_type_switch(p.grad_dtype, [&]<typename G>() {
    grad_norm_kernel<G><<<norm_partials(), kThreads, 0, stream>>>(t, p);
  });
  return cudaGetLastError();
}

cudaError_t grad_norm_finish(const float* partials, int count, bool inf_norm, float max_norm, float* total,
                             float* coef, cudaStream_t stream) {
  grad_norm_finish_kernel<<<1, 1024, 0, stream>>>(partials, count, inf_norm, max_norm, total, coef);
  return cudaGetLastError();
}

cudaError_t scale_grads(const TensorTable& t, DType grad_dtype, const float* coef, cudaStream_t stream) {
  float_type_switch(grad_dtype, [&]<typename G>() { launch<scale_kernel<G>>(t, coef, stream); });
  return cudaGetLastError();
}

}  // namespace fusedkernels::optim
