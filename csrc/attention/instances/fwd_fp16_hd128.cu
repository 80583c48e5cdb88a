#include "attention/attention_launch.cuh"
FUSEDKERNELS_ATTENTION_FWD_INSTANCE(__half, 128)
