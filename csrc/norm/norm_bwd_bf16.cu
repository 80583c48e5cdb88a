// Backward instances for bf16 input (weight in bf16 or fp32).
#include "norm/norm_kernels.cuh"
#include "norm/norm_launch.h"

FUSEDKERNELS_NORM_BWD_INSTANCES(__nv_bfloat16, __nv_bfloat16)
FUSEDKERNELS_NORM_BWD_INSTANCES(__nv_bfloat16, float)
