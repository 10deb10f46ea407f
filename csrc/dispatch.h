// Host-side helpers of the launchers: compile-time switches from runtime flags.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

#include "launch.h"

namespace fk {

// Calls f(std::true_type{}) or f(std::false_type{}): the flag becomes a template argument, so the
// kernels' hot loops carry no runtime branch on it.
template <class F> inline void dispatch_bool(bool flag, F&& f) {
  if (flag) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

// The element type of a dtype code, as a value: f(TypeTag<T>{}) reads it as decltype(tag)::type.
template <class T> struct TypeTag {
  using type = T;
};

// Calls f(TypeTag<T>{}) for the element type of a TMKL dtype code (fp32, fp16, bf16, fp64);
// returns false, calling nothing, for any other code.
template <class F> inline bool dispatch_tmkl_dtype(int dtype, F&& f) {
  switch (dtype) {
    case kFloat32: f(TypeTag<float>{}); return true;
    case kFloat16: f(TypeTag<__half>{}); return true;
    case kBFloat16: f(TypeTag<__nv_bfloat16>{}); return true;
    case kFloat64: f(TypeTag<double>{}); return true;
    default: return false;
  }
}

// Calls f(fwd, mask, sep) with the three TMKL options of p (forward_kl, mask_target,
// separate_ce) as std::integral_constant<bool, ...>: one kernel instantiation per combination.
template <class Args, class F> inline void dispatch_tmkl_options(const Args& p, F&& f) {
  dispatch_bool(p.forward_kl, [&](auto fwd) {
    dispatch_bool(p.mask_target, [&](auto mask) {
      dispatch_bool(p.separate_ce, [&](auto sep) { f(fwd, mask, sep); });
    });
  });
}

}  // namespace fk
