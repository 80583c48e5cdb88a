#include "gemm/linear_act_sm80.cuh"
FUSEDKERNELS_LINEAR_ACT_SM80_INSTANCE(__half)
