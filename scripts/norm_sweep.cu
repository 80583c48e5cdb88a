// Forward register-path sweep (no torch): times fwd_registers_kernel over threads per row (kTpr), vectors per
// thread (kIters) and a minimum of resident blocks (launch bounds) against a device copy, on the bench's
// shapes, with inputs rotated through more memory than L2 holds; and an experimental plain forward taking two rows a
// warp pass (fwd_two_rows_kernel, checked against the library's output). Build and run: scripts/norm_sweep.sh.
#include <cmath>
#include <cstdio>
#include <algorithm>
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

template <typename Launch>
float time_us(Launch&& launch) {
  cudaEvent_t a, b;
  CHECK(cudaEventCreate(&a));
  CHECK(cudaEventCreate(&b));
  for (int i = 0; i < 8; ++i) launch(i % kSets);
  CHECK(cudaEventRecord(a));
  for (int i = 0; i < kReps; ++i) launch(i % kSets);
  CHECK(cudaEventRecord(b));
  CHECK(cudaEventSynchronize(b));
  float ms = 0;
  CHECK(cudaEventElapsedTime(&ms, a, b));
  CHECK(cudaGetLastError());
  return ms * 1e3f / kReps;
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

template <bool kRms, bool kAdd, int kTpr, int kIters, int kMinBlocks>
void sweep_one(const Buffers& B, const char* name, float copy_us) {
  constexpr int kVec = kVec16<bf16>;
  if constexpr (kTpr * kIters * kVec >= kHidden && (kTpr / 2) * kIters * kVec < kHidden) {
    constexpr int kThreads = threads_for_tpr<kTpr>();
    const int64_t blocks = std::min<int64_t>(ceil_div(kRows, kThreads / kTpr), int64_t(sm_count()) * 64);
    auto kernel = fwd_registers_kernel<bf16, bf16, bf16, kRms, kAdd, kTpr, kIters, kMinBlocks>;
    cudaFuncAttributes attr{};
    CHECK(cudaFuncGetAttributes(&attr, kernel));
    int resident = 0;
    CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&resident, kernel, kThreads, 0));
    const float us = time_us([&](int set) { kernel<<<blocks, kThreads>>>(params<kRms, kAdd>(B, set)); });
    const double units = kAdd ? 4 : 2;
    const double bytes = units * kRows * kHidden * sizeof(bf16);
    std::printf("%-8s %5lldx%-5d tpr %4d iters %d minblocks %d | regs %3d local %3d B blocks/SM %2d | %7.1f us %6.0f GB/s %4.0f%% of copy\n",
                name, (long long)kRows, kHidden, kTpr, kIters, kMinBlocks, attr.numRegs, int(attr.localSizeBytes), resident, us, bytes / us * 1e-3,
                100.0 * (bytes / us) / (2.0 * kRows * kHidden * sizeof(bf16) / copy_us));
  }
}

// Experiment (not in the library): the plain forward with each warp taking two rows a pass (a warp per row,
// kIters 16-byte vectors a thread of each): both rows' loads are issued before either row's reductions, and the
// two rows' shuffle reductions interleave, so a warp has twice the bytes in flight through its reductions (the
// production kernel's warp waits on one row's loads, then its reductions, with nothing else in flight).
template <bool kRms, int kIters, int kMinBlocks>
__global__ void __launch_bounds__(256, kMinBlocks) fwd_two_rows_kernel(const FwdParamsT<false> p) {
  constexpr int kVec = kVec16<bf16>, kRows = 2, kWarps = 256 / 32;
  const bf16* x = static_cast<const bf16*>(p.x);
  const bf16* weight = static_cast<const bf16*>(p.weight);
  const bf16* bias = static_cast<const bf16*>(p.bias);
  bf16* y = static_cast<bf16*>(p.y);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, nvec = p.hidden / kVec;
  const float inv_hidden = 1.f / p.hidden;
  for (int64_t first = (int64_t(blockIdx.x) * kWarps + warp) * kRows; first < p.rows;
       first += int64_t(gridDim.x) * kWarps * kRows) {
    Vec<bf16, kVec> xv[kRows][kIters];
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
#pragma unroll
      for (int i = 0; i < kIters; ++i) {
        const int c = i * 32 + lane;
        if (first + r < p.rows && c < nvec) xv[r][i].load(x + (first + r) * p.hidden + c * kVec);
      }
    }
    // out[r] = the sum over row r's elements of f(r, element), reduced over the warp (both rows' shuffles interleave)
    const auto row_sums = [&](auto f, float (&out)[kRows]) {
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        out[r] = 0.f;
#pragma unroll
        for (int i = 0; i < kIters; ++i) {
          if (i * 32 + lane < nvec) {
#pragma unroll
            for (int j = 0; j < kVec; ++j) out[r] += f(r, xv[r][i].get(j));
          }
        }
      }
#pragma unroll
      for (int o = 16; o > 0; o /= 2) {
#pragma unroll
        for (int r = 0; r < kRows; ++r) out[r] += __shfl_xor_sync(0xffffffffu, out[r], o);
      }
    };
    float mean[kRows] = {}, sq[kRows], rstd[kRows];
    if constexpr (!kRms) {
      row_sums([](int, float v) { return v; }, mean);
#pragma unroll
      for (int r = 0; r < kRows; ++r) mean[r] *= inv_hidden;
    }
    row_sums([&](int r, float v) { return (v - mean[r]) * (v - mean[r]); }, sq);
