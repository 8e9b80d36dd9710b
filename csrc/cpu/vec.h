// Row primitives of the CPU kernels: dot products, sums of squares and row sums in fp32.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

namespace g2tr::cpu {

#define G2TR_DECLARE_ROW_KERNELS(T)                                                                   \
  /* *dot = <x, y>, *x_sumsq = <x, x>, *y_sumsq = <y, y>: one read of x and y */                      \
  void dot_and_sumsqs(const T* x, const T* y, int64_t d, float* dot, float* x_sumsq, float* y_sumsq); \
  float sumsq(const T* x, int64_t d);                                                                 \
  /* acc = x * s */                                                                                   \
  void scale_row(float* acc, const T* x, float s, int64_t d);                                         \
  /* acc += x */                                                                                      \
  void add_row(float* acc, const T* x, int64_t d);                                                    \
  /* out = x (fp32) */                                                                                \
  void widen_row(float* out, const T* x, int64_t d);                                                  \
  /* out = T(acc / count), round to nearest even */                                                   \
  void divide_row(T* out, const float* acc, float count, int64_t d);

G2TR_DECLARE_ROW_KERNELS(float)
G2TR_DECLARE_ROW_KERNELS(c10::BFloat16)
G2TR_DECLARE_ROW_KERNELS(c10::Half)
#undef G2TR_DECLARE_ROW_KERNELS

}  // namespace g2tr::cpu
