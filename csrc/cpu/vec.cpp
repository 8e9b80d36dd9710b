// Row primitives, vectorised by the compiler.
//
// Sums are accumulated in kLanes independent partial sums combined in a fixed tree, so
// the compiler may vectorise them (no reassociation needed) and, with FMA contraction off
// (setup.py: -ffp-contract=off), the result does not depend on the vector width. target_clones builds an AVX-512 and an
// AVX2 copy beside the portable one, chosen once at load time; a machine always runs the same copy, so results are
// bitwise reproducible.
#include "vec.h"

#include <cmath>
#include <cstring>
#include <type_traits>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define G2TR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define G2TR_CLONES
#endif
#define G2TR_INLINE __attribute__((always_inline)) inline

namespace g2tr::cpu {
namespace {

constexpr int kLanes = 16;

G2TR_INLINE float widen(float x) { return x; }
// bf16 -> fp32 is a 16-bit shift; written out so the vectoriser sees through it.
G2TR_INLINE float widen(c10::BFloat16 x) {
  const uint32_t bits = static_cast<uint32_t>(x.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}
G2TR_INLINE float widen(c10::Half x) { return static_cast<float>(x); }

G2TR_INLINE void narrow(float* out, float x) { *out = x; }
// fp32 -> bf16 with round to nearest even (NaN stays a quiet NaN), c10::BFloat16's rule,
// written without branches so the vectoriser sees through it.
G2TR_INLINE void narrow(c10::BFloat16* out, float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  out->x = static_cast<uint16_t>(x != x ? 0x7FC0u : rounded);
}
G2TR_INLINE void narrow(c10::Half* out, float x) { *out = c10::Half(x); }

// The kLanes partial sums as one vector value: written lane-wise in scalar form, GCC
// vectorised the float dot over the outer loop, with a transpose (1,351 permutes) per
// step of 16, at a third of the bf16 kernel's speed. Vector arithmetic is lane-wise and
// no FMA is formed, so every lane is summed exactly as the scalar loop sums it.
typedef float Lanes __attribute__((vector_size(kLanes * sizeof(float))));

template <typename T>
G2TR_INLINE Lanes load_lanes(const T* x) {
  Lanes v;
  if constexpr (std::is_same_v<T, float>) {
    std::memcpy(&v, x, sizeof(v));
  } else {
    for (int l = 0; l < kLanes; ++l) v[l] = widen(x[l]);
  }
  return v;
}

G2TR_INLINE float tree_sum(Lanes v) {
  float acc[kLanes];
  std::memcpy(acc, &v, sizeof(acc));
  for (int s = kLanes / 2; s > 0; s /= 2)
    for (int l = 0; l < s; ++l) acc[l] += acc[l + s];
  return acc[0];
}

// Scaled: each element times a power of two first (exact), for rows of extreme magnitude;
// a separate instantiation, so the plain one is the loop it always was.
template <bool Scaled, typename T>
G2TR_INLINE void dot_and_sumsqs_impl(const T* x, const T* y, int64_t d, float px, float py, float* dot, float* x_sumsq,
                                     float* y_sumsq) {
  Lanes acc_dot = {}, acc_xx = {}, acc_yy = {};
  int64_t i = 0;
  for (; i + kLanes <= d; i += kLanes) {
    Lanes a = load_lanes(x + i), b = load_lanes(y + i);
    if constexpr (Scaled) a *= px, b *= py;
    acc_dot += a * b;
    acc_xx += a * a;
    acc_yy += b * b;
  }
  for (int l = 0; i < d; ++i, ++l) {
    float a = widen(x[i]), b = widen(y[i]);
    if constexpr (Scaled) a *= px, b *= py;
    acc_dot[l] += a * b;
    acc_xx[l] += a * a;
    acc_yy[l] += b * b;
  }
  *dot = tree_sum(acc_dot);
  *x_sumsq = tree_sum(acc_xx);
  *y_sumsq = tree_sum(acc_yy);
}

template <bool Scaled, typename T>
G2TR_INLINE float sumsq_impl(const T* x, int64_t d, float px) {
  Lanes acc = {};
  int64_t i = 0;
  for (; i + kLanes <= d; i += kLanes) {
    Lanes a = load_lanes(x + i);
    if constexpr (Scaled) a *= px;
    acc += a * a;
  }
  for (int l = 0; i < d; ++i, ++l) {
    float a = widen(x[i]);
    if constexpr (Scaled) a *= px;
    acc[l] += a * a;
  }
  return tree_sum(acc);
}

template <typename T>
G2TR_INLINE float max_abs_impl(const T* x, int64_t d) {
  float m = 0.0f;
  for (int64_t i = 0; i < d; ++i) {
    const float a = std::fabs(widen(x[i]));
    m = a > m ? a : m;  // NaN never compares greater
  }
  return m;
}

}  // namespace

#define G2TR_DEFINE_ROW_KERNELS(T)                                                                                 \
  G2TR_CLONES void dot_and_sumsqs(const T* x, const T* y, int64_t d, float* dot, float* x_sumsq, float* y_sumsq) { \
    dot_and_sumsqs_impl<false>(x, y, d, 1.0f, 1.0f, dot, x_sumsq, y_sumsq);                                        \
  }                                                                                                                \
  G2TR_CLONES float sumsq(const T* x, int64_t d) { return sumsq_impl<false>(x, d, 1.0f); }                         \
  void dot_and_sumsqs_scaled(const T* x, const T* y, int64_t d, float px, float py, float* dot, float* x_sumsq,    \
                             float* y_sumsq) {                                                                     \
    dot_and_sumsqs_impl<true>(x, y, d, px, py, dot, x_sumsq, y_sumsq);                                             \
  }                                                                                                                \
  float sumsq_scaled(const T* x, int64_t d, float px) { return sumsq_impl<true>(x, d, px); }                       \
  float max_abs(const T* x, int64_t d) { return max_abs_impl(x, d); }                                              \
  G2TR_CLONES void scale_row(float* acc, const T* x, float s, int64_t d) {                                         \
    for (int64_t i = 0; i < d; ++i) acc[i] = widen(x[i]) * s;                                                      \
  }                                                                                                                \
  G2TR_CLONES void add_row(float* acc, const T* x, int64_t d) {                                                    \
    for (int64_t i = 0; i < d; ++i) acc[i] += widen(x[i]);                                                         \
  }                                                                                                                \
  G2TR_CLONES void widen_row(float* out, const T* x, int64_t d) {                                                  \
    for (int64_t i = 0; i < d; ++i) out[i] = widen(x[i]);                                                          \
  }                                                                                                                \
  G2TR_CLONES void divide_row(T* out, const float* acc, float count, int64_t d) {                                  \
    for (int64_t i = 0; i < d; ++i) narrow(out + i, acc[i] / count);                                               \
  }

G2TR_DEFINE_ROW_KERNELS(float)
G2TR_DEFINE_ROW_KERNELS(c10::BFloat16)
G2TR_DEFINE_ROW_KERNELS(c10::Half)

}  // namespace g2tr::cpu
