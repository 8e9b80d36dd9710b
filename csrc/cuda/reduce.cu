// The whole reduction on CUDA: score (token norms kept for the merge), select, merge, all
// launched on the current stream without a sync; every output size comes from the grids.
// Five launches for up to 64 images: score (which also gives the token norms), select
// (which also writes cu_seqlens), assign, group, sum.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "launch.cuh"

namespace g2tr::cuda {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> reduce_cuda(
    const at::Tensor& tokens_in, const at::Tensor& anchors_in, c10::IntArrayRef grids, c10::IntArrayRef anchor_grids,
    double keep_ratio, int64_t min_keep, double merge_weight) {
  const char* op = "g2tr.reduce";
  const Images im = check_reduce(op, tokens_in, anchors_in, grids, anchor_grids, keep_ratio, min_keep, merge_weight);
  check_int_sizes(op, im);
  check_select_capacity(op, im);  // before any launch: nothing half-done on refusal
  const c10::cuda::CUDAGuard guard(tokens_in.device());
  const at::Tensor tokens = tokens_in.contiguous(), anchors = anchors_in.contiguous();
  const int64_t n = tokens.size(0), dim = tokens.size(1), k = im.kept_begin.back();
  const auto options = tokens.options();
  auto scores = at::empty({n}, options.dtype(at::kFloat));
  auto keep_idx = at::empty({k}, options.dtype(at::kLong));
  auto merged = at::empty({k, dim}, options);
  auto assign = at::empty({n}, options.dtype(at::kLong));
  if (im.count() == 0) return {merged, keep_idx, at::zeros({1}, options.dtype(at::kInt)), scores, assign};
  auto cu_seqlens = at::empty({im.count() + 1}, options.dtype(at::kInt));
  auto cells = at::empty({n}, options.dtype(at::kLong));
  auto inv_norms = at::empty({n}, options.dtype(at::kFloat)), pow2s = at::empty({n}, options.dtype(at::kFloat));
  std::vector<int64_t> cell_counts(im.count()), quotas(im.count(), 1);
  for (int64_t b = 0; b < im.count(); ++b) cell_counts[b] = im.cells(b);
  launch_score_tokens(tokens, &anchors, im, scores.data_ptr<float>(), cells.data_ptr<int64_t>(),
                      inv_norms.data_ptr<float>(), pow2s.data_ptr<float>());
  launch_select_tokens(scores.const_data_ptr<float>(), cells.const_data_ptr<int64_t>(), im, cell_counts, quotas,
                       keep_idx.data_ptr<int64_t>(), cu_seqlens.data_ptr<int32_t>());
  launch_merge_tokens(tokens, im, keep_idx.const_data_ptr<int64_t>(), merge_weight, inv_norms.const_data_ptr<float>(),
                      pow2s.const_data_ptr<float>(), merged, assign.data_ptr<int64_t>());
  return {merged, keep_idx, cu_seqlens, scores, assign};
}

}  // namespace

TORCH_LIBRARY_IMPL(g2tr, CUDA, m) { m.impl("reduce", &reduce_cuda); }

}  // namespace g2tr::cuda
