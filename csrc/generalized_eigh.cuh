// Batched small generalized symmetric eigensolver: device code.
//
// Solves A v = w (B + eps I) v for one n x n problem (n <= 64) per block, entirely in shared memory:
//   1. load sym(A) into C, sym(B) + eps I into L, U = I; a NaN or inf input stops here;
//   2. Cholesky B + eps I = L L^T (right-looking, in place);
//   3. whitening C = L^-1 A L^-T by two forward substitutions (the second on the transpose);
//   4. parallel-order cyclic Jacobi on C: each round rotates n/2 disjoint (p, q) pairs of a
//      round-robin tournament (n - 1 rounds per sweep visit every pair once), accumulating U;
//      sweeps until one sweep rotates nothing (at most max_sweeps, default kEighMaxSweeps);
//   5. eigenvalues diag(C) ranked ascending, V = L^-T U by back substitution, written in order;
//      a non-finite result (overflow) is reported, never returned as a solution.
//
// Per-problem status (forgetkern/_params.py EIGH_*): 0 ok, k > 0 B + eps I not positive definite
// (Cholesky failed at column k - 1), -1 non-finite input or intermediate, -2 Jacobi did not
// converge (the last iterate is returned). Failed problems (status > 0 or -1) get NaN outputs.
//
// The body is a sequence of data-parallel phases (`blk.phase`), each followed by a barrier, so the
// host emulation runs the same code thread by thread. Within a phase no two threads write the same
// element, and no thread reads an element another thread writes.
#pragma once

#include "common.cuh"
#include "launch.h"

