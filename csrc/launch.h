// Host-side interface between the pybind11 bindings (bindings.cpp, plain C++) and the CUDA
// launchers (*.cu). Pointers travel as integers, so nothing here depends on libtorch.
//
// Launchers return a cudaError_t as int (0 = success) and never throw; the bindings turn a
// non-zero status into a Python exception that names the kernel. `emulate_*` run the kernels'
// per-thread code on the CPU over host memory (tests without a GPU; never a production path).
// Both are instances of the one launch / emulate template in dispatch.h.
#pragma once

#include <cstddef>
#include <cstdint>

namespace fk {

// dtype codes shared by the launchers, the bindings and forgetkern/_cuda.py
enum DTypeCode : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

// Columns of the (N, kNumStats) per-row statistics, in the accumulation dtype (forgetkern/_params.py
// STAT_*; a test ties the count): each normalizer as its max and its log-sum, kept apart.
enum StatColumn : int {
  kStatMZ = 0,   // max over the kept columns of z/T (0 for a row without a finite entry)
  kStatLsZ = 1,  // log sum exp(z/T - m_z) over the kept columns
  kStatMB = 2,   // the same for b/T
  kStatLsB = 3,
  kStatMCE = 4,  // max of z over every column (the CE normalizer; temperature never applies)
  kStatLsCE = 5, // log sum exp(z - m_ce)
  kStatKL = 6,   // the row's KL (unscaled)
  kNumStats = 7
};

// TMKL forward: per row loss, ce, kl and the (N, kNumStats) statistics.
struct TMKLForwardArgs {
  uintptr_t z;         // [N, V] adapted logits, unit stride along V
  int64_t stride_z;    // row stride of z (elements)
  uintptr_t b;         // [N, V] base logits, same dtype
  int64_t stride_b;
  uintptr_t y;         // [N] int64 labels
  uintptr_t loss;      // [N] out, accumulation dtype
  uintptr_t ce;        // [N] out
  uintptr_t kl;        // [N] out (unscaled)
  uintptr_t stats;     // [N, kNumStats] out, contiguous
  int64_t n;
  int64_t v;
  int64_t ignore_index;
  double inv_t;        // 1 / temperature
  double ce_weight;
  double kl_scale;     // kl_weight * temperature^2
  bool forward_kl;
  bool mask_target;
  bool separate_ce;    // temperature != 1: CE keeps its own log-sum-exp
  int dtype;           // DTypeCode of z and b
  int threads;         // threads per block; 0 = tmkl_threads(v, dtype)
};

// TMKL backward: grad[i] = coef_ce[i] * dCE_i/dz + coef_kl[i] * dKL_i/dz, written into g.
struct TMKLBackwardArgs {
  uintptr_t z;         // [N, V] adapted logits (may be the same memory as g)
  int64_t stride_z;
  uintptr_t b;         // [N, V] base logits
  int64_t stride_b;
  uintptr_t y;         // [N] int64 labels
  uintptr_t stats;     // [N, kNumStats] from the forward, contiguous, accumulation dtype
  uintptr_t coef_ce;   // [N] accumulation dtype
  uintptr_t coef_kl;   // [N] accumulation dtype
  uintptr_t g;         // [N, V] out, dtype of z
  int64_t stride_g;
  int64_t n;
  int64_t v;
  int64_t ignore_index;
  double inv_t;
  bool forward_kl;
  bool mask_target;
  bool separate_ce;
  int dtype;
  int threads;
};

// Batched generalized symmetric eigenproblem A v = w (B + eps I) v for n <= kEighMaxN.
struct GeneralizedEighArgs {
  uintptr_t a;         // [batch, n, n] contiguous, dtype
  uintptr_t b;         // [batch, n, n] contiguous, dtype
  uintptr_t w;         // [batch, n] out, ascending eigenvalues
  uintptr_t vecs;      // [batch, n, n] out, eigenvectors as columns
  uintptr_t info;      // [batch] out int32 status (forgetkern/_params.py EIGH_*): 0 ok,
                       //   k > 0 not positive definite (Cholesky failed at column k-1),
                       //   -1 non-finite input or result, -2 Jacobi did not converge
  int64_t batch;
  int64_t n;
  double eps;
  int dtype;           // kFloat32 or kFloat64
  int threads;         // 0 = generalized_eigh_threads(n)
  int max_sweeps;      // 0 = kEighMaxSweeps (tests force non-convergence with fewer)
};

// Limits shared with forgetkern/_params.py (EIGH_MAX_N, EIGH_MAX_SWEEPS; a test ties them).
constexpr int kEighMaxN = 64;
constexpr int kTMKLMaxThreads = 512;
constexpr int kEighMaxThreads = 256;
constexpr int kEighMaxSweeps = 40;

// Launch settings (the one place they are chosen).
int tmkl_threads(int64_t v, int dtype);
int generalized_eigh_threads(int64_t n);
std::size_t generalized_eigh_shared_bytes(int64_t n, int dtype);

int tmkl_forward_launch(const TMKLForwardArgs& args, uintptr_t stream);
int tmkl_backward_launch(const TMKLBackwardArgs& args, uintptr_t stream);
int generalized_eigh_launch(const GeneralizedEighArgs& args, uintptr_t stream);

void tmkl_forward_emulate(const TMKLForwardArgs& args);
void tmkl_backward_emulate(const TMKLBackwardArgs& args);
void generalized_eigh_emulate(const GeneralizedEighArgs& args);

// Stream synchronization and error text (thin wrappers so bindings.cpp needs no CUDA headers).
int stream_synchronize(uintptr_t stream);
const char* error_name(int code);
const char* error_string(int code);
int runtime_version();

}  // namespace fk
