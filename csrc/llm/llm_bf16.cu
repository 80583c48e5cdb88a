// Rotary and cross-entropy instances for bf16 (tables in bf16 or fp32).
#include "llm/cross_entropy_kernels.cuh"
#include "llm/llm_launch.h"
#include "llm/rotary_kernels.cuh"

FUSEDKERNELS_ROTARY_INSTANCE(__nv_bfloat16, __nv_bfloat16)
FUSEDKERNELS_ROTARY_INSTANCE(__nv_bfloat16, float)
FUSEDKERNELS_CROSS_ENTROPY_INSTANCE(__nv_bfloat16)
