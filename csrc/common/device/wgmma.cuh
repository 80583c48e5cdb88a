// Hopper warpgroup MMA (wgmma, sm_90a): shared-memory matrix descriptors for 128-byte-swizzled tiles and
// the m64nNk16 instructions with fp32 accumulators. Include only from sources under an sm90/ folder and
// call only from code guarded by FUSEDKERNELS_SM90A. docs/hopper.md explains the vocabulary.
//
// Tile layout (what the descriptors below describe): a tile of R rows by C 16-bit columns is stored as
// C / 64 column blocks of R x 64 elements; each row of a block is 128 bytes, and its eight 16-byte chunks
// are permuted by the row: chunk c of row r lives at chunk c ^ (r % 8) (the "128B swizzle"; `swizzled`).
// Eight consecutive rows then cover all 32 banks whichever chunk they read, and the tensor cores read the
// same permutation back through the descriptor. Blocks start on 1024-byte boundaries.
#pragma once

#include <cstdint>
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace fusedkernels::sm90 {

// Byte offset of element (row, col) of a swizzled tile of `rows` rows; col % 8 == 0 for 16-byte accesses.
__host__ __device__ constexpr uint32_t swizzled(int row, int col, int rows) {
  return uint32_t((col / 64) * rows * 128 + row * 128 + ((((col % 64) / 8) ^ (row % 8)) * 16) + (col % 8) * 2);
}

// A descriptor for a 128B-swizzled operand at shared address `address` (1024-byte aligned at block starts;
// steps of 32 bytes inside a row address the k16 slices of a K-major operand).
//   K-major (A, or B stored N x K): rows 128 bytes apart, 8-row groups `stride_bytes` = 1024 apart; the
//     leading offset is unused.
//   MN-major (B stored K x N, or A stored K x M, transposed by the instruction): `leading_bytes` between
//     64-column blocks, `stride_bytes` = 1024 between 8-row groups of K.
// Fields (PTX ISA, "Matrix Descriptor Format"): address >> 4 in bits 0-13, leading offset >> 4 in 16-29,
// stride offset >> 4 in 32-45, swizzle mode in 62-63 (1 = 128B).
__device__ __forceinline__ uint64_t smem_descriptor(uint32_t address, uint32_t leading_bytes, uint32_t stride_bytes) {
  return uint64_t((address & 0x3FFFF) >> 4) | (uint64_t(leading_bytes >> 4) << 16) |
         (uint64_t(stride_bytes >> 4) << 32) | (uint64_t(1) << 62);
}

// Keeps the compiler from moving register reads or writes of x across an asynchronous wgmma: the
// instruction reads and writes its registers after issue, which the compiler does not see.
__device__ __forceinline__ void fence_operands(float& x) { asm volatile("" : "+f"(x)::"memory"); }
__device__ __forceinline__ void fence_operands(uint32_t& x) { asm volatile("" : "+r"(x)::"memory"); }
template <typename R, int kN>
__device__ __forceinline__ void fence_operands(R (&x)[kN]) {
#pragma unroll
  for (int i = 0; i < kN; ++i) fence_operands(x[i]);
}

// x, with its value hidden from the optimiser: descriptors derived from it inside a loop are then computed
// where they are used instead of hoisted out of the loop, where dozens of them would hold registers the
// accumulators need.
__device__ __forceinline__ uint32_t opaque(uint32_t x) {
  asm volatile("" : "+r"(x));
  return x;
}

// Accumulator layout of m64nNk16 (as mma.sync's C): warp w of the warpgroup holds rows 16w..16w+15; for
// each n8 block j, d[4j], d[4j+1] are (row g, cols 8j+2t, +1) and d[4j+2], d[4j+3] the same cols of row
// g+8 (lane = 4g + t).
template <int kN>
struct Wgmma;

// (asm needs the operand lists spelled out)
#define FUSEDKERNELS_WGMMA_D16 "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15}"
#define FUSEDKERNELS_WGMMA_D32 "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}"
#define FUSEDKERNELS_WGMMA_D64 "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}"
#define FUSEDKERNELS_WGMMA_ACC16(d) \
  "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
  "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15])
#define FUSEDKERNELS_WGMMA_ACC32(d) \
  "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
  "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), \
  "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), \
  "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
#define FUSEDKERNELS_WGMMA_ACC64(d) \
  "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
  "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), \
  "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), \
  "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), \
  "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), \
  "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), \
  "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), \
  "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])

#define FUSEDKERNELS_WGMMA_D128 "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, %96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, %112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127}"
#define FUSEDKERNELS_WGMMA_ACC128(d) \
  "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
  "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), \
  "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), \
  "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), \
  "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), \
  "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), \
  "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), \
  "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]), \
  "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]), \
  "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), \
  "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]), \
  "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]), \
  "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]), \
  "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]), \
  "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]), \
  "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])

