// The Philox state of one random call from torch's CUDA generator, for the bindings of kernels that draw
// (dropout): graph-capture safe, as torch's own dropout takes it. And the CPU kernels' dropout masks.
#pragma once

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/cuda/CUDAGeneratorImpl.h>
#include <ATen/cuda/PhiloxCudaState.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

#include <mutex>
#include <optional>

#include "common/philox_state.h"

namespace fusedkernels {

// Reserves `increment` offsets (a multiple of 4, as the generator requires) of `generator` (the device's
// default when none) for one call. Under CUDA graph capture the state holds pointers the replays update.
inline PhiloxState philox_state(const std::optional<at::Generator>& generator, uint64_t increment) {
  auto* gen = at::get_generator_or_default<at::CUDAGeneratorImpl>(generator,
                                                                   at::cuda::detail::getDefaultCUDAGenerator());
  at::PhiloxCudaState state;
  {
    const std::lock_guard<std::mutex> lock(gen->mutex_);
    state = gen->philox_cuda_state(increment);
  }
  PhiloxState philox;
  philox.captured = state.captured_;
  if (state.captured_) {
    philox.seed_ptr = state.seed_.ptr;
    philox.offset_ptr = state.offset_.ptr;
    philox.offset_intragraph = state.offset_intragraph_;
  } else {
    philox.seed = state.seed_.val;
    philox.offset = state.offset_.val;
  }
  return philox;
}

// The CPU kernels' dropout: a seed drawn from the CPU generator, saved with the forward's results, from which
// the forward and the backward regenerate the same keep mask (True = kept, probability 1 - p).
inline int64_t cpu_dropout_seed(const std::optional<at::Generator>& generator) {
  auto* gen = at::get_generator_or_default<at::CPUGeneratorImpl>(generator, at::detail::getDefaultCPUGenerator());
  const std::lock_guard<std::mutex> lock(gen->mutex_);
  return static_cast<int64_t>(gen->random64() >> 1);
}

inline at::Tensor cpu_dropout_keep(int64_t seed, c10::SymIntArrayRef shape, double p) {
  // A function of the seed alone, whatever vmap or torch.func transform is active (a backward run under vmap, as
  // autograd.grad(is_grads_batched=True) does, regenerates the forward's mask): drawn beneath them.
  const c10::impl::ExcludeDispatchKeyGuard beneath_transforms(c10::DispatchKeySet(
      {c10::DispatchKey::FuncTorchDynamicLayerFrontMode, c10::DispatchKey::FuncTorchDynamicLayerBackMode,
       c10::DispatchKey::FuncTorchVmapMode, c10::DispatchKey::VmapMode}));
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(static_cast<uint64_t>(seed));
  return at::rand_symint(shape, gen, at::TensorOptions().dtype(at::kFloat)).ge(p);
}

}  // namespace fusedkernels
