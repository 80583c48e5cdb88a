// Forward register-path sweep (no torch): times fwd_registers_kernel over threads per row (kTpr), vectors per
// thread (kIters), a minimum of resident blocks (launch bounds) and the block size against a device copy, on the
// bench's shapes, with inputs rotated through more memory than L2 holds; and the backward's. Build and run:
// scripts/norm_sweep.sh.
#include <algorithm>
#include <cstdio>
#include <string>
#include <vector>

#include "norm/norm_kernels.cuh"

using namespace fusedkernels;
using namespace fusedkernels::norm;
using bf16 = __nv_bfloat16;

#ifndef SWEEP_HIDDEN
#define SWEEP_HIDDEN 1024
#endif
#ifndef SWEEP_ROWS
#define SWEEP_ROWS 16384
#endif
constexpr int kHidden = SWEEP_HIDDEN;
constexpr int64_t kRows = SWEEP_ROWS;
constexpr int kSets = 4;  // rotated copies of every tensor: 4 x (>= 33 MB) is past the 50 MB L2
constexpr int kReps = 40;

#define CHECK(x)                                                                      \
  do {                                                                                \
    cudaError_t e_ = (x);                                                             \
    if (e_ != cudaSuccess) {                                                          \
      std::printf("CUDA error %s at %s:%d\n", cudaGetErrorString(e_), __FILE__, __LINE__); \
      std::exit(1);                                                                   \
    }                                                                                 \
  } while (0)

struct Buffers {
  bf16 *x, *res, *y, *h, *w, *b;
  float *mean, *rstd, *partials;
};

// Median of 10 replays of a CUDA graph of kReps launches over the rotated sets (as torch.compile's kernels are timed
// in scripts/compile_norm_kernels.py): no launch gaps between the kernels.
template <typename Launch>
float time_us(Launch&& launch) {
  static cudaStream_t stream = [] {
    cudaStream_t s;
    CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    return s;
  }();
  for (int i = 0; i < kSets; ++i) launch(i, stream);
  cudaGraph_t graph;
  cudaGraphExec_t exec;
  CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
  for (int i = 0; i < kReps; ++i) launch(i % kSets, stream);
  CHECK(cudaStreamEndCapture(stream, &graph));
  CHECK(cudaGraphInstantiate(&exec, graph, 0));
  CHECK(cudaGraphLaunch(exec, stream));
  cudaEvent_t a, b;
  CHECK(cudaEventCreate(&a));
  CHECK(cudaEventCreate(&b));
  std::vector<float> times;
  for (int r = 0; r < 10; ++r) {
    CHECK(cudaEventRecord(a, stream));
    CHECK(cudaGraphLaunch(exec, stream));
    CHECK(cudaEventRecord(b, stream));
    CHECK(cudaEventSynchronize(b));
    float ms = 0;
    CHECK(cudaEventElapsedTime(&ms, a, b));
    times.push_back(ms * 1e3f / kReps);
  }
  CHECK(cudaGraphExecDestroy(exec));
  CHECK(cudaGraphDestroy(graph));
  CHECK(cudaGetLastError());
  std::sort(times.begin(), times.end());
  return times[times.size() / 2];
}

template <bool kRms, bool kAdd>
FwdParamsT<kAdd> params(const Buffers& B, int set) {
  FwdParamsT<kAdd> p{};
  const int64_t n = kRows * kHidden * set;
  p.x = B.x + n;
  p.weight = B.w;
  p.bias = kRms ? nullptr : B.b;
  p.y = B.y + n;
  p.mean = kRms ? nullptr : B.mean + kRows * set;
  p.rstd = B.rstd + kRows * set;
  p.rows = kRows;
  p.hidden = kHidden;
  p.eps = 1e-5f;
  if constexpr (kAdd) {
    p.residual = B.res + n;
    p.residual_out = B.h + n;
    p.dropout_p = 0.f;
  }
  return p;
}

template <bool kRms, bool kAdd, int kTpr, int kIters, int kMinBlocks, int kThreads = threads_for_tpr<kTpr>(),
          bool kFullRow = false>
