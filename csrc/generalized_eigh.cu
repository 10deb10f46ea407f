// Generalized eigensolver launcher: launch settings (threads, dynamic shared memory) and the
// eigensolver's kernel family (instantiation, host emulation) for the launch template of dispatch.h.
#include <vector>

#include "dispatch.h"
#include "generalized_eigh.cuh"

namespace fk {

int generalized_eigh_threads(int64_t n) {
  // About two elements of a rotated row pair per thread in the Jacobi phases (n/2 pairs x n
  // columns), in whole warps, at most kEighMaxThreads.
  int64_t threads = ((n * n / 2 + 31) / 32) * 32;
  if (threads < 32) threads = 32;
  if (threads > kEighMaxThreads) threads = kEighMaxThreads;
  return static_cast<int>(threads);
}

std::size_t generalized_eigh_shared_bytes(int64_t n, int dtype) {
  return dtype == kFloat64 ? EighLayout<double>::bytes(static_cast<int>(n))
                           : EighLayout<float>::bytes(static_cast<int>(n));
}

namespace {

// One block per problem, its whole working set in dynamic shared memory.
struct GeneralizedEigh {
  using Args = GeneralizedEighArgs;
  static int64_t blocks(const Args& p) { return p.batch; }
  static int threads(const Args& p) { return generalized_eigh_threads(p.n); }
  template <class F> static bool dispatch(const Args& p, F&& f) { return dispatch_float_or_double(p.dtype, f); }
  template <class C> static auto kernel() { return &generalized_eigh_kernel<typename C::type>; }
  template <class C> static std::size_t shared_bytes(const Args& p) {
    return EighLayout<typename C::type>::bytes(static_cast<int>(p.n));
  }

  // The kernel's phases thread by thread (HostBlock) over a host copy of the shared working set.
  template <class C> static void emulate_block(const Args& p, int64_t mat, int threads) {
    using A = typename C::type;
    const int n = static_cast<int>(p.n);
    std::vector<unsigned char> smem(EighLayout<A>::bytes(n) + 16);
    unsigned char* base = smem.data();
    base += (16 - (reinterpret_cast<uintptr_t>(base) & 15)) & 15;
    HostBlock blk{threads};
    generalized_eigh_problem<A>(blk, EighLayout<A>::carve(base, n), p, mat);
  }
};

}  // namespace

int generalized_eigh_launch(const GeneralizedEighArgs& p, uintptr_t stream) {
  return launch<GeneralizedEigh>(p, stream);
}

void generalized_eigh_emulate(const GeneralizedEighArgs& p) { emulate<GeneralizedEigh>(p); }

}  // namespace fk
