// Target-masked KL (TMKL) on logits: device code of the forward and backward kernels.
//
// Per row (docs/math.md §1), with x = z/T, u = b/T and the target column removed when
// MASK_TARGET:   CE = LSE(z) - z_y,
//   forward KL = sum_{v!=y} p~_v (log p~_v - log q~_v),  reverse KL = sum_{v!=y} q~_v (log q~_v - log p~_v),
//   loss = ce_weight * CE + kl_weight * T^2 * KL.
//
// One block per row. The forward streams the row once: each thread keeps online, target-excluded
// log-sum-exp states of x and u plus the KL accumulator (and, when T != 1, a separate LSE of z for
// the CE), the block merges the thread states (warp shuffles, then shared memory) and thread 0
// writes loss, ce, kl and the seven saved statistics (kStat*). The backward recomputes the
// softmaxes from the statistics and writes the gradient, optionally over the logits themselves.
//
// Rows are read with 16-byte vector loads when z, b (and g) share their offset within a 16-byte
// line: a scalar head up to the first aligned column, the aligned body, a scalar tail. Rows whose
// inputs are misaligned against each other are read element by element (correct, slower).
//
// Exponentials run in base 2 (x2 = x * log2 e) so that each is one SFU instruction for float32.
#pragma once

#include "common.cuh"
#include "launch.h"

namespace fk {

// ----------------------------------------------------------------------------------------------
// Forward state of one thread (or of a merged group of threads). Maxima are kept apart from the
// sums, in the logits' own units (shift-invariant: exponents are formed as (x - m), never x - LSE).
// ----------------------------------------------------------------------------------------------
template <typename A> struct TMKLFwdState {
  A mz, sz;  // max of x = z/T over kept columns, sum exp(x - mz)
  A mb, sb;  // the same for u = b/T
  A acc;     // forward: sum exp(u - mb) ((u - mb) - (x - mz)); reverse: the same with x, u swapped
  A mc, sc;  // z over all columns (the CE normalizer when T != 1)
  FK_HD void init() {
    mz = mb = mc = Math<A>::neg_inf();
    sz = sb = sc = acc = A(0);
  }
};

// The running max as a finite shift: an all -inf prefix uses 0 (its sum is 0 anyway).
template <typename A> FK_HD A finite_shift(A m) { return m == Math<A>::neg_inf() ? A(0) : m; }

// exp(d) by the hot-loop exponential (d = x - m: exact near the max, where it matters).
template <typename A> FK_HD A exp_fast(A d) { return Math<A>::exp2_fast(d * A(kLog2e)); }

// acc rescaled by f in [0, 1] after its max moved; an infinite KL contribution stays infinite.
template <typename A> FK_HD A rescale(A acc, A f) {
  return f > A(0) ? acc * f : (acc == Math<A>::pos_inf() ? acc : A(0));
}

// The KL accumulator after the maxima moved by dz = m_z_old - m_z and db = m_b_old - m_b (finite
// shifts): every earlier term's offset changes by (db - dz) (forward; reverse: dz - db), then the
// weights rescale by fw = exp(m_w_old - m_w). sw is the weights' sum before the move.
template <typename A> FK_HD A moved(A acc, A sw, A fw, A dz, A db, bool forward_kl) {
  const A shift = forward_kl ? db - dz : dz - db;
  return rescale(sw == A(0) ? acc : acc + sw * shift, fw);
}

// Adds K consecutive columns starting at col0 to a thread's state.
template <typename A, int K, bool FORWARD_KL, bool MASK_TARGET, bool SEPARATE_CE>
FK_HD void tmkl_fwd_update(TMKLFwdState<A>& st, const A (&zr)[K], const A (&br)[K], int64_t col0,
                           int64_t y, A inv_t) {
  using M = Math<A>;
  const A ninf = M::neg_inf();
  const A pinf = M::pos_inf();
  const int64_t target = y - col0;  // position of the target within these K columns, if any
  A x[K], u[K];
  A xm = ninf, um = ninf;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    x[k] = zr[k] * inv_t;
    u[k] = br[k] * inv_t;
    if (MASK_TARGET && k == target) {
      x[k] = ninf;
      u[k] = ninf;
    }
    xm = M::max(xm, x[k]);
    um = M::max(um, u[k]);
  }
  // online rescale, only when a max moves (rare after the first columns). The accumulator's terms
  // are offsets to the maxima: when either moves, earlier terms shift by the change of the offsets
  const A mz0 = finite_shift(st.mz), mb0 = finite_shift(st.mb);
  const A sw0 = FORWARD_KL ? st.sb : st.sz;  // the weights' sum so far, relative to the old max
  A fw = A(1);
  if (xm > st.mz) {
    const A f = exp_fast(st.mz - xm);
    st.sz *= f;
    if (!FORWARD_KL) fw = f;
    st.mz = xm;
  }
  if (um > st.mb) {
    const A f = exp_fast(st.mb - um);
    st.sb *= f;
    if (FORWARD_KL) fw = f;
    st.mb = um;
  }
  const A mz = finite_shift(st.mz);
  const A mb = finite_shift(st.mb);
  if (mz != mz0 || mb != mb0) st.acc = moved(st.acc, sw0, fw, mz0 - mz, mb0 - mb, FORWARD_KL);
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const A ez = exp_fast(x[k] - mz);
    const A eb = exp_fast(u[k] - mb);
    st.sz += ez;
    st.sb += eb;
    if (FORWARD_KL) {
      // p~_v (log p~_v - log q~_v) with offsets to the maxima, up to the final normalization;
      // nothing where the base is -inf, +inf where the base has mass and the adapted model has none
      const A d = (u[k] - mb) - (x[k] - mz);
      st.acc += u[k] == ninf ? A(0) : (d == pinf ? d : eb * d);
    } else {
      const A d = (x[k] - mz) - (u[k] - mb);
      st.acc += x[k] == ninf ? A(0) : (d == pinf ? d : ez * d);
    }
  }
  if (SEPARATE_CE) {
    A c[K];
    A cm = ninf;
#pragma unroll
    for (int k = 0; k < K; ++k) {
      c[k] = zr[k];
      cm = M::max(cm, c[k]);
    }
    if (cm > st.mc) {
      st.sc *= exp_fast(st.mc - cm);
      st.mc = cm;
    }
    const A mc = finite_shift(st.mc);
#pragma unroll
    for (int k = 0; k < K; ++k) st.sc += exp_fast(c[k] - mc);
  }
}

