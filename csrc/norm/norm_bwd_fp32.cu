// Backward instances for fp32 input (weight in fp32 or fp32).
#include "norm/norm_kernels.cuh"
#include "norm/norm_launch.h"

FUSEDKERNELS_NORM_BWD_INSTANCES(float, float)
