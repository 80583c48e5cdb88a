// LAMB over a TensorTable in three launches (the trust ratio of a tensor needs the norms of all of it):
//   1. moments: m, v updated and stored; per chunk, sum w^2 and sum u^2 into the workspace
//   2. trust:   per tensor, |w| / |u| from its chunks' partials, added in a fixed order
//   3. apply:   u recomputed from the stored m, v and w; w -= lr * trust * u
// Sharded params split this after 2, which then writes the per-tensor sums (LambParams::sums_out); the
// second phase runs 2 from the sums added up across the shards (sums_in), then 3.
// Recomputing u reads w, m, v (12 B/param in fp32) where storing it would cost a write and a read
// (8 B) plus clobbering the grads; the moments are stored rounded to their dtype first, so both
// launches see the same u bit for bit.
#include <type_traits>

#include "common/device/reduce.cuh"
#include "optim/multi_tensor.cuh"

namespace fusedkernels::optim {
namespace {

constexpr int kTrustThreads = 256;  // one warp per tensor

template <typename S>
__device__ __forceinline__ float round_to(float x) {
  return to_float(from_float<S>(x));
}

// The factor the raw grads are multiplied by: AMP unscale, deferred clip, maximize, and LAMB's own
// clip of the global norm to max_grad_norm.
__device__ __forceinline__ float lamb_grad_factor(const LambParams& p, const GradFactor& gf) {
  float f = gf.total;
  if (p.grad_norm) {
    const float norm = *p.grad_norm * fabsf(gf.total);  // the norm of the grads as the step sees them
    if (norm > p.max_grad_norm) f /= norm / p.max_grad_norm;
  }
  return f;
}

struct BiasCorrection {
  float bc1, bc2;
};

__device__ __forceinline__ BiasCorrection bias_correction(const LambParams& p, float step) {
  if (!p.bias_correction) return {1.f, 1.f};
  return {1.f - powf(p.beta1, step), 1.f - powf(p.beta2, step)};
}

__device__ __forceinline__ float lamb_update(const LambParams& p, const BiasCorrection& bc, float m, float v, float w) {
  const float u = (m / bc.bc1) / (sqrtf(v / bc.bc2) + p.eps);
  return p.decoupled ? u + p.weight_decay * w : u;
}

__device__ __forceinline__ float* trust_ratios(const TensorTable& t, const LambParams& p) {
  return p.partials + 2 * int64_t(t.chunk_start[t.num_tensors]);
}

template <typename P, typename S, bool kHasMaster>
__global__ void __launch_bounds__(kThreads) lamb_moments_kernel(const __grid_constant__ TensorTable t,
                                                                const LambParams p) {
  constexpr int N = kElemsFor<P, S, WeightType<P, kHasMaster>>;
  __shared__ float scratch[kThreads / 32];
  if (step_skipped(p.s)) return;
  const GradFactor gf = grad_factor(p.s);
  const float factor = lamb_grad_factor(p, gf);
  for_each_chunk(t, [&](int tensor, int64_t begin, int64_t end) {
    const BiasCorrection bc = bias_correction(p, *t.step[tensor] + 1.f);
    float w_sq = 0.f, u_sq = 0.f;
    for_each_group<N>(t, tensor, begin, end, [&](int64_t i, int count, bool vec) {
      float g[N], w[N], m[N], v[N];
      load_group<P>(t.ptr[kGrad][tensor], i, count, vec, g);
      load_weights<P, kHasMaster>(t, tensor, i, count, vec, w);
      load_group<S>(t.ptr[kState0][tensor], i, count, vec, m);
      load_group<S>(t.ptr[kState1][tensor], i, count, vec, v);
      if (p.s.write_back_grad) write_back_unscaled<P>(t, tensor, i, count, vec, g, gf.unscale);
#pragma unroll
      for (int k = 0; k < N; ++k) {
        float grad = g[k] * factor;
        if (!p.decoupled && p.weight_decay != 0.f) grad += p.weight_decay * w[k];
        m[k] = round_to<S>(p.beta1 * m[k] + p.grad_weight * grad);
        v[k] = round_to<S>(p.beta2 * v[k] + (1.f - p.beta2) * grad * grad);
        const float u = lamb_update(p, bc, m[k], v[k], w[k]);
        if (k < count) {  // lanes past the end would add 0 / eps, or NaN when eps is 0
          w_sq += w[k] * w[k];
          u_sq += u * u;
        }
      }
      store_group<S>(t.ptr[kState0][tensor], i, count, vec, m);
      store_group<S>(t.ptr[kState1][tensor], i, count, vec, v);
    });
    w_sq = block_sum<kThreads>(w_sq, scratch);
    u_sq = block_sum<kThreads>(u_sq, scratch);
    if (threadIdx.x == 0) {
      const int64_t chunk = t.chunk_start[tensor] + begin / kChunk;
      p.partials[2 * chunk] = w_sq;
      p.partials[2 * chunk + 1] = u_sq;
    }
  });
}

__global__ void __launch_bounds__(kTrustThreads) lamb_trust_kernel(const __grid_constant__ TensorTable t,
                                                                   const LambParams p) {
  if (step_skipped(p.s)) return;
  const int tensor = blockIdx.x * (kTrustThreads / 32) + threadIdx.x / 32;
  if (tensor >= t.num_tensors) return;  // whole warps leave together
  const int lane = threadIdx.x % 32;
  float w_sq = 0.f, u_sq = 0.f;
  if (p.sums_in) {
    w_sq = p.sums_in[2 * tensor];
    u_sq = p.sums_in[2 * tensor + 1];
  } else {
    for (int c = t.chunk_start[tensor] + lane; c < t.chunk_start[tensor + 1]; c += 32) {
      w_sq += p.partials[2 * int64_t(c)];
      u_sq += p.partials[2 * int64_t(c) + 1];
    }
    w_sq = group_sum_in_warp<32>(w_sq);
    u_sq = group_sum_in_warp<32>(u_sq);
  }
  if (lane != 0) return;
  if (p.sums_out) {
    p.sums_out[2 * tensor] = w_sq;
    p.sums_out[2 * tensor + 1] = u_sq;
    return;
  }
  const float w_norm = sqrtf(w_sq), u_norm = sqrtf(u_sq);
  const bool adapt = (p.always_adapt || p.weight_decay != 0.f) && w_norm > 0.f && u_norm > 0.f;
  trust_ratios(t, p)[tensor] = adapt ? w_norm / u_norm : 1.f;
}

template <typename P, typename S, bool kHasMaster>
__global__ void __launch_bounds__(kThreads) lamb_apply_kernel(const __grid_constant__ TensorTable t,
                                                              const LambParams p) {
  constexpr int N = kElemsFor<P, S, WeightType<P, kHasMaster>>;
  if (step_skipped(p.s)) return;
  const float lr = p.s.lr_ptr ? *p.s.lr_ptr : p.s.lr;
  const float* trust = trust_ratios(t, p);
  for_each_chunk(t, [&](int tensor, int64_t begin, int64_t end) {
    const BiasCorrection bc = bias_correction(p, *t.step[tensor] + 1.f);
    const float step_size = lr * trust[tensor];
    for_each_group<N>(t, tensor, begin, end, [&](int64_t i, int count, bool vec) {
      float w[N], m[N], v[N];
      load_weights<P, kHasMaster>(t, tensor, i, count, vec, w);
      load_group<S>(t.ptr[kState0][tensor], i, count, vec, m);
      load_group<S>(t.ptr[kState1][tensor], i, count, vec, v);
#pragma unroll
      for (int k = 0; k < N; ++k) w[k] -= step_size * lamb_update(p, bc, m[k], v[k], w[k]);
      store_weights<P, kHasMaster>(t, tensor, i, count, vec, w);
    });
  });
}

template <typename P, typename S, bool kHasMaster>
void launch_lamb(const TensorTable& t, const LambParams& p, cudaStream_t stream) {
  if (!p.sums_in) launch<lamb_moments_kernel<P, S, kHasMaster>>(t, p, stream);
  const int warps_per_block = kTrustThreads / 32;
  lamb_trust_kernel<<<(t.num_tensors + warps_per_block - 1) / warps_per_block, kTrustThreads, 0, stream>>>(t, p);
  if (p.sums_out) return;
  launch<lamb_apply_kernel<P, S, kHasMaster>>(t, p, stream);
  increment_steps(t, p.s.found_inf, stream);
}

}  // namespace

cudaError_t lamb_step(const TensorTable& t, const LambParams& p, cudaStream_t stream) {
  float_type_switch(p.param_dtype, [&]<typename P>() {
    type_switch<DType::kFloat32, DType::kBFloat16>(p.state_dtype, [&]<typename S>() {
      if constexpr (!std::is_same_v<P, float>) {
        if (p.master) return launch_lamb<P, S, true>(t, p, stream);
      }
      launch_lamb<P, S, false>(t, p, stream);
    });
  });
  return cudaGetLastError();
}

}  // namespace fusedkernels::optim