// Merges state o into st (associative up to rounding).
template <typename A, bool FORWARD_KL, bool SEPARATE_CE>
FK_HD void tmkl_fwd_merge(TMKLFwdState<A>& st, const TMKLFwdState<A>& o) {
  using M = Math<A>;
  const A mz = M::max(st.mz, o.mz);
  const A mb = M::max(st.mb, o.mb);
  const A fz0 = exp_fast(st.mz - finite_shift(mz)), fz1 = exp_fast(o.mz - finite_shift(mz));
  const A fb0 = exp_fast(st.mb - finite_shift(mb)), fb1 = exp_fast(o.mb - finite_shift(mb));
  // both accumulators move to the merged maxima (their offsets shift, their weights rescale)
  const A dz0 = finite_shift(st.mz) - finite_shift(mz), dz1 = finite_shift(o.mz) - finite_shift(mz);
  const A db0 = finite_shift(st.mb) - finite_shift(mb), db1 = finite_shift(o.mb) - finite_shift(mb);
  if (FORWARD_KL) {
    st.acc = moved(st.acc, st.sb, fb0, dz0, db0, true) + moved(o.acc, o.sb, fb1, dz1, db1, true);
  } else {
    st.acc = moved(st.acc, st.sz, fz0, dz0, db0, false) + moved(o.acc, o.sz, fz1, dz1, db1, false);
  }
  st.sz = st.sz * fz0 + o.sz * fz1;
  st.sb = st.sb * fb0 + o.sb * fb1;
  st.mz = mz;
  st.mb = mb;
  if (SEPARATE_CE) {
    const A mc = M::max(st.mc, o.mc);
    st.sc = st.sc * exp_fast(st.mc - finite_shift(mc)) + o.sc * exp_fast(o.mc - finite_shift(mc));
    st.mc = mc;
  }
}

