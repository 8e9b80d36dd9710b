// The CUDA merge's column-split arithmetic (csrc/include/g2tr/merge_splits.h), on the CPU:
// for the SHAPES.md workloads on an H200 (132 SMs) and an A100 (108), with the tile sizes
// of the tensor-core (128 x 128) and fp32 (64 x 64) kernels, every split of every image
// has work, an image's splits differ by at most one tile and cover its tiles exactly once,
// and the launch's work list (assign_blocks / locate_block) holds exactly the blocks with
// work: every (image, dropped-row tile, split) once, none empty, for any number of images.
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "g2tr/merge_splits.h"

namespace {

int failures = 0;

void expect(bool ok, const char* what, const char* workload, int sms, int block) {
  if (!ok) {
    std::printf("FAIL %s: %s (%d SMs, %d x %d tiles)\n", workload, what, sms, block, block);
    ++failures;
  }
}

struct Workload {
  const char* name;
  std::vector<int64_t> lengths;
};

std::vector<int64_t> repeat(std::vector<int64_t> v, int times) {
  std::vector<int64_t> out;
  for (int i = 0; i < times; ++i) out.insert(out.end(), v.begin(), v.end());
  return out;
}

// Decodes every block of the work list as the kernels do (merge.cuh assign_work) and checks
// that each one has dropped rows and kept columns and that each (image, row tile, split) of
// the images comes exactly once. Returns the launch's block count.
int64_t check_work_list(const Workload& w, const std::vector<int64_t>& kept, int splits, int block, int sms) {
  // The table of one launch holds at most 64 images (common.cuh kMaxImagesPerLaunch).
  const int count = static_cast<int>(w.lengths.size());
  std::vector<int> token_begin(count + 1, 0), kept_begin(count + 1, 0), blocks_begin(count + 1, -1);
  for (int b = 0; b < count; ++b) {
    token_begin[b + 1] = token_begin[b] + static_cast<int>(w.lengths[b]);
    kept_begin[b + 1] = kept_begin[b] + static_cast<int>(kept[b]);
  }
  const int64_t total =
      g2tr::assign_blocks(token_begin.data(), kept_begin.data(), count, block, block, splits, blocks_begin.data());
  expect(blocks_begin[count] == total, "blocks_begin ends at the block count", w.name, sms, block);
  std::vector<std::vector<int>> seen(count);
  for (int b = 0; b < count; ++b) {
    const int64_t row_tiles = g2tr::ceil_div64(w.lengths[b] - kept[b], block);
    const int own = g2tr::image_splits(static_cast<int>(g2tr::ceil_div64(kept[b], block)), splits);
    seen[b].assign(static_cast<size_t>(row_tiles * own), 0);
  }
  int previous_image = 0;
  for (int64_t i = 0; i < total; ++i) {
    const g2tr::WorkBlock wb = g2tr::locate_block(blocks_begin.data(), token_begin.data(), kept_begin.data(), count,
                                                  block, block, splits, static_cast<int>(i));
    if (wb.image < 0 || wb.image >= count) {
      expect(false, "block maps to an image of the launch", w.name, sms, block);
      continue;
    }
    expect(wb.image >= previous_image, "images come in order", w.name, sms, block);
    previous_image = wb.image;
    const int64_t dropped = w.lengths[wb.image] - kept[wb.image];
    const int col_tiles = static_cast<int>(g2tr::ceil_div64(kept[wb.image], block));
    expect(static_cast<int64_t>(wb.row_tile) * block < dropped, "block has dropped rows", w.name, sms, block);
    expect(wb.splits == g2tr::image_splits(col_tiles, splits), "block uses its image's splits", w.name, sms, block);
    expect(wb.split >= 0 && wb.split < wb.splits, "split in range", w.name, sms, block);
    int begin = 0, end = 0;
    g2tr::split_range(col_tiles, wb.splits, wb.split, &begin, &end);
    expect(end > begin, "block has kept columns", w.name, sms, block);
    const int64_t row_tiles = g2tr::ceil_div64(dropped, block);
    const int64_t slot = static_cast<int64_t>(wb.split) * row_tiles + wb.row_tile;
    if (wb.row_tile >= 0 && wb.row_tile < row_tiles && wb.split >= 0 && wb.split < wb.splits) ++seen[wb.image][slot];
  }
  for (int b = 0; b < count; ++b)
    for (int n : seen[b]) expect(n == 1, "every (row tile, split) of an image exactly once", w.name, sms, block);
  if (count == 1) {
    // One image: the order of the former (row tile, split) grid, block x + row_tiles * y.
    const int64_t row_tiles = g2tr::ceil_div64(w.lengths[0] - kept[0], block);
    for (int64_t i = 0; i < total; ++i) {
      const g2tr::WorkBlock wb = g2tr::locate_block(blocks_begin.data(), token_begin.data(), kept_begin.data(), 1,
                                                    block, block, splits, static_cast<int>(i));
      expect(wb.row_tile == i % row_tiles && wb.split == i / row_tiles, "one image keeps the grid's order", w.name, sms,
             block);
    }
  }
  return total;
}

void check(const Workload& w, int sms, int block) {
  std::vector<int64_t> kept;
  for (int64_t n : w.lengths) kept.push_back(g2tr::budget(n, 0.5, 32));
  const int splits =
      g2tr::choose_splits(w.lengths.data(), kept.data(), static_cast<int64_t>(w.lengths.size()), block, block, sms);
  expect(splits >= 1 && splits <= 65535, "split count in [1, 65535]", w.name, sms, block);
  int64_t row_tiles_max = 0, busy_blocks = 0;
  for (size_t b = 0; b < w.lengths.size(); ++b) {
    const int col_tiles = static_cast<int>(g2tr::ceil_div64(kept[b], block));
    const int64_t row_tiles = g2tr::ceil_div64(w.lengths[b] - kept[b], block);
    row_tiles_max = row_tiles > row_tiles_max ? row_tiles : row_tiles_max;
    const int own = g2tr::image_splits(col_tiles, splits);
    expect(own >= 1 && own <= col_tiles && own <= splits, "image splits in [1, min(tiles, launch splits)]", w.name, sms,
           block);
    int covered = 0, smallest = col_tiles, largest = 0, next = 0;
    for (int s = 0; s < own; ++s) {
      int begin = 0, end = 0;
      g2tr::split_range(col_tiles, own, s, &begin, &end);
      expect(begin == next, "splits are contiguous and ascending", w.name, sms, block);
      next = end;
      covered += end - begin;
      smallest = end - begin < smallest ? end - begin : smallest;
      largest = end - begin > largest ? end - begin : largest;
    }
    expect(covered == col_tiles && next == col_tiles, "splits cover the image's tiles once", w.name, sms, block);
    expect(smallest >= 1, "no empty split", w.name, sms, block);
    expect(largest - smallest <= 1, "splits differ by at most one tile", w.name, sms, block);
    busy_blocks += row_tiles * own;
  }
  const int64_t full_grid = row_tiles_max * splits * static_cast<int64_t>(w.lengths.size());
  const int64_t launched = check_work_list(w, kept, splits, block, sms);
  expect(launched == busy_blocks, "the work list launches exactly the blocks with work", w.name, sms, block);
  std::printf("%-4s %3d SMs %3dx%-3d: %5d splits, %7lld blocks launched, all with work (a full grid: %7lld)\n", w.name,
              sms, block, block, splits, static_cast<long long>(launched), static_cast<long long>(full_grid));
}

}  // namespace

