#include "attention/attention_launch.cuh"
FUSEDKERNELS_ATTENTION_BWD_INSTANCE(__nv_bfloat16, 256)
