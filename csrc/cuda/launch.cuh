// The torch side of the CUDA kernels: per-launch image tables built from the host-side
// Images, and the stage launchers that the per-op files share (reduce.cu chains them).
//
// Launchers run on the current device and stream (the op wrappers set the device guard),
// allocate only through the caching allocator, never synchronise and never read device
// memory on the host: every size comes from the host int lists, so the ops can be
// captured in a CUDA graph and traced by torch.compile.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <vector>

#include "g2tr/checks.h"
#include "kernels/common.cuh"

namespace g2tr::cuda {

// The kernels' element type of a torch dtype (same bits).
template <typename scalar_t>
struct DeviceType {
  using type = scalar_t;
};
template <>
struct DeviceType<c10::Half> {
  using type = __half;
};
template <>
struct DeviceType<c10::BFloat16> {
  using type = __nv_bfloat16;
};

// 16-byte vector paths: whole rows of 16-byte units starting on 16-byte boundaries.
inline bool vectorizable(int64_t dim, size_t element_size, const void* base) {
  return (dim * static_cast<int64_t>(element_size)) % 16 == 0 && reinterpret_cast<uintptr_t>(base) % 16 == 0;
}

// The kernels index tokens, kept rows and anchors with ints (offsets into row arrays;
// element offsets are int64).
inline void check_int_sizes(const char* op, const Images& im) {
  TORCH_CHECK_VALUE(im.tokens_begin.back() <= INT_MAX, op, ": the CUDA kernels take at most ", INT_MAX,
                    " tokens per call, got ", im.tokens_begin.back());
  TORCH_CHECK_VALUE(im.anchors_begin.empty() || im.anchors_begin.back() <= INT_MAX, op,
                    ": the CUDA kernels take at most ", INT_MAX, " anchors per call, got ", im.anchors_begin.back());
}

// One table per group of kMaxImagesPerLaunch images. cell_counts / quotas are the
// selection's (empty elsewhere); quotas are clamped to [1, length] (a larger quota means
// the same as the length).
inline std::vector<ImageTable> image_tables(const Images& im, c10::IntArrayRef cell_counts = {},
                                            c10::IntArrayRef quotas = {}) {
  std::vector<ImageTable> tables;
  for (int64_t b0 = 0; b0 < im.count(); b0 += kMaxImagesPerLaunch) {
    ImageTable t{};
    t.count = static_cast<int>(std::min<int64_t>(kMaxImagesPerLaunch, im.count() - b0));
    t.first_image = static_cast<int>(b0);
    for (int i = 0; i <= t.count; ++i) {
      const int64_t b = b0 + i;
      t.token_begin[i] = static_cast<int>(im.tokens_begin[b]);
      t.kept_begin[i] = im.kept_begin.empty() ? 0 : static_cast<int>(im.kept_begin[b]);
      if (i == t.count) break;
      t.anchor_begin[i] = im.anchors_begin.empty() ? 0 : static_cast<int>(im.anchors_begin[b]);
      t.h[i] = static_cast<int>(im.h[b]);
      t.w[i] = static_cast<int>(im.w[b]);
      t.h_a[i] = im.h_a.empty() ? 1 : static_cast<int>(im.h_a[b]);
      t.w_a[i] = im.w_a.empty() ? 1 : static_cast<int>(im.w_a[b]);
      t.cell_count[i] = cell_counts.empty() ? 1 : static_cast<int>(cell_counts[b]);
      t.quota[i] = quotas.empty() ? 1 : static_cast<int>(std::clamp<int64_t>(quotas[b], 1, im.length(b)));
    }
    tables.push_back(t);
  }
  return tables;
}

inline int max_length(const ImageTable& t) {
  int m = 0;
  for (int i = 0; i < t.count; ++i) m = std::max(m, t.token_begin[i + 1] - t.token_begin[i]);
  return m;
}
inline int max_kept(const ImageTable& t) {
  int m = 0;
  for (int i = 0; i < t.count; ++i) m = std::max(m, t.kept_begin[i + 1] - t.kept_begin[i]);
  return m;
}

// anchor_scores.cu. With anchors: scores, cells and (when not null) inv_norms and pow2s of
// every token; without (nullptr): inv_norms and pow2s only. pow2s: the exact power of two
// each row entered its norm scaled by (common.h cosine_pow2; 1 for normal rows).
void launch_score_tokens(const at::Tensor& tokens, const at::Tensor* anchors, const Images& im, float* scores,
                         int64_t* cells, float* inv_norms, float* pow2s);

// balanced_topk.cu. The host-side refusal of images larger than one block can sort.
void check_select_capacity(const char* op, const Images& im);
// keep_idx[kept_begin[b] ...] = image b's kept global indices, ascending; cu_seqlens, when
// not null, = kept_begin as int32.
void launch_select_tokens(const float* scores, const int64_t* cells, const Images& im, c10::IntArrayRef cell_counts,
                          c10::IntArrayRef quotas, int64_t* keep_idx, int32_t* cu_seqlens);

// merge.cu. inv_norms and pow2s (launch_score_tokens) may be null (computed here). merged
// [K_total, D] and assign [N].
void launch_merge_tokens(const at::Tensor& tokens, const Images& im, const int64_t* keep_idx, double merge_weight,
                         const float* inv_norms, const float* pow2s, at::Tensor& merged, int64_t* assign);

}  // namespace g2tr::cuda
