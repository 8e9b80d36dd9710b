// Which inner product the CPU merge assignment runs on, per machine and dtype.
//
// The assignment is a (N-K) x D by D x K product per image reduced to a row argmax, so its
// speed is that of the fastest matrix-product engine of the CPU, and that differs by
// vendor, not only by ISA flag:
//   bf16_dot   the AVX512-BF16 dot-argmax micro-kernel (dot_argmax.cpp): exact bf16 products,
//              fp32 sums, argmax fused. Fastest where vdpbf16ps does twice the work of an fp32
//              FMA per cycle (AMD Zen 4 / Zen 5).
//   fp32_gemm  tiles of rows upcast to fp32 through at::mm (MKL sgemm), argmax over the tile.
//              The only path for fp32 and fp16 inputs; for bf16 the fastest on Intel CPUs
//              without AMX, where vdpbf16ps does no more work per cycle than fp32 FMAs and
//              MKL runs near the fp32 peak.
//   bf16_gemm  bf16 tiles through the library's bf16 x bf16 -> fp32 GEMM: ATen's exported
//              at::native::cpublas::brgemm without VNNI packing, which on x86 builds is MKL's
//              cblas_gemm_bf16bf16f32 (AMX tiles on Intel CPUs that have them; on AMD, MKL
//              runs it at about its fp32 speed). argmax over the tile. What else torch 2.14
//              offers for bf16 with an fp32 result on the CPU, and why it is not used:
//              torch.mm(out_dtype=float32) / aten::mm.dtype has no CPU kernel;
//              at::native::mkldnn_matmul (oneDNN) requires the result in the input dtype, and a
//              bf16-rounded similarity would change the argmax; oneDNN's own bf16 -> fp32 GEMM
//              (mkldnn_bf16f32_gemm) is internal to libtorch and reached on ARM only; the oneDNN
//              brgemm ukernel (brgemm with is_vnni) needs hand-packed panels, which is what the
//              bf16_dot micro-kernel already is.
// The choice is a fixed rule on the CPU's features (choose_merge_path), never a timing taken
// at run time, so one machine gives the same bits on every run. G2TR_CPU_MERGE=bf16_dot|
// fp32_gemm|bf16_gemm overrides it for bf16 inputs (e.g. fp32_gemm on every machine: the same
// bits on every CPU model that runs the same MKL kernel). `g2tr info` / build_info() report
// the choice and the reason. The one-time calibration is `g2tr bench --workloads M1 M2
// --no-peers --no-stages`: its rows `g2tr cpu, <path>` time every path this CPU can run beside
// the fp32 and bf16 GEMM floors, so a user sees whether the rule picked the fastest here (it
// only reports; nothing is chosen from timings).
#pragma once

#include <c10/core/ScalarType.h>

#include <string>

namespace g2tr::cpu {

enum class MergePath { bf16_dot, fp32_gemm, bf16_gemm };

const char* merge_path_name(MergePath path);

// What the rule looks at, read once from cpuid (and XCR0 for the OS state of AVX-512/AMX).
struct CpuFeatures {
  std::string vendor;  // "GenuineIntel", "AuthenticAMD", ... ("" off x86)
  int family = 0, model = 0;
  bool avx512f = false, avx512_bf16 = false, avx512_fp16 = false, amx_bf16 = false;
};
const CpuFeatures& cpu_features();

struct MergePathChoice {
  MergePath path;
  std::string reason;
};

// The rule, on any feature set (so it can be checked for CPUs this build never runs on):
//   amx_bf16                   -> bf16_gemm (MKL runs the product on AMX tiles)
//   AMD with avx512_bf16       -> bf16_dot
//   anything else              -> fp32_gemm (Intel without AMX: vdpbf16ps is no faster than
//                                 fp32 FMA; no avx512_bf16: no bf16 arithmetic at all)
// bf16_dot is only ever chosen where dot_argmax_bf16_supported() holds.
MergePathChoice choose_merge_path(const CpuFeatures& cpu, at::ScalarType dtype);

// The path a merge of `dtype` takes now on this machine: G2TR_CPU_MERGE for bf16 inputs
// (read on every call, so a process can switch), otherwise the rule. Raises ValueError
// naming the variable for an unknown value or a path this CPU cannot run.
MergePathChoice merge_path_for(at::ScalarType dtype);

}  // namespace g2tr::cpu
