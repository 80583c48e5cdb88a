// rotary / cross_entropy: pick the launcher instance for the dtypes in the params.
#include "common/host/static_switch.h"
#include "llm/llm_launch.h"

namespace fusedkernels::llm {

cudaError_t rotary(const RotaryParams& p, cudaStream_t stream) {
  // tables in the input's type or in float32 (validated by the bindings)
  return float_type_switch(p.dtype, [&]<typename T>() {
    if (p.table_dtype == DType::kFloat32) return launch_rotary<T, float>(p, stream);
    return launch_rotary<T, T>(p, stream);
  });
}

cudaError_t cross_entropy(const CrossEntropyParams& p, cudaStream_t stream) {
  return float_type_switch(p.dtype, [&]<typename T>() { return launch_cross_entropy<T>(p, stream); });
}

}  // namespace fusedkernels::llm
