// Stage IV on the GPU (SPEC.md §4), three launches for the whole packed batch:
//
// 1. assign: for tiles of dropped rows x kept rows of the same image, the dot products
//    reduced straight into a running argmax of
//        value(j, k) = (dot_fp32(v_j, v_k) * inv_norm[k]) * inv_norm[j]
//    (the CPU's expression and order, no FMA contraction; a row of extreme magnitude enters
//    the dot scaled by the exact power of two of its norm, common.h cosine_pow2, so no
//    product overflows or underflows). Nothing of size (N-K) x K is
//    stored: each block keeps its best per dropped row in registers and writes one
//    (value, index) per row and column split. bf16/fp16 run on tensor cores
//    (mma.sync m16n8k16: exact products, fp32 accumulation); fp32 runs a plain FMA tiling,
//    never TF32, which would round the inputs to 10 mantissa bits and change the argmax.
// 2. group: per image, the best of the splits is each dropped token's target; a stable
//    counting sort (counts, one scan, then chunks of a stable block radix sort by target)
//    lists every kept row's dropped tokens in ascending index order. Integer atomics only.
// 3. sum: per kept row, the weighted mean of SPEC.md §4 (g2tr_kernels/reference/merge.py)
//    over its list in ascending order, in fp32, the count accumulated in fp32 from
//    merge_weight as on the CPU.
// With the same assignment the merged rows equal the CPU's bit for bit; the assignment
// itself differs only where two similarities are within fp32 summation-order rounding.
//
// Why hand-written mma.sync and not cuBLAS on tiles + an argmax kernel: cuBLAS would need
// the rows gathered per image into contiguous buffers, a host loop of GEMMs per image and
// tile (not one launch), and an fp32 similarity tile written to and re-read from memory;
// mma.sync fuses gather, product and argmax in one launch for every image of the batch.
#pragma once

#include <cub/block/block_discontinuity.cuh>
#include <cub/block/block_radix_sort.cuh>
#include <cub/block/block_scan.cuh>
#include <cuda/functional>
#include <cuda/std/functional>

#include "common.cuh"
#include "g2tr/merge_splits.h"

namespace g2tr::cuda {

// ---------------------------------------------------------------- shared pieces of stage 1

// Partial argmax output: row d of the packed dropped list (image after image) of split s
// sits at [s * dropped_total + d]; value -inf with index kNoIndex means "no column".
struct AssignPartials {
  float* value;
  int* index;
  int64_t dropped_total;
};

// The compacted work list of one assign launch (g2tr/merge_splits.h assign_blocks): image
// b of the table owns blocks [begin[b], begin[b + 1]). A kernel argument like ImageTable
// (260 bytes more, both together under the 4 KB argument limit).
struct AssignBlocks {
  int begin[kMaxImagesPerLaunch + 1];
};

// The image, dropped rows and column tiles of this block of the work list.
struct AssignWork {
  ImageSpan im;
  int row0;      // first dropped row of the tile
  int ct_begin;  // kept-column tiles [ct_begin, ct_end) of the image
  int ct_end;
  int split;  // partials slot
};

template <int kRows, int kCols>
__device__ __forceinline__ AssignWork assign_work(const ImageTable& table, const AssignBlocks& blocks, int splits) {
  const WorkBlock w = locate_block(blocks.begin, table.token_begin, table.kept_begin, table.count, kRows, kCols, splits,
                                   static_cast<int>(blockIdx.x));
  AssignWork a;
  a.im = image_span(table, w.image);
  a.row0 = w.row_tile * kRows;
  a.split = w.split;
  split_range((a.im.kept + kCols - 1) / kCols, w.splits, w.split, &a.ct_begin, &a.ct_end);
  return a;
}

// Local token (-1 past the image's dropped rows), inv_norm and pow2 of the block's dropped
// rows [row0, row0 + kRows), written to shared memory by the first kRows threads; every
// thread of the block must call it (it ends with a barrier). Returns, on every thread,
// whether any of these rows is rescaled (pow2 != 1).
template <int kRows>
__device__ __forceinline__ bool load_dropped_rows(const int64_t* keep_idx, const float* inv_norms, const float* pow2s,
                                                  const ImageSpan& im, int row0, int* a_token, float* a_inv,
                                                  float* a_pow2) {
  const int tid = threadIdx.x;
  bool scaled = false;
  if (tid < kRows) {
    const int d = row0 + tid;
    const int t = d < im.dropped() ? dropped_token(keep_idx, im, d) : -1;
    a_token[tid] = t;
    a_inv[tid] = t >= 0 ? inv_norms[im.first + t] : 0.0f;
    a_pow2[tid] = t >= 0 ? pow2s[im.first + t] : 1.0f;
    scaled = a_pow2[tid] != 1.0f;
  }
  return __syncthreads_or(scaled) != 0;
}

// ---------------------------------------------------------------- stage 1, tensor cores

namespace mma {
constexpr int kBlockRows = 128;          // dropped rows per block (M)
constexpr int kBlockCols = 128;          // kept rows per tile (N)
constexpr int kBlockDepth = 32;          // features per pipeline stage (K)
constexpr int kStages = 3;               // cp.async pipeline depth
constexpr int kThreads = 256;            // 8 warps: 2 along M (64 rows each) x 4 along N (32 columns each)
constexpr int kPitch = kBlockDepth + 8;  // row pitch in elements: 80 bytes, conflict-free fragment loads
constexpr int kStageElems = (kBlockRows + kBlockCols) * kPitch;
constexpr int kSmemBytes = kStages * kStageElems * 2;  // 61440: dynamic shared memory, opted in
static_assert(kBlockRows * kBlockDepth / 8 == 2 * kThreads, "two 16-byte A chunks per thread");
static_assert(kBlockCols * kBlockDepth / 8 == 2 * kThreads, "two 16-byte B chunks per thread");
static_assert(kBlockRows * 4 * (sizeof(float) + sizeof(int)) <= kSmemBytes, "epilogue reuses the pipeline memory");
}  // namespace mma

__device__ __forceinline__ void cp_async_16(void* smem_dst, const void* global_src, int src_bytes) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem_dst));
  // src_bytes = 0 writes 16 zero bytes and reads nothing: rows and features past the end.
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(global_src), "r"(src_bytes)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}

