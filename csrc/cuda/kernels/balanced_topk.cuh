// Stage III select on the GPU (SPEC.md §3): one thread block per image, whole image in
// registers and shared memory, two stable block radix sorts and three block scans.
//
// The rule is SPEC.md §3 as g2tr_kernels/reference/balanced_topk.py walks it. Without the
// walk it equals: seed = "valid cell and fewer than `quota` tokens of the same cell rank
// before it"; keep the first K of [seeds in score order, then non-seeds in score order].
// (A seed's cell holds exactly its rank-in-cell taken tokens when the walk reaches it.)
//   1. sort tokens by descending_score_key (stable: ties keep the lower index first);
//   2. stable-sort that order by cell: each cell's tokens stay in score order, so a token's
//      rank in its cell is its distance from the start of its cell's run;
//   3. a prefix sum of the seed flags in score order gives every token its place in the
//      sequence above, hence whether it is among the first K;
//   4. a prefix sum of the kept flags in index order writes keep_idx ascending.
// Deterministic: no atomics, every step is a sort or a scan with a fixed order.
//
// Capacity: kThreads * kItems tokens per image (8192 with the large configuration), chosen
// on the host from the largest image of the launch; larger images are refused on the host
// before any launch, naming the image.
#pragma once

#include <cub/block/block_discontinuity.cuh>
#include <cub/block/block_radix_sort.cuh>
#include <cub/block/block_scan.cuh>
#include <cuda/functional>
#include <cuda/std/functional>

#include "common.cuh"

namespace g2tr::cuda {

template <int kThreads_, int kItems_>
struct SelectConfig {
  static constexpr int kThreads = kThreads_;
  static constexpr int kItems = kItems_;
  static constexpr int kCapacity = kThreads * kItems;
};
using SelectSmall = SelectConfig<256, 8>;   // images up to 2048 tokens (InternVL tiles, 37x37)
using SelectLarge = SelectConfig<512, 16>;  // images up to 8192 tokens (BAGEL 70x70)
constexpr int kSelectMaxTokens = SelectLarge::kCapacity;

// Grid: x = image of the launch. cell_end_bit: bits of the largest cell_count of the launch
// (the sentinel key of invalid cells is cell_count itself). cu_seqlens, when not null,
// receives the batch's kept offsets (reduce writes them here instead of in a launch of its own).
template <typename Config>
__global__ void __launch_bounds__(Config::kThreads)
    select_tokens_kernel(const float* __restrict__ scores, const int64_t* __restrict__ cells,
                         const __grid_constant__ ImageTable table, int cell_end_bit, int64_t* __restrict__ keep_idx,
                         int32_t* __restrict__ cu_seqlens) {
  constexpr int kThreads = Config::kThreads, kItems = Config::kItems, kCapacity = Config::kCapacity;
  static_assert(kCapacity <= 32768, "a token index and a seed flag share 16 bits");
  using Sort = cub::BlockRadixSort<uint32_t, kThreads, kItems, int>;
  using Scan = cub::BlockScan<int, kThreads>;
  using Discontinuity = cub::BlockDiscontinuity<uint32_t, kThreads>;
  // The sort storage is dead once both sorts are done; the per-position arrays reuse it.
  __shared__ union {
    typename Sort::TempStorage sort;
    struct {
      uint16_t token_and_seed[kCapacity];  // by score position: token | seed << 15
      uint8_t kept[kCapacity];             // by token
    } flags;
  } smem;
  __shared__ typename Scan::TempStorage scan_storage;
  __shared__ typename Discontinuity::TempStorage discontinuity_storage;

  const int b = blockIdx.x;
  const ImageSpan im = image_span(table, b);
  const int tid = threadIdx.x;
  const uint32_t cell_count = static_cast<uint32_t>(table.cell_count[b]);
  const int quota = table.quota[b];
  const float* image_scores = scores + im.first;
  const int64_t* image_cells = cells + im.first;

  if (cu_seqlens != nullptr && tid == 0) {
    cu_seqlens[table.first_image + b + 1] = table.kept_begin[b + 1];
    if (table.first_image + b == 0) cu_seqlens[0] = table.kept_begin[0];
  }

  // 1. score order. Padding sorts after every real key (the largest real key is that of
  // -inf, 0xff800000) and, being later in the input, after equal keys too.
  uint32_t key[kItems];
  int value[kItems];
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    const int t = tid * kItems + i;
    key[i] = t < im.length ? descending_score_key(image_scores[t]) : 0xffffffffu;
    value[i] = t;
  }
  Sort(smem.sort).Sort(key, value);
  __syncthreads();

  // 2. rank of each token within its cell, counted in score order. Invalid cells (and
  // padding) share the sentinel key cell_count and are never seeds.
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    const int p = tid * kItems + i;  // score position of token value[i]
    uint32_t cell_key = cell_count;
    if (p < im.length) {
      const int64_t c = image_cells[value[i]];
      if (c >= 0 && c < static_cast<int64_t>(cell_count)) cell_key = static_cast<uint32_t>(c);
    }
    key[i] = cell_key;
    value[i] = value[i] | (p << 16);  // token in the low 16 bits, score position above
  }
  Sort(smem.sort).Sort(key, value, 0, cell_end_bit);
  int run_start[kItems];
  {
    int head[kItems];
    Discontinuity(discontinuity_storage).FlagHeads(head, key, ::cuda::std::not_equal_to<>{});
#pragma unroll
    for (int i = 0; i < kItems; ++i) run_start[i] = head[i] ? tid * kItems + i : 0;
  }
  Scan(scan_storage).InclusiveScan(run_start, run_start, ::cuda::maximum<>{});
  __syncthreads();  // the sort storage becomes the flag arrays
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    const int q = tid * kItems + i;
    const bool seed = key[i] < cell_count && q - run_start[i] < quota;
    smem.flags.token_and_seed[value[i] >> 16] = static_cast<uint16_t>((value[i] & 0xffff) | (seed ? 0x8000 : 0));
  }
  __syncthreads();

  // 3. seeds in score order first, then the other tokens in score order: the first K.
  int seed_rank[kItems];
  int num_seeds;
  {
    int is_seed[kItems];
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      const int p = tid * kItems + i;
      is_seed[i] = p < im.length ? smem.flags.token_and_seed[p] >> 15 : 0;
    }
    Scan(scan_storage).ExclusiveSum(is_seed, seed_rank, num_seeds);
  }
  // Every token of the image is written once below (positions are a permutation).
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    const int p = tid * kItems + i;
    if (p < im.length) {
      const int entry = smem.flags.token_and_seed[p];
      const bool is_seed = entry >> 15;
      const bool keep =
          is_seed ? seed_rank[i] < im.kept : num_seeds < im.kept && p - seed_rank[i] < im.kept - num_seeds;
      smem.flags.kept[entry & 0x7fff] = keep ? 1 : 0;
    }
  }
  __syncthreads();

  // 4. kept tokens, ascending.
  int flag[kItems], rank[kItems];
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    const int t = tid * kItems + i;
    flag[i] = t < im.length ? smem.flags.kept[t] : 0;
  }
  Scan(scan_storage).ExclusiveSum(flag, rank);
#pragma unroll
  for (int i = 0; i < kItems; ++i)
    if (flag[i] && rank[i] < im.kept) keep_idx[im.kept0 + rank[i]] = static_cast<int64_t>(im.first) + tid * kItems + i;
}

}  // namespace g2tr::cuda