void sweep_one(const Buffers& B, const char* name, float copy_us) {
  constexpr int kVec = kVec16<bf16>;
  if constexpr (kTpr * kIters * kVec >= kHidden && (kTpr / 2) * kIters * kVec < kHidden) {
    // as many threads in the grid as the library's 256-thread blocks launch: smaller blocks, more of them
    const int64_t blocks = std::min<int64_t>(ceil_div(kRows, kThreads / kTpr), int64_t(sm_count()) * 64 * 256 / kThreads);
    auto kernel = fwd_registers_kernel<bf16, bf16, bf16, kRms, kAdd, kTpr, kIters, kMinBlocks, kThreads, kFullRow, kAdd && !kFullRow>;
    cudaFuncAttributes attr{};
    CHECK(cudaFuncGetAttributes(&attr, kernel));
    int resident = 0;
    CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&resident, kernel, kThreads, 0));
    const float us = time_us([&](int set, cudaStream_t stream) { kernel<<<blocks, kThreads, 0, stream>>>(params<kRms, kAdd>(B, set)); });
    const double units = kAdd ? 4 : 2;
    const double bytes = units * kRows * kHidden * sizeof(bf16);
    std::printf("%-8s%s %5lldx%-5d tpr %4d iters %d threads %4d minblocks %2d | regs %3d local %3d B blocks/SM %2d | %7.1f us %6.0f GB/s %4.0f%% of copy\n",
                name, kFullRow ? " full" : "     ", (long long)kRows, kHidden, kTpr, kIters, kThreads, kMinBlocks, attr.numRegs, int(attr.localSizeBytes), resident, us, bytes / us * 1e-3,
                100.0 * (bytes / us) / (2.0 * kRows * kHidden * sizeof(bf16) / copy_us));
  }
}

template <bool kRms, bool kAdd>
void sweep(const Buffers& B, const char* name, float copy_us) {
  [&]<int... kI>(std::integer_sequence<int, kI...>) {
    ([&] {
      constexpr int kTpr = 8 << kI;
      sweep_one<kRms, kAdd, kTpr, 2, 4>(B, name, copy_us);
      sweep_one<kRms, kAdd, kTpr, 2, 6>(B, name, copy_us);
      sweep_one<kRms, kAdd, kTpr, 2, 8>(B, name, copy_us);
      sweep_one<kRms, kAdd, kTpr, 3, 4>(B, name, copy_us);
      sweep_one<kRms, kAdd, kTpr, 3, 5>(B, name, copy_us);
      sweep_one<kRms, kAdd, kTpr, 3, 6>(B, name, copy_us);
      sweep_one<kRms, kAdd, kTpr, 4, 4>(B, name, copy_us);
      sweep_one<kRms, kAdd, kTpr, 4, 5>(B, name, copy_us);
      sweep_one<kRms, kAdd, kTpr, 4, 6>(B, name, copy_us);
      sweep_one<kRms, kAdd, kTpr, 8, 2>(B, name, copy_us);
      sweep_one<kRms, kAdd, kTpr, 8, 3>(B, name, copy_us);
    }(), ...);
  }(std::make_integer_sequence<int, 7>{});
}

// Blocks of one to four warps (the library's are 256 threads or one row): torch.compile's Triton norm at
// H = 1024 runs one 32-thread block per row (ncu, docs/perf-notes.md norm). Resident threads per SM 1024-2048
// (at most 32 blocks an SM).
template <bool kRms, bool kAdd>
void sweep_small_blocks(const Buffers& B, const char* name, float copy_us) {
  [&]<int... kI>(std::integer_sequence<int, kI...>) {
    ([&] {
      constexpr int kTpr = 8 << kI;  // 8 .. 128
      [&]<int... kJ>(std::integer_sequence<int, kJ...>) {
        ([&] {
          constexpr int kThreads = 32 << kJ;  // 32, 64, 128
          if constexpr (kThreads % kTpr == 0) {
            constexpr int kFew = std::min(32, 1024 / kThreads), kMany = std::min(32, 2048 / kThreads);
            [&]<int... kK>(std::integer_sequence<int, kK...>) {
              ([&] {
                constexpr int kIters = 1 << kK;  // 1, 2, 4, 8
                sweep_one<kRms, kAdd, kTpr, kIters, kFew, kThreads>(B, name, copy_us);
                if constexpr (kMany != kFew) sweep_one<kRms, kAdd, kTpr, kIters, kMany, kThreads>(B, name, copy_us);
              }(), ...);
            }(std::make_integer_sequence<int, 4>{});
          }
        }(), ...);
      }(std::make_integer_sequence<int, 3>{});
    }(), ...);
  }(std::make_integer_sequence<int, 5>{});
}

