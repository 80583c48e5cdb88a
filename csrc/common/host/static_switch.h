// The one way runtime values become template parameters: static_switch<8, 16, 32>(tpr, fn) calls
// fn.template operator()<16>() when tpr == 16. Each listed value is one instance of whatever fn
// instantiates, so list only the values a measurement says deserve their own code.
#pragma once

#include <utility>

#include "common/dtype.h"

namespace fusedkernels {

// The value must be one of the list (callers validate their inputs): anything else takes the last.
template <auto kFirst, auto... kRest, typename T, typename Fn>
decltype(auto) static_switch(const T& value, Fn&& fn) {
  if constexpr (sizeof...(kRest) == 0) {
    return fn.template operator()<kFirst>();
  } else {
    if (value == kFirst) return fn.template operator()<kFirst>();
    return static_switch<kRest...>(value, std::forward<Fn>(fn));
  }
}

// static_switch over element types: type_switch<DType::kFloat32, DType::kBFloat16>(d, fn) calls
// fn.template operator()<float>() or fn.template operator()<__nv_bfloat16>().
template <DType... kTypes, typename Fn>
decltype(auto) type_switch(DType d, Fn&& fn) {
  return static_switch<kTypes...>(d, [&]<DType kD>() -> decltype(auto) { return fn.template operator()<CType<kD>>(); });
}

// Every element type the kernels know.
template <typename Fn>
decltype(auto) float_type_switch(DType d, Fn&& fn) {
  return type_switch<DType::kFloat32, DType::kFloat16, DType::kBFloat16>(d, std::forward<Fn>(fn));
}

}  // namespace fusedkernels
