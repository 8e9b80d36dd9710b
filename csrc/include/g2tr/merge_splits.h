// How the CUDA merge shares an image's kept-column tiles among the blocks of its assign
// launch (csrc/cuda/merge.cu, kernels/merge.cuh). Plain C++, __host__ __device__ under
// nvcc: the host picks the launch's split count, the kernels and the group step derive
// each image's own split count and tile range from it with the same code, and
// tests/cpp/test_merge_splits.cpp checks the arithmetic on the CPU.
//
// The split count never changes a result (the argmax order is total), only how the
// columns are shared out. Rules: no split of an image is empty, the splits of an image
// differ by at most one tile, and the largest image's tiles divide evenly where possible.
//
// The launch itself is a compacted work list (assign_blocks / locate_block): one block per
// (image, dropped-row tile, split) that has work and no other, so a mixed-size batch does
// not launch blocks that exit at once (M2 on 132 SMs: 277 blocks, was a 480-block grid).
#pragma once

#include <cstdint>

#include "g2tr/common.h"

namespace g2tr {

G2TR_HD int64_t ceil_div64(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Splits image b actually uses: the launch's count, but never more than its column tiles
// (a split past them would have no work).
G2TR_HD int image_splits(int col_tiles, int launch_splits) {
  const int tiles = col_tiles < 1 ? 1 : col_tiles;
  return launch_splits < tiles ? (launch_splits < 1 ? 1 : launch_splits) : tiles;
}

// Column tiles [begin, end) of split `split` of `splits` (splits <= col_tiles): split s
// takes [s * T / S, (s + 1) * T / S), so every split gets floor(T / S) or ceil(T / S) tiles.
G2TR_HD void split_range(int col_tiles, int splits, int split, int* begin, int* end) {
  *begin = static_cast<int>(static_cast<int64_t>(split) * col_tiles / splits);
  *end = static_cast<int>(static_cast<int64_t>(split + 1) * col_tiles / splits);
}

// The launch's split count (grid y): enough blocks for about two per SM over all images'
// dropped-row tiles, then rounded so that the largest image's tiles share out into equal
// runs (20 tiles and 14 wanted -> 10 splits of 2 tiles, not 14 splits of which 4 are empty
// or hold half the work of the others). At most 65535 (the grid's y limit).
inline int choose_splits(const int64_t* lengths, const int64_t* kept, int64_t count, int block_rows, int block_cols,
                         int sms) {
  int64_t row_tiles = 0, col_tiles = 1;
  for (int64_t b = 0; b < count; ++b) {
    row_tiles += ceil_div64(lengths[b] - kept[b], block_rows);
    const int64_t tiles = ceil_div64(kept[b], block_cols);
    col_tiles = tiles > col_tiles ? tiles : col_tiles;
  }
  if (row_tiles < 1) row_tiles = 1;
  const int64_t limit = col_tiles < 65535 ? col_tiles : 65535;
  int64_t wanted = ceil_div64(2 * static_cast<int64_t>(sms), row_tiles);
  wanted = wanted < 1 ? 1 : (wanted > limit ? limit : wanted);
  const int64_t per_split = ceil_div64(col_tiles, wanted);
  const int64_t splits = ceil_div64(col_tiles, per_split);
  return static_cast<int>(splits > limit ? limit : splits);
}

// Blocks image b gets: its dropped-row tiles times its own splits (0 when nothing is dropped).
G2TR_HD int64_t image_blocks(int64_t length, int64_t kept, int block_rows, int block_cols, int launch_splits) {
  const int64_t row_tiles = ceil_div64(length - kept, block_rows);
  if (row_tiles <= 0) return 0;
  return row_tiles * image_splits(static_cast<int>(ceil_div64(kept, block_cols)), launch_splits);
}

// The work list of one launch of `count` images: blocks_begin[b] is image b's first block,
// blocks_begin[count] the launch's block count. token_begin / kept_begin: count + 1 packed
// offsets (ImageTable's). Returns the block count (the caller checks it fits a grid).
inline int64_t assign_blocks(const int* token_begin, const int* kept_begin, int count, int block_rows, int block_cols,
                             int launch_splits, int* blocks_begin) {
  int64_t total = 0;
  for (int b = 0; b < count; ++b) {
    blocks_begin[b] = static_cast<int>(total);
    total += image_blocks(token_begin[b + 1] - token_begin[b], kept_begin[b + 1] - kept_begin[b], block_rows,
                          block_cols, launch_splits);
  }
  blocks_begin[count] = static_cast<int>(total);
  return total;
}

struct WorkBlock {
  int image;     // of the launch
  int row_tile;  // dropped rows [row_tile * block_rows, ...) of that image
  int split;     // column split, of `splits`: the image's own count (image_splits)
  int splits;
};

// What block `block` (< blocks_begin[count]) of an assign_blocks launch does. Within an
// image the row tiles of split 0 come first, then those of split 1, ...: for one image the
// order of the former (row tile, split) grid, so neighbouring blocks share kept columns.
G2TR_HD WorkBlock locate_block(const int* blocks_begin, const int* token_begin, const int* kept_begin, int count,
                               int block_rows, int block_cols, int launch_splits, int block) {
  // The last image whose first block is <= block: images without blocks share the next
  // image's start and are passed over.
  int lo = 0, hi = count - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (blocks_begin[mid] <= block)
      lo = mid;
    else
      hi = mid - 1;
  }
  const int kept = kept_begin[lo + 1] - kept_begin[lo];
  const int dropped = (token_begin[lo + 1] - token_begin[lo]) - kept;
  const int row_tiles = static_cast<int>(ceil_div64(dropped, block_rows));
  const int local = block - blocks_begin[lo];
  WorkBlock w;
  w.image = lo;
  w.row_tile = local % row_tiles;
  w.split = local / row_tiles;
  w.splits = image_splits(static_cast<int>(ceil_div64(kept, block_cols)), launch_splits);
  return w;
}

}  // namespace g2tr