// How one thread walks its share of a row: [0, head) scalar, then nvec aligned vectors, then
// [tail, v) scalar. Without a common alignment the whole row is scalar.
struct RowSplit {
  int64_t head, nvec, tail;
};

template <int VEC> FK_HD RowSplit split_row(int64_t v, int64_t head_elems, bool vector_ok) {
  if (!vector_ok) return RowSplit{v, 0, v};
  const int64_t head = head_elems < v ? head_elems : v;
  const int64_t nvec = (v - head) / VEC;
  return RowSplit{head, nvec, head + nvec * VEC};
}

// One thread's pass over its columns of a row (columns t, t + nt, ... of each segment).
template <typename T, bool FORWARD_KL, bool MASK_TARGET, bool SEPARATE_CE>
FK_HD void tmkl_fwd_thread(TMKLFwdState<acc_t<T>>& st, const T* __restrict__ z,
                           const T* __restrict__ b, int64_t v, int64_t y, acc_t<T> inv_t, int t,
                           int nt) {
  using A = acc_t<T>;
  constexpr int VEC = Vec<T>::kSize;
  const RowSplit sp = split_row<VEC>(v, head_elements(z), misalignment(z) == misalignment(b));
  for (int64_t c = t; c < sp.head; c += nt) {
    const A zr[1] = {to_acc(z[c])};
    const A br[1] = {to_acc(b[c])};
    tmkl_fwd_update<A, 1, FORWARD_KL, MASK_TARGET, SEPARATE_CE>(st, zr, br, c, y, inv_t);
  }
  const T* zv = z + sp.head;
  const T* bv = b + sp.head;
  int64_t i = t;
  for (; i + nt < sp.nvec; i += 2 * static_cast<int64_t>(nt)) {  // two vectors in flight
    A z0[VEC], b0[VEC], z1[VEC], b1[VEC];
    load_vec(zv + i * VEC, z0);
    load_vec(bv + i * VEC, b0);
    load_vec(zv + (i + nt) * VEC, z1);
    load_vec(bv + (i + nt) * VEC, b1);
    tmkl_fwd_update<A, VEC, FORWARD_KL, MASK_TARGET, SEPARATE_CE>(st, z0, b0, sp.head + i * VEC, y, inv_t);
    tmkl_fwd_update<A, VEC, FORWARD_KL, MASK_TARGET, SEPARATE_CE>(st, z1, b1, sp.head + (i + nt) * VEC, y,
                                                                 inv_t);
  }
  if (i < sp.nvec) {
    A z0[VEC], b0[VEC];
    load_vec(zv + i * VEC, z0);
    load_vec(bv + i * VEC, b0);
    tmkl_fwd_update<A, VEC, FORWARD_KL, MASK_TARGET, SEPARATE_CE>(st, z0, b0, sp.head + i * VEC, y, inv_t);
  }
  for (int64_t c = sp.tail + t; c < v; c += nt) {
    const A zr[1] = {to_acc(z[c])};
    const A br[1] = {to_acc(b[c])};
    tmkl_fwd_update<A, 1, FORWARD_KL, MASK_TARGET, SEPARATE_CE>(st, zr, br, c, y, inv_t);
  }
}

// Per-row outputs of the forward: loss, ce, kl and the statistics (layout: kStat* in launch.h,
// forgetkern/_params.py STAT_*): each normalizer as its max and its log-sum, apart.
template <typename A> struct TMKLFwdRow {
  A loss, ce, kl;
  A m_z, ls_z, m_b, ls_b, m_ce, ls_ce;
};

template <typename A> FK_HD void tmkl_fwd_store(const TMKLForwardArgs& p, int64_t row, const TMKLFwdRow<A>& o) {
  reinterpret_cast<A*>(p.loss)[row] = o.loss;
  reinterpret_cast<A*>(p.ce)[row] = o.ce;
  // a KL below zero by rounding reports as 0 (NaN stays NaN); the statistics keep it as computed
  reinterpret_cast<A*>(p.kl)[row] = o.kl < A(0) ? A(0) : o.kl;
  A* stats = reinterpret_cast<A*>(p.stats) + row * kNumStats;
  stats[kStatMZ] = o.m_z;
  stats[kStatLsZ] = o.ls_z;
  stats[kStatMB] = o.m_b;
  stats[kStatLsB] = o.ls_b;
  stats[kStatMCE] = o.m_ce;
  stats[kStatLsCE] = o.ls_ce;
  stats[kStatKL] = o.kl;
}

