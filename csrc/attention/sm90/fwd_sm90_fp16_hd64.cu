#include "attention/sm90/attention_launch_sm90.cuh"
FUSEDKERNELS_ATTENTION_FWD_SM90_INSTANCE(__half, 64)
