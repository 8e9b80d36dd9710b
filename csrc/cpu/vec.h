// Row primitives of the CPU kernels: dot products, sums of squares and row sums in fp32.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

#include "g2tr/common.h"

namespace g2tr::cpu {

#define G2TR_DECLARE_ROW_KERNELS(T)                                                                             \
  /* *dot = <x, y>, *x_sumsq = <x, x>, *y_sumsq = <y, y>: one read of x and y */                                \
  void dot_and_sumsqs(const T* x, const T* y, int64_t d, float* dot, float* x_sumsq, float* y_sumsq);           \
  float sumsq(const T* x, int64_t d);                                                                           \
  /* the same sums of x * px and y * py (px, py: powers of two, common.h cosine_pow2) */                        \
  void dot_and_sumsqs_scaled(const T* x, const T* y, int64_t d, float px, float py, float* dot, float* x_sumsq, \
                             float* y_sumsq);                                                                   \
  float sumsq_scaled(const T* x, int64_t d, float px);                                                          \
  /* max |x_i| (NaN ignored) */                                                                                 \
  float max_abs(const T* x, int64_t d);                                                                         \
  /* acc = x * s */                                                                                             \
  void scale_row(float* acc, const T* x, float s, int64_t d);                                                   \
  /* acc += x */                                                                                                \
  void add_row(float* acc, const T* x, int64_t d);                                                              \
  /* out = x (fp32) */                                                                                          \
  void widen_row(float* out, const T* x, int64_t d);                                                            \
  /* out = T(acc / count), round to nearest even */                                                             \
  void divide_row(T* out, const float* acc, float count, int64_t d);

G2TR_DECLARE_ROW_KERNELS(float)
G2TR_DECLARE_ROW_KERNELS(c10::BFloat16)
G2TR_DECLARE_ROW_KERNELS(c10::Half)
#undef G2TR_DECLARE_ROW_KERNELS

// Cosine scale of row x whose plain sum of squares is `sum_of_squares`: *pow2 and the
// returned c satisfy x / max(|x|, eps) == (x * *pow2) * c (common.h). *pow2 is 1 for
// every row of normal magnitude, with no extra pass over it.
template <typename T>
float cosine_scale(const T* x, int64_t d, float sum_of_squares, float* pow2) {
  *pow2 = 1.0f;
  if (!needs_rescale(sum_of_squares)) return inv_norm(sum_of_squares);
  *pow2 = cosine_pow2(max_abs(x, d));
  return inv_norm(sumsq_scaled(x, d, *pow2), *pow2);
}

}  // namespace g2tr::cpu
