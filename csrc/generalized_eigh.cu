// Generalized eigensolver launchers: dtype dispatch, launch settings (threads, shared memory) and
// the host emulation of the kernel (tests without a GPU).
#include <vector>

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

template <typename A> int launch_typed(const GeneralizedEighArgs& p, cudaStream_t stream) {
  const int threads = p.threads > 0 ? p.threads : generalized_eigh_threads(p.n);
  const std::size_t smem = EighLayout<A>::bytes(static_cast<int>(p.n));
  // above 48 KiB a kernel must opt in to dynamic shared memory (per device; cheap to repeat)
  cudaError_t err = cudaFuncSetAttribute(generalized_eigh_kernel<A>,
                                         cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(smem));
  if (err != cudaSuccess) return static_cast<int>(err);
  generalized_eigh_kernel<A><<<static_cast<unsigned>(p.batch), threads, smem, stream>>>(p);
  return static_cast<int>(cudaGetLastError());
}

template <typename A> void emulate_typed(const GeneralizedEighArgs& p) {
  const int threads = p.threads > 0 ? p.threads : generalized_eigh_threads(p.n);
  const int n = static_cast<int>(p.n);
  std::vector<unsigned char> smem(EighLayout<A>::bytes(n) + 16);
  unsigned char* base = smem.data();
  base += (16 - (reinterpret_cast<uintptr_t>(base) & 15)) & 15;
  const EighShared<A> s = EighLayout<A>::carve(base, n);
  HostBlock blk{threads};
  for (int64_t mat = 0; mat < p.batch; ++mat) {
    generalized_eigh_solve<A>(blk, s, reinterpret_cast<const A*>(p.a) + mat * n * n,
                              reinterpret_cast<const A*>(p.b) + mat * n * n,
                              reinterpret_cast<A*>(p.w) + mat * n, reinterpret_cast<A*>(p.vecs) + mat * n * n,
                              reinterpret_cast<int*>(p.info) + mat, n, A(p.eps));
  }
}

}  // namespace

int generalized_eigh_launch(const GeneralizedEighArgs& p, uintptr_t stream) {
  if (p.batch == 0) return 0;
  cudaGetLastError();  // clear a stale error of this runtime so the check below is ours
  auto s = reinterpret_cast<cudaStream_t>(stream);
  switch (p.dtype) {
    case kFloat32: return launch_typed<float>(p, s);
    case kFloat64: return launch_typed<double>(p, s);
    default: return static_cast<int>(cudaErrorInvalidValue);
  }
}

void generalized_eigh_emulate(const GeneralizedEighArgs& p) {
  switch (p.dtype) {
    case kFloat32: return emulate_typed<float>(p);
    case kFloat64: return emulate_typed<double>(p);
    default: return;
  }
}

}  // namespace fk
