// Shared device helpers of the forgetkern CUDA kernels: dtype traits, 16-byte vector loads and
// stores, math wrappers and the SPMD block abstraction.
//
// Every helper here is __host__ __device__ so that the kernels' per-thread code also compiles for
// the host: the `emulate_*` entry points run it thread by thread on the CPU (tests of the kernel
// logic on machines without a GPU). Only the few lines guarded by __CUDA_ARCH__ differ.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#include "launch.h"

#define FK_HD __host__ __device__ __forceinline__

namespace fk {

constexpr double kLog2e = 1.4426950408889634074;  // log2(e)
constexpr double kLn2 = 0.69314718055994530942;   // ln(2)

// ----------------------------------------------------------------------------------------------
// Accumulation type: float64 for float64 inputs, float32 otherwise.
// ----------------------------------------------------------------------------------------------
template <typename T> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };
template <typename T> using acc_t = typename AccOf<T>::type;

// ----------------------------------------------------------------------------------------------
// Math in the accumulation type. exp2_fast is the hot-loop exponential: the SFU instruction
// (ex2.approx.ftz, relative error ~2^-22) for float32, the exact exp2 for float64.
// ----------------------------------------------------------------------------------------------
template <typename A> struct Math;

template <> struct Math<float> {
  static constexpr float kEps = 1.1920928955078125e-07f;  // machine epsilon
  static FK_HD float neg_inf() { return -INFINITY; }
  static FK_HD float pos_inf() { return INFINITY; }
  static FK_HD float exp2_fast(float x) {
#ifdef __CUDA_ARCH__
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
#else
    return exp2f(x);
#endif
  }
  static FK_HD float exp2(float x) { return exp2f(x); }
  static FK_HD float log2(float x) { return log2f(x); }
  static FK_HD float log(float x) { return logf(x); }
  static FK_HD float log1p(float x) { return log1pf(x); }
  static FK_HD float exp(float x) { return expf(x); }
  static FK_HD float sqrt(float x) { return sqrtf(x); }
  static FK_HD float abs(float x) { return fabsf(x); }
  static FK_HD float max(float a, float b) { return fmaxf(a, b); }
  static FK_HD bool isfinite(float x) { return x - x == 0.0f; }
};

template <> struct Math<double> {
  static constexpr double kEps = 2.220446049250313e-16;
  static FK_HD double neg_inf() { return -static_cast<double>(INFINITY); }
  static FK_HD double pos_inf() { return static_cast<double>(INFINITY); }
  static FK_HD double exp2_fast(double x) { return ::exp2(x); }
  static FK_HD double exp2(double x) { return ::exp2(x); }
  static FK_HD double log2(double x) { return ::log2(x); }
  static FK_HD double log(double x) { return ::log(x); }
  static FK_HD double log1p(double x) { return ::log1p(x); }
  static FK_HD double exp(double x) { return ::exp(x); }
  static FK_HD double sqrt(double x) { return ::sqrt(x); }
  static FK_HD double abs(double x) { return ::fabs(x); }
  static FK_HD double max(double a, double b) { return ::fmax(a, b); }
  static FK_HD bool isfinite(double x) { return x - x == 0.0; }
};

// ----------------------------------------------------------------------------------------------
// Scalar conversions between storage and accumulation types.
// ----------------------------------------------------------------------------------------------
FK_HD float to_acc(float x) { return x; }
FK_HD double to_acc(double x) { return x; }
FK_HD float to_acc(__half x) { return __half2float(x); }
FK_HD float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> FK_HD T from_acc(acc_t<T> x);
template <> FK_HD float from_acc<float>(float x) { return x; }
template <> FK_HD double from_acc<double>(double x) { return x; }
template <> FK_HD __half from_acc<__half>(float x) { return __float2half_rn(x); }
template <> FK_HD __nv_bfloat16 from_acc<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// ----------------------------------------------------------------------------------------------
// 16-byte vectors: VEC elements of T per aligned load/store.
// ----------------------------------------------------------------------------------------------
template <typename T> struct Vec {
  static constexpr int kSize = 16 / sizeof(T);
  union Raw {
    uint4 u;
    T e[kSize];
    FK_HD Raw() {}
  };
};

template <typename T>
FK_HD void load_vec(const T* p, acc_t<T> (&out)[Vec<T>::kSize]) {
  typename Vec<T>::Raw raw;
  raw.u = *reinterpret_cast<const uint4*>(p);
#pragma unroll
  for (int k = 0; k < Vec<T>::kSize; ++k) out[k] = to_acc(raw.e[k]);
}

template <typename T>
FK_HD void store_vec(T* p, const acc_t<T> (&in)[Vec<T>::kSize]) {
  typename Vec<T>::Raw raw;
#pragma unroll
  for (int k = 0; k < Vec<T>::kSize; ++k) raw.e[k] = from_acc<T>(in[k]);
  *reinterpret_cast<uint4*>(p) = raw.u;
}

// Byte offset of p within its 16-byte line.
template <typename T> FK_HD unsigned misalignment(const T* p) {
  return static_cast<unsigned>(reinterpret_cast<uintptr_t>(p) & 15u);
}

// Elements before p + head is 16-byte aligned (p itself is element aligned).
template <typename T> FK_HD int64_t head_elements(const T* p) {
  unsigned mis = misalignment(p);
  return mis == 0 ? 0 : static_cast<int64_t>((16u - mis) / sizeof(T));
}

// ----------------------------------------------------------------------------------------------
// SPMD block abstraction. A kernel body written as a sequence of `blk.phase(f)` calls runs f(t, nt)
// for every thread t of the block, with a barrier after each phase. On the GPU every thread calls
// f with its own index; the host emulation calls f for t = 0..nt-1 in turn. Values that must
// survive a phase live in shared memory; per-thread locals do not cross phases.
// ----------------------------------------------------------------------------------------------
struct DeviceBlock {
  int tid;
  int nt;
  template <class F> FK_HD void phase(F&& f) {
    f(tid, nt);
#ifdef __CUDA_ARCH__
    __syncthreads();
#endif
  }
};

struct HostBlock {
  int nt;
  template <class F> FK_HD void phase(F&& f) {
    for (int t = 0; t < nt; ++t) f(t, nt);
  }
};

FK_HD void atomic_or_flag(int* flag, int value) {
#ifdef __CUDA_ARCH__
  atomicOr(flag, value);
#else
  *flag |= value;
#endif
}

}  // namespace fk