// D (fp32, 16x8) += A (16x16, row) * B (16x8, col); bf16 or fp16 inputs, exact products.
template <bool kBf16>
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  if constexpr (kBf16) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

// Multiplies the rows of a loaded stage by their powers of two (the loader's chunks of this
// thread). Exact: a power of two times a bf16/fp16 value is representable (fp16 rows never
// need it: their sums of squares cannot leave [2^-100, 2^100] unless zero).
template <bool kBf16>
__device__ __forceinline__ void scale_stage(uint16_t* stage, const float* a_pow2, const float* b_pow2) {
  using namespace mma;
  const int tid = threadIdx.x, chunk = (tid % 4) * 8;
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int r = tid / 4 + 64 * i;
    uint16_t* pa = stage + r * kPitch + chunk;
    uint16_t* pb = stage + (kBlockRows + r) * kPitch + chunk;
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      if constexpr (kBf16) {
        pa[e] = __bfloat16_as_ushort(__float2bfloat16_rn(__bfloat162float(__ushort_as_bfloat16(pa[e])) * a_pow2[r]));
        pb[e] = __bfloat16_as_ushort(__float2bfloat16_rn(__bfloat162float(__ushort_as_bfloat16(pb[e])) * b_pow2[r]));
      } else {
        pa[e] = __half_as_ushort(__float2half_rn(__half2float(__ushort_as_half(pa[e])) * a_pow2[r]));
        pb[e] = __half_as_ushort(__float2half_rn(__half2float(__ushort_as_half(pb[e])) * b_pow2[r]));
      }
    }
  }
}