namespace fk {

// Shared-memory working set of one problem. Matrices are row-major with leading dimension
// n + 1 (padding against bank conflicts in the column accesses).
template <typename A> struct EighShared {
  A* L;        // [n][ld] Cholesky factor (lower triangle)
  A* C;        // [n][ld] whitened matrix, rotated towards diag(eigenvalues)
  A* U;        // [n][ld] accumulated rotations, then the eigenvectors V = L^-T U
  A* part;     // [kEighMaxThreads] per-thread partial results
  A* w;        // [kEighMaxN] eigenvalues in C's order
  A* rot_c;    // [kEighMaxN / 2] cosine of each pair's rotation in the current round
  A* rot_s;    // sine
  A* rot_pp;   // new C[p][p]
  A* rot_qq;   // new C[q][q]
  A* scale;    // [1] max |C_ij| after whitening
  int* rot_p;  // [kEighMaxN / 2] pair (p, q), p < q
  int* rot_q;
  int* rot_on; // whether the pair is rotated this round
  int* rank;   // [kEighMaxN] ascending position of each eigenvalue
  int* status; // [1] the problem's status (see above)
  int* rotated;// [2] "some pair rotated in this sweep", double-buffered by sweep parity
};

template <typename A> struct EighLayout {
  static constexpr int kPairs = kEighMaxN / 2;
  static FK_HD std::size_t align16(std::size_t x) { return (x + 15) & ~static_cast<std::size_t>(15); }
  static FK_HD std::size_t matrix_bytes(int n) { return align16(sizeof(A) * n * (n + 1)); }
  static FK_HD std::size_t bytes(int n) {
    return 3 * matrix_bytes(n) + align16(sizeof(A) * (kEighMaxThreads + kEighMaxN + 4 * kPairs + 1)) +
           align16(sizeof(int) * (3 * kPairs + kEighMaxN + 3));
  }
  static FK_HD EighShared<A> carve(unsigned char* base, int n) {
    EighShared<A> s;
    unsigned char* p = base;
    s.L = reinterpret_cast<A*>(p);
    p += matrix_bytes(n);
    s.C = reinterpret_cast<A*>(p);
    p += matrix_bytes(n);
    s.U = reinterpret_cast<A*>(p);
    p += matrix_bytes(n);
    A* f = reinterpret_cast<A*>(p);
    s.part = f;
    f += kEighMaxThreads;
    s.w = f;
    f += kEighMaxN;
    s.rot_c = f;
    f += kPairs;
    s.rot_s = f;
    f += kPairs;
    s.rot_pp = f;
    f += kPairs;
    s.rot_qq = f;
    f += kPairs;
    s.scale = f;
    p += align16(sizeof(A) * (kEighMaxThreads + kEighMaxN + 4 * kPairs + 1));
    int* k = reinterpret_cast<int*>(p);
    s.rot_p = k;
    k += kPairs;
    s.rot_q = k;
    k += kPairs;
    s.rot_on = k;
    k += kPairs;
    s.rank = k;
    k += kEighMaxN;
    s.status = k;
    k += 1;
    s.rotated = k;
    return s;
  }
};

// Pair k of round r of a round-robin tournament of m (even) players: player m-1 stays put and
// meets r; the others meet (r + k, r - k) mod (m - 1). Over rounds 0..m-2 every pair meets once.
FK_HD void round_robin_pair(int m, int r, int k, int& p, int& q) {
  int a, b;
  if (k == 0) {
    a = r;
    b = m - 1;
  } else {
    a = (r + k) % (m - 1);
    b = (r - k + (m - 1)) % (m - 1);
  }
  p = a < b ? a : b;
  q = a < b ? b : a;
}

// Solves one problem. gA, gB: [n, n] inputs; gw: [n] and gV: [n, n] outputs; ginfo: status.
template <typename A, class Block>
FK_HD void generalized_eigh_solve(Block& blk, const EighShared<A>& s, const A* gA, const A* gB,
                                  A* gw, A* gV, int* ginfo, int n, A eps, int max_sweeps) {
  using M = Math<A>;
  const int ld = n + 1;
  A* L = s.L;
  A* C = s.C;
  A* U = s.U;

  // 1. symmetric parts (halved before the sum: no overflow near the dtype's max); B + eps I into
  // the lower triangle of L; U = I; each thread notes whether its inputs were finite
  blk.phase([&](int t, int nt) {
    bool finite = true;
    for (int idx = t; idx < n * n; idx += nt) {
      const int i = idx / n, j = idx % n;
      finite = finite && M::isfinite(gA[idx]) && M::isfinite(gB[idx]);
      C[i * ld + j] = A(0.5) * gA[i * n + j] + A(0.5) * gA[j * n + i];
      const A bij = A(0.5) * gB[i * n + j] + A(0.5) * gB[j * n + i] + (i == j ? eps : A(0));
      L[i * ld + j] = j <= i ? bij : A(0);
      U[i * ld + j] = i == j ? A(1) : A(0);
    }
    s.part[t] = finite ? A(0) : A(1);
    if (t == 0) {
      s.rotated[0] = 0;
      s.rotated[1] = 0;
    }
  });
  blk.phase([&](int t, int nt) {
    if (t == 0) {
      bool finite = true;
      for (int k = 0; k < nt; ++k) finite = finite && s.part[k] == A(0);
      *s.status = finite ? 0 : -1;
    }
  });

  // 2. Cholesky, column k at a time: scale the column, then update the trailing lower triangle.
  for (int k = 0; k < n && *s.status == 0; ++k) {
    const A d = L[k * ld + k];  // final after the previous phase; written again only in phase b
    if (!(d > A(0))) {  // not positive definite (or NaN): same decision in every thread
      blk.phase([&](int t, int) {
        if (t == 0) *s.status = k + 1;
      });
      break;
    }
    const A lkk = M::sqrt(d);
    blk.phase([&](int t, int nt) {
      for (int i = k + 1 + t; i < n; i += nt) L[i * ld + k] /= lkk;
    });
    blk.phase([&](int t, int nt) {
      const int m = n - k - 1;
      for (int idx = t; idx < m * m; idx += nt) {
        const int i = k + 1 + idx / m, j = k + 1 + idx % m;
        if (j <= i) L[i * ld + j] -= L[i * ld + k] * L[j * ld + k];
      }
      if (t == 0) L[k * ld + k] = lkk;
    });
  }

  // 3a. Y = L^-1 C. Phase k eliminates row k (complete, not yet divided by L_kk) from the rows
  // below and divides row k-1, which no thread reads in this phase.
  if (*s.status == 0) {
    for (int k = 0; k < n; ++k) {
      blk.phase([&](int t, int nt) {
        const A inv = A(1) / L[k * ld + k];
        const int rows = n - k - 1;
        for (int idx = t; idx < rows * n; idx += nt) {
          const int i = k + 1 + idx / n, j = idx % n;
          C[i * ld + j] -= L[i * ld + k] * inv * C[k * ld + j];
        }
        if (k > 0) {
          const A inv_prev = A(1) / L[(k - 1) * ld + (k - 1)];
          for (int j = t; j < n; j += nt) C[(k - 1) * ld + j] *= inv_prev;
        }
      });
    }
    blk.phase([&](int t, int nt) {
      const A inv = A(1) / L[(n - 1) * ld + (n - 1)];
      for (int j = t; j < n; j += nt) C[(n - 1) * ld + j] *= inv;
    });
    // 3b. X = L^-1 Y^T, the same elimination on the transpose (element (i, j) of Y^T is C[j][i]);
    // afterwards C holds X^T = L^-1 A L^-T.
    for (int k = 0; k < n; ++k) {
      blk.phase([&](int t, int nt) {
        const A inv = A(1) / L[k * ld + k];
        const int rows = n - k - 1;
        for (int idx = t; idx < rows * n; idx += nt) {
          const int i = k + 1 + idx / n, j = idx % n;
          C[j * ld + i] -= L[i * ld + k] * inv * C[j * ld + k];
        }
        if (k > 0) {
          const A inv_prev = A(1) / L[(k - 1) * ld + (k - 1)];
          for (int j = t; j < n; j += nt) C[j * ld + (k - 1)] *= inv_prev;
        }
      });
    }
    blk.phase([&](int t, int nt) {
      const A inv = A(1) / L[(n - 1) * ld + (n - 1)];
      for (int j = t; j < n; j += nt) C[j * ld + (n - 1)] *= inv;
    });
    // symmetrize; each unordered pair (i, j) belongs to the thread owning i > j
    blk.phase([&](int t, int nt) {
      for (int idx = t; idx < n * n; idx += nt) {
        const int i = idx / n, j = idx % n;
        if (j < i) {
          const A v = A(0.5) * (C[i * ld + j] + C[j * ld + i]);
          C[i * ld + j] = v;
          C[j * ld + i] = v;
        }
      }
    });
    // scale of C for the absolute rotation threshold; a non-finite entry stops here
    blk.phase([&](int t, int nt) {
      A m = A(0);
      bool finite = true;
      for (int idx = t; idx < n * n; idx += nt) {
        const A v = C[(idx / n) * ld + idx % n];
        finite = finite && M::isfinite(v);
        m = M::max(m, M::abs(v));
      }
      s.part[t] = finite ? m : M::pos_inf();
    });
    blk.phase([&](int t, int nt) {
      if (t == 0) {
        A m = A(0);
        for (int k = 0; k < nt; ++k) m = M::max(m, s.part[k]);
        *s.scale = m;
        if (!(m < M::pos_inf())) *s.status = -1;
      }
    });
  }

  // 4. Jacobi sweeps. A pair is rotated unless |C_pq| <= eps_mach * max(sqrt|C_pp C_qq|,
  // eps_mach * max|C|); a sweep without a rotation ends the iteration.
  if (*s.status == 0) {
    const int m = n + (n & 1);
    const int npairs = m / 2;
    const A tol = A(M::kEps);
    const A floor = tol * tol * *s.scale;
    bool converged = false;
    for (int sweep = 0; sweep < max_sweeps; ++sweep) {
      int* flag = &s.rotated[sweep & 1];
      for (int r = 0; r < m - 1; ++r) {
        // rotation of each pair of this round: J = [[c, s], [-s, c]] zeroes C_pq in J^T C J
        blk.phase([&](int t, int nt) {
          for (int k = t; k < npairs; k += nt) {
            int p, q;
            round_robin_pair(m, r, k, p, q);
            s.rot_p[k] = p;
            s.rot_q[k] = q;
            int on = 0;
            if (q < n) {
              const A app = C[p * ld + p], aqq = C[q * ld + q], apq = C[p * ld + q];
              // sqrt|C_pp| sqrt|C_qq|, not sqrt|C_pp C_qq|: the product overflows fp32 from ~1e19
              const A thr = M::max(tol * M::sqrt(M::abs(app)) * M::sqrt(M::abs(aqq)), floor);
              if (M::abs(apq) > thr) {
                const A tau = (aqq - app) / (A(2) * apq);
                // t = sign(tau) / (|tau| + sqrt(1 + tau^2)), = 1 / (2 tau) once tau^2 would swamp 1
                // (and before it overflows)
                const A tt = M::abs(tau) > A(1) / tol
                                 ? A(0.5) / tau
                                 : (tau >= A(0) ? A(1) : A(-1)) / (M::abs(tau) + M::sqrt(A(1) + tau * tau));
                const A c = A(1) / M::sqrt(A(1) + tt * tt);
                s.rot_c[k] = c;
                s.rot_s[k] = tt * c;
                s.rot_pp[k] = app - tt * apq;
                s.rot_qq[k] = aqq + tt * apq;
                on = 1;
              }
            }
            s.rot_on[k] = on;
            if (on) atomic_or_flag(flag, 1);
          }
        });
        // rows p, q of J^T C
        blk.phase([&](int t, int nt) {
          if (r == 0 && t == 0) s.rotated[(sweep + 1) & 1] = 0;  // read last before the previous barrier
          for (int idx = t; idx < npairs * n; idx += nt) {
            const int k = idx / n, j = idx % n;
            if (!s.rot_on[k]) continue;
            const int p = s.rot_p[k], q = s.rot_q[k];
            const A c = s.rot_c[k], sn = s.rot_s[k];
            const A a = C[p * ld + j], b = C[q * ld + j];
            C[p * ld + j] = c * a - sn * b;
            C[q * ld + j] = sn * a + c * b;
          }
        });
        // columns p, q of (J^T C) J with the 2x2 block set exactly; U <- U J
        blk.phase([&](int t, int nt) {
          for (int idx = t; idx < npairs * n; idx += nt) {
            const int k = idx / n, i = idx % n;
            if (!s.rot_on[k]) continue;
            const int p = s.rot_p[k], q = s.rot_q[k];
            const A c = s.rot_c[k], sn = s.rot_s[k];
            if (i == p) {
              C[p * ld + p] = s.rot_pp[k];
              C[p * ld + q] = A(0);
            } else if (i == q) {
              C[q * ld + q] = s.rot_qq[k];
              C[q * ld + p] = A(0);
            } else {
              const A a = C[i * ld + p], b = C[i * ld + q];
              C[i * ld + p] = c * a - sn * b;
              C[i * ld + q] = sn * a + c * b;
            }
            const A ua = U[i * ld + p], ub = U[i * ld + q];
            U[i * ld + p] = c * ua - sn * ub;
            U[i * ld + q] = sn * ua + c * ub;
          }
        });
      }
      if (*flag == 0) {  // read by every thread after the last barrier of the sweep
        converged = true;
        break;
      }
    }
    if (!converged) {
      blk.phase([&](int t, int) {
        if (t == 0) *s.status = -2;
      });
    }

    // 5. eigenvalues, their ascending ranks (ties by index), V = L^-T U by back substitution:
    // phase k eliminates row k (complete, not yet divided by L_kk) from the rows above and
    // divides row k+1.
    blk.phase([&](int t, int nt) {
      for (int i = t; i < n; i += nt) s.w[i] = C[i * ld + i];
    });
    blk.phase([&](int t, int nt) {
      for (int i = t; i < n; i += nt) {
        const A wi = s.w[i];
        int rk = 0;
        for (int j = 0; j < n; ++j) rk += (s.w[j] < wi) || (s.w[j] == wi && j < i);
        s.rank[i] = rk;
      }
    });
    for (int k = n - 1; k >= 0; --k) {
      blk.phase([&](int t, int nt) {
        const A inv = A(1) / L[k * ld + k];
        for (int idx = t; idx < k * n; idx += nt) {
          const int i = idx / n, j = idx % n;
          U[i * ld + j] -= L[k * ld + i] * inv * U[k * ld + j];
        }
        if (k < n - 1) {
          const A inv_next = A(1) / L[(k + 1) * ld + (k + 1)];
          for (int j = t; j < n; j += nt) U[(k + 1) * ld + j] *= inv_next;
        }
      });
    }
    blk.phase([&](int t, int nt) {
      const A inv = A(1) / L[0];
      for (int j = t; j < n; j += nt) U[j] *= inv;
    });
    // a solution that overflowed is a failure, never returned
    blk.phase([&](int t, int nt) {
      bool finite = true;
      for (int idx = t; idx < n * n; idx += nt) finite = finite && M::isfinite(U[(idx / n) * ld + idx % n]);
      for (int i = t; i < n; i += nt) finite = finite && M::isfinite(s.w[i]);
      s.part[t] = finite ? A(0) : A(1);
    });
    blk.phase([&](int t, int nt) {
      if (t == 0) {
        bool finite = true;
        for (int k = 0; k < nt; ++k) finite = finite && s.part[k] == A(0);
        if (!finite) *s.status = -1;
      }
    });
  }

  // 6. outputs in ascending order (NaN where the problem failed before the Jacobi stage)
  const int status = *s.status;
  blk.phase([&](int t, int nt) {
    const bool solved = status == 0 || status == -2;
    const A nan = M::pos_inf() - M::pos_inf();
    for (int idx = t; idx < n * n; idx += nt) {
      const int i = idx / n, j = idx % n;
      if (solved) {
        gV[i * n + s.rank[j]] = U[i * ld + j];
      } else {
        gV[i * n + j] = nan;
      }
    }
    for (int j = t; j < n; j += nt) {
      if (solved) {
        gw[s.rank[j]] = s.w[j];
      } else {
        gw[j] = nan;
      }
    }
    if (t == 0) *ginfo = status;
  });
}

// Problem `mat` of the batch (the kernel's block, or one block of the host emulation).
template <typename A, class Block>
FK_HD void generalized_eigh_problem(Block& blk, const EighShared<A>& s, const GeneralizedEighArgs& p,
                                    int64_t mat) {
  const int n = static_cast<int>(p.n);
  const int64_t nn = static_cast<int64_t>(n) * n;
  generalized_eigh_solve<A>(blk, s, reinterpret_cast<const A*>(p.a) + mat * nn,
                            reinterpret_cast<const A*>(p.b) + mat * nn, reinterpret_cast<A*>(p.w) + mat * n,
                            reinterpret_cast<A*>(p.vecs) + mat * nn, reinterpret_cast<int*>(p.info) + mat, n,
                            A(p.eps), p.max_sweeps > 0 ? p.max_sweeps : kEighMaxSweeps);
}

#ifdef __CUDACC__
template <typename A>
__global__ void __launch_bounds__(kEighMaxThreads) generalized_eigh_kernel(const GeneralizedEighArgs p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  DeviceBlock blk{static_cast<int>(threadIdx.x), static_cast<int>(blockDim.x)};
  generalized_eigh_problem<A>(blk, EighLayout<A>::carve(smem_raw, static_cast<int>(p.n)), p, blockIdx.x);
}
#endif  // __CUDACC__

}  // namespace fk
