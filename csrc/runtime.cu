// Thin wrappers over the CUDA runtime for the bindings (which include no CUDA header).
#include <cuda_runtime.h>

#include "launch.h"

namespace fk {

int stream_synchronize(uintptr_t stream) {
  return static_cast<int>(cudaStreamSynchronize(reinterpret_cast<cudaStream_t>(stream)));
}

const char* error_name(int code) { return cudaGetErrorName(static_cast<cudaError_t>(code)); }

const char* error_string(int code) { return cudaGetErrorString(static_cast<cudaError_t>(code)); }

int runtime_version() {
  int version = 0;
  cudaRuntimeGetVersion(&version);
  return version;
}

}  // namespace fk
