// TMKL backward launcher: dtype and option dispatch to the kernel instantiations and the host
// emulation of the backward's per-thread code.
#include "dispatch.h"
#include "tmkl.cuh"

namespace fk {

namespace {

template <typename T>
int launch_typed(const TMKLBackwardArgs& p, cudaStream_t stream) {
  const int threads = p.threads > 0 ? p.threads : tmkl_threads(p.v, p.dtype);
  int status = 0;
  dispatch_tmkl_options(p, [&](auto fwd, auto mask, auto sep) {
    tmkl_bwd_kernel<T, decltype(fwd)::value, decltype(mask)::value, decltype(sep)::value>
        <<<static_cast<unsigned>(p.n), threads, 0, stream>>>(p);
    status = static_cast<int>(cudaGetLastError());
  });
  return status;
}

// Host emulation: the kernel's per-thread function for t = 0..threads-1 of each row.
template <typename T, bool FWD, bool MASK, bool SEP>
void emulate_rows(const TMKLBackwardArgs& p, int threads) {
  using A = acc_t<T>;
  for (int64_t row = 0; row < p.n; ++row) {
    const int64_t y = reinterpret_cast<const int64_t*>(p.y)[row];
    const T* z = reinterpret_cast<const T*>(p.z) + row * p.stride_z;
    const T* b = reinterpret_cast<const T*>(p.b) + row * p.stride_b;
    T* g = reinterpret_cast<T*>(p.g) + row * p.stride_g;
    if (y == p.ignore_index || y < 0 || y >= p.v) {
      const A fill = y == p.ignore_index ? A(0) : Math<A>::pos_inf() - Math<A>::pos_inf();
      for (int t = 0; t < threads; ++t) tmkl_fill_thread<T>(g, p.v, fill, t, threads);
      continue;
    }
    const TMKLBwdRow<A> r = tmkl_bwd_row<T, MASK, SEP>(p, row, z, y);
    for (int t = 0; t < threads; ++t) tmkl_bwd_thread<T, FWD, MASK, SEP>(z, b, g, p.v, y, r, t, threads);
  }
}

}  // namespace

int tmkl_backward_launch(const TMKLBackwardArgs& p, uintptr_t stream) {
  if (p.n == 0) return 0;
  cudaGetLastError();  // clear a stale error of this runtime so the check after the launch is ours
  int status = static_cast<int>(cudaErrorInvalidValue);
  dispatch_tmkl_dtype(p.dtype, [&](auto t) {
    status = launch_typed<typename decltype(t)::type>(p, reinterpret_cast<cudaStream_t>(stream));
  });
  return status;
}

void tmkl_backward_emulate(const TMKLBackwardArgs& p) {
  const int threads = p.threads > 0 ? p.threads : tmkl_threads(p.v, p.dtype);
  dispatch_tmkl_dtype(p.dtype, [&](auto t) {
    dispatch_tmkl_options(p, [&](auto fwd, auto mask, auto sep) {
      emulate_rows<typename decltype(t)::type, decltype(fwd)::value, decltype(mask)::value,
                   decltype(sep)::value>(p, threads);
    });
  });
}

}  // namespace fk