// The library's forward launch for each shape against its full-row instance (norm_kernels.cuh, kFullRow), where
// the row fills every vector.
template <bool kRms, bool kAdd>
void sweep_full_rows(const Buffers& B, const char* name, float copy_us) {
  [&]<int... kI>(std::integer_sequence<int, kI...>) {
    ([&] {
      constexpr int kTpr = 8 << kI;
      constexpr int kT = threads_for_tpr<kTpr>();
      if constexpr (kAdd) {
        sweep_one<kRms, kAdd, kTpr, 2, kFwdMinBlocks<bf16, bf16, true, kT>, kT>(B, name, copy_us);
        sweep_one<kRms, kAdd, kTpr, 3, kAddFwdWideMinBlocks<kT>, kT>(B, name, copy_us);
        if constexpr (kTpr * 2 * kVec16<bf16> == kHidden)
          sweep_one<kRms, kAdd, kTpr, 2, kFwdMinBlocks<bf16, bf16, true, kT>, kT, true>(B, name, copy_us);
        if constexpr (kTpr * 3 * kVec16<bf16> == kHidden)
          sweep_one<kRms, kAdd, kTpr, 3, kAddFwdWideMinBlocks<kT>, kT, true>(B, name, copy_us);
      } else {
        constexpr int kFull = kFullRowNormThreads<kTpr>;
        sweep_one<kRms, kAdd, kTpr, 4, kFwdMinBlocks<bf16, bf16, false, kT>, kT>(B, name, copy_us);
        if constexpr (kTpr * 4 * kVec16<bf16> == kHidden) sweep_one<kRms, kAdd, kTpr, 4, 1024 / kFull, kFull, true>(B, name, copy_us);
        if constexpr (kTpr * 3 * kVec16<bf16> == kHidden) sweep_one<kRms, kAdd, kTpr, 3, 1024 / kFull, kFull, true>(B, name, copy_us);
      }
    }(), ...);
  }(std::make_integer_sequence<int, 6>{});
}

template <bool kRms, bool kAdd>
BwdParamsT<kAdd> bwd_params(const Buffers& B, int set) {
  // x (add + norm: h) from x, dy from res, dx (add: dresidual, x's grad too) into y; dh_out from h.
  BwdParamsT<kAdd> p{};
  const int64_t n = kRows * kHidden * set;
  p.dy = B.res + n;
  p.x = B.x + n;
  p.weight = B.w;
  p.mean = kRms ? nullptr : B.mean + kRows * set;
  p.rstd = B.rstd + kRows * set;
  p.dweight = B.w;  // only tested for null by this kernel (reduce_partials_kernel writes it)
  p.dbias = kRms ? nullptr : B.b;
  p.partials = B.partials;
  p.rows = kRows;
  p.hidden = kHidden;
  if constexpr (kAdd) {
    p.dresidual_out = B.h + n;
    p.dresidual = B.y + n;
  } else {
    p.dx = B.y + n;
  }
  return p;
}

template <bool kRms, bool kAdd, int kTpr, int kIters, int kMinBlocks>
void sweep_bwd_one(const Buffers& B, const char* name, float copy_us) {
  constexpr int kVec = kVec16<bf16>;
  if constexpr (kTpr * kIters * kVec >= kHidden && (kTpr / 2) * kIters * kVec < kHidden) {
    constexpr int kThreads = threads_for_tpr<kTpr>();
    constexpr int kSmem = BwdStager<bf16, bf16, kAdd, kTpr, kIters>::kBytes;
    auto kernel = bwd_registers_kernel<bf16, bf16, bf16, kRms, kAdd, kTpr, kIters, kMinBlocks>;
    CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem));
    cudaFuncAttributes attr{};
    CHECK(cudaFuncGetAttributes(&attr, kernel));
    int resident = 0;
    CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&resident, kernel, kThreads, kSmem));
    if (resident == 0) return;
    const int64_t blocks = std::min<int64_t>(ceil_div(kRows, kThreads / kTpr), int64_t(sm_count()) * resident);
    const float us = time_us([&](int set, cudaStream_t stream) { kernel<<<blocks, kThreads, kSmem, stream>>>(bwd_params<kRms, kAdd>(B, set)); });
    const double units = kAdd ? 4 : 3;  // add: read dy, dh_out, h, write dh; norm: read x, dy, write dx
    const double bytes = units * kRows * kHidden * sizeof(bf16);
    std::printf("bwd %-8s %5lldx%-5d tpr %4d iters %d minblocks %d | regs %3d local %3d B smem %6d blocks/SM %2d | %7.1f us %6.0f GB/s %4.0f%% of copy\n",
                name, (long long)kRows, kHidden, kTpr, kIters, kMinBlocks, attr.numRegs, int(attr.localSizeBytes), kSmem,
                resident, us, bytes / us * 1e-3, 100.0 * (bytes / us) / (2.0 * kRows * kHidden * sizeof(bf16) / copy_us));
  }
}

