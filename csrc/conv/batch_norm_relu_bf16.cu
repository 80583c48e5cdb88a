#include "conv/batch_norm_relu.cuh"
FUSEDKERNELS_BATCH_NORM_RELU_INSTANCE(__nv_bfloat16)
