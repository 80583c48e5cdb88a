// Vector loads and stores of N elements of T, and conversion to and from fp32.
#pragma once

#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace fusedkernels {

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// The bits of a 16-bit float.
__device__ __forceinline__ unsigned short bits_of(__half x) { return __half_as_ushort(x); }
__device__ __forceinline__ unsigned short bits_of(__nv_bfloat16 x) { return __bfloat16_as_ushort(x); }
template <typename T>
__device__ __forceinline__ T from_bits(unsigned short b);
template <>
__device__ __forceinline__ __half from_bits<__half>(unsigned short b) { return __ushort_as_half(b); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_bits<__nv_bfloat16>(unsigned short b) { return __ushort_as_bfloat16(b); }

// The two T of a packed pair (lo in the low half) as floats; for bf16 two bit operations (the high half stays where
// a float's high half is, instead of a shift down and back up).
template <typename T>
__device__ __forceinline__ float2 unpack2(unsigned int pair) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return make_float2(__uint_as_float(pair << 16), __uint_as_float(pair & 0xffff0000u));
  } else {
    return make_float2(to_float(from_bits<T>(pair & 0xffffu)), to_float(from_bits<T>(pair >> 16)));
  }
}

// N elements of T (8, 16 or 32 bytes in all) moved with 8- or 16-byte accesses. The elements live packed
// in 32-bit words: copying an array of __half / __nv_bfloat16 (user-defined copies) compiles to 2-byte
// accesses.
template <typename T, int N>
struct alignas(sizeof(T) * N < 16 ? sizeof(T) * N : 16) Vec {
  static constexpr int kBytes = sizeof(T) * N;
  static_assert(kBytes == 8 || kBytes % 16 == 0, "Vec moves 8 bytes or multiples of 16");
  static constexpr int kWords = kBytes / 4;
  unsigned int w[kWords] = {};

  __device__ __forceinline__ void load(const T* p) {
    if constexpr (kBytes == 8) {
      const uint2 u = *reinterpret_cast<const uint2*>(p);
      w[0] = u.x, w[1] = u.y;
    } else {
#pragma unroll
      for (int k = 0; k < kWords / 4; ++k) {
        const uint4 u = reinterpret_cast<const uint4*>(p)[k];
        w[4 * k] = u.x, w[4 * k + 1] = u.y, w[4 * k + 2] = u.z, w[4 * k + 3] = u.w;
      }
    }
  }
  // Stores to global memory (every Vec store does), through inline PTX: a plain uint4 store next to a
  // per-element fallback path gets merged with it and split into 4-byte stores. No memory clobber:
  // nothing reads back what a Vec stores in the same kernel, and a clobber would keep the compiler from
  // issuing the next loads before these stores.
  __device__ __forceinline__ void store(T* p) const {
    const size_t g = __cvta_generic_to_global(p);
    if constexpr (kBytes == 8) {
      asm volatile("st.global.v2.b32 [%0], {%1, %2};" ::"l"(g), "r"(w[0]), "r"(w[1]));
    } else {
#pragma unroll
      for (int k = 0; k < kWords / 4; ++k) {
        asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};" ::"l"(g + 16 * k), "r"(w[4 * k]), "r"(w[4 * k + 1]),
                     "r"(w[4 * k + 2]), "r"(w[4 * k + 3]));
      }
    }
  }
  __device__ __forceinline__ float get(int i) const {
    if constexpr (sizeof(T) == 4) {
      return __uint_as_float(w[i]);
    } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {  // a bf16 is the top half of its float
      return __uint_as_float(i % 2 ? w[i / 2] & 0xffff0000u : w[i / 2] << 16);
    } else {
      return to_float(from_bits<T>(static_cast<unsigned short>(w[i / 2] >> (16 * (i % 2)))));
    }
  }
  __device__ __forceinline__ void set(int i, float x) {
    if constexpr (sizeof(T) == 4) {
      w[i] = __float_as_uint(x);
    } else {
      const unsigned int b = bits_of(from_float<T>(x)), shift = 16 * (i % 2);
      w[i / 2] = (w[i / 2] & ~(0xffffu << shift)) | (b << shift);
    }
  }
};

// Elements of T in one 16-byte access.
template <typename T>
constexpr int kVec16 = 16 / sizeof(T);

}  // namespace fusedkernels
