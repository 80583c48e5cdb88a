#include "attention/sm90/attention_bwd_sm90_ws.cuh"
FUSEDKERNELS_ATTENTION_BWD_SM90_INSTANCE(__nv_bfloat16, 128)
