// The CPU stages on raw pointers, shared by the per-op wrappers and the fused reduce.
#pragma once

#include <cstdint>

#include "g2tr/checks.h"

namespace g2tr::cpu {

// scores[i] = cos(token i, anchor of its cell), cells[i] = its local cell id, and,
// when inv_norms is not null, the token's cosine scale (vec.h cosine_scale: inv_norms[i]
// and pow2s[i], with token i / max(|token i|, eps) = (token i * pow2s[i]) * inv_norms[i]):
// one pass over the tokens, whose norms the merge reuses.
template <typename T>
void score_tokens(const T* tokens, const T* anchors, int64_t dim, const Images& im, float* scores, int64_t* cells,
                  float* inv_norms, float* pow2s);

// Kept indices of every image (global, ascending) into keep_idx[kept_begin[b] ...].
void select_tokens(const float* scores, const int64_t* cells, const Images& im, const int64_t* cell_counts,
                   const int64_t* cell_quotas, int64_t* keep_idx);

// Whether the images are too small to keep every thread busy one at a time (S1: 16 tiles
// of 256 tokens), so the merge, and the whole of reduce, runs one image per task instead
// (on one thread too: reduce then takes each image through all stages while it is cached).
bool spread_images(const Images& im, int64_t dim);

// Merged rows and assignment of every image. inv_norms and pow2s (score_tokens) may be
// null together (computed here).
template <typename T>
void merge_tokens(const T* tokens, int64_t dim, const Images& im, const int64_t* keep_idx, double merge_weight,
                  const float* inv_norms, const float* pow2s, T* merged, int64_t* assign);

}  // namespace g2tr::cpu
