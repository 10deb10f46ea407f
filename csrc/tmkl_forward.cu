// TMKL forward launcher: dtype and option dispatch to the kernel instantiations, the launch
// settings of both TMKL kernels, and the host emulation of the forward's per-thread code.
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

template <typename T>
int launch_typed(const TMKLForwardArgs& p, cudaStream_t stream) {
  const int threads = p.threads > 0 ? p.threads : tmkl_threads(p.v, p.dtype);
  int status = 0;
  dispatch_tmkl_options(p, [&](auto fwd, auto mask, auto sep) {
    tmkl_fwd_kernel<T, decltype(fwd)::value, decltype(mask)::value, decltype(sep)::value>
        <<<static_cast<unsigned>(p.n), threads, 0, stream>>>(p);
    status = static_cast<int>(cudaGetLastError());
  });
  return status;
}

// Host emulation: the kernel's per-thread function for t = 0..threads-1, then a sequential merge.
template <typename T, bool FWD, bool MASK, bool SEP>
void emulate_rows(const TMKLForwardArgs& p, int threads) {
  using A = acc_t<T>;
  for (int64_t row = 0; row < p.n; ++row) {
    const int64_t y = reinterpret_cast<const int64_t*>(p.y)[row];
    if (tmkl_fwd_trivial_row<A>(p, row, y)) continue;
    const T* z = reinterpret_cast<const T*>(p.z) + row * p.stride_z;
    const T* b = reinterpret_cast<const T*>(p.b) + row * p.stride_b;
    TMKLFwdState<A> total;
    total.init();
    for (int t = 0; t < threads; ++t) {
      TMKLFwdState<A> st;
      st.init();
      tmkl_fwd_thread<T, FWD, MASK, SEP>(st, z, b, p.v, y, A(p.inv_t * kLog2e), t, threads);
      tmkl_fwd_merge<A, FWD, SEP>(total, st);
    }
    tmkl_fwd_finish<A, FWD, MASK, SEP>(total, to_acc(z[y]), p, row);
  }
}

}  // namespace

int tmkl_forward_launch(const TMKLForwardArgs& p, uintptr_t stream) {
  if (p.n == 0) return 0;
  cudaGetLastError();  // clear a stale error of this runtime so the check after the launch is ours
  int status = static_cast<int>(cudaErrorInvalidValue);
  dispatch_tmkl_dtype(p.dtype, [&](auto t) {
    status = launch_typed<typename decltype(t)::type>(p, reinterpret_cast<cudaStream_t>(stream));
  });
  return status;
}

void tmkl_forward_emulate(const TMKLForwardArgs& p) {
  const int threads = p.threads > 0 ? p.threads : tmkl_threads(p.v, p.dtype);
  dispatch_tmkl_dtype(p.dtype, [&](auto t) {
    dispatch_tmkl_options(p, [&](auto fwd, auto mask, auto sep) {
      emulate_rows<typename decltype(t)::type, decltype(fwd)::value, decltype(mask)::value,
                   decltype(sep)::value>(p, threads);
    });
  });
}

}  // namespace fk
