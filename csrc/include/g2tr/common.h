// The integer and ordering rules of G2TR (SPEC.md §3) that every backend shares.
//
// Plain C++ with no torch include, marked __host__ __device__ under nvcc, so the CPU
// kernels (and their tests) run exactly the code the CUDA kernels run.
#pragma once

#include <cmath>
#include <cstdint>

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
  int64_t k = round_half_even(static_cast<double>(num_tokens) * keep_ratio);
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

// 1 / max(|x|, eps), torch.nn.functional.normalize's denominator.
constexpr float kNormEps = 1e-12f;
G2TR_HD float inv_norm(float sum_of_squares) {
  const float norm = sqrtf(sum_of_squares);
  return 1.0f / (norm > kNormEps ? norm : kNormEps);
}

}  // namespace g2tr