// Grid: x = the launch's work list (AssignBlocks): one block per tile of 128 dropped rows and
// column split of an image, every one with work. tokens are 16-bit values (bf16 when kBf16,
// else fp16), moved as raw bits.
// vectorized: D % 8 == 0 and a 16-byte aligned base (cp.async); otherwise element copies.
template <bool kBf16>
__global__ void __launch_bounds__(mma::kThreads)
    assign_mma_kernel(const uint16_t* __restrict__ tokens, int64_t dim, bool vectorized,
                      const int64_t* __restrict__ keep_idx, const float* __restrict__ inv_norms,
                      const float* __restrict__ pow2s, const __grid_constant__ ImageTable table,
                      const __grid_constant__ AssignBlocks blocks, int splits, AssignPartials partials) {
  using namespace mma;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  uint16_t* pipe = reinterpret_cast<uint16_t*>(smem_raw);
  __shared__ int a_token[kBlockRows];  // local token of each dropped row of the tile, -1 past the end
  __shared__ float a_inv[kBlockRows];
  __shared__ float b_inv[kBlockCols];                       // inv_norm of the kept rows of the current column tile
  __shared__ float a_pow2[kBlockRows], b_pow2[kBlockCols];  // their cosine_pow2 (1 for normal rows)

  const AssignWork work = assign_work<kBlockRows, kBlockCols>(table, blocks, splits);
  const ImageSpan& im = work.im;
  const int row0 = work.row0, ct_begin = work.ct_begin, ct_end = work.ct_end;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int group = lane / 4, quad = lane % 4;  // mma fragment coordinates
  const int warp_m = warp % 2, warp_n = warp / 2;

  const int k_tiles = max(1, static_cast<int>((dim + kBlockDepth - 1) / kBlockDepth));
  const int total = (ct_end - ct_begin) * k_tiles;

  bool scaled = load_dropped_rows<kBlockRows>(keep_idx, inv_norms, pow2s, im, row0, a_token, a_inv, a_pow2);
  {  // Rare (extreme magnitudes): if any row of the block or kept row of its columns is
     // rescaled, every stage is scaled in shared memory before its products (below).
    bool cols_scaled = false;
    for (int col = ct_begin * kBlockCols + tid; col < min(ct_end * kBlockCols, im.kept); col += kThreads)
      cols_scaled |= pow2s[im.first + kept_token(keep_idx, im, col)] != 1.0f;
    scaled = __syncthreads_or(scaled || cols_scaled) != 0;
  }

  // Loader: thread copies 16-byte chunk (tid % 4) of rows tid / 4 and tid / 4 + 64 of both tiles.
  const int chunk = (tid % 4) * 8;
  const uint16_t* a_src[2];
  bool a_ok[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int t = a_token[tid / 4 + 64 * i];
    a_ok[i] = t >= 0;
    a_src[i] = tokens + (static_cast<int64_t>(im.first) + max(t, 0)) * dim;
  }
  const uint16_t* b_src[2];
  bool b_ok[2];
  int load_ct = ct_begin, load_kt = 0;
  auto point_b = [&](int ct) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int col = ct * kBlockCols + tid / 4 + 64 * i;
      b_ok[i] = col < im.kept;
      b_src[i] = tokens + (static_cast<int64_t>(im.first) + (b_ok[i] ? kept_token(keep_idx, im, col) : 0)) * dim;
    }
  };
  if (total > 0) point_b(load_ct);
  auto load_stage = [&](int stage) {
    uint16_t* sa = pipe + stage * kStageElems;
    uint16_t* sb = sa + kBlockRows * kPitch;
    const int64_t f = static_cast<int64_t>(load_kt) * kBlockDepth + chunk;
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int r = tid / 4 + 64 * i;
      uint16_t* da = sa + r * kPitch + chunk;
      uint16_t* db = sb + r * kPitch + chunk;
      if (vectorized) {
        const bool fa = a_ok[i] && f < dim, fb = b_ok[i] && f < dim;
        cp_async_16(da, fa ? a_src[i] + f : tokens, fa ? 16 : 0);
        cp_async_16(db, fb ? b_src[i] + f : tokens, fb ? 16 : 0);
      } else {
#pragma unroll
        for (int e = 0; e < 8; ++e) {
          da[e] = a_ok[i] && f + e < dim ? a_src[i][f + e] : uint16_t{0};
          db[e] = b_ok[i] && f + e < dim ? b_src[i][f + e] : uint16_t{0};
        }
      }
    }
    if (++load_kt == k_tiles) {
      load_kt = 0;
      if (++load_ct < ct_end) point_b(load_ct);
    }
  };

  float acc[4][4][4];
#pragma unroll
  for (int mt = 0; mt < 4; ++mt)
