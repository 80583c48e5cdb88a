// Tensor maps for the TMA copy engine (sm_90), encoded on the host through the driver's entry point, so
// nothing links against libcuda. No torch here.
#pragma once

#include <cstdint>

#include <cuda.h>  // CUtensorMap and its enums (types only)
#include <cudaTypedefs.h>
#include <cuda_runtime.h>


namespace fusedkernels {

// The driver's function `name` (version 12.0), or nullptr.
inline void* driver_function(const char* name) {
  void* fn = nullptr;
  cudaDriverEntryPointQueryResult status;
  if (cudaGetDriverEntryPointByVersion(name, &fn, 12000, cudaEnableDefault, &status) == cudaSuccess &&
      status == cudaDriverEntryPointSuccess) {
    return fn;
  }
  cudaGetLastError();
  return nullptr;
}

inline PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() {
  static const auto encode =
      reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(driver_function("cuTensorMapEncodeTiled"));
  return encode;
}

// A map of a tensor of `rank` dimensions, innermost first, of 16-bit elements (or `type`'s): sizes[i] elements,
// strides[i] bytes between consecutive indices of dimension i + 1 (multiples of 16; base 16-byte aligned), read and
// written in boxes of box[i] elements, box[0] elements == 128 bytes, laid out in shared memory in the 128-byte
// swizzle (common/device/wgmma.cuh's layout). Loads read elements outside the tensor as zeros; stores and
// reductions skip them. False when the driver cannot encode it.
inline bool make_tensor_map(CUtensorMap* map, const void* base, int rank, const int64_t* sizes,
                            const int64_t* strides, const int* box,
                            CUtensorMapDataType type = CU_TENSOR_MAP_DATA_TYPE_UINT16) {
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
  return encode(map, type, cuuint32_t(rank), const_cast<void*>(base), dims, byte_strides,
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

// An im2col map of the NHWC 16-bit tensor at `base` ([batch, height, width, channels], contiguous; channels a
// multiple of 8) for a convolution with these paddings, filter size, dilations and strides: each load reads
// `channels_per_pixel` channels (x 2 == 128 bytes, the 128-byte swizzle) of `pixels` output pixels' input
// positions, in their order (w, then h, then the image). The bounding box of the filter window's corner runs
// from -pad to (size - 1) + pad - (filter - 1) * dilation in each of w and h. False when the driver cannot
// encode it.
inline bool make_im2col_map_nhwc(CUtensorMap* map, const void* base, int64_t batch, int64_t height, int64_t width,
                                 int64_t channels, int pad_h, int pad_w, int kernel_h, int kernel_w, int dilation_h,
                                 int dilation_w, int stride_h, int stride_w, int pixels, int channels_per_pixel) {
  using Encoder = PFN_cuTensorMapEncodeIm2col_v12000;
  static const auto encode = reinterpret_cast<Encoder>(driver_function("cuTensorMapEncodeIm2col"));
  if (encode == nullptr) return false;
  const cuuint64_t dims[4] = {cuuint64_t(channels), cuuint64_t(width), cuuint64_t(height), cuuint64_t(batch)};
  const cuuint64_t strides[3] = {cuuint64_t(channels) * 2, cuuint64_t(width * channels) * 2,
                                 cuuint64_t(height * width * channels) * 2};
  // corners in {w, h} order, as the dimensions
  const int lower[2] = {-pad_w, -pad_h};
  const int upper[2] = {pad_w - (kernel_w - 1) * dilation_w, pad_h - (kernel_h - 1) * dilation_h};
  const cuuint32_t element_strides[4] = {1, cuuint32_t(stride_w), cuuint32_t(stride_h), 1};
  return encode(map, CU_TENSOR_MAP_DATA_TYPE_UINT16, 4, const_cast<void*>(base), dims, strides, lower, upper,
                cuuint32_t(channels_per_pixel), cuuint32_t(pixels), element_strides, CU_TENSOR_MAP_INTERLEAVE_NONE,
                CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

}  // namespace fusedkernels
