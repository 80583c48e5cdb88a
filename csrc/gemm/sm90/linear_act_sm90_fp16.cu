#include "gemm/sm90/linear_act_sm90.cuh"
FUSEDKERNELS_LINEAR_ACT_SM90_INSTANCE(__half)