#pragma unroll
    for (int r = 0; r < kRows; ++r) rstd[r] = rsqrtf(sq[r] * inv_hidden + p.eps);
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      if (first + r >= p.rows) continue;
      if (lane == 0) {
        if constexpr (!kRms) p.mean[first + r] = mean[r];
        p.rstd[first + r] = rstd[r];
      }
#pragma unroll
      for (int i = 0; i < kIters; ++i) {
        const int c = i * 32 + lane;
        if (c >= nvec) continue;
        Vec<bf16, kVec> w, b, out;
        w.load(weight + c * kVec);
        if (!kRms) b.load(bias + c * kVec);
#pragma unroll
        for (int j = 0; j < kVec; ++j) out.set(j, (xv[r][i].get(j) - mean[r]) * rstd[r] * w.get(j) + (kRms ? 0.f : b.get(j)));
        out.store(y + (first + r) * p.hidden + c * kVec);
      }
    }
  }
}

template <bool kRms, int kIters, int kMinBlocks>
void sweep_two_rows_one(const Buffers& B, const char* name, float copy_us) {
  constexpr int kVec = kVec16<bf16>;
  if constexpr (32 * kIters * kVec >= kHidden && 16 * kIters * kVec < kHidden) {
    auto kernel = fwd_two_rows_kernel<kRms, kIters, kMinBlocks>;
    cudaFuncAttributes attr{};
    CHECK(cudaFuncGetAttributes(&attr, kernel));
    int resident = 0;
    CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&resident, kernel, 256, 0));
    const int64_t blocks = std::min<int64_t>(ceil_div(kRows, 16), int64_t(sm_count()) * 64);  // 8 warps x 2 rows
    const float us = time_us([&](int set) { kernel<<<blocks, 256>>>(params<kRms, false>(B, set)); });
    // the output of set 0 against the library's kernel (written to B.h, which the plain norm leaves unused)
    FwdParamsT<false> ref = params<kRms, false>(B, 0);
    ref.y = B.h;
    fwd_registers_kernel<bf16, bf16, bf16, kRms, false, 32, 4><<<ceil_div(kRows, 8), 256>>>(ref);
    CHECK(cudaDeviceSynchronize());
    std::vector<bf16> ours(size_t(kRows) * kHidden), lib(ours.size());
    CHECK(cudaMemcpy(ours.data(), B.y, ours.size() * 2, cudaMemcpyDeviceToHost));
    CHECK(cudaMemcpy(lib.data(), B.h, lib.size() * 2, cudaMemcpyDeviceToHost));
    float diff = 0.f;
    for (size_t i = 0; i < ours.size(); ++i) diff = std::max(diff, std::fabs(__bfloat162float(ours[i]) - __bfloat162float(lib[i])));
    const double bytes = 2.0 * kRows * kHidden * sizeof(bf16);
    std::printf("%-8s %5lldx%-5d 2 rows/warp iters %d minblocks %d | regs %3d local %3d B blocks/SM %2d | %7.1f us %6.0f GB/s %4.0f%% of copy | max |diff| vs library %.3g\n",
                name, (long long)kRows, kHidden, kIters, kMinBlocks, attr.numRegs, int(attr.localSizeBytes), resident, us,
                bytes / us * 1e-3, 100.0 * (bytes / us) / (2.0 * kRows * kHidden * sizeof(bf16) / copy_us), diff);
  }
}

template <bool kRms>
void sweep_two_rows(const Buffers& B, const char* name, float copy_us) {
  [&]<int... kI>(std::integer_sequence<int, kI...>) {
    ([&] {
      constexpr int kIters = 1 << kI;  // 1, 2, 4 vectors a thread: H up to 256, 512, 1024 bf16
      sweep_two_rows_one<kRms, kIters, 2>(B, name, copy_us);
      sweep_two_rows_one<kRms, kIters, 3>(B, name, copy_us);
      sweep_two_rows_one<kRms, kIters, 4>(B, name, copy_us);
      sweep_two_rows_one<kRms, kIters, 6>(B, name, copy_us);
    }(), ...);
  }(std::make_integer_sequence<int, 3>{});
  sweep_two_rows_one<kRms, 3, 4>(B, name, copy_us);  // H = 768: three vectors a thread
  sweep_two_rows_one<kRms, 3, 6>(B, name, copy_us);
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
    const float us = time_us([&](int set) { kernel<<<blocks, kThreads, kSmem>>>(bwd_params<kRms, kAdd>(B, set)); });
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
  const bool fwd = argc < 2 || std::string(argv[1]) != "bwd", bwd = argc < 2 || std::string(argv[1]) != "fwd";
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
  const float copy_us = time_us([&](int set) { cudaMemcpyAsync(B.y + one / 2 * set, B.x + one / 2 * set, one, cudaMemcpyDeviceToDevice); });
  std::printf("copy %lldx%d: %.1f us, %.0f GB/s\n", (long long)kRows, kHidden, copy_us, 2.0 * one / copy_us * 1e-3);
  if (fwd) {
    sweep<false, false>(B, "ln", copy_us);
    sweep<true, false>(B, "rms", copy_us);
    sweep_two_rows<false>(B, "ln", copy_us);
    sweep_two_rows<true>(B, "rms", copy_us);
    sweep<true, true>(B, "add_rms", copy_us);
    sweep<false, true>(B, "add_ln", copy_us);
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
