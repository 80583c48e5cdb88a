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

// A map of the row-major [rows, cols] 16-bit matrix at `base` (rows `row_stride` elements apart: a multiple
// of 8, base 16-byte aligned) read in boxes of box_rows x box_cols elements, box_cols * 2 == 128 bytes,
// stored in shared memory in the 128-byte swizzle (common/device/wgmma.cuh's layout); elements past the
// matrix read as zeros. False when the driver cannot encode it.
inline bool make_tensor_map_2d(CUtensorMap* map, const void* base, int64_t rows, int64_t cols, int64_t row_stride,
                               int box_rows, int box_cols) {
  const auto encode = tensor_map_encoder();
  if (encode == nullptr) return false;
  const cuuint64_t dims[2] = {cuuint64_t(cols), cuuint64_t(rows)};
  const cuuint64_t strides[1] = {cuuint64_t(row_stride) * 2};  // bytes, of every dimension but the innermost
  const cuuint32_t box[2] = {cuuint32_t(box_cols), cuuint32_t(box_rows)};
  const cuuint32_t element_strides[2] = {1, 1};
  return encode(map, CU_TENSOR_MAP_DATA_TYPE_UINT16, 2, const_cast<void*>(base), dims, strides, box, element_strides,
                CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

}  // namespace fusedkernels