template <>
struct Wgmma<32> {
  // d (+)= A B: A 64x16 and B 16x32 both from shared memory (descriptors); kTransA / kTransB: the operand
  // is stored M- / N-major.
  template <typename T, bool kTransA, bool kTransB>
  static __device__ __forceinline__ void ss(float (&d)[16], uint64_t desc_a, uint64_t desc_b, bool accumulate) {
    if constexpr (std::is_same_v<T, __half>) {
      asm volatile(
          "{\n.reg .pred p;\nsetp.ne.b32 p, %18, 0;\n"
          "wgmma.mma_async.sync.aligned.m64n32k16.f32.f16.f16 " FUSEDKERNELS_WGMMA_D16 ", "
          "%16, %17, p, 1, 1, %19, %20;\n}\n"
          : FUSEDKERNELS_WGMMA_ACC16(d)
          : "l"(desc_a), "l"(desc_b), "r"(int(accumulate)), "n"(int(kTransA)), "n"(int(kTransB)));
    } else {
      asm volatile(
          "{\n.reg .pred p;\nsetp.ne.b32 p, %18, 0;\n"
          "wgmma.mma_async.sync.aligned.m64n32k16.f32.bf16.bf16 " FUSEDKERNELS_WGMMA_D16 ", "
          "%16, %17, p, 1, 1, %19, %20;\n}\n"
          : FUSEDKERNELS_WGMMA_ACC16(d)
          : "l"(desc_a), "l"(desc_b), "r"(int(accumulate)), "n"(int(kTransA)), "n"(int(kTransB)));
    }
  }

  // d (+)= A B: A 64x16 from registers (mma.sync m16n8k16's A fragment, one 16-row slice per warp), B 16x32
  // from shared memory.
  template <typename T, bool kTransB>
  static __device__ __forceinline__ void rs(float (&d)[16], const uint32_t (&a)[4], uint64_t desc_b,
                                            bool accumulate) {
    if constexpr (std::is_same_v<T, __half>) {
      asm volatile(
          "{\n.reg .pred p;\nsetp.ne.b32 p, %21, 0;\n"
          "wgmma.mma_async.sync.aligned.m64n32k16.f32.f16.f16 " FUSEDKERNELS_WGMMA_D16 ", "
          "{%16, %17, %18, %19}, %20, p, 1, 1, %22;\n}\n"
          : FUSEDKERNELS_WGMMA_ACC16(d)
          : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(int(accumulate)), "n"(int(kTransB)));
    } else {
      asm volatile(
          "{\n.reg .pred p;\nsetp.ne.b32 p, %21, 0;\n"
          "wgmma.mma_async.sync.aligned.m64n32k16.f32.bf16.bf16 " FUSEDKERNELS_WGMMA_D16 ", "
          "{%16, %17, %18, %19}, %20, p, 1, 1, %22;\n}\n"
          : FUSEDKERNELS_WGMMA_ACC16(d)
          : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(int(accumulate)), "n"(int(kTransB)));
    }
  }
};

template <>
struct Wgmma<64> {
  // d (+)= A B: A 64x16 and B 16x64 both from shared memory (descriptors); kTransA / kTransB: the operand
  // is stored M- / N-major.
  template <typename T, bool kTransA, bool kTransB>
  static __device__ __forceinline__ void ss(float (&d)[32], uint64_t desc_a, uint64_t desc_b, bool accumulate) {
    if constexpr (std::is_same_v<T, __half>) {
      asm volatile(
          "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
          "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 " FUSEDKERNELS_WGMMA_D32 ", "
          "%32, %33, p, 1, 1, %35, %36;\n}\n"
          : FUSEDKERNELS_WGMMA_ACC32(d)
          : "l"(desc_a), "l"(desc_b), "r"(int(accumulate)), "n"(int(kTransA)), "n"(int(kTransB)));
    } else {
      asm volatile(
          "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
          "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 " FUSEDKERNELS_WGMMA_D32 ", "
          "%32, %33, p, 1, 1, %35, %36;\n}\n"
          : FUSEDKERNELS_WGMMA_ACC32(d)
          : "l"(desc_a), "l"(desc_b), "r"(int(accumulate)), "n"(int(kTransA)), "n"(int(kTransB)));
    }
  }

  // d (+)= A B: A 64x16 from registers (mma.sync m16n8k16's A fragment, one 16-row slice per warp), B 16x64
  // from shared memory.
  template <typename T, bool kTransB>
  static __device__ __forceinline__ void rs(float (&d)[32], const uint32_t (&a)[4], uint64_t desc_b,
                                            bool accumulate) {
    if constexpr (std::is_same_v<T, __half>) {
      asm volatile(
          "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
          "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 " FUSEDKERNELS_WGMMA_D32 ", "
          "{%32, %33, %34, %35}, %36, p, 1, 1, %38;\n}\n"
          : FUSEDKERNELS_WGMMA_ACC32(d)
          : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(int(accumulate)), "n"(int(kTransB)));
    } else {
      asm volatile(
          "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
          "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 " FUSEDKERNELS_WGMMA_D32 ", "
          "{%32, %33, %34, %35}, %36, p, 1, 1, %38;\n}\n"
          : FUSEDKERNELS_WGMMA_ACC32(d)
          : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(int(accumulate)), "n"(int(kTransB)));
    }
  }
};

