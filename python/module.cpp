// g2tr_kernels._C: loading it registers torch.ops.g2tr (csrc/), and it tells what this
// build holds. The ops themselves are reached through torch.ops.g2tr, not through here.
#include <ATen/Parallel.h>
#include <pybind11/pybind11.h>
#include <torch/extension.h>

#include "cpu/dot_argmax.h"
#include "cpu/merge_path.h"

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
        const auto& cpu = g2tr::cpu::cpu_features();
        py::dict features;
        features["vendor"] = cpu.vendor;
        features["family"] = cpu.family;
        features["model"] = cpu.model;
        features["avx512f"] = cpu.avx512f;
        features["avx512_bf16"] = cpu.avx512_bf16;
        features["avx512_fp16"] = cpu.avx512_fp16;
        features["amx_bf16"] = cpu.amx_bf16;
        info["cpu_features"] = features;
        // What a merge of each dtype runs on now (G2TR_CPU_MERGE included) and why.
        py::dict paths;
        for (auto [name, dtype] : {std::pair{"bfloat16", at::kBFloat16}, std::pair{"float16", at::kHalf},
                                   std::pair{"float32", at::kFloat}}) {
          const auto choice = g2tr::cpu::merge_path_for(dtype);
          py::dict entry;
          entry["path"] = g2tr::cpu::merge_path_name(choice.path);
          entry["reason"] = choice.reason;
          paths[name] = entry;
        }
        info["cpu_merge"] = paths;
        return info;
      },
      "Version, compiled backends, CUDA archs, OpenMP threads, CPU features and the CPU merge path per dtype.");
  m.def(
      "merge_path_rule",
      [](const std::string& vendor, bool avx512_bf16, bool amx_bf16, const std::string& dtype) {
        g2tr::cpu::CpuFeatures cpu;
        cpu.vendor = vendor;
        cpu.avx512f = avx512_bf16 || amx_bf16;
        cpu.avx512_bf16 = avx512_bf16;
        cpu.amx_bf16 = amx_bf16;
        TORCH_CHECK_VALUE(dtype == "bfloat16" || dtype == "float16" || dtype == "float32",
                          "merge_path_rule: dtype must be bfloat16, float16 or float32, got '", dtype, "'");
        const auto st = dtype == "bfloat16" ? at::kBFloat16 : dtype == "float16" ? at::kHalf : at::kFloat;
        const auto choice = g2tr::cpu::choose_merge_path(cpu, st);
        return py::make_tuple(g2tr::cpu::merge_path_name(choice.path), choice.reason);
      },
      "The CPU merge path rule on a given feature set (vendor, avx512_bf16, amx_bf16, dtype): (path, reason).");
}
