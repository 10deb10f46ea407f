// pybind11 bindings of forgetkern._C: input checks, launches and error reporting.
//
// No libtorch: launchers take raw pointers (Python ints), sizes, strides, a dtype code and the CUDA
// stream handle (torch.cuda.current_stream().cuda_stream), so one build serves any torch version.
// Every check below runs before anything touches the GPU and raises ValueError naming the
// argument; a failed launch raises RuntimeError naming the kernel and the CUDA error.
#include <pybind11/pybind11.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <sstream>
#include <stdexcept>
#include <string>

#include "launch.h"

#ifndef FORGETKERN_CUDA_ARCHS
#define FORGETKERN_CUDA_ARCHS ""
#endif

namespace py = pybind11;

namespace {

constexpr int64_t kMaxGrid = std::numeric_limits<int32_t>::max();

[[noreturn]] void fail(const std::string& fn, const std::string& what) {
  throw py::value_error("forgetkern._C." + fn + ": " + what);
}

const char* dtype_name(int code) {
  switch (code) {
    case fk::kFloat32: return "float32";
    case fk::kFloat16: return "float16";
    case fk::kBFloat16: return "bfloat16";
    case fk::kFloat64: return "float64";
    default: return "unknown";
  }
}

int64_t dtype_size(const std::string& fn, int code) {
  switch (code) {
    case fk::kFloat32: return 4;
    case fk::kFloat16: return 2;
    case fk::kBFloat16: return 2;
    case fk::kFloat64: return 8;
    default: {
      std::ostringstream os;
      os << "dtype must be a dtype code (0 float32, 1 float16, 2 bfloat16, 3 float64), got " << code;
      fail(fn, os.str());
    }
  }
}

void check_ptr(const std::string& fn, const char* name, uintptr_t ptr, int64_t align) {
  if (ptr == 0) fail(fn, std::string(name) + " must be a non-null device pointer");
  if (ptr % static_cast<uintptr_t>(align) != 0) {
    std::ostringstream os;
    os << name << " must be aligned to " << align << " bytes (its element size), got address 0x" << std::hex
       << ptr;
    fail(fn, os.str());
  }
}

void check_range(const std::string& fn, const char* name, int64_t value, int64_t lo, int64_t hi) {
  if (value < lo || value > hi) {
    std::ostringstream os;
    os << name << " must be in [" << lo << ", " << hi << "], got " << value;
    fail(fn, os.str());
  }
}

void check_finite(const std::string& fn, const char* name, double value) {
  if (!std::isfinite(value)) fail(fn, std::string(name) + " must be finite, got " + std::to_string(value));
}

void check_threads(const std::string& fn, int threads, int max_threads) {
  if (threads != 0 && (threads < 32 || threads > max_threads || threads % 32 != 0)) {
    std::ostringstream os;
    os << "threads must be 0 (automatic) or a multiple of 32 in [32, " << max_threads << "], got " << threads;
    fail(fn, os.str());
  }
}

// Turns a launcher status into a Python exception naming the kernel; optionally waits for the
// kernel to finish (FORGETKERN_CUDA_SYNC=1 in forgetkern._cuda) so that faults are attributed.
void check_launch(const std::string& fn, const char* kernel, int status, uintptr_t stream, bool sync) {
  const char* stage = "launching";
  if (status == 0 && sync) {
    py::gil_scoped_release release;
    status = fk::stream_synchronize(stream);
    stage = "running";
  }
  if (status != 0) {
    std::ostringstream os;
    os << "forgetkern._C." << fn << ": " << stage << " " << kernel << " failed: " << fk::error_name(status)
       << ": " << fk::error_string(status);
    throw std::runtime_error(os.str());
  }
}

// ---------------------------------------------------------------------------------------------
// TMKL
// ---------------------------------------------------------------------------------------------
// Checks shared by both TMKL launchers: sizes, row strides and temperature ...
void check_tmkl_sizes(const std::string& fn, int64_t n, int64_t v, int64_t stride_z, int64_t stride_b,
                      double inv_t) {
  check_range(fn, "n", n, 0, kMaxGrid);
  check_range(fn, "v", v, 1, std::numeric_limits<int64_t>::max() / 16);
  check_range(fn, "stride_z", stride_z, 0, std::numeric_limits<int64_t>::max() / 16);
  check_range(fn, "stride_b", stride_b, 0, std::numeric_limits<int64_t>::max() / 16);
  if (!(inv_t > 0.0) || !std::isfinite(inv_t)) fail(fn, "inv_t (1 / temperature) must be finite and > 0");
}

// ... and the input pointers (logits, base logits, int64 labels).
void check_tmkl_inputs(const std::string& fn, uintptr_t z, uintptr_t b, uintptr_t y, int64_t esize) {
  check_ptr(fn, "z", z, esize);
  check_ptr(fn, "b", b, esize);
  check_ptr(fn, "y", y, 8);
}

fk::TMKLForwardArgs tmkl_forward_args(const std::string& fn, uintptr_t z, int64_t stride_z, uintptr_t b,
                                      int64_t stride_b, uintptr_t y, uintptr_t loss, uintptr_t ce,
                                      uintptr_t kl, uintptr_t stats, int64_t n, int64_t v,
                                      int64_t ignore_index, double inv_t, double ce_weight,
                                      double kl_scale, bool forward_kl, bool mask_target,
                                      bool separate_ce, int dtype, int threads) {
  const int64_t esize = dtype_size(fn, dtype);
  const int64_t asize = dtype == fk::kFloat64 ? 8 : 4;
  check_tmkl_sizes(fn, n, v, stride_z, stride_b, inv_t);
  check_finite(fn, "ce_weight", ce_weight);
  check_finite(fn, "kl_scale", kl_scale);
  check_threads(fn, threads, fk::kTMKLMaxThreads);
  if (n > 0) {
    check_tmkl_inputs(fn, z, b, y, esize);
    check_ptr(fn, "loss", loss, asize);
    check_ptr(fn, "ce", ce, asize);
    check_ptr(fn, "kl", kl, asize);
    check_ptr(fn, "stats", stats, asize);
  }
  return fk::TMKLForwardArgs{z, stride_z, b, stride_b, y, loss, ce, kl, stats, n, v, ignore_index, inv_t,
                             ce_weight, kl_scale, forward_kl, mask_target, separate_ce, dtype, threads};
}

fk::TMKLBackwardArgs tmkl_backward_args(const std::string& fn, uintptr_t z, int64_t stride_z, uintptr_t b,
                                        int64_t stride_b, uintptr_t y, uintptr_t stats, uintptr_t coef_ce,
                                        uintptr_t coef_kl, uintptr_t g, int64_t stride_g, int64_t n,
                                        int64_t v, int64_t ignore_index, double inv_t, bool forward_kl,
                                        bool mask_target, bool separate_ce, int dtype, int threads) {
  const int64_t esize = dtype_size(fn, dtype);
  const int64_t asize = dtype == fk::kFloat64 ? 8 : 4;
  check_tmkl_sizes(fn, n, v, stride_z, stride_b, inv_t);
  // output rows must not overlap (rows of the inputs may, e.g. a broadcast base row)
  check_range(fn, "stride_g", stride_g, n > 1 ? v : 0, std::numeric_limits<int64_t>::max() / 16);
  check_threads(fn, threads, fk::kTMKLMaxThreads);
  if (n > 0) {
    check_tmkl_inputs(fn, z, b, y, esize);
    check_ptr(fn, "stats", stats, asize);
    check_ptr(fn, "coef_ce", coef_ce, asize);
    check_ptr(fn, "coef_kl", coef_kl, asize);
    check_ptr(fn, "g", g, esize);
    if (g == z && stride_g != stride_z) fail(fn, "an in-place g (g == z) must have the row stride of z");
  }
  return fk::TMKLBackwardArgs{z, stride_z, b, stride_b, y, stats, coef_ce, coef_kl, g, stride_g, n, v,
                              ignore_index, inv_t, forward_kl, mask_target, separate_ce, dtype, threads};
}

void tmkl_forward(uintptr_t z, int64_t stride_z, uintptr_t b, int64_t stride_b, uintptr_t y, uintptr_t loss,
                  uintptr_t ce, uintptr_t kl, uintptr_t stats, int64_t n, int64_t v, int64_t ignore_index,
                  double inv_t, double ce_weight, double kl_scale, bool forward_kl, bool mask_target,
                  bool separate_ce, int dtype, int threads, uintptr_t stream, bool sync) {
  const auto args = tmkl_forward_args("tmkl_forward", z, stride_z, b, stride_b, y, loss, ce, kl, stats, n, v,
                                      ignore_index, inv_t, ce_weight, kl_scale, forward_kl, mask_target,
                                      separate_ce, dtype, threads);
  check_launch("tmkl_forward", "tmkl_fwd_kernel", fk::tmkl_forward_launch(args, stream), stream, sync);
}

void tmkl_backward(uintptr_t z, int64_t stride_z, uintptr_t b, int64_t stride_b, uintptr_t y, uintptr_t stats,
                   uintptr_t coef_ce, uintptr_t coef_kl, uintptr_t g, int64_t stride_g, int64_t n, int64_t v,
                   int64_t ignore_index, double inv_t, bool forward_kl, bool mask_target, bool separate_ce,
                   int dtype, int threads, uintptr_t stream, bool sync) {
  const auto args = tmkl_backward_args("tmkl_backward", z, stride_z, b, stride_b, y, stats, coef_ce, coef_kl, g,
                                       stride_g, n, v, ignore_index, inv_t, forward_kl, mask_target,
                                       separate_ce, dtype, threads);
  check_launch("tmkl_backward", "tmkl_bwd_kernel", fk::tmkl_backward_launch(args, stream), stream, sync);
}

void emulate_tmkl_forward(uintptr_t z, int64_t stride_z, uintptr_t b, int64_t stride_b, uintptr_t y,
                          uintptr_t loss, uintptr_t ce, uintptr_t kl, uintptr_t stats, int64_t n, int64_t v,
                          int64_t ignore_index, double inv_t, double ce_weight, double kl_scale,
                          bool forward_kl, bool mask_target, bool separate_ce, int dtype, int threads) {
  const auto args = tmkl_forward_args("emulate_tmkl_forward", z, stride_z, b, stride_b, y, loss, ce, kl, stats,
                                      n, v, ignore_index, inv_t, ce_weight, kl_scale, forward_kl, mask_target,
                                      separate_ce, dtype, threads);
  py::gil_scoped_release release;
  fk::tmkl_forward_emulate(args);
}

void emulate_tmkl_backward(uintptr_t z, int64_t stride_z, uintptr_t b, int64_t stride_b, uintptr_t y,
                           uintptr_t stats, uintptr_t coef_ce, uintptr_t coef_kl, uintptr_t g, int64_t stride_g,
                           int64_t n, int64_t v, int64_t ignore_index, double inv_t, bool forward_kl,
                           bool mask_target, bool separate_ce, int dtype, int threads) {
  const auto args = tmkl_backward_args("emulate_tmkl_backward", z, stride_z, b, stride_b, y, stats, coef_ce,
                                       coef_kl, g, stride_g, n, v, ignore_index, inv_t, forward_kl, mask_target,
                                       separate_ce, dtype, threads);
  py::gil_scoped_release release;
  fk::tmkl_backward_emulate(args);
}

// ---------------------------------------------------------------------------------------------
// Generalized eigensolver
// ---------------------------------------------------------------------------------------------
fk::GeneralizedEighArgs eigh_args(const std::string& fn, uintptr_t a, uintptr_t b, uintptr_t w, uintptr_t vecs,
                                  uintptr_t info, int64_t batch, int64_t n, double eps, int dtype, int threads,
                                  int max_sweeps) {
  dtype_size(fn, dtype);
  if (dtype != fk::kFloat32 && dtype != fk::kFloat64) {
    fail(fn, std::string("dtype must be float32 (0) or float64 (3), got ") + dtype_name(dtype));
  }
  const int64_t asize = dtype == fk::kFloat64 ? 8 : 4;
  check_range(fn, "batch", batch, 0, kMaxGrid);
  check_range(fn, "n", n, 1, fk::kEighMaxN);
  if (!(eps >= 0.0) || !std::isfinite(eps)) fail(fn, "eps must be finite and >= 0");
  check_threads(fn, threads, fk::kEighMaxThreads);
  check_range(fn, "max_sweeps", max_sweeps, 0, fk::kEighMaxSweeps);
  if (batch > 0) {
    check_ptr(fn, "a", a, asize);
    check_ptr(fn, "b", b, asize);
    check_ptr(fn, "w", w, asize);
    check_ptr(fn, "vecs", vecs, asize);
    check_ptr(fn, "info", info, 4);
  }
  return fk::GeneralizedEighArgs{a, b, w, vecs, info, batch, n, eps, dtype, threads, max_sweeps};
}

void generalized_eigh(uintptr_t a, uintptr_t b, uintptr_t w, uintptr_t vecs, uintptr_t info, int64_t batch,
                      int64_t n, double eps, int dtype, int threads, int max_sweeps, uintptr_t stream,
                      bool sync) {
  const auto args = eigh_args("generalized_eigh", a, b, w, vecs, info, batch, n, eps, dtype, threads, max_sweeps);
  check_launch("generalized_eigh", "generalized_eigh_kernel", fk::generalized_eigh_launch(args, stream), stream,
               sync);
}

void emulate_generalized_eigh(uintptr_t a, uintptr_t b, uintptr_t w, uintptr_t vecs, uintptr_t info,
                              int64_t batch, int64_t n, double eps, int dtype, int threads, int max_sweeps) {
  const auto args = eigh_args("emulate_generalized_eigh", a, b, w, vecs, info, batch, n, eps, dtype, threads,
                              max_sweeps);
  py::gil_scoped_release release;
  fk::generalized_eigh_emulate(args);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() =
      "forgetkern CUDA kernels (raw-pointer launchers; see forgetkern/_cuda.py for the torch ops). "
      "emulate_* run the kernels' per-thread code on the CPU over host memory, for tests.";

  py::dict codes;
  codes["float32"] = static_cast<int>(fk::kFloat32);
  codes["float16"] = static_cast<int>(fk::kFloat16);
  codes["bfloat16"] = static_cast<int>(fk::kBFloat16);
  codes["float64"] = static_cast<int>(fk::kFloat64);
  m.attr("DTYPE_CODES") = codes;
  m.attr("NUM_STATS") = static_cast<int>(fk::kNumStats);
  m.attr("EIGH_MAX_N") = fk::kEighMaxN;
  m.attr("EIGH_MAX_SWEEPS") = fk::kEighMaxSweeps;
  m.attr("TMKL_MAX_THREADS") = fk::kTMKLMaxThreads;
  m.attr("EIGH_MAX_THREADS") = fk::kEighMaxThreads;
  m.attr("CUDA_ARCHS") = std::string(FORGETKERN_CUDA_ARCHS);

  m.def("cuda_runtime_version", &fk::runtime_version,
        "Version of the CUDA runtime linked into the extension (e.g. 13000), 0 without a driver.");
  m.def("tmkl_threads", &fk::tmkl_threads, py::arg("v"), py::arg("dtype"),
        "Threads per block the TMKL kernels use for a vocabulary of v columns.");
  m.def("generalized_eigh_threads", &fk::generalized_eigh_threads, py::arg("n"),
        "Threads per block of the eigensolver for n x n problems.");
  m.def("generalized_eigh_shared_bytes", &fk::generalized_eigh_shared_bytes, py::arg("n"), py::arg("dtype"),
        "Dynamic shared memory per block of the eigensolver.");

  m.def("tmkl_forward", &tmkl_forward, py::kw_only(), py::arg("z"), py::arg("stride_z"), py::arg("b"),
        py::arg("stride_b"), py::arg("y"), py::arg("loss"), py::arg("ce"), py::arg("kl"), py::arg("stats"),
        py::arg("n"), py::arg("v"), py::arg("ignore_index"), py::arg("inv_t"), py::arg("ce_weight"),
        py::arg("kl_scale"), py::arg("forward_kl"), py::arg("mask_target"), py::arg("separate_ce"),
        py::arg("dtype"), py::arg("threads") = 0, py::arg("stream") = 0, py::arg("sync") = false,
        "Launch tmkl_fwd_kernel: per-row loss, ce, kl and (N, NUM_STATS) stats.");
  m.def("tmkl_backward", &tmkl_backward, py::kw_only(), py::arg("z"), py::arg("stride_z"), py::arg("b"),
        py::arg("stride_b"), py::arg("y"), py::arg("stats"), py::arg("coef_ce"), py::arg("coef_kl"), py::arg("g"),
        py::arg("stride_g"), py::arg("n"), py::arg("v"), py::arg("ignore_index"), py::arg("inv_t"),
        py::arg("forward_kl"), py::arg("mask_target"), py::arg("separate_ce"), py::arg("dtype"),
        py::arg("threads") = 0, py::arg("stream") = 0, py::arg("sync") = false,
        "Launch tmkl_bwd_kernel: g = coef_ce * dCE/dz + coef_kl * dKL/dz (g may be z).");
  m.def("generalized_eigh", &generalized_eigh, py::kw_only(), py::arg("a"), py::arg("b"), py::arg("w"),
        py::arg("vecs"), py::arg("info"), py::arg("batch"), py::arg("n"), py::arg("eps"), py::arg("dtype"),
        py::arg("threads") = 0, py::arg("max_sweeps") = 0, py::arg("stream") = 0, py::arg("sync") = false,
        "Launch generalized_eigh_kernel on a batch of n x n problems (n <= EIGH_MAX_N); info gets each "
        "problem's status (0 ok, k > 0 not positive definite, -1 non-finite, -2 not converged).");

  m.def("emulate_tmkl_forward", &emulate_tmkl_forward, py::kw_only(), py::arg("z"), py::arg("stride_z"),
        py::arg("b"), py::arg("stride_b"), py::arg("y"), py::arg("loss"), py::arg("ce"), py::arg("kl"),
        py::arg("stats"), py::arg("n"), py::arg("v"), py::arg("ignore_index"), py::arg("inv_t"),
        py::arg("ce_weight"), py::arg("kl_scale"), py::arg("forward_kl"), py::arg("mask_target"),
        py::arg("separate_ce"), py::arg("dtype"), py::arg("threads") = 0,
        "Run tmkl_fwd_kernel's per-thread code on the CPU (host pointers; tests only).");
  m.def("emulate_tmkl_backward", &emulate_tmkl_backward, py::kw_only(), py::arg("z"), py::arg("stride_z"),
        py::arg("b"), py::arg("stride_b"), py::arg("y"), py::arg("stats"), py::arg("coef_ce"), py::arg("coef_kl"),
        py::arg("g"), py::arg("stride_g"), py::arg("n"), py::arg("v"), py::arg("ignore_index"), py::arg("inv_t"),
        py::arg("forward_kl"), py::arg("mask_target"), py::arg("separate_ce"), py::arg("dtype"),
        py::arg("threads") = 0, "Run tmkl_bwd_kernel's per-thread code on the CPU (host pointers; tests only).");
  m.def("emulate_generalized_eigh", &emulate_generalized_eigh, py::kw_only(), py::arg("a"), py::arg("b"),
        py::arg("w"), py::arg("vecs"), py::arg("info"), py::arg("batch"), py::arg("n"), py::arg("eps"),
        py::arg("dtype"), py::arg("threads") = 0, py::arg("max_sweeps") = 0,
        "Run generalized_eigh_kernel's phases thread by thread on the CPU (host pointers; tests only).");
}
