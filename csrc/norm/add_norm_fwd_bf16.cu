// Add + norm forward instances for bf16 input (weight in bf16 or fp32; residual in bf16 or fp32).
#include "norm/norm_kernels.cuh"
#include "norm/norm_launch.h"

FUSEDKERNELS_ADD_NORM_INSTANCES(__nv_bfloat16, __nv_bfloat16, __nv_bfloat16)
FUSEDKERNELS_ADD_NORM_INSTANCES(__nv_bfloat16, float, __nv_bfloat16)
FUSEDKERNELS_ADD_NORM_INSTANCES(__nv_bfloat16, __nv_bfloat16, float)
FUSEDKERNELS_ADD_NORM_INSTANCES(__nv_bfloat16, float, float)
