// Host-side helpers of the launchers: compile-time switches from runtime flags.
#pragma once

#include <type_traits>

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

}  // namespace fk