#pragma unroll
    for (int nt = 0; nt < 4; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[mt][nt][e] = 0.0f;
  float best_value[4][2];
  int best_index[4][2];
#pragma unroll
  for (int mt = 0; mt < 4; ++mt)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      best_value[mt][h] = -INFINITY;
      best_index[mt][h] = kNoIndex;
    }

#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < total) load_stage(s);
    cp_async_commit();
  }
  int ct = ct_begin, kt = 0;
  for (int it = 0; it < total; ++it) {
    cp_async_wait<kStages - 2>();
    __syncthreads();
    if (it + kStages - 1 < total) load_stage((it + kStages - 1) % kStages);
    cp_async_commit();
    if (kt == 0 && tid < kBlockCols) {
      const int col = ct * kBlockCols + tid;
      const int t = col < im.kept ? kept_token(keep_idx, im, col) : -1;
      b_inv[tid] = t >= 0 ? inv_norms[im.first + t] : 0.0f;
      b_pow2[tid] = t >= 0 ? pow2s[im.first + t] : 1.0f;
    }
    if (scaled) {
      __syncthreads();  // b_pow2 of this tile is visible
      scale_stage<kBf16>(pipe + (it % kStages) * kStageElems, a_pow2, b_pow2);
      __syncthreads();
    }

    const uint16_t* sa = pipe + (it % kStages) * kStageElems;
    const uint16_t* sb = sa + kBlockRows * kPitch;
#pragma unroll
    for (int kk = 0; kk < kBlockDepth; kk += 16) {
      uint32_t b_frag[4][2];
#pragma unroll
      for (int nt = 0; nt < 4; ++nt) {
        const uint16_t* p = sb + (warp_n * 32 + nt * 8 + group) * kPitch + kk + quad * 2;
        b_frag[nt][0] = *reinterpret_cast<const uint32_t*>(p);
        b_frag[nt][1] = *reinterpret_cast<const uint32_t*>(p + 8);
      }
#pragma unroll
      for (int mt = 0; mt < 4; ++mt) {
        const uint16_t* p = sa + (warp_m * 64 + mt * 16 + group) * kPitch + kk + quad * 2;
        uint32_t a_frag[4];
        a_frag[0] = *reinterpret_cast<const uint32_t*>(p);                   // row g,     k 0-7
        a_frag[1] = *reinterpret_cast<const uint32_t*>(p + 8 * kPitch);      // row g + 8, k 0-7
        a_frag[2] = *reinterpret_cast<const uint32_t*>(p + 8);               // row g,     k 8-15
        a_frag[3] = *reinterpret_cast<const uint32_t*>(p + 8 * kPitch + 8);  // row g + 8, k 8-15
#pragma unroll
        for (int nt = 0; nt < 4; ++nt) mma_16816<kBf16>(acc[mt][nt], a_frag, b_frag[nt][0], b_frag[nt][1]);
      }
    }

    if (kt == k_tiles - 1) {
      __syncthreads();  // b_inv of this tile is visible (it was written in this iteration if k_tiles == 1)
#pragma unroll
      for (int mt = 0; mt < 4; ++mt)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const float inv_a = a_inv[warp_m * 64 + mt * 16 + group + h * 8];
#pragma unroll
          for (int nt = 0; nt < 4; ++nt)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              const int col_in_tile = warp_n * 32 + nt * 8 + quad * 2 + e;
              const int col = ct * kBlockCols + col_in_tile;
              if (col < im.kept) {
                const float value = __fmul_rn(__fmul_rn(acc[mt][nt][h * 2 + e], b_inv[col_in_tile]), inv_a);
                take_better(best_value[mt][h], best_index[mt][h], value, col);
              }
              acc[mt][nt][h * 2 + e] = 0.0f;
            }
        }
      kt = 0;
      ++ct;
    } else {
      ++kt;
    }
  }
  cp_async_wait<0>();
  __syncthreads();

  // The 4 lanes of a quad hold the same rows; then the 4 warps along N.
#pragma unroll
  for (int mt = 0; mt < 4; ++mt)
#pragma unroll
    for (int h = 0; h < 2; ++h)
