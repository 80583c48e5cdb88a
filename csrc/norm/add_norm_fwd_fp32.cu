// Add + norm forward instances for fp32 input (weight and residual fp32).
#include "norm/norm_kernels.cuh"
#include "norm/norm_launch.h"

FUSEDKERNELS_ADD_NORM_INSTANCES(float, float, float)
