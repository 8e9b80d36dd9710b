// Device-side building blocks shared by the CUDA kernels: per-launch image table, element
// conversions, 16-byte vector access, warp sums and the one argmax order of SPEC.md.
//
// No torch include: these headers take plain pointers and sizes, so nvcc can compile-check
// them alone (nvcc -std=c++20 -Icsrc/include -arch=sm_80 on a .cu that includes them).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <climits>
#include <cstdint>

#include "g2tr/common.h"

namespace g2tr::cuda {

// Images per launch. The table below travels as a kernel argument (2.3 KB, under the
// classic 4 KB limit), so a CUDA graph captures it with the launch and nothing is copied
// to the device. A batch with more images runs one launch per group of 64.
constexpr int kMaxImagesPerLaunch = 64;

// Per-image geometry of one launch. Offsets are absolute (packed rows of the whole
// batch); the host checks that every one fits in an int.
struct ImageTable {
  int count;                                 // images in this launch
  int first_image;                           // index of image 0 of this launch in the batch
  int token_begin[kMaxImagesPerLaunch + 1];  // [count] is the end of the last image
  int kept_begin[kMaxImagesPerLaunch + 1];
  int anchor_begin[kMaxImagesPerLaunch];
  int h[kMaxImagesPerLaunch], w[kMaxImagesPerLaunch];
  int h_a[kMaxImagesPerLaunch], w_a[kMaxImagesPerLaunch];
  int cell_count[kMaxImagesPerLaunch];  // selection: valid local cell ids are [0, cell_count)
  int quota[kMaxImagesPerLaunch];       // selection: seeds per cell, clamped to [1, length]
};

// One image of a launch, as the kernels read it.
struct ImageSpan {
  int first;   // packed index of its first token
  int length;  // its tokens
  int kept0;   // first output row
  int kept;    // its output rows (K)
  __device__ __forceinline__ int dropped() const { return length - kept; }
  // Rows of the packed dropped-token list come image after image: image b's start there
  // is (tokens before it) - (kept rows before it).
  __device__ __forceinline__ int dropped0() const { return first - kept0; }
};

__device__ __forceinline__ ImageSpan image_span(const ImageTable& table, int b) {
  ImageSpan s;
  s.first = table.token_begin[b];
  s.length = table.token_begin[b + 1] - s.first;
  s.kept0 = table.kept_begin[b];
  s.kept = table.kept_begin[b + 1] - s.kept0;
  return s;
}

__device__ __forceinline__ int clamp_index(int64_t i, int size) {
  return i < 0 ? 0 : (i >= size ? size - 1 : static_cast<int>(i));
}

// Local index of kept row r of an image. keep_idx is not trusted (the CPU kernel raises on
// a bad one; here it would need a sync): clamped into the image, so a bad value gives an
// unspecified result but never an out-of-bounds access.
__device__ __forceinline__ int kept_token(const int64_t* keep_idx, const ImageSpan& im, int r) {
  return clamp_index(keep_idx[im.kept0 + r] - im.first, im.length);
}

// Local index of the d-th dropped token (ascending) of an image: d + j, where j is the
// number of kept tokens before it, i.e. the first j with keep[j] - j > d (keep[j] - j never
// decreases when keep is strictly ascending). Binary search over keep_idx, so no list of
// dropped tokens is ever built. Clamped like kept_token.
__device__ __forceinline__ int dropped_token(const int64_t* keep_idx, const ImageSpan& im, int d) {
  const int64_t* keep = keep_idx + im.kept0;
  int lo = 0, hi = im.kept;
  while (lo < hi) {
    const int mid = (lo + hi) >> 1;
    if (keep[mid] - im.first - mid > d)
      hi = mid;
    else
      lo = mid + 1;
  }
  return clamp_index(static_cast<int64_t>(d) + lo, im.length);
}

// ---------------------------------------------------------------- element conversions
// torch builds with __CUDA_NO_HALF_CONVERSIONS__: every conversion is spelled out.

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) {
  return x;
}
// Round to nearest even, as c10::Half / c10::BFloat16 do on the CPU.
template <>
__device__ __forceinline__ __half from_float<__half>(float x) {
  return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// 16 bytes of T, the unit of the vectorised paths (taken when D * sizeof(T) is a multiple
// of 16 and the base pointer is 16-byte aligned; the host decides, the kernels branch once).
template <typename T>
struct Vec16 {
  static constexpr int kElems = 16 / static_cast<int>(sizeof(T));
  uint4 raw;
  __device__ __forceinline__ void load(const T* p) { raw = *reinterpret_cast<const uint4*>(p); }
  __device__ __forceinline__ void store(T* p) const { *reinterpret_cast<uint4*>(p) = raw; }
  __device__ __forceinline__ float get(int i) const { return to_float(reinterpret_cast<const T*>(&raw)[i]); }
  __device__ __forceinline__ void set(int i, float x) { reinterpret_cast<T*>(&raw)[i] = from_float<T>(x); }
};

// Butterfly sum over a warp: every lane ends with the same value, and the order of the
// additions is fixed, so the result is reproducible bit for bit.
__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

// ---------------------------------------------------------------- the argmax order
// A running best (value, index) under ranks_before (common.h): higher value first, ties
// to the lower index, NaN ranked as -inf. Every candidate of a row is distinct by index,
// so this is a total order and the best of any split of the candidates, combined in any
// order, is the same: the argmax does not depend on tiles, splits or thread layout.
// Over all candidates it equals the CPU's sequential scan "v > best, starting from
// (-inf, 0)": when every value is -inf or NaN both give the lowest index.
constexpr int kNoIndex = INT_MAX;  // loses to every real candidate (ties go to the lower index)

__device__ __forceinline__ void take_better(float& best_value, int& best_index, float value, int index) {
  if (ranks_before(value, index, best_value, best_index)) {
    best_value = value;
    best_index = index;
  }
}

// Sort key of a score: ascending keys are descending scores, with NaN ranked as -inf and
// -0 equal to +0 (ranks_before compares values, not bits). Equal keys keep the input
// order in a stable radix sort, which gives "ties to the lower index".
__device__ __forceinline__ uint32_t descending_score_key(float score) {
  uint32_t u = __float_as_uint(rank_value(score));
  if ((u << 1) == 0u) u = 0u;                      // -0 -> +0
  u = (u & 0x80000000u) ? ~u : (u | 0x80000000u);  // order-preserving map to unsigned
  return ~u;
}

// Bits of the largest value a radix sort must order (at least 1).
inline int bit_width(uint32_t max_value) {
  int bits = 1;
  while (bits < 32 && (max_value >> bits) != 0u) ++bits;
  return bits;
}

}  // namespace g2tr::cuda
