// The CPU stages on raw pointers, shared by the per-op wrappers and the fused reduce.
#pragma once

#include <cstdint>

#include "g2tr/checks.h"

namespace g2tr::cpu {

// scores[i] = cos(token i, anchor of its cell), cells[i] = its local cell id, and,
// when inv_norms is not null, inv_norms[i] = 1 / max(|token i|, eps): one pass over
// the tokens, whose norms the merge reuses.
template <typename T>
void score_tokens(const T* tokens, const T* anchors, int64_t dim, const Images& im, float* scores, int64_t* cells,
                  float* inv_norms);

// Kept indices of every image (global, ascending) into keep_idx[kept_begin[b] ...].
void select_tokens(const float* scores, const int64_t* cells, const Images& im, const int64_t* cell_counts,
                   const int64_t* cell_quotas, int64_t* keep_idx);

// Merged rows and assignment of every image. inv_norms may be null (computed here).
template <typename T>
void merge_tokens(const T* tokens, int64_t dim, const Images& im, const int64_t* keep_idx, double merge_weight,
                  const float* inv_norms, T* merged, int64_t* assign);

}  // namespace g2tr::cpu