#pragma unroll
      for (int offset = 1; offset < 4; offset <<= 1) {
        const float v = __shfl_xor_sync(0xffffffffu, best_value[mt][h], offset);
        const int j = __shfl_xor_sync(0xffffffffu, best_index[mt][h], offset);
        take_better(best_value[mt][h], best_index[mt][h], v, j);
      }
  float* red_value = reinterpret_cast<float*>(smem_raw);                // [4][kBlockRows]
  int* red_index = reinterpret_cast<int*>(red_value + 4 * kBlockRows);  // [4][kBlockRows]
  if (quad == 0) {
#pragma unroll
    for (int mt = 0; mt < 4; ++mt)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int r = warp_m * 64 + mt * 16 + group + h * 8;
        red_value[warp_n * kBlockRows + r] = best_value[mt][h];
        red_index[warp_n * kBlockRows + r] = best_index[mt][h];
      }
  }
  __syncthreads();
  if (tid < kBlockRows && row0 + tid < im.dropped()) {
    float v = red_value[tid];
    int j = red_index[tid];
#pragma unroll
    for (int w = 1; w < 4; ++w) take_better(v, j, red_value[w * kBlockRows + tid], red_index[w * kBlockRows + tid]);
    const int64_t slot = work.split * partials.dropped_total + im.dropped0() + row0 + tid;
    partials.value[slot] = v;
    partials.index[slot] = j;
  }
}

// ---------------------------------------------------------------- stage 1, fp32 FMA

namespace fma {
constexpr int kBlockRows = 64, kBlockCols = 64, kBlockDepth = 16;
constexpr int kThreads = 256;  // 16 x 16 threads, 4 x 4 outputs each (rows ty + 16 i, columns tx + 16 j)
constexpr int kPitch = kBlockRows + 4;
static_assert(kBlockRows == kBlockCols, "one loader layout for both tiles");
static_assert(kBlockRows * kBlockDepth == 4 * kThreads, "four features per thread and tile");
}  // namespace fma

