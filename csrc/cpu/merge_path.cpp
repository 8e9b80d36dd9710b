// The CPU merge path rule; see merge_path.h.
#include "merge_path.h"

#include <c10/util/Exception.h>

#include <cstdlib>
#include <cstring>

#include "dot_argmax.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <cpuid.h>
#define G2TR_MERGE_PATH_X86 1
#else
#define G2TR_MERGE_PATH_X86 0
#endif

namespace g2tr::cpu {

const char* merge_path_name(MergePath path) {
  switch (path) {
    case MergePath::bf16_dot:
      return "bf16_dot";
    case MergePath::fp32_gemm:
      return "fp32_gemm";
    case MergePath::bf16_gemm:
      return "bf16_gemm";
  }
  return "?";
}

namespace {

CpuFeatures read_cpu_features() {
  CpuFeatures f;
#if G2TR_MERGE_PATH_X86
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid(0, &a, &b, &c, &d)) return f;
  const unsigned max_leaf = a;
  char vendor[13] = {};
  std::memcpy(vendor, &b, 4);
  std::memcpy(vendor + 4, &d, 4);
  std::memcpy(vendor + 8, &c, 4);
  f.vendor = vendor;
  __get_cpuid(1, &a, &b, &c, &d);
  const unsigned base_family = (a >> 8) & 0xF, base_model = (a >> 4) & 0xF;
  f.family = static_cast<int>(base_family == 0xF ? base_family + ((a >> 20) & 0xFF) : base_family);
  f.model =
      static_cast<int>(base_family == 0x6 || base_family == 0xF ? (((a >> 16) & 0xF) << 4) | base_model : base_model);
  // The OS must save the registers too: XCR0 bits 5-7 (opmask, zmm) and 17-18 (AMX tiles).
  const bool osxsave = (c >> 27) & 1;
  unsigned long long xcr0 = 0;
  if (osxsave) {
    unsigned lo = 0, hi = 0;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    xcr0 = (static_cast<unsigned long long>(hi) << 32) | lo;
  }
  const bool os_zmm = (xcr0 & 0xE6) == 0xE6;
  const bool os_amx = (xcr0 & 0x60000) == 0x60000;
  if (max_leaf >= 7) {
    __cpuid_count(7, 0, a, b, c, d);
    f.avx512f = os_zmm && ((b >> 16) & 1);
    f.avx512_fp16 = f.avx512f && ((d >> 23) & 1);
    f.amx_bf16 = os_amx && ((d >> 22) & 1) && ((d >> 24) & 1);  // AMX-BF16 and AMX-TILE
    const unsigned max_sub = a;
    if (max_sub >= 1) {
      __cpuid_count(7, 1, a, b, c, d);
      f.avx512_bf16 = f.avx512f && ((a >> 5) & 1);
    }
  }
#endif
  return f;
}

}  // namespace

const CpuFeatures& cpu_features() {
  static const CpuFeatures features = read_cpu_features();
  return features;
}

MergePathChoice choose_merge_path(const CpuFeatures& cpu, at::ScalarType dtype) {
  if (dtype != at::kBFloat16)
    return {MergePath::fp32_gemm, std::string(dtype == at::kHalf ? "float16" : "float32") +
                                      " input: rows upcast to fp32 blocks through at::mm (MKL), its only path"};
  if (cpu.amx_bf16) return {MergePath::bf16_gemm, "amx_bf16: the bf16 x bf16 -> fp32 MKL GEMM runs on AMX tiles"};
  if (cpu.vendor == "AuthenticAMD" && cpu.avx512_bf16)
    return {MergePath::bf16_dot,
            "AMD with avx512_bf16: vdpbf16ps does twice the work of an fp32 FMA per cycle, so the fused "
            "dot-argmax micro-kernel beats the fp32 GEMM"};
  if (cpu.avx512_bf16)
    return {MergePath::fp32_gemm,
            "avx512_bf16 without AMX on a non-AMD CPU (" + cpu.vendor +
                "): vdpbf16ps does no more work per cycle than fp32 FMAs, and the fp32 MKL GEMM runs near "
                "that peak"};
  return {MergePath::fp32_gemm, "no avx512_bf16: fp32 GEMM tiles"};
}

MergePathChoice merge_path_for(at::ScalarType dtype) {
  MergePathChoice rule = choose_merge_path(cpu_features(), dtype);
  const char* env = std::getenv("G2TR_CPU_MERGE");
  if (dtype != at::kBFloat16 || env == nullptr || *env == '\0' || std::strcmp(env, "auto") == 0) return rule;
  MergePath path;
  if (std::strcmp(env, "bf16_dot") == 0) {
    TORCH_CHECK_VALUE(dot_argmax_bf16_supported(),
                      "G2TR_CPU_MERGE=bf16_dot needs a CPU with avx512_bf16 (and AVX-512 enabled by the OS); this "
                      "one has none: use fp32_gemm or bf16_gemm, or unset it");
    path = MergePath::bf16_dot;
  } else if (std::strcmp(env, "fp32_gemm") == 0) {
    path = MergePath::fp32_gemm;
  } else if (std::strcmp(env, "bf16_gemm") == 0) {
    path = MergePath::bf16_gemm;
  } else {
    TORCH_CHECK_VALUE(false, "G2TR_CPU_MERGE must be one of auto, bf16_dot, fp32_gemm, bf16_gemm; got '", env, "'");
  }
  return {path, std::string("G2TR_CPU_MERGE=") + env + " (the rule would pick " + merge_path_name(rule.path) + ")"};
}

}  // namespace g2tr::cpu
