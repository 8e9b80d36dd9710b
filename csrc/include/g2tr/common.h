// The integer and ordering rules of G2TR (SPEC.md §3) that every backend shares.
//
// Plain C++ with no torch include, marked __host__ __device__ under nvcc, so the CPU
// kernels (and their tests) run exactly the code the CUDA kernels run.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define G2TR_HD __host__ __device__ __forceinline__
#else
#define G2TR_HD inline
#endif

namespace g2tr {

// Python's round() of the double product: ties to even (1369 * 0.5 = 684.5 -> 684).
// Written out instead of nearbyint() so the result never depends on the FP rounding mode.
G2TR_HD int64_t round_half_even(double x) {
  const double lower = floor(x);
  const double frac = x - lower;  // exact for doubles
  int64_t r = static_cast<int64_t>(lower);
  if (frac > 0.5 || (frac == 0.5 && (r & 1) != 0)) r += 1;
  return r;
}

// K = min(N, max(min_keep, round_half_even(N * keep_ratio))): a function of N and the
// arguments only, so every output size is known on the host before a kernel runs.
G2TR_HD int64_t budget(int64_t num_tokens, double keep_ratio, int64_t min_keep) {
  const double product = static_cast<double>(num_tokens) * keep_ratio;
  // A product that rounds to num_tokens or above (keep_ratio 1, or N near 2^63, where
  // the cast back to int64 would overflow) keeps everything.
  int64_t k = product < static_cast<double>(num_tokens) ? round_half_even(product) : num_tokens;
  if (k < min_keep) k = min_keep;
  return k < num_tokens ? k : num_tokens;
}

// Local anchor cell of token `token` of an h x w ViT grid over an h_a x w_a anchor grid:
// integer floor map, clamped to the last cell.
G2TR_HD int64_t cell_of(int64_t token, int64_t h, int64_t w, int64_t h_a, int64_t w_a) {
  const int64_t r = token / w, c = token % w;
  int64_t a_r = r * h_a / h, a_c = c * w_a / w;
  if (a_r > h_a - 1) a_r = h_a - 1;
  if (a_c > w_a - 1) a_c = w_a - 1;
  return a_r * w_a + a_c;
}

// Scores are ranked with NaN below everything, so a NaN token is never preferred.
G2TR_HD float rank_value(float score) { return score != score ? -INFINITY : score; }

// The one ordering used everywhere (cell best, cell ranking, fill, merge assignment):
// higher value first, ties to the lower index. A strict weak order even with NaN input.
G2TR_HD bool ranks_before(float value_a, int64_t index_a, float value_b, int64_t index_b) {
  const float a = rank_value(value_a), b = rank_value(value_b);
  return a > b || (a == b && index_a < index_b);
}

// 1 / max(|x|, eps), torch.nn.functional.normalize's denominator. For a row scaled by
// the power of two pow2 (see cosine_pow2), sum_of_squares is that of x * pow2 and the
// result c satisfies x / max(|x|, eps) == (x * pow2) * c: |x * pow2| = pow2 * |x| exactly.
constexpr float kNormEps = 1e-12f;
G2TR_HD float inv_norm(float sum_of_squares, float pow2 = 1.0f) {
  const float norm = sqrtf(sum_of_squares);
  const float eps = kNormEps * pow2;
  return 1.0f / (norm > eps ? norm : eps);
}

// Cosines exact at any finite magnitude (SPEC.md §3). A row whose fp32 sum of squares
// lies in [2^-100, 2^100] (|x| in [2^-50, 2^50]: all normal data) is used as it is: its
// sums of squares and its dot products with any such row (or a rescaled one) neither
// overflow nor lose bits to underflow. Any other row (rare: |x| ~ 1e20 overflows the
// sum, |x| ~ 1e-25 underflows it) is multiplied by an exact power of two that brings its
// max-abs into [2^-23, 4) before every sum it enters, its norm and its dot products
// alike, so the cosine does not change and the fast path costs one compare per row.
G2TR_HD bool needs_rescale(float sum_of_squares) {
  // NaN (a non-finite input) is not rescaled: the NaN propagates as before.
  return sum_of_squares < 0x1p-100f || sum_of_squares > 0x1p100f;
}

// 2^p bringing max_abs near 1: p = 126 - its biased exponent, clamped so 2^p is a normal
// float; 1 for a zero or non-finite row (nothing to rescale). The same bit arithmetic in
// the Triton kernels (triton/anchor_scores.py).
G2TR_HD float cosine_pow2(float max_abs) {
  uint32_t bits;
  memcpy(&bits, &max_abs, sizeof(bits));
  const int biased = static_cast<int>((bits >> 23) & 0xFFu);
  if (max_abs == 0.0f || biased == 0xFF) return 1.0f;
  int p = 126 - biased;
  p = p < -126 ? -126 : (p > 127 ? 127 : p);
  bits = static_cast<uint32_t>(p + 127) << 23;
  float pow2;
  memcpy(&pow2, &bits, sizeof(pow2));
  return pow2;
}

}  // namespace g2tr
