// Tensor maps for the TMA copy engine (sm_90), encoded on the host through the driver's entry point, so
// nothing links against libcuda. No torch here.
#pragma once

#include <cstdint>
#include <mutex>

#include <cuda.h>  // CUtensorMap and its enums (types only)
#include <cudaTypedefs.h>
#include <cuda_runtime.h>


namespace fusedkernels {

inline PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() {
  static PFN_cuTensorMapEncodeTiled_v12000 encode = nullptr;
  static std::once_flag once;
  std::call_once(once, [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult status;
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &status) ==
            cudaSuccess &&
        status == cudaDriverEntryPointSuccess) {
      encode = reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(fn);
    } else {
      cudaGetLastError();
    }
  });
  return encode;
}

// A map of a 16-bit tensor of `rank` dimensions, innermost first: sizes[i] elements, strides[i] bytes between
// consecutive indices of dimension i + 1 (multiples of 16; base 16-byte aligned), read and written in boxes
// of box[i] elements, box[0] * 2 == 128 bytes, laid out in shared memory in the 128-byte swizzle
// (common/device/wgmma.cuh's layout). Loads read elements outside the tensor as zeros; stores skip them.
// False when the driver cannot encode it.
inline bool make_tensor_map(CUtensorMap* map, const void* base, int rank, const int64_t* sizes,
                            const int64_t* strides, const int* box) {
  const auto encode = tensor_map_encoder();
  if (encode == nullptr || rank < 1 || rank > 5) return false;
  cuuint64_t dims[5], byte_strides[4];
  cuuint32_t box_dims[5], element_strides[5];
  for (int i = 0; i < rank; ++i) {
    dims[i] = cuuint64_t(sizes[i]);
    box_dims[i] = cuuint32_t(box[i]);
    element_strides[i] = 1;
    if (i + 1 < rank) byte_strides[i] = cuuint64_t(strides[i]);
  }
  return encode(map, CU_TENSOR_MAP_DATA_TYPE_UINT16, cuuint32_t(rank), const_cast<void*>(base), dims, byte_strides,
                box_dims, element_strides, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

// The row-major [rows, cols] matrix at `base`, rows `row_stride` elements apart (a multiple of 8), in boxes of
// box_rows x box_cols elements (box_cols * 2 == 128 bytes).
inline bool make_tensor_map_2d(CUtensorMap* map, const void* base, int64_t rows, int64_t cols, int64_t row_stride,
                               int box_rows, int box_cols) {
  const int64_t sizes[2] = {cols, rows}, strides[1] = {row_stride * 2};
  const int box[2] = {box_cols, box_rows};
  return make_tensor_map(map, base, 2, sizes, strides, box);
}

}  // namespace fusedkernels
