// AVX512-BF16 fused dot + argmax; see dot_argmax.h for the contract.
//
// Layout: B is packed in panels of kPanel columns as [pair k][column][2], so one step
// over a k-pair loads whole zmm vectors of columns and vdpbf16ps multiplies them by a
// broadcast 32-bit pair of one A row. A register tile of kRows rows x kPanel columns is
// accumulated over the whole of d before its argmax epilogue runs: there is no k
// blocking, so every (i, j) is summed by the same instruction sequence whatever tile,
// panel or task it lands in (identical rows => bitwise-identical values).
//
// This file is compiled without -mavx512*: only the functions marked
// G2TR_TARGET_BF16 use the ISA, and callers check dot_argmax_bf16_supported() first.
#include "dot_argmax.h"

#include <algorithm>
#include <cstring>
#include <limits>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define G2TR_DOT_ARGMAX_X86 1
#include <immintrin.h>
#else
#define G2TR_DOT_ARGMAX_X86 0
#endif

// Tuning knobs, overridable with -D for experiments. On Zen 4 (AMD EPYC family 25 model 17; d = 3584, m = n = 2450)
// 8x3, 6x4, 8x2 and 4x4 tiles and row blocks of 24..all rows all ran within ~5% of each
// other, at ~90% of the vdpbf16ps peak; 8x3 keeps the most zmm registers spare and the
// narrowest panel (48 columns x d/2 pairs: 344 KiB at d = 3584, so it stays in a 1 MiB
// L2 for larger d too). kRows * kVecs accumulators + kVecs B vectors + one broadcast
// must fit in 32 zmm registers.
#ifndef G2TR_DA_ROWS
#define G2TR_DA_ROWS 8
#endif
#ifndef G2TR_DA_VECS
#define G2TR_DA_VECS 3
#endif
#ifndef G2TR_DA_ROW_BLOCK
#define G2TR_DA_ROW_BLOCK 192
#endif

namespace g2tr::cpu {
namespace {

constexpr int kLanes = 16;  // fp32 lanes (= packed columns) per zmm
constexpr int kVecs = G2TR_DA_VECS;
constexpr int kPanel = kLanes * kVecs;
constexpr int kRows = G2TR_DA_ROWS;
// Rows per block: a block walks every B panel, and each panel is reused by all the row
// tiles of the block while it sits in L2; the block bounds the A rows re-read per panel
// (they stream from L3, each element feeding kPanel columns, so that is cheap).
constexpr int64_t kRowBlock = (G2TR_DA_ROW_BLOCK + kRows - 1) / kRows * kRows;
static_assert(kRows >= 1 && kRows <= 8, "tile dispatch handles 1..8 rows");
static_assert(kRows * kVecs + kVecs + 1 <= 32, "register tile does not fit in zmm registers");

// The packed buffer is typed c10::BFloat16 but holds bf16 pairs written as one word.
typedef uint32_t __attribute__((may_alias)) pair_t;

inline int64_t num_pairs(int64_t d) { return (d + 1) / 2; }
inline int64_t num_panels(int64_t n) { return (n + kPanel - 1) / kPanel; }

// Elements 2k (low half) and 2k+1 (high half): the order vdpbf16ps pairs them in.
inline uint32_t load_pair(const c10::BFloat16* p) {
  uint32_t w;
  std::memcpy(&w, p, sizeof(w));
  return w;
}
// Last element of an odd row, its missing partner zero.
inline uint32_t load_last(const c10::BFloat16* p) { return p->x; }

#if G2TR_DOT_ARGMAX_X86
#if defined(__GNUC__) && !defined(__clang__)
// GCC 12's AVX-512 headers build "undefined" vectors as `__Y = __Y`, which -Wall flags
// wherever they get inlined into a target("avx512...") function: a false positive.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#define G2TR_TARGET_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

// One R x kPanel register tile over the whole of d, then its argmax epilogue merged
// into the rows' running best (panels arrive in increasing column order).
template <int R>
G2TR_TARGET_BF16 void tile_panel(const c10::BFloat16* const* a_ptr, const pair_t* panel, int64_t d,
                                 const float* a_scale, const float* b_scale, int64_t col0, int64_t n, int64_t* best_idx,
                                 float* best_val) {
  __m512 acc[R][kVecs];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < kVecs; ++c) acc[r][c] = _mm512_setzero_ps();

  const c10::BFloat16* a[R];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) a[r] = a_ptr[r];