// Ignored rows contribute zeros; a label outside [0, V) (unchecked input) gives NaN, never a read
// out of bounds.
template <typename A> FK_HD bool tmkl_fwd_trivial_row(const TMKLForwardArgs& p, int64_t row, int64_t y) {
  if (y == p.ignore_index || y < 0 || y >= p.v) {
    const A fill = y == p.ignore_index ? A(0) : Math<A>::pos_inf() - Math<A>::pos_inf();
    tmkl_fwd_store<A>(p, row, TMKLFwdRow<A>{fill, fill, fill, fill, fill, fill, fill, fill, fill});
    return true;
  }
  return false;
}

// Final per-row values from the merged state of the whole row.
template <typename A, bool FORWARD_KL, bool MASK_TARGET, bool SEPARATE_CE>
FK_HD void tmkl_fwd_finish(const TMKLFwdState<A>& st, A z_y, const TMKLForwardArgs& p, int64_t row) {
  using M = Math<A>;
  TMKLFwdRow<A> o;
  // a row without a finite entry: max 0, log-sum -inf
  o.m_z = finite_shift(st.mz);
  o.ls_z = M::log(st.sz);
  o.m_b = finite_shift(st.mb);
  o.ls_b = M::log(st.sb);
  A kl;
  if (FORWARD_KL) {
    // KL = acc/s_b - ls_b + ls_z (offsets to the maxima: shift-invariant); no base mass: 0; base
    // mass but no adapted mass: inf
    kl = st.acc / st.sb - o.ls_b + o.ls_z;
    if (st.sz == A(0)) kl = M::pos_inf();
    if (st.sb == A(0)) kl = A(0);
  } else {
    kl = st.acc / st.sz - o.ls_z + o.ls_b;
    if (st.sb == A(0)) kl = M::pos_inf();
    if (st.sz == A(0)) kl = A(0);
  }
  o.kl = kl;
  if (SEPARATE_CE) {
    o.m_ce = finite_shift(st.mc);
    o.ls_ce = M::log(st.sc);
  } else if (MASK_TARGET) {
    // T == 1: LSE(z) = logaddexp(LSE'(z), z_y), max and log-sum apart
    const A raw = st.sz == A(0) ? M::neg_inf() : st.mz;
    o.m_ce = finite_shift(M::max(raw, z_y));
    o.ls_ce = M::log(M::exp((o.m_z - o.m_ce) + o.ls_z) + M::exp(z_y - o.m_ce));
  } else {
    o.m_ce = o.m_z;
    o.ls_ce = o.ls_z;
  }
  o.ce = (o.m_ce - z_y) + o.ls_ce;
  const A ce_weight = A(p.ce_weight), kl_scale = A(p.kl_scale);
  const A kl_out = o.kl < A(0) ? A(0) : o.kl;
  o.loss = (ce_weight != A(0) ? ce_weight * o.ce : A(0)) + (kl_scale != A(0) ? kl_scale * kl_out : A(0));
  tmkl_fwd_store<A>(p, row, o);
}

