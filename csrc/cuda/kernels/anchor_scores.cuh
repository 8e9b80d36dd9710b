// Stage III score on the GPU (SPEC.md §3): one warp per token, one read of the token row.
//
// scores[i] = (<v_i, a> * inv_norm(|v_i|^2)) * inv_norm(|a|^2) for the anchor a of the token's
// cell, cells[i] = its local cell id, and inv_norms[i] = inv_norm(|v_i|^2) for the merge.
// A row of extreme magnitude enters its norm and dot product scaled by an exact power of
// two (common.h needs_rescale / cosine_pow2, the CPU and Triton rule), so cosines are
// exact at any finite magnitude.
// The anchor's norm is summed in the same pass as the dot product (its row is read anyway,
// mostly from L2), so scoring is one launch with no anchor pre-pass. With kWithAnchor =
// false only the token norms are computed (the merge op on its own).
#pragma once

#include "common.cuh"

namespace g2tr::cuda {

constexpr int kScoreWarps = 8;  // tokens per block
constexpr int kScoreThreads = kScoreWarps * 32;

// Calls f(x[d], y[d]) in fp32 for the features d this lane owns (y[d] = 0 without an
// anchor), in one fixed order. The vector and element paths use the same element-to-lane
// map and order, so a misaligned copy of a row gives the same bits as an aligned one.
template <typename T, bool kWithAnchor, typename F>
__device__ __forceinline__ void for_lane_elements(const T* x, const T* y, int64_t dim, bool vectorized, int lane, F f) {
  constexpr int E = Vec16<T>::kElems;
  if (vectorized) {
    const int64_t vectors = dim / E;
    for (int64_t v = lane; v < vectors; v += 32) {
      Vec16<T> xv, yv;
      xv.load(x + v * E);
      if constexpr (kWithAnchor) yv.load(y + v * E);
#pragma unroll
      for (int e = 0; e < E; ++e) f(xv.get(e), kWithAnchor ? yv.get(e) : 0.0f);
    }
  } else {
    for (int64_t v = lane; v * E < dim; v += 32) {
#pragma unroll
      for (int e = 0; e < E; ++e) {
        const int64_t d = v * E + e;
        if (d < dim) f(to_float(x[d]), kWithAnchor ? to_float(y[d]) : 0.0f);
      }
    }
  }
}

// Butterfly max over a warp (every lane ends with it).
__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, offset));
  return x;
}

// Grid: x = groups of kScoreWarps tokens of an image, y = image of the launch.
// pow2s (with inv_norms, for the merge): each token's cosine_pow2, 1 for normal rows.
template <typename T, bool kWithAnchor>
__global__ void __launch_bounds__(kScoreThreads)
    score_tokens_kernel(const T* __restrict__ tokens, const T* __restrict__ anchors, int64_t dim, bool vectorized,
                        const __grid_constant__ ImageTable table, float* __restrict__ scores,
                        int64_t* __restrict__ cells, float* __restrict__ inv_norms, float* __restrict__ pow2s) {
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
  auto accumulate = [&](float xe, float ye) {
    xx = fmaf(xe, xe, xx);
    if constexpr (kWithAnchor) {
      dot = fmaf(xe, ye, dot);
      yy = fmaf(ye, ye, yy);
    }
  };
  auto warp_sums = [&]() {
    xx = warp_sum(xx);
    if constexpr (kWithAnchor) {
      dot = warp_sum(dot);
      yy = warp_sum(yy);
    }
  };
  for_lane_elements<T, kWithAnchor>(x, y, dim, vectorized, lane, accumulate);
  warp_sums();
  // Rows of extreme magnitude (common.h needs_rescale; rare) are summed again, scaled by
  // an exact power of two. The sums are the same on every lane, so the branch is uniform.
  float px = 1.0f, py = 1.0f;
  const bool rescale_x = needs_rescale(xx), rescale_y = kWithAnchor && needs_rescale(yy);
  if (rescale_x || rescale_y) {
    float mx = 0.0f, my = 0.0f;  // fmaxf ignores NaN, as the CPU's max_abs
    for_lane_elements<T, kWithAnchor>(x, y, dim, vectorized, lane, [&](float xe, float ye) {
      mx = fmaxf(mx, fabsf(xe));
      my = fmaxf(my, fabsf(ye));
    });
    if (rescale_x) px = cosine_pow2(warp_max(mx));
    if (rescale_y) py = cosine_pow2(warp_max(my));
    dot = xx = yy = 0.0f;
    for_lane_elements<T, kWithAnchor>(x, y, dim, vectorized, lane,
                                      [&](float xe, float ye) { accumulate(xe * px, ye * py); });
    warp_sums();
  }
  if (lane == 0) {
    const float inv = inv_norm(xx, px);
    if (inv_norms != nullptr) {
      inv_norms[token] = inv;
      pow2s[token] = px;
    }
    if constexpr (kWithAnchor) {
      // The CPU's order, dot * inv * anchor_inv, without FMA contraction.
      scores[token] = __fmul_rn(__fmul_rn(dot, inv), inv_norm(yy, py));
      cells[token] = cell;
    }
  }
}

}  // namespace g2tr::cuda
