// Test-only pybind wrapper around csrc/cpu/dot_argmax.{h,cpp}, built by
// tests/cpp/dot_argmax_check.py (not part of the package).
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <vector>

#include "dot_argmax.h"

namespace {

using g2tr::cpu::dot_argmax_packed_size;

const int64_t* opt_rows(const c10::optional<torch::Tensor>& rows) {
  return rows.has_value() ? rows->data_ptr<int64_t>() : nullptr;
}

// `offset` elements of slack in front of the buffer to test an unaligned panel buffer.
torch::Tensor pack(const torch::Tensor& B, const c10::optional<torch::Tensor>& rows, int64_t n, int64_t d,
                   int64_t offset) {
  TORCH_CHECK(g2tr::cpu::dot_argmax_bf16_supported(), "no AVX512-BF16");
  TORCH_CHECK(B.scalar_type() == at::kBFloat16 && B.dim() == 2 && B.stride(1) == 1);
  const int64_t size = dot_argmax_packed_size(n, d);
  auto buf = torch::full({size + offset}, 7.0, B.options()).narrow(0, offset, size);
  g2tr::cpu::dot_argmax_pack_b(B.data_ptr<at::BFloat16>(), B.stride(0), opt_rows(rows), n, d,
                               buf.data_ptr<at::BFloat16>());
  return buf;
}

// Into an existing buffer, so timing excludes allocation and page faults.
void pack_into(const torch::Tensor& B, const c10::optional<torch::Tensor>& rows, int64_t n, int64_t d,
               torch::Tensor& out) {
  TORCH_CHECK(out.numel() == dot_argmax_packed_size(n, d) && out.is_contiguous());
  g2tr::cpu::dot_argmax_pack_b(B.data_ptr<at::BFloat16>(), B.stride(0), opt_rows(rows), n, d,
                               out.data_ptr<at::BFloat16>());
}

// Rows [splits[t], splits[t + 1]) form task t; tasks run under at::parallel_for.
std::vector<torch::Tensor> rows(const torch::Tensor& A, const c10::optional<torch::Tensor>& a_rows, int64_t m,
                                const torch::Tensor& packed, int64_t n, int64_t d, const torch::Tensor& a_scale,
                                const torch::Tensor& b_scale, std::vector<int64_t> splits) {
  TORCH_CHECK(A.scalar_type() == at::kBFloat16 && A.dim() == 2 && A.stride(1) == 1);
  TORCH_CHECK(splits.size() >= 2 && splits.front() == 0 && splits.back() == m);
  auto idx = torch::full({m}, -5, torch::kInt64);
  auto val = torch::full({m}, 123.0, torch::kFloat32);
  const auto* a = A.data_ptr<at::BFloat16>();
  const int64_t lda = A.stride(0);
  const int64_t* ar = opt_rows(a_rows);
  const auto* pb = packed.data_ptr<at::BFloat16>();
  const float* as = a_scale.data_ptr<float>();
  const float* bs = b_scale.data_ptr<float>();
  int64_t* pi = idx.data_ptr<int64_t>();
  float* pv = val.data_ptr<float>();
  at::parallel_for(0, static_cast<int64_t>(splits.size()) - 1, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = splits[t], e = splits[t + 1];
      // Offsetting A itself when there is no row list exercises both addressing modes.
      g2tr::cpu::dot_argmax_rows(ar ? a : a + b * lda, lda, ar ? ar + b : nullptr, e - b, pb, n, d, as + b, bs, pi + b,
                                 pv + b);
    }
  });
  return {idx, val};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("supported", &g2tr::cpu::dot_argmax_bf16_supported);
  m.def("packed_size", &dot_argmax_packed_size);
  m.def("pack", &pack);
  m.def("pack_into", &pack_into);
  m.def("rows", &rows);
}