// Same work list, partials and value expression as assign_mma_kernel; fp32 products accumulated
// with fmaf in ascending feature order. vectorized: D % 4 == 0 and a 16-byte aligned base.
__global__ void __launch_bounds__(fma::kThreads)
    assign_fma_kernel(const float* __restrict__ tokens, int64_t dim, bool vectorized,
                      const int64_t* __restrict__ keep_idx, const float* __restrict__ inv_norms,
                      const float* __restrict__ pow2s, const __grid_constant__ ImageTable table,
                      const __grid_constant__ AssignBlocks blocks, int splits, AssignPartials partials) {
  using namespace fma;
  __shared__ __align__(16) float sa[2][kBlockDepth][kPitch];  // transposed: [feature][row]
  __shared__ __align__(16) float sb[2][kBlockDepth][kPitch];
  __shared__ int a_token[kBlockRows];
  __shared__ float a_inv[kBlockRows];
  __shared__ float b_inv[kBlockCols];
  __shared__ float a_pow2[kBlockRows];

  const AssignWork work = assign_work<kBlockRows, kBlockCols>(table, blocks, splits);
  const ImageSpan& im = work.im;
  const int row0 = work.row0, ct_begin = work.ct_begin, ct_end = work.ct_end;
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;

  const int k_tiles = max(1, static_cast<int>((dim + kBlockDepth - 1) / kBlockDepth));
  const int total = (ct_end - ct_begin) * k_tiles;

  load_dropped_rows<kBlockRows>(keep_idx, inv_norms, pow2s, im, row0, a_token, a_inv, a_pow2);

  // Loader: row tid / 4 of both tiles, features (tid % 4) * 4 .. + 3, each times its row's
  // power of two (1 for normal rows: no multiply).
  const int load_row = tid / 4, load_f = (tid % 4) * 4;
  const int a_t = a_token[load_row];
  const float a_p = a_pow2[load_row];
  float b_p = 1.0f;
  const float* a_src = tokens + (static_cast<int64_t>(im.first) + max(a_t, 0)) * dim;
  const float* b_src = tokens;
  bool b_ok = false;
  int load_ct = ct_begin, load_kt = 0;
  auto point_b = [&](int ct) {
    const int col = ct * kBlockCols + load_row;
    b_ok = col < im.kept;
    const int t = b_ok ? kept_token(keep_idx, im, col) : 0;
    b_src = tokens + (static_cast<int64_t>(im.first) + t) * dim;
    b_p = b_ok ? pow2s[im.first + t] : 1.0f;
  };
  if (total > 0) point_b(load_ct);
  float ra[4], rb[4];
  auto fetch = [&]() {
    const int64_t f = static_cast<int64_t>(load_kt) * kBlockDepth + load_f;
    if (vectorized) {
      const bool fa = a_t >= 0 && f < dim, fb = b_ok && f < dim;
      const float4 va = fa ? *reinterpret_cast<const float4*>(a_src + f) : make_float4(0.f, 0.f, 0.f, 0.f);
      const float4 vb = fb ? *reinterpret_cast<const float4*>(b_src + f) : make_float4(0.f, 0.f, 0.f, 0.f);
      ra[0] = va.x, ra[1] = va.y, ra[2] = va.z, ra[3] = va.w;
      rb[0] = vb.x, rb[1] = vb.y, rb[2] = vb.z, rb[3] = vb.w;
    } else {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        ra[e] = a_t >= 0 && f + e < dim ? a_src[f + e] : 0.0f;
        rb[e] = b_ok && f + e < dim ? b_src[f + e] : 0.0f;
      }
    }
    if (a_p != 1.0f)
#pragma unroll
      for (int e = 0; e < 4; ++e) ra[e] *= a_p;
    if (b_p != 1.0f)
#pragma unroll
      for (int e = 0; e < 4; ++e) rb[e] *= b_p;
    if (++load_kt == k_tiles) {
      load_kt = 0;
      if (++load_ct < ct_end) point_b(load_ct);
    }
  };

  float acc[4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = 0.0f;
  float best_value[4];
  int best_index[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    best_value[i] = -INFINITY;
    best_index[i] = kNoIndex;
  }

  if (total > 0) fetch();
  int ct = ct_begin, kt = 0;
  for (int it = 0; it < total; ++it) {
    const int buf = it % 2;
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      sa[buf][load_f + e][load_row] = ra[e];
      sb[buf][load_f + e][load_row] = rb[e];
    }
    __syncthreads();
    if (it + 1 < total) fetch();  // in flight during the products below
    if (kt == 0 && tid < kBlockCols) {
      const int col = ct * kBlockCols + tid;
      b_inv[tid] = col < im.kept ? inv_norms[im.first + kept_token(keep_idx, im, col)] : 0.0f;
    }
#pragma unroll
    for (int f = 0; f < kBlockDepth; ++f) {
      float a[4], b[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) a[i] = sa[buf][f][ty + 16 * i];
#pragma unroll
      for (int j = 0; j < 4; ++j) b[j] = sb[buf][f][tx + 16 * j];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
    }
    if (kt == k_tiles - 1) {
      __syncthreads();  // b_inv of this tile is visible
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const float inv_a = a_inv[ty + 16 * i];
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const int col = ct * kBlockCols + tx + 16 * j;
          if (col < im.kept) {
            const float value = __fmul_rn(__fmul_rn(acc[i][j], b_inv[tx + 16 * j]), inv_a);
            take_better(best_value[i], best_index[i], value, col);
          }
          acc[i][j] = 0.0f;
        }
      }
      kt = 0;
      ++ct;
    } else {
      ++kt;
    }
  }

  // A row's 16 threads are the lanes tx = 0..15 of one half-warp.
#pragma unroll
  for (int i = 0; i < 4; ++i) {
#pragma unroll
    for (int offset = 1; offset < 16; offset <<= 1) {
      const float v = __shfl_xor_sync(0xffffffffu, best_value[i], offset);
      const int j = __shfl_xor_sync(0xffffffffu, best_index[i], offset);
      take_better(best_value[i], best_index[i], v, j);
    }
    const int d = row0 + ty + 16 * i;
    if (tx == 0 && d < im.dropped()) {
      const int64_t slot = work.split * partials.dropped_total + im.dropped0() + d;
      partials.value[slot] = best_value[i];
      partials.index[slot] = best_index[i];
    }
  }
}

// ---------------------------------------------------------------- stage 2: group

