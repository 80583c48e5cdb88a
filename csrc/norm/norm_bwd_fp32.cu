// Backward instances for fp32 input (and fp32 weight).
#include "norm/norm_kernels.cuh"
#include "norm/norm_launch.h"

FUSEDKERNELS_NORM_BWD_INSTANCES(float, float)
