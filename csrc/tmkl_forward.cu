// TMKL forward launcher: the launch settings of both TMKL kernels and the forward's kernel family
// (instantiation, host emulation of its per-thread code) for the launch template of dispatch.h.
#include "dispatch.h"
#include "tmkl.cuh"

namespace fk {

int tmkl_threads(int64_t v, int dtype) {
  // Enough 16-byte vectors per thread to amortize the block merge, at most kTMKLMaxThreads
  // (16 warps: several blocks per SM keep loads in flight), at least two warps.
  const int64_t elem = dtype == kFloat64 ? 8 : (dtype == kFloat32 ? 4 : 2);
  const int64_t vectors = (v * elem + 15) / 16;
  int64_t threads = 64;
  while (threads < kTMKLMaxThreads && threads * 4 < vectors) threads *= 2;
  return static_cast<int>(threads);
}

namespace {

// One block per row; the block's threads stream the row, then merge their states.
struct TMKLForward {
  using Args = TMKLForwardArgs;
  static int64_t blocks(const Args& p) { return p.n; }
  static int threads(const Args& p) { return tmkl_threads(p.v, p.dtype); }
  template <class F> static bool dispatch(const Args& p, F&& f) { return dispatch_tmkl(p, f); }
  template <class C> static auto kernel() {
    return &tmkl_fwd_kernel<typename C::type, C::kForwardKL, C::kMaskTarget, C::kSeparateCE>;
  }
  template <class C> static std::size_t shared_bytes(const Args&) { return 0; }

  // The kernel's per-thread function for t = 0..threads-1, then a sequential merge.
  template <class C> static void emulate_block(const Args& p, int64_t row, int threads) {
    using T = typename C::type;
    using A = acc_t<T>;
    const int64_t y = reinterpret_cast<const int64_t*>(p.y)[row];
    if (tmkl_fwd_trivial_row<A>(p, row, y)) return;
    const T* z = reinterpret_cast<const T*>(p.z) + row * p.stride_z;
    const T* b = reinterpret_cast<const T*>(p.b) + row * p.stride_b;
    TMKLFwdState<A> total;
    total.init();
    for (int t = 0; t < threads; ++t) {
      TMKLFwdState<A> st;
      st.init();
      tmkl_fwd_thread<T, C::kForwardKL, C::kMaskTarget, C::kSeparateCE>(st, z, b, p.v, y,
                                                                       A(p.inv_t), t, threads);
      tmkl_fwd_merge<A, C::kForwardKL, C::kSeparateCE>(total, st);
    }
    tmkl_fwd_finish<A, C::kForwardKL, C::kMaskTarget, C::kSeparateCE>(total, to_acc(z[y]), p, row);
  }
};

}  // namespace

int tmkl_forward_launch(const TMKLForwardArgs& p, uintptr_t stream) { return launch<TMKLForward>(p, stream); }

void tmkl_forward_emulate(const TMKLForwardArgs& p) { emulate<TMKLForward>(p); }

}  // namespace fk
