#include "attention/attention_launch.cuh"
FUSEDKERNELS_ATTENTION_BWD_INSTANCE(__half, 128)
