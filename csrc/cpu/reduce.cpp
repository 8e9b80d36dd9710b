// The whole reduction on the CPU: score (one pass, token norms kept for the merge),
// select, merge. Output sizes come from the grids alone.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu_kernels.h"

namespace g2tr::cpu {
namespace {

// Image b alone, its offsets still into the whole batch.
Images one_image(const Images& im, int64_t b) {
  return {{im.h[b]},
          {im.w[b]},
          {im.h_a[b]},
          {im.w_a[b]},
          {im.tokens_begin[b], im.tokens_begin[b + 1]},
          {im.anchors_begin[b], im.anchors_begin[b + 1]},
          {im.kept_begin[b], im.kept_begin[b + 1]}};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> reduce_cpu(
    const at::Tensor& tokens_in, const at::Tensor& anchors_in, c10::IntArrayRef grids, c10::IntArrayRef anchor_grids,
    double keep_ratio, int64_t min_keep, double merge_weight) {
  const char* op = "g2tr.reduce";
  const Images im = check_reduce(op, tokens_in, anchors_in, grids, anchor_grids, keep_ratio, min_keep, merge_weight);
  const at::Tensor tokens = tokens_in.contiguous(), anchors = anchors_in.contiguous();
  const int64_t n = tokens.size(0), dim = tokens.size(1), k = im.kept_begin.back();
  auto scores = at::empty({n}, tokens.options().dtype(at::kFloat));
  auto cells = at::empty({n}, tokens.options().dtype(at::kLong));
  auto inv_norms = at::empty({n}, tokens.options().dtype(at::kFloat));
  auto pow2s = at::empty({n}, tokens.options().dtype(at::kFloat));
  auto keep_idx = at::empty({k}, tokens.options().dtype(at::kLong));
  auto merged = at::empty({k, dim}, tokens.options());
  auto assign = at::empty({n}, tokens.options().dtype(at::kLong));
  auto cu_seqlens = at::empty({im.count() + 1}, tokens.options().dtype(at::kInt));
  for (int64_t b = 0; b <= im.count(); ++b) cu_seqlens.data_ptr<int32_t>()[b] = static_cast<int32_t>(im.kept_begin[b]);
  std::vector<int64_t> cell_counts(im.count()), quotas(im.count(), 1);
  for (int64_t b = 0; b < im.count(); ++b) cell_counts[b] = im.cells(b);
  G2TR_DISPATCH_FLOAT_TYPES(tokens.scalar_type(), "g2tr_reduce", [&] {
    // The three stages over `part` (all images, or one); offsets in Images are global.
    auto stages = [&](const Images& part, int64_t b) {
      score_tokens<scalar_t>(tokens.const_data_ptr<scalar_t>(), anchors.const_data_ptr<scalar_t>(), dim, part,
                             scores.data_ptr<float>(), cells.data_ptr<int64_t>(), inv_norms.data_ptr<float>(),
                             pow2s.data_ptr<float>());
      select_tokens(scores.const_data_ptr<float>(), cells.const_data_ptr<int64_t>(), part, cell_counts.data() + b,
                    quotas.data() + b, keep_idx.data_ptr<int64_t>());
      merge_tokens<scalar_t>(tokens.const_data_ptr<scalar_t>(), dim, part, keep_idx.const_data_ptr<int64_t>(),
                             merge_weight, inv_norms.const_data_ptr<float>(), pow2s.const_data_ptr<float>(),
                             merged.data_ptr<scalar_t>(), assign.data_ptr<int64_t>());
    };
    if (!spread_images(im, dim)) return stages(im, 0);
    // Small images: each task takes its images through all three stages while their rows
    // are still in its core's cache (S1 in fp32 read every row from memory three times
    // when the stages ran one after another). Every stage computes an image's rows alone,
    // so the result is the same bits as stage after stage.
    at::parallel_for(0, im.count(), 1, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) stages(one_image(im, b), b);
    });
  });
  return {merged, keep_idx, cu_seqlens, scores, assign};
}

}  // namespace

TORCH_LIBRARY_IMPL(g2tr, CPU, m) { m.impl("reduce", &reduce_cpu); }

}  // namespace g2tr::cpu