#ifdef __CUDACC__
// Block-wide merge of the thread states; thread 0 returns the row's state. blockDim.x is a
// multiple of 32 and at most 1024. `smem` holds 7 x 32 values.
template <typename A, bool FORWARD_KL, bool SEPARATE_CE>
__device__ __forceinline__ void tmkl_block_merge(TMKLFwdState<A>& st, A* smem) {
  auto warp_merge = [&](TMKLFwdState<A>& s) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      TMKLFwdState<A> o;
      o.mz = __shfl_xor_sync(0xffffffffu, s.mz, off);
      o.sz = __shfl_xor_sync(0xffffffffu, s.sz, off);
      o.mb = __shfl_xor_sync(0xffffffffu, s.mb, off);
      o.sb = __shfl_xor_sync(0xffffffffu, s.sb, off);
      o.acc = __shfl_xor_sync(0xffffffffu, s.acc, off);
      if (SEPARATE_CE) {
        o.mc = __shfl_xor_sync(0xffffffffu, s.mc, off);
        o.sc = __shfl_xor_sync(0xffffffffu, s.sc, off);
      } else {
        o.mc = s.mc;
        o.sc = s.sc;
      }
      tmkl_fwd_merge<A, FORWARD_KL, SEPARATE_CE>(s, o);
    }
  };
  warp_merge(st);
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int nwarps = blockDim.x >> 5;
  if (nwarps == 1) return;
  if (lane == 0) {
    smem[0 * 32 + warp] = st.mz;
    smem[1 * 32 + warp] = st.sz;
    smem[2 * 32 + warp] = st.mb;
    smem[3 * 32 + warp] = st.sb;
    smem[4 * 32 + warp] = st.acc;
    smem[5 * 32 + warp] = st.mc;
    smem[6 * 32 + warp] = st.sc;
  }
  __syncthreads();
  if (warp == 0) {
    if (lane < nwarps) {
      st.mz = smem[0 * 32 + lane];
      st.sz = smem[1 * 32 + lane];
      st.mb = smem[2 * 32 + lane];
      st.sb = smem[3 * 32 + lane];
      st.acc = smem[4 * 32 + lane];
      st.mc = smem[5 * 32 + lane];
      st.sc = smem[6 * 32 + lane];
    } else {
      st.init();
    }
    warp_merge(st);
  }
}

template <typename T, bool FORWARD_KL, bool MASK_TARGET, bool SEPARATE_CE>
__global__ void __launch_bounds__(kTMKLMaxThreads) tmkl_fwd_kernel(const TMKLForwardArgs p) {
  using A = acc_t<T>;
  __shared__ A smem[7 * 32];
  const int64_t row = blockIdx.x;
  const int64_t y = reinterpret_cast<const int64_t*>(p.y)[row];
  if (tmkl_fwd_trivial_row<A>(p, row, y)) return;  // uniform over the block (one row per block)
  const T* z = reinterpret_cast<const T*>(p.z) + row * p.stride_z;
  const T* b = reinterpret_cast<const T*>(p.b) + row * p.stride_b;
  TMKLFwdState<A> st;
  st.init();
  tmkl_fwd_thread<T, FORWARD_KL, MASK_TARGET, SEPARATE_CE>(st, z, b, p.v, y, A(p.inv_t),
                                                          threadIdx.x, blockDim.x);
  tmkl_block_merge<A, FORWARD_KL, SEPARATE_CE>(st, smem);
  if (threadIdx.x == 0) {
    tmkl_fwd_finish<A, FORWARD_KL, MASK_TARGET, SEPARATE_CE>(st, to_acc(z[y]), p, row);
  }
}
#endif  // __CUDACC__

// ----------------------------------------------------------------------------------------------
// Backward
// ----------------------------------------------------------------------------------------------
template <typename A> struct TMKLBwdRow {
  A m_z, ls_z;       // LSE'(z/T) as max and log-sum (the forward's statistics)
  A m_b, ls_b;       // LSE'(b/T)
  A m_ce, ls_ce;     // LSE(z)
  A kl;              // the row's KL (unscaled)
  A a, c;            // coef_ce, coef_kl
  bool a_nz, c_nz;   // a zero coefficient contributes exactly zero (never 0 * inf)
  A inv_t;           // 1/T
  A ratio;           // exp(LSE'(z) - LSE(z)): softmax(z)_v = q~_v * ratio off the target (T == 1)
  A dce_y;           // softmax(z)_y - 1 (T == 1 with the target masked)
};

