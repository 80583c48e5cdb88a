// Rotary and cross-entropy instances for fp16 (tables in fp16 or fp32).
#include "llm/cross_entropy_kernels.cuh"
#include "llm/llm_launch.h"
#include "llm/rotary_kernels.cuh"

FUSEDKERNELS_ROTARY_INSTANCE(__half, __half)
FUSEDKERNELS_ROTARY_INSTANCE(__half, float)
FUSEDKERNELS_CROSS_ENTROPY_INSTANCE(__half)