  const int64_t full = d / 2;
  const pair_t* bp = panel;
  for (int64_t k = 0; k < full; ++k, bp += kPanel) {
    __m512i b[kVecs];
#pragma GCC unroll 4
    for (int c = 0; c < kVecs; ++c) b[c] = _mm512_loadu_si512(bp + c * kLanes);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m512bh av = (__m512bh)_mm512_set1_epi32(static_cast<int>(load_pair(a[r] + 2 * k)));
#pragma GCC unroll 4
      for (int c = 0; c < kVecs; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], av, (__m512bh)b[c]);
    }
  }
  if (d & 1) {  // same instruction as the body, the partner zero on both sides
    __m512i b[kVecs];
#pragma GCC unroll 4
    for (int c = 0; c < kVecs; ++c) b[c] = _mm512_loadu_si512(bp + c * kLanes);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m512bh av = (__m512bh)_mm512_set1_epi32(static_cast<int>(load_last(a[r] + d - 1)));
#pragma GCC unroll 4
      for (int c = 0; c < kVecs; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], av, (__m512bh)b[c]);
    }
  }

  // Padded columns (j >= n) hold zeros that could beat negative values: mask them out.
  __mmask16 valid[kVecs];
  __m512 bs[kVecs];
  __m512i col[kVecs];
  const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
#pragma GCC unroll 4
  for (int c = 0; c < kVecs; ++c) {
    const int64_t left = n - (col0 + c * kLanes);
    valid[c] = left >= kLanes ? __mmask16(0xFFFF) : left <= 0 ? __mmask16(0) : __mmask16((1u << left) - 1u);
    bs[c] = _mm512_maskz_loadu_ps(valid[c], b_scale + col0 + c * kLanes);
    col[c] = _mm512_add_epi32(iota, _mm512_set1_epi32(static_cast<int>(col0 + c * kLanes)));
  }
  const __m512 neg_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    const __m512 as = _mm512_set1_ps(a_scale[r]);
    // Per lane, columns come in increasing order, so strict '>' keeps the lowest index;
    // an ordered compare is false for NaN, so NaN never wins.
    __m512 best = neg_inf;
    __m512i best_col = _mm512_setzero_si512();
#pragma GCC unroll 4
    for (int c = 0; c < kVecs; ++c) {
      const __m512 v = _mm512_mul_ps(_mm512_mul_ps(acc[r][c], bs[c]), as);
      const __mmask16 gt = _mm512_mask_cmp_ps_mask(valid[c], v, best, _CMP_GT_OQ);
      best = _mm512_mask_mov_ps(best, gt, v);
      best_col = _mm512_mask_mov_epi32(best_col, gt, col[c]);
    }
    const float panel_max = _mm512_reduce_max_ps(best);  // lanes hold no NaN
    if (panel_max > best_val[r]) {                       // strict: an earlier panel keeps its tie
      const __mmask16 at_max = _mm512_cmp_ps_mask(best, _mm512_set1_ps(panel_max), _CMP_EQ_OQ);
      const int j = _mm512_mask_reduce_min_epi32(at_max, best_col);
      // The winner's own value, so a +0/-0 tie reports the bits of the lowest column.
      const __mmask16 win = _mm512_mask_cmpeq_epi32_mask(at_max, best_col, _mm512_set1_epi32(j));
      best_val[r] = _mm512_mask_reduce_max_ps(win, best);
      best_idx[r] = j;
    }
  }
}

// Row tiles shorter than kRows (the tail of a block) get their own instantiation; each
// accumulator is independent, so the per-(i, j) sequence is the same as in a full tile.
G2TR_TARGET_BF16 void dispatch_tile(int rows, const c10::BFloat16* const* a_ptr, const pair_t* panel, int64_t d,
                                    const float* a_scale, const float* b_scale, int64_t col0, int64_t n,
                                    int64_t* best_idx, float* best_val) {
#define G2TR_DA_CASE(R)                                                                                      \
  case R:                                                                                                    \
    if constexpr (R <= kRows) tile_panel<R>(a_ptr, panel, d, a_scale, b_scale, col0, n, best_idx, best_val); \
    break;
  switch (rows) {
    G2TR_DA_CASE(1)
    G2TR_DA_CASE(2)
    G2TR_DA_CASE(3)
    G2TR_DA_CASE(4)
    G2TR_DA_CASE(5)
    G2TR_DA_CASE(6)
    G2TR_DA_CASE(7)
    G2TR_DA_CASE(8)
    default:
      break;
  }
#undef G2TR_DA_CASE
}