// Row constants; reads z[y] when MASK_TARGET && !SEPARATE_CE (before anything is written).
template <typename T, bool MASK_TARGET, bool SEPARATE_CE>
FK_HD TMKLBwdRow<acc_t<T>> tmkl_bwd_row(const TMKLBackwardArgs& p, int64_t row, const T* z, int64_t y) {
  using A = acc_t<T>;
  using M = Math<A>;
  const A* stats = reinterpret_cast<const A*>(p.stats) + row * kNumStats;
  TMKLBwdRow<A> r;
  r.m_z = stats[kStatMZ];
  r.ls_z = stats[kStatLsZ];
  r.m_b = stats[kStatMB];
  r.ls_b = stats[kStatLsB];
  r.m_ce = stats[kStatMCE];
  r.ls_ce = stats[kStatLsCE];
  r.kl = stats[kStatKL];
  r.a = reinterpret_cast<const A*>(p.coef_ce)[row];
  r.c = reinterpret_cast<const A*>(p.coef_kl)[row];
  r.a_nz = r.a != A(0);
  r.c_nz = r.c != A(0);
  r.inv_t = A(p.inv_t);
  r.ratio = A(0);
  r.dce_y = A(0);
  if (MASK_TARGET && !SEPARATE_CE) {
    r.ratio = M::exp((r.m_z - r.m_ce) + (r.ls_z - r.ls_ce));
    r.dce_y = M::exp((to_acc(z[y]) - r.m_ce) - r.ls_ce) - A(1);
  }
  return r;
}

// coef_ce * dCE/dz_v + coef_kl * dKL/dz_v for one column.
template <typename A, bool FORWARD_KL, bool MASK_TARGET, bool SEPARATE_CE>
FK_HD A tmkl_grad(A zr, A br, bool is_y, const TMKLBwdRow<A>& r) {
  using M = Math<A>;
  const A ninf = M::neg_inf();
  A x = zr * r.inv_t;
  A u = br * r.inv_t;
  if (MASK_TARGET && is_y) {
    x = ninf;
    u = ninf;
  }
  // log q~_v = (x - m_z) - ls_z, log p~_v = (u - m_b) - ls_b (shift-invariant)
  const A lq = (x - r.m_z) - r.ls_z;
  const A lp = (u - r.m_b) - r.ls_b;
  const A q = x == ninf ? A(0) : exp_fast(lq);  // q~_v
  const A pb = u == ninf ? A(0) : exp_fast(lp);  // p~_v
  A d_kl;
  if (FORWARD_KL) {
    // dKL/dz_v = (q~_v - p~_v) / T
    d_kl = (q - pb) * r.inv_t;
  } else {
    // dKL/dz_v = q~_v (log q~_v - log p~_v - KL) / T
    d_kl = q > A(0) ? q * ((lq - lp) - r.kl) * r.inv_t : A(0);
  }
  // dCE/dz = softmax(z) - e_y
  A d_ce;
  if (SEPARATE_CE) {
    const A sm = zr == ninf ? A(0) : exp_fast((zr - r.m_ce) - r.ls_ce);
    d_ce = is_y ? sm - A(1) : sm;
  } else if (MASK_TARGET) {
    d_ce = is_y ? r.dce_y : q * r.ratio;
  } else {
    d_ce = is_y ? q - A(1) : q;
  }
  return (r.a_nz ? r.a * d_ce : A(0)) + (r.c_nz ? r.c * d_kl : A(0));
}

// One thread's columns of the gradient row. g may be z (in-place): each column is read and then
// written by the same thread.
template <typename T, bool FORWARD_KL, bool MASK_TARGET, bool SEPARATE_CE>
FK_HD void tmkl_bwd_thread(const T* z, const T* __restrict__ b, T* g, int64_t v, int64_t y,
                           const TMKLBwdRow<acc_t<T>>& r, int t, int nt) {
  using A = acc_t<T>;
  constexpr int VEC = Vec<T>::kSize;
  const bool vector_ok = misalignment(z) == misalignment(b) && misalignment(z) == misalignment(g);
  const RowSplit sp = split_row<VEC>(v, head_elements(z), vector_ok);
  for (int64_t c = t; c < sp.head; c += nt) {
    g[c] = from_acc<T>(tmkl_grad<A, FORWARD_KL, MASK_TARGET, SEPARATE_CE>(to_acc(z[c]), to_acc(b[c]), c == y, r));
  }
  // gradient of VEC columns from col0, from values already loaded (zr is overwritten)
  auto grad_vec = [&](A (&zr)[VEC], const A (&br)[VEC], int64_t col0) {
    const int64_t target = y - col0;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      zr[k] = tmkl_grad<A, FORWARD_KL, MASK_TARGET, SEPARATE_CE>(zr[k], br[k], k == target, r);
    }
    store_vec(g + col0, zr);
  };
  int64_t i = t;
  // two vectors in flight: both are loaded before either is stored (g may be z, and the compiler
  // cannot hoist a load above a store that may alias it)
  for (; i + nt < sp.nvec; i += 2 * static_cast<int64_t>(nt)) {
    const int64_t c0 = sp.head + i * VEC, c1 = sp.head + (i + nt) * VEC;
    A z0[VEC], b0[VEC], z1[VEC], b1[VEC];
    load_vec(z + c0, z0);
    load_vec(b + c0, b0);
    load_vec(z + c1, z1);
    load_vec(b + c1, b1);
    grad_vec(z0, b0, c0);
    grad_vec(z1, b1, c1);
  }
  if (i < sp.nvec) {
    const int64_t c0 = sp.head + i * VEC;
    A z0[VEC], b0[VEC];
    load_vec(z + c0, z0);
    load_vec(b + c0, b0);
    grad_vec(z0, b0, c0);
  }
  for (int64_t c = sp.tail + t; c < v; c += nt) {
    g[c] = from_acc<T>(tmkl_grad<A, FORWARD_KL, MASK_TARGET, SEPARATE_CE>(to_acc(z[c]), to_acc(b[c]), c == y, r));
  }
}

