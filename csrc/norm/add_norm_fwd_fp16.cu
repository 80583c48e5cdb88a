// Add + norm forward instances for fp16 input (weight in fp16 or fp32; residual in fp16 or fp32).
#include "norm/norm_kernels.cuh"
#include "norm/norm_launch.h"

FUSEDKERNELS_ADD_NORM_INSTANCES(__half, __half, __half)
FUSEDKERNELS_ADD_NORM_INSTANCES(__half, float, __half)
FUSEDKERNELS_ADD_NORM_INSTANCES(__half, __half, float)
FUSEDKERNELS_ADD_NORM_INSTANCES(__half, float, float)
