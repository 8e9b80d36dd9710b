// g2tr_kernels._C: loading it registers torch.ops.g2tr (csrc/), and it tells what this
// build holds. The ops themselves are reached through torch.ops.g2tr, not through here.
#include <ATen/Parallel.h>
#include <pybind11/pybind11.h>
#include <torch/extension.h>

#include "cpu/dot_argmax.h"

#ifndef G2TR_VERSION
#define G2TR_VERSION "0+unknown"
#endif
#ifndef G2TR_CUDA_ARCHS
#define G2TR_CUDA_ARCHS ""
#endif

namespace py = pybind11;

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "g2tr_kernels native library: registers torch.ops.g2tr";
  m.def(
      "build_info",
      [] {
        py::dict info;
        info["version"] = G2TR_VERSION;
        py::list backends;
        backends.append("cpu");
#ifdef G2TR_WITH_CUDA
        backends.append("cuda");
#endif
        info["backends"] = backends;
        info["cuda_archs"] = std::string(G2TR_CUDA_ARCHS);
        info["openmp_threads"] = at::get_num_threads();
        info["parallel_backend"] = at::get_parallel_info();
        info["cpu_bf16_merge"] = g2tr::cpu::dot_argmax_bf16_supported() ? "avx512_bf16" : "fp32 gemm";
        return info;
      },
      "Version, compiled backends, CUDA archs, OpenMP threads and the CPU merge path of this build.");
}