template <>
struct Wgmma<128> {
  // d (+)= A B: A 64x16 and B 16x128 both from shared memory (descriptors); kTransA / kTransB: the operand
  // is stored M- / N-major.
  template <typename T, bool kTransA, bool kTransB>
  static __device__ __forceinline__ void ss(float (&d)[64], uint64_t desc_a, uint64_t desc_b, bool accumulate) {
    if constexpr (std::is_same_v<T, __half>) {
      asm volatile(
          "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
          "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 " FUSEDKERNELS_WGMMA_D64 ", "
          "%64, %65, p, 1, 1, %67, %68;\n}\n"
          : FUSEDKERNELS_WGMMA_ACC64(d)
          : "l"(desc_a), "l"(desc_b), "r"(int(accumulate)), "n"(int(kTransA)), "n"(int(kTransB)));
    } else {
      asm volatile(
          "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
          "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 " FUSEDKERNELS_WGMMA_D64 ", "
          "%64, %65, p, 1, 1, %67, %68;\n}\n"
          : FUSEDKERNELS_WGMMA_ACC64(d)
          : "l"(desc_a), "l"(desc_b), "r"(int(accumulate)), "n"(int(kTransA)), "n"(int(kTransB)));
    }
  }

  // d (+)= A B: A 64x16 from registers (mma.sync m16n8k16's A fragment, one 16-row slice per warp), B 16x128
  // from shared memory.
  template <typename T, bool kTransB>
  static __device__ __forceinline__ void rs(float (&d)[64], const uint32_t (&a)[4], uint64_t desc_b,
                                            bool accumulate) {
    if constexpr (std::is_same_v<T, __half>) {
      asm volatile(
          "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
          "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 " FUSEDKERNELS_WGMMA_D64 ", "
          "{%64, %65, %66, %67}, %68, p, 1, 1, %70;\n}\n"
          : FUSEDKERNELS_WGMMA_ACC64(d)
          : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(int(accumulate)), "n"(int(kTransB)));
    } else {
      asm volatile(
          "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
          "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 " FUSEDKERNELS_WGMMA_D64 ", "
          "{%64, %65, %66, %67}, %68, p, 1, 1, %70;\n}\n"
          : FUSEDKERNELS_WGMMA_ACC64(d)
          : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(int(accumulate)), "n"(int(kTransB)));
    }
  }
};


template <>
struct Wgmma<256> {
  // d (+)= A B: A 64x16 and B 16x256 both from shared memory (the GEMM's full-width tile).
  template <typename T, bool kTransA, bool kTransB>
  static __device__ __forceinline__ void ss(float (&d)[128], uint64_t desc_a, uint64_t desc_b, bool accumulate) {
    if constexpr (std::is_same_v<T, __half>) {
      asm volatile(
          "{\n.reg .pred p;\nsetp.ne.b32 p, %130, 0;\n"
          "wgmma.mma_async.sync.aligned.m64n256k16.f32.f16.f16 " FUSEDKERNELS_WGMMA_D128 ", "
          "%128, %129, p, 1, 1, %131, %132;\n}\n"
          : FUSEDKERNELS_WGMMA_ACC128(d)
          : "l"(desc_a), "l"(desc_b), "r"(int(accumulate)), "n"(int(kTransA)), "n"(int(kTransB)));
    } else {
      asm volatile(
          "{\n.reg .pred p;\nsetp.ne.b32 p, %130, 0;\n"
          "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 " FUSEDKERNELS_WGMMA_D128 ", "
          "%128, %129, p, 1, 1, %131, %132;\n}\n"
          : FUSEDKERNELS_WGMMA_ACC128(d)
          : "l"(desc_a), "l"(desc_b), "r"(int(accumulate)), "n"(int(kTransA)), "n"(int(kTransB)));
    }
  }
};

}  // namespace fusedkernels::sm90

#undef FUSEDKERNELS_WGMMA_D16
#undef FUSEDKERNELS_WGMMA_ACC16
#undef FUSEDKERNELS_WGMMA_D32
#undef FUSEDKERNELS_WGMMA_ACC32
#undef FUSEDKERNELS_WGMMA_D64
#undef FUSEDKERNELS_WGMMA_ACC64
#undef FUSEDKERNELS_WGMMA_D128
#undef FUSEDKERNELS_WGMMA_ACC128
