// The order in which the GEMM kernels walk their output tiles, shared by every arch's kernel.
#pragma once

namespace fusedkernels::gemm {

// Tile `index` of a tiles_m x tiles_n grid, walked in groups of kGroupM m-blocks (all n-blocks of a group
// before the next group), so the W slices the group's tiles share stay in L2.
template <int kGroupM>
__device__ __forceinline__ void tile_of(int index, int tiles_m, int tiles_n, int& m_block, int& n_block) {
  const int group = index / (kGroupM * tiles_n), first_m = group * kGroupM;
  const int rows = min(kGroupM, tiles_m - first_m), within = index % (kGroupM * tiles_n);
  m_block = first_m + within % rows;
  n_block = within / rows;
}

}  // namespace fusedkernels::gemm
