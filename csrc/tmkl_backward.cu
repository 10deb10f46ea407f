// TMKL backward launcher: the backward's kernel family (instantiation, host emulation of its
// per-thread code) for the launch template of dispatch.h. Launch settings: tmkl_forward.cu.
#include "dispatch.h"
#include "tmkl.cuh"

namespace fk {

namespace {

// One block per row; every thread writes its part of the row's gradient.
struct TMKLBackward {
  using Args = TMKLBackwardArgs;
  static int64_t blocks(const Args& p) { return p.n; }
  static int threads(const Args& p) { return tmkl_threads(p.v, p.dtype); }
  template <class F> static bool dispatch(const Args& p, F&& f) { return dispatch_tmkl(p, f); }
  template <class C> static auto kernel() {
    return &tmkl_bwd_kernel<typename C::type, C::kForwardKL, C::kMaskTarget, C::kSeparateCE>;
  }
  template <class C> static std::size_t shared_bytes(const Args&) { return 0; }

  // The row constants once (the kernel's threads all compute them before the barrier, so an
  // in-place g sees the same z[y]), then the per-thread function for t = 0..threads-1.
  template <class C> static void emulate_block(const Args& p, int64_t row, int threads) {
    using T = typename C::type;
    using A = acc_t<T>;
    const int64_t y = reinterpret_cast<const int64_t*>(p.y)[row];
    const T* z = reinterpret_cast<const T*>(p.z) + row * p.stride_z;
    const T* b = reinterpret_cast<const T*>(p.b) + row * p.stride_b;
    T* g = reinterpret_cast<T*>(p.g) + row * p.stride_g;
    bool trivial = false;
    for (int t = 0; t < threads; ++t) trivial = tmkl_bwd_trivial_row<T>(p, g, y, t, threads);
    if (trivial) return;
    const TMKLBwdRow<A> r = tmkl_bwd_row<T, C::kMaskTarget, C::kSeparateCE>(p, row, z, y);
    for (int t = 0; t < threads; ++t) {
      tmkl_bwd_thread<T, C::kForwardKL, C::kMaskTarget, C::kSeparateCE>(z, b, g, p.v, y, r, t, threads);
    }
  }
};

}  // namespace

int tmkl_backward_launch(const TMKLBackwardArgs& p, uintptr_t stream) { return launch<TMKLBackward>(p, stream); }

void tmkl_backward_emulate(const TMKLBackwardArgs& p) { emulate<TMKLBackward>(p); }

}  // namespace fk