// Work arrays of stages 2 and 3, all [kept rows] or [dropped rows] of the batch (ints):
struct MergeGroups {
  int* count;   // [K_total] tokens absorbed by each kept row
  int* end;     // [K_total] end of its list in `member` (relative to the image's dropped rows)
  int* member;  // [N_total - K_total] global token indices, grouped by target, ascending within a group
};

constexpr int kGroupThreads = 256;
constexpr int kGroupItems = 4;
constexpr int kGroupChunk = kGroupThreads * kGroupItems;

// Grid: x = image of the launch. target_end_bit: bits of the largest K of the launch (the
// padding key is K itself). Writes assign for every token of the image. One block per
// image, so occupancy does not matter; the explicit minimum of 1 block per SM also keeps
// ptxas from spilling a register in the radix sort (it does on sm_90 without it).
__global__ void __launch_bounds__(kGroupThreads, 1)
    group_kernel(const int64_t* __restrict__ keep_idx, const __grid_constant__ ImageTable table, int splits,
                 int block_cols, AssignPartials partials, int target_end_bit, int64_t* __restrict__ assign,
                 MergeGroups groups) {
  using Sort = cub::BlockRadixSort<uint32_t, kGroupThreads, kGroupItems, int>;
  using Scan = cub::BlockScan<int, kGroupThreads>;
  using Discontinuity = cub::BlockDiscontinuity<uint32_t, kGroupThreads>;
  __shared__ typename Sort::TempStorage sort_storage;
  __shared__ typename Scan::TempStorage scan_storage;
  __shared__ typename Discontinuity::TempStorage discontinuity_storage;

  const ImageSpan im = image_span(table, blockIdx.x);
  const int tid = threadIdx.x;
  const int nd = im.dropped();
  int* count = groups.count + im.kept0;
  int* end = groups.end + im.kept0;
  int* member = groups.member + im.dropped0();

  // Every token gets a row of its image even if a bad keep_idx leaves it out below.
  for (int t = tid; t < im.length; t += kGroupThreads) assign[im.first + t] = im.kept0;
  __syncthreads();
  // Kept tokens own their rows.
  for (int r = tid; r < im.kept; r += kGroupThreads) {
    assign[im.first + kept_token(keep_idx, im, r)] = im.kept0 + r;
    count[r] = 0;
  }
  __syncthreads();

  // Each dropped token's target: the best of its split partials (any order gives the same).
  const int own_splits = image_splits((im.kept + block_cols - 1) / block_cols, splits);
  for (int d = tid; d < nd; d += kGroupThreads) {
    float v = -INFINITY;
    int j = kNoIndex;
    for (int s = 0; s < own_splits; ++s) {
      const int64_t slot = s * partials.dropped_total + im.dropped0() + d;
      take_better(v, j, partials.value[slot], partials.index[slot]);
    }
    const int r = clamp_index(j, im.kept);
    assign[im.first + dropped_token(keep_idx, im, d)] = im.kept0 + r;
    atomicAdd(&count[r], 1);  // integer: the counts do not depend on the order
  }
  __syncthreads();

  // end[r] = start of r's list; the placement below advances it to the end.
  int running = 0;
  for (int base = 0; base < im.kept; base += kGroupChunk) {
    int c[kGroupItems], start[kGroupItems];
#pragma unroll
    for (int i = 0; i < kGroupItems; ++i) {
      const int r = base + tid * kGroupItems + i;
      c[i] = r < im.kept ? count[r] : 0;
    }
    int chunk_total;
    Scan(scan_storage).ExclusiveSum(c, start, chunk_total);
#pragma unroll
    for (int i = 0; i < kGroupItems; ++i) {
      const int r = base + tid * kGroupItems + i;
      if (r < im.kept) end[r] = running + start[i];
    }
    running += chunk_total;
    __syncthreads();
  }

  // Stable placement, one chunk of dropped tokens (ascending) at a time: a stable sort by
  // target keeps ascending token order within each target's run.
  for (int base = 0; base < nd; base += kGroupChunk) {
    uint32_t key[kGroupItems];
    int token[kGroupItems];
#pragma unroll
    for (int i = 0; i < kGroupItems; ++i) {
      const int d = base + tid * kGroupItems + i;
      key[i] = static_cast<uint32_t>(im.kept);  // padding: after every target
      token[i] = 0;
      if (d < nd) {
        const int t = dropped_token(keep_idx, im, d);
        key[i] = static_cast<uint32_t>(clamp_index(assign[im.first + t] - im.kept0, im.kept));
        token[i] = t;
      }
    }
    Sort(sort_storage).Sort(key, token, 0, target_end_bit);
    int head[kGroupItems], tail[kGroupItems], run_start[kGroupItems];
    Discontinuity(discontinuity_storage).FlagHeadsAndTails(head, tail, key, ::cuda::std::not_equal_to<>{});
#pragma unroll
    for (int i = 0; i < kGroupItems; ++i) run_start[i] = head[i] ? tid * kGroupItems + i : 0;
    Scan(scan_storage).InclusiveScan(run_start, run_start, ::cuda::maximum<>{});
    int next_end[kGroupItems];
#pragma unroll
    for (int i = 0; i < kGroupItems; ++i) {
      const int q = tid * kGroupItems + i;
      next_end[i] = -1;
      if (key[i] < static_cast<uint32_t>(im.kept)) {
        const int at = end[key[i]] + q - run_start[i];
        if (at < nd) member[at] = im.first + token[i];
        if (tail[i]) next_end[i] = at + 1;
      }
    }
    __syncthreads();  // every read of end[] of this chunk happens before the run tails move it
#pragma unroll
    for (int i = 0; i < kGroupItems; ++i)
      if (next_end[i] >= 0) end[key[i]] = next_end[i];
    __syncthreads();
  }
}