// Transposes 16 rows x 16 pairs (one zmm per row) into 16 pairs x 16 rows.
G2TR_TARGET_BF16 inline void transpose_16x16_epi32(__m512i r[16]) {
  __m512i t[16], u[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  // u[4g + e], 128-bit lane L: rows 4g..4g+3 of pair 4L + e.
  for (int g = 0; g < 4; ++g) {
    u[4 * g + 0] = _mm512_unpacklo_epi64(t[4 * g], t[4 * g + 2]);
    u[4 * g + 1] = _mm512_unpackhi_epi64(t[4 * g], t[4 * g + 2]);
    u[4 * g + 2] = _mm512_unpacklo_epi64(t[4 * g + 1], t[4 * g + 3]);
    u[4 * g + 3] = _mm512_unpackhi_epi64(t[4 * g + 1], t[4 * g + 3]);
  }
  for (int e = 0; e < 4; ++e) {
    const __m512i v0 = _mm512_shuffle_i32x4(u[e], u[4 + e], 0x44);
    const __m512i v1 = _mm512_shuffle_i32x4(u[e], u[4 + e], 0xEE);
    const __m512i w0 = _mm512_shuffle_i32x4(u[8 + e], u[12 + e], 0x44);
    const __m512i w1 = _mm512_shuffle_i32x4(u[8 + e], u[12 + e], 0xEE);
    r[e] = _mm512_shuffle_i32x4(v0, w0, 0x88);
    r[4 + e] = _mm512_shuffle_i32x4(v0, w0, 0xDD);
    r[8 + e] = _mm512_shuffle_i32x4(v1, w1, 0x88);
    r[12 + e] = _mm512_shuffle_i32x4(v1, w1, 0xDD);
  }
}

// Blocks of 16 columns x 16 pairs are transposed in registers so every store is a full
// 64-byte line; masked loads supply the zero padding (odd d, columns past n) and never
// read past the end of a source row.
G2TR_TARGET_BF16 void pack_panels(const c10::BFloat16* B, int64_t ldb, const int64_t* rows, int64_t n, int64_t d,
                                  pair_t* out) {
  const int64_t pairs = num_pairs(d);
  for (int64_t p = 0; p < num_panels(n); ++p) {
    pair_t* panel = out + p * pairs * kPanel;
    for (int g = 0; g < kVecs; ++g) {
      const c10::BFloat16* src[kLanes];
      for (int c = 0; c < kLanes; ++c) {
        const int64_t j = p * kPanel + g * kLanes + c;
        src[c] = j < n ? B + (rows ? rows[j] : j) * ldb : nullptr;
      }
      for (int64_t k0 = 0; k0 < pairs; k0 += kLanes) {
        const int64_t elems = std::min<int64_t>(2 * kLanes, d - 2 * k0);
        const __mmask32 mask = elems >= 32 ? ~__mmask32(0) : __mmask32((1u << elems) - 1u);
        __m512i r[kLanes];
        for (int c = 0; c < kLanes; ++c)
          r[c] = src[c] ? _mm512_maskz_loadu_epi16(mask, src[c] + 2 * k0) : _mm512_setzero_si512();
        transpose_16x16_epi32(r);
        const int64_t count = std::min<int64_t>(kLanes, pairs - k0);
        for (int q = 0; q < count; ++q) _mm512_storeu_si512(panel + (k0 + q) * kPanel + g * kLanes, r[q]);
      }
    }
  }
}
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif
#endif  // G2TR_DOT_ARGMAX_X86

}  // namespace

bool dot_argmax_bf16_supported() {
#if G2TR_DOT_ARGMAX_X86
  static const bool ok = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16");
  }();
  return ok;
#else
  return false;
#endif
}

int64_t dot_argmax_packed_size(int64_t n, int64_t d) { return num_panels(n) * num_pairs(d) * kPanel * 2; }

void dot_argmax_pack_b(const c10::BFloat16* B, int64_t ldb, const int64_t* rows, int64_t n, int64_t d,
                       c10::BFloat16* packed) {
#if G2TR_DOT_ARGMAX_X86
  pack_panels(B, ldb, rows, n, d, reinterpret_cast<pair_t*>(packed));
#else
  (void)B, (void)ldb, (void)rows, (void)n, (void)d, (void)packed;
#endif
}

void dot_argmax_rows(const c10::BFloat16* A, int64_t lda, const int64_t* a_rows, int64_t m,
                     const c10::BFloat16* packed_b, int64_t n, int64_t d, const float* a_scale, const float* b_scale,
                     int64_t* best_idx, float* best_val) {
  for (int64_t i = 0; i < m; ++i) {
    best_idx[i] = 0;
    best_val[i] = -std::numeric_limits<float>::infinity();
  }
#if G2TR_DOT_ARGMAX_X86
  if (m <= 0 || n <= 0) return;
  const pair_t* packed = reinterpret_cast<const pair_t*>(packed_b);
  const int64_t panel_stride = num_pairs(d) * kPanel;
  const int64_t panels = num_panels(n);
  const c10::BFloat16* a_ptr[kRows];
  for (int64_t i0 = 0; i0 < m; i0 += kRowBlock) {
    const int64_t i1 = std::min(m, i0 + kRowBlock);
    for (int64_t p = 0; p < panels; ++p) {
      for (int64_t t = i0; t < i1; t += kRows) {
        const int rows = static_cast<int>(std::min<int64_t>(kRows, i1 - t));
        for (int r = 0; r < rows; ++r) a_ptr[r] = A + (a_rows ? a_rows[t + r] : t + r) * lda;
        dispatch_tile(rows, a_ptr, packed + p * panel_stride, d, a_scale + t, b_scale, p * kPanel, n, best_idx + t,
                      best_val + t);
      }
    }
  }
#else
  (void)A, (void)lda, (void)a_rows, (void)packed_b, (void)n, (void)d, (void)a_scale, (void)b_scale;
#endif
}

}  // namespace g2tr::cpu
