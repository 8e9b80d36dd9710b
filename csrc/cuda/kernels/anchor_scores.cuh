// Stage III score on the GPU (SPEC.md §3): one warp per token, one read of the token row.
//
// scores[i] = (<v_i, a> * inv_norm(|v_i|^2)) * inv_norm(|a|^2) for the anchor a of the token's
// cell, cells[i] = its local cell id, and inv_norms[i] = inv_norm(|v_i|^2) for the merge.
// The anchor's norm is summed in the same pass as the dot product (its row is read anyway,
// mostly from L2), so scoring is one launch with no anchor pre-pass. With kWithAnchor =
// false only the token norms are computed (the merge op on its own).
#pragma once

#include "common.cuh"

namespace g2tr::cuda {

constexpr int kScoreWarps = 8;  // tokens per block
constexpr int kScoreThreads = kScoreWarps * 32;

// Grid: x = groups of kScoreWarps tokens of an image, y = image of the launch.
template <typename T, bool kWithAnchor>
__global__ void __launch_bounds__(kScoreThreads)
    score_tokens_kernel(const T* __restrict__ tokens, const T* __restrict__ anchors, int64_t dim, bool vectorized,
                        const __grid_constant__ ImageTable table, float* __restrict__ scores,
                        int64_t* __restrict__ cells, float* __restrict__ inv_norms) {
  const int b = blockIdx.y;
  const int first = table.token_begin[b];
  const int length = table.token_begin[b + 1] - first;
  const int local = blockIdx.x * kScoreWarps + static_cast<int>(threadIdx.x / 32);
  if (local >= length) return;
  const int lane = threadIdx.x % 32;
  const int64_t token = static_cast<int64_t>(first) + local;
  const T* x = tokens + token * dim;
  int64_t cell = 0;
  const T* y = x;
  if constexpr (kWithAnchor) {
    cell = cell_of(local, table.h[b], table.w[b], table.h_a[b], table.w_a[b]);
    y = anchors + (static_cast<int64_t>(table.anchor_begin[b]) + cell) * dim;
  }
  float dot = 0.0f, xx = 0.0f, yy = 0.0f;
  if (vectorized) {
    constexpr int E = Vec16<T>::kElems;
    const int64_t vectors = dim / E;
    for (int64_t v = lane; v < vectors; v += 32) {
      Vec16<T> xv, yv;
      xv.load(x + v * E);
      if constexpr (kWithAnchor) yv.load(y + v * E);
#pragma unroll
      for (int e = 0; e < E; ++e) {
        const float xe = xv.get(e);
        xx = fmaf(xe, xe, xx);
        if constexpr (kWithAnchor) {
          const float ye = yv.get(e);
          dot = fmaf(xe, ye, dot);
          yy = fmaf(ye, ye, yy);
        }
      }
    }
  } else {
    // Same element-to-lane map and order as the vector path, so a misaligned copy of a row
    // gives the same bits as an aligned one.
    constexpr int E = Vec16<T>::kElems;
    for (int64_t v = lane; v * E < dim; v += 32) {
#pragma unroll
      for (int e = 0; e < E; ++e) {
        const int64_t d = v * E + e;
        if (d < dim) {
          const float xe = to_float(x[d]);
          xx = fmaf(xe, xe, xx);
          if constexpr (kWithAnchor) {
            const float ye = to_float(y[d]);
            dot = fmaf(xe, ye, dot);
            yy = fmaf(ye, ye, yy);
          }
        }
      }
    }
  }
  xx = warp_sum(xx);
  if constexpr (kWithAnchor) {
    dot = warp_sum(dot);
    yy = warp_sum(yy);
  }
  if (lane == 0) {
    const float inv = inv_norm(xx);
    if (inv_norms != nullptr) inv_norms[token] = inv;
    if constexpr (kWithAnchor) {
      // The CPU's order, dot * inv * anchor_inv, without FMA contraction.
      scores[token] = __fmul_rn(__fmul_rn(dot, inv), inv_norm(yy));
      cells[token] = cell;
    }
  }
}

}  // namespace g2tr::cuda