int main() {
  const std::vector<int64_t> m2 = {4900, 3640, 3640, 2730, 1369, 729};
  const std::vector<Workload> workloads = {
      {"S1", repeat({256}, 16)},
      {"S2", repeat({1369}, 8)},
      {"M1", {4900}},
      {"M2", m2},
      {"L1", repeat({4900}, 8)},
      {"L2", repeat({4900, 3640, 3640, 2730}, 8)},
      {"one", {1}},
      {"tiny", {2, 3, 40}},
      {"none", {1, 4900, 1, 1369}},  // images of one token drop nothing: no blocks
  };
  for (int sms : {132, 108}) {
    for (int block : {128, 64}) {
      for (const Workload& w : workloads) check(w, sms, block);
    }
  }
  // The M1 case the review found: 20 x 20 tiles of 128 on 132 SMs gave 14 splits of which 4 were empty.
  const int64_t n = 4900, k = 2450;
  const int m1 = g2tr::choose_splits(&n, &k, 1, 128, 128, 132);
  expect(m1 == 10, "M1 on an H200: 10 splits of 2 tiles", "M1", 132, 128);
  // M2 on an H200: the full (row tile, split, image) grid had 480 blocks of which 277 had work.
  {
    const Workload m2w{"M2", m2};
    std::vector<int64_t> kept;
    for (int64_t len : m2) kept.push_back(g2tr::budget(len, 0.5, 32));
    const int splits = g2tr::choose_splits(m2.data(), kept.data(), static_cast<int64_t>(m2.size()), 128, 128, 132);
    expect(check_work_list(m2w, kept, splits, 128, 132) == 277, "M2 on an H200: 277 blocks, all with work", "M2", 132,
           128);
  }
  if (failures) {
    std::printf("%d failures\n", failures);
    return EXIT_FAILURE;
  }
  std::printf("merge splits: all checks passed\n");
  return EXIT_SUCCESS;
}
