// Forward instances for fp16 input (weight in fp16 or fp32).
#include "norm/norm_kernels.cuh"
#include "norm/norm_launch.h"

FUSEDKERNELS_NORM_INSTANCES(__half, __half)
FUSEDKERNELS_NORM_INSTANCES(__half, float)
