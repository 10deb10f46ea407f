// Host-side helpers of the launchers (*.cu only): compile-time switches from runtime flags, and the
// one launch / host-emulation template every kernel family goes through.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
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

// One TMKL kernel instantiation: element type and the three options as compile-time constants.
template <class T, bool FORWARD_KL, bool MASK_TARGET, bool SEPARATE_CE> struct TMKLConfig {
  using type = T;
  static constexpr bool kForwardKL = FORWARD_KL;
  static constexpr bool kMaskTarget = MASK_TARGET;
  static constexpr bool kSeparateCE = SEPARATE_CE;
};

// Calls f(TMKLConfig<T, forward_kl, mask_target, separate_ce>{}) for the element type of p.dtype
// (fp32, fp16, bf16, fp64) and p's options: 8 instantiations per dtype. Returns false, calling
// nothing, for any other dtype code. Args: TMKLForwardArgs or TMKLBackwardArgs.
template <class Args, class F> inline bool dispatch_tmkl(const Args& p, F&& f) {
  auto options = [&](auto tag) {
    using T = typename decltype(tag)::type;
    dispatch_bool(p.forward_kl, [&](auto fwd) {
      dispatch_bool(p.mask_target, [&](auto mask) {
        dispatch_bool(p.separate_ce, [&](auto sep) {
          f(TMKLConfig<T, decltype(fwd)::value, decltype(mask)::value, decltype(sep)::value>{});
        });
      });
    });
  };
  switch (p.dtype) {
    case kFloat32: options(TypeTag<float>{}); return true;
    case kFloat16: options(TypeTag<__half>{}); return true;
    case kBFloat16: options(TypeTag<__nv_bfloat16>{}); return true;
    case kFloat64: options(TypeTag<double>{}); return true;
    default: return false;
  }
}

// Calls f(TypeTag<A>{}) for the working type of an fp32 / fp64 dtype code; false for any other.
template <class F> inline bool dispatch_float_or_double(int dtype, F&& f) {
  switch (dtype) {
    case kFloat32: f(TypeTag<float>{}); return true;
    case kFloat64: f(TypeTag<double>{}); return true;
    default: return false;
  }
}

// ---------------------------------------------------------------------------------------------
// The one launch / host-emulation template.
//
// A kernel family (TMKLForward, TMKLBackward, GeneralizedEigh, defined in its *.cu file) describes
// one grid of independent blocks:
//
//   using Args = ...;                                   // its launch.h argument struct
//   static int64_t blocks(const Args&);                 // grid size (one block per row / problem)
//   static int threads(const Args&);                    // automatic block size (Args::threads == 0)
//   template <class F> static bool dispatch(const Args&, F&& f);
//                                                       // f(Config{}) for the instantiation that
//                                                       // the runtime flags select; false if none
//   template <class C> static auto kernel();            // its __global__ instantiation for C
//   template <class C> static std::size_t shared_bytes(const Args&);  // dynamic shared memory
//   template <class C> static void emulate_block(const Args&, int64_t block, int threads);
//                                                       // block's per-thread code on the host
//
// launch<Family> and emulate<Family> below are then the whole launcher of the family.
// ---------------------------------------------------------------------------------------------
constexpr std::size_t kDefaultSharedBytes = 48 * 1024;  // dynamic shared memory without opting in

template <class Family> inline int block_threads(const typename Family::Args& p) {
  return p.threads > 0 ? p.threads : Family::threads(p);
}

// Launches the family's kernel on `stream`; returns the cudaError_t as int (0 = success).
template <class Family> int launch(const typename Family::Args& p, uintptr_t stream) {
  const int64_t blocks = Family::blocks(p);
  if (blocks == 0) return 0;
  cudaGetLastError();  // clear a stale error of this runtime so the check after the launch is ours
  const int threads = block_threads<Family>(p);
  int status = static_cast<int>(cudaErrorInvalidValue);  // a dtype code no instantiation serves
  Family::dispatch(p, [&](auto config) {
    using C = decltype(config);
    const auto kernel = Family::template kernel<C>();
    const std::size_t smem = Family::template shared_bytes<C>(p);
    if (smem > kDefaultSharedBytes) {
      // above 48 KiB a kernel must opt in to dynamic shared memory (per device; cheap to repeat)
      const cudaError_t err =
          cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
      if (err != cudaSuccess) {
        status = static_cast<int>(err);
        return;
      }
    }
    kernel<<<static_cast<unsigned>(blocks), threads, smem, reinterpret_cast<cudaStream_t>(stream)>>>(p);
    status = static_cast<int>(cudaGetLastError());
  });
  return status;
}

// Runs the family's per-thread code for every block on the CPU, over host memory (tests).
template <class Family> void emulate(const typename Family::Args& p) {
  const int64_t blocks = Family::blocks(p);
  const int threads = block_threads<Family>(p);
  Family::dispatch(p, [&](auto config) {
    for (int64_t block = 0; block < blocks; ++block) {
      Family::template emulate_block<decltype(config)>(p, block, threads);
    }
  });
}

}  // namespace fk