// ---------------------------------------------------------------- stage 3: sum

constexpr int kSumThreads = 128;

// Grid: x = kept row of an image, y = image of the launch.
template <typename T>
__global__ void __launch_bounds__(kSumThreads)
    merge_rows_kernel(const T* __restrict__ tokens, int64_t dim, bool vectorized, const int64_t* __restrict__ keep_idx,
                      const __grid_constant__ ImageTable table, float merge_weight, MergeGroups groups,
                      T* __restrict__ merged) {
  const ImageSpan im = image_span(table, blockIdx.y);
  const int r = blockIdx.x;
  if (r >= im.kept) return;
  const int64_t row = static_cast<int64_t>(im.kept0) + r;
  const int nd = im.dropped();
  // Clamped, so that even a bad keep_idx never leads outside the image's lists.
  const int stop = min(max(groups.end[row], 0), nd);
  const int start = max(stop - max(groups.count[row], 0), 0);
  const int* member = groups.member + im.dropped0();
  const T* kept_row = tokens + (static_cast<int64_t>(im.first) + kept_token(keep_idx, im, r)) * dim;
  T* out = merged + row * dim;
  auto member_row = [&](int g) {
    return tokens +
           (static_cast<int64_t>(im.first) + clamp_index(static_cast<int64_t>(member[g]) - im.first, im.length)) * dim;
  };
  // The CPU's count: merge_weight, then + 1 per absorbed token, in fp32.
  float count = merge_weight;
  for (int g = start; g < stop; ++g) count = __fadd_rn(count, 1.0f);

  if (vectorized) {
    constexpr int E = Vec16<T>::kElems;
    for (int64_t v = threadIdx.x; v < dim / E; v += kSumThreads) {
      Vec16<T> x;
      x.load(kept_row + v * E);
      float acc[E];
#pragma unroll
      for (int e = 0; e < E; ++e) acc[e] = __fmul_rn(x.get(e), merge_weight);
      for (int g = start; g < stop; ++g) {
        x.load(member_row(g) + v * E);
#pragma unroll
        for (int e = 0; e < E; ++e) acc[e] = __fadd_rn(acc[e], x.get(e));
      }
#pragma unroll
      for (int e = 0; e < E; ++e) x.set(e, __fdiv_rn(acc[e], count));
      x.store(out + v * E);
    }
  } else {
    for (int64_t f = threadIdx.x; f < dim; f += kSumThreads) {
      float acc = __fmul_rn(to_float(kept_row[f]), merge_weight);
      for (int g = start; g < stop; ++g) acc = __fadd_rn(acc, to_float(member_row(g)[f]));
      out[f] = from_float<T>(__fdiv_rn(acc, count));
    }
  }
}

}  // namespace g2tr::cuda
