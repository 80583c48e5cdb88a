// Rotary and cross-entropy instances for fp32 (tables in fp32).
#include "llm/cross_entropy_kernels.cuh"
#include "llm/llm_launch.h"
#include "llm/rotary_kernels.cuh"

FUSEDKERNELS_ROTARY_INSTANCE(float, float)
FUSEDKERNELS_CROSS_ENTROPY_INSTANCE(float)