template <bool kRms, bool kAdd>
void sweep_bwd(const Buffers& B, const char* name, float copy_us) {
  [&]<int... kI>(std::integer_sequence<int, kI...>) {
    ([&] {
      constexpr int kTpr = 8 << kI;
      sweep_bwd_one<kRms, kAdd, kTpr, 2, bwd_min_blocks<kAdd, false, threads_for_tpr<kTpr>()>()>(B, name, copy_us);
      sweep_bwd_one<kRms, kAdd, kTpr, 2, 3>(B, name, copy_us);
      sweep_bwd_one<kRms, kAdd, kTpr, 2, 4>(B, name, copy_us);
      sweep_bwd_one<kRms, kAdd, kTpr, 1, 4>(B, name, copy_us);
      sweep_bwd_one<kRms, kAdd, kTpr, 1, 6>(B, name, copy_us);
      sweep_bwd_one<kRms, kAdd, kTpr, 4, 2>(B, name, copy_us);
    }(), ...);
  }(std::make_integer_sequence<int, 7>{});
}

int main(int argc, char** argv) {
  const std::string only = argc < 2 ? "" : argv[1];  // fwd, bwd, small (the small-block forwards) or full
  const bool fwd = only.empty() || only == "fwd", bwd = only.empty() || only == "bwd";
  const size_t n = size_t(kRows) * kHidden * kSets;
  Buffers B{};
  CHECK(cudaMalloc(&B.x, n * 2));
  CHECK(cudaMalloc(&B.res, n * 2));
  CHECK(cudaMalloc(&B.y, n * 2));
  CHECK(cudaMalloc(&B.h, n * 2));
  CHECK(cudaMalloc(&B.w, kHidden * 2));
  CHECK(cudaMalloc(&B.b, kHidden * 2));
  CHECK(cudaMalloc(&B.mean, kRows * kSets * 4));
  CHECK(cudaMalloc(&B.rstd, kRows * kSets * 4));
  CHECK(cudaMalloc(&B.partials, size_t(3) * 132 * 8 * kHidden * 4));  // column sums x blocks (<= 8 per SM) x hidden
  std::vector<bf16> host(n);
  for (size_t i = 0; i < n; ++i) host[i] = __float2bfloat16(float((i * 2654435761u) % 1000) / 500.f - 1.f);
  CHECK(cudaMemcpy(B.x, host.data(), n * 2, cudaMemcpyHostToDevice));
  CHECK(cudaMemcpy(B.res, host.data(), n * 2, cudaMemcpyHostToDevice));
  CHECK(cudaMemcpy(B.w, host.data(), kHidden * 2, cudaMemcpyHostToDevice));
  CHECK(cudaMemcpy(B.b, host.data(), kHidden * 2, cudaMemcpyHostToDevice));
  const size_t one = size_t(kRows) * kHidden * 2;
  const float copy_us = time_us([&](int set, cudaStream_t stream) { cudaMemcpyAsync(B.y + one / 2 * set, B.x + one / 2 * set, one, cudaMemcpyDeviceToDevice, stream); });
  std::printf("copy %lldx%d: %.1f us, %.0f GB/s\n", (long long)kRows, kHidden, copy_us, 2.0 * one / copy_us * 1e-3);
  if (fwd) {
    sweep<false, false>(B, "ln", copy_us);
    sweep<true, false>(B, "rms", copy_us);
    sweep<true, true>(B, "add_rms", copy_us);
    sweep<false, true>(B, "add_ln", copy_us);
  }
  if (only == "full") {  // (not in the default run)
    sweep_full_rows<false, false>(B, "ln", copy_us);
    sweep_full_rows<true, false>(B, "rms", copy_us);
    sweep_full_rows<true, true>(B, "add_rms", copy_us);
    sweep_full_rows<false, true>(B, "add_ln", copy_us);
  }
  if (fwd || only == "small") {
    sweep_small_blocks<false, false>(B, "ln", copy_us);
    sweep_small_blocks<true, false>(B, "rms", copy_us);
    sweep_small_blocks<true, true>(B, "add_rms", copy_us);
    sweep_small_blocks<false, true>(B, "add_ln", copy_us);
  }
  if (!bwd) return 0;
  // statistics for the backward: any finite values do (time, not results, is measured)
  CHECK(cudaMemset(B.mean, 0, kRows * kSets * 4));
  std::vector<float> ones(kRows * kSets, 1.f);
  CHECK(cudaMemcpy(B.rstd, ones.data(), ones.size() * 4, cudaMemcpyHostToDevice));
  CHECK(cudaMemcpy(B.h, host.data(), n * 2, cudaMemcpyHostToDevice));
  sweep_bwd<false, false>(B, "ln", copy_us);
  sweep_bwd<true, false>(B, "rms", copy_us);
  sweep_bwd<true, true>(B, "add_rms", copy_us);
  sweep_bwd<false, true>(B, "add_ln", copy_us);
  return 0;
}