// Fills one thread's columns of a row with `value` (ignored rows: 0; invalid labels: NaN).
template <typename T> FK_HD void tmkl_fill_thread(T* g, int64_t v, acc_t<T> value, int t, int nt) {
  using A = acc_t<T>;
  constexpr int VEC = Vec<T>::kSize;
  const RowSplit sp = split_row<VEC>(v, head_elements(g), true);
  const T fill = from_acc<T>(value);
  for (int64_t c = t; c < sp.head; c += nt) g[c] = fill;
  A vals[VEC];
#pragma unroll
  for (int k = 0; k < VEC; ++k) vals[k] = value;
  for (int64_t i = t; i < sp.nvec; i += nt) store_vec(g + sp.head + i * VEC, vals);
  for (int64_t c = sp.tail + t; c < v; c += nt) g[c] = fill;
}

// Ignored rows get a zero gradient; a label outside [0, V) (unchecked input) NaN, never a read out
// of bounds. Thread t's part of that fill; returns whether the row is such a row (uniform over the
// block: one row per block).
template <typename T>
FK_HD bool tmkl_bwd_trivial_row(const TMKLBackwardArgs& p, T* g, int64_t y, int t, int nt) {
  using A = acc_t<T>;
  if (y != p.ignore_index && y >= 0 && y < p.v) return false;
  const A fill = y == p.ignore_index ? A(0) : Math<A>::pos_inf() - Math<A>::pos_inf();
  tmkl_fill_thread<T>(g, p.v, fill, t, nt);
  return true;
}

#ifdef __CUDACC__
template <typename T, bool FORWARD_KL, bool MASK_TARGET, bool SEPARATE_CE>
__global__ void __launch_bounds__(kTMKLMaxThreads) tmkl_bwd_kernel(const TMKLBackwardArgs p) {
  using A = acc_t<T>;
  const int64_t row = blockIdx.x;
  const int64_t y = reinterpret_cast<const int64_t*>(p.y)[row];
  const T* z = reinterpret_cast<const T*>(p.z) + row * p.stride_z;
  const T* b = reinterpret_cast<const T*>(p.b) + row * p.stride_b;
  T* g = reinterpret_cast<T*>(p.g) + row * p.stride_g;
  if (tmkl_bwd_trivial_row<T>(p, g, y, threadIdx.x, blockDim.x)) return;  // uniform over the block
  const TMKLBwdRow<A> r = tmkl_bwd_row<T, MASK_TARGET, SEPARATE_CE>(p, row, z, y);
  if (MASK_TARGET && !SEPARATE_CE) __syncthreads();  // z[y] read by all before g (maybe z) is written
  tmkl_bwd_thread<T, FORWARD_KL, MASK_TARGET, SEPARATE_CE>(z, b, g, p.v, y, r, threadIdx.x, blockDim.x);
}
#endif  // __CUDACC__

}  // namespace fk
