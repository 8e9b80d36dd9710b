// Stage III score on the CPU (SPEC.md §3, g2tr_kernels/reference/anchor_scores.py): one pass
// over the tokens and the anchors they fall on.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "cpu_kernels.h"
#include "vec.h"

namespace g2tr::cpu {

template <typename T>
void score_tokens(const T* tokens, const T* anchors, int64_t dim, const Images& im, float* scores, int64_t* cells,
                  float* inv_norms, float* pow2s) {
  // The anchor's norm is summed beside the dot product (the anchor row is read anyway), so
  // anchors no token falls on (anchor grids finer than the ViT grid) cost nothing.
  at::parallel_for(im.tokens_begin.front(), im.tokens_begin.back(), 16, [&](int64_t begin, int64_t end) {
    // The image of the first token of this chunk; later tokens move forward from it.
    int64_t b = std::upper_bound(im.tokens_begin.begin(), im.tokens_begin.end(), begin) - im.tokens_begin.begin() - 1;
    for (int64_t i = begin; i < end; ++i) {
      while (i >= im.tokens_begin[b + 1]) ++b;
      const int64_t cell = cell_of(i - im.tokens_begin[b], im.h[b], im.w[b], im.h_a[b], im.w_a[b]);
      const int64_t anchor = im.anchors_begin[b] + cell;
      const T* x = tokens + i * dim;
      const T* y = anchors + anchor * dim;
      float dot, token_sq, anchor_sq, token_pow2 = 1.0f, anchor_pow2 = 1.0f;
      dot_and_sumsqs(x, y, dim, &dot, &token_sq, &anchor_sq);
      if (needs_rescale(token_sq) || needs_rescale(anchor_sq)) {  // rare: see common.h
        if (needs_rescale(token_sq)) token_pow2 = cosine_pow2(max_abs(x, dim));
        if (needs_rescale(anchor_sq)) anchor_pow2 = cosine_pow2(max_abs(y, dim));
        dot_and_sumsqs_scaled(x, y, dim, token_pow2, anchor_pow2, &dot, &token_sq, &anchor_sq);
      }
      const float inv = inv_norm(token_sq, token_pow2);
      scores[i] = dot * inv * inv_norm(anchor_sq, anchor_pow2);
      cells[i] = cell;
      if (inv_norms) {
        inv_norms[i] = inv;
        pow2s[i] = token_pow2;
      }
    }
  });
}

#define G2TR_INSTANTIATE(T) \
  template void score_tokens<T>(const T*, const T*, int64_t, const Images&, float*, int64_t*, float*, float*);
G2TR_INSTANTIATE(float)
G2TR_INSTANTIATE(c10::BFloat16)
G2TR_INSTANTIATE(c10::Half)
#undef G2TR_INSTANTIATE

namespace {

std::tuple<at::Tensor, at::Tensor> anchor_scores_cpu(const at::Tensor& tokens_in, const at::Tensor& anchors_in,
                                                     c10::IntArrayRef grids, c10::IntArrayRef anchor_grids) {
  const Images im = check_images("g2tr.anchor_scores", tokens_in, anchors_in, grids, anchor_grids);
  const at::Tensor tokens = tokens_in.contiguous(), anchors = anchors_in.contiguous();
  auto scores = at::empty({tokens.size(0)}, tokens.options().dtype(at::kFloat));
  auto cells = at::empty({tokens.size(0)}, tokens.options().dtype(at::kLong));
  G2TR_DISPATCH_FLOAT_TYPES(tokens.scalar_type(), "g2tr_anchor_scores", [&] {
    score_tokens<scalar_t>(tokens.const_data_ptr<scalar_t>(), anchors.const_data_ptr<scalar_t>(), tokens.size(1), im,
                           scores.data_ptr<float>(), cells.data_ptr<int64_t>(), nullptr, nullptr);
  });
  return {scores, cells};
}

}  // namespace

TORCH_LIBRARY_IMPL(g2tr, CPU, m) { m.impl("anchor_scores", &anchor_scores_cpu); }

}  // namespace g2tr::cpu
