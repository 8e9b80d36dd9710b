// Fused "cosine similarity + argmax" for the CPU merge step (SPEC.md §4).
//
// For every dropped row a_i, find the kept row b_j maximising
//   value(i, j) = (dot_fp32(a_i, b_j) * b_scale[j]) * a_scale[i]
// without materialising the m x n similarity matrix. dot_fp32 accumulates the exact
// bf16 x bf16 products in fp32, always in the same order for every (i, j), so identical
// rows give bitwise-identical values and exact ties resolve to the lowest j.
//
// Plain pointers only (no ATen), so the kernel can be tested and benchmarked on its own.
#pragma once

#include <cstdint>

#include <c10/util/BFloat16.h>

namespace g2tr::cpu {

// True when this CPU and build can run the AVX512-BF16 path. pack_b/rows must only be
// called when this returns true.
bool dot_argmax_bf16_supported();

// Size, in c10::BFloat16 elements, of the packed panel buffer for n rows of length d.
// The buffer should be 64-byte aligned (unaligned works, a bit slower).
int64_t dot_argmax_packed_size(int64_t n, int64_t d);

// Packs rows B[rows[j]] (row stride ldb elements; rows == nullptr means row j) for
// j in [0, n) into the panel layout dot_argmax_rows reads; zero-pads the tail pair of
// an odd d and the columns past n. Writes all dot_argmax_packed_size(n, d) elements.
void dot_argmax_pack_b(const c10::BFloat16* B, int64_t ldb, const int64_t* rows, int64_t n, int64_t d,
                       c10::BFloat16* packed);

// For rows A[a_rows[i]] (row stride lda; a_rows == nullptr means row i), i in [0, m):
//   best_idx[i] = lowest j in [0, n) with the largest value(i, j); NaN never wins;
//                 0 when no value exceeds -inf (including n == 0),
//   best_val[i] = that value, or -inf when nothing won.
// a_scale is indexed by i (not by a_rows[i]), b_scale by j. Serial on the calling
// thread and reentrant: callers split [0, m) into tasks sharing one read-only packed
// buffer; the result of a row does not depend on the split. best_idx/best_val hold the
// running best during the call, so they must not alias the inputs. Requires n < 2^31.
void dot_argmax_rows(const c10::BFloat16* A, int64_t lda, const int64_t* a_rows, int64_t m,
                     const c10::BFloat16* packed_b, int64_t n, int64_t d, const float* a_scale, const float* b_scale,
                     int64_t* best_idx, float* best_val);

}  // namespace g2tr::cpu
