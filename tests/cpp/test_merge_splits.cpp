// The CUDA merge's column-split arithmetic (csrc/include/g2tr/merge_splits.h), on the CPU:
// for the SHAPES.md workloads on an H200 (132 SMs) and an A100 (108), with the tile sizes
// of the tensor-core (128 x 128) and fp32 (64 x 64) kernels, every split of every image
// has work, an image's splits differ by at most one tile and cover its tiles exactly once,
// and a single image launches no block without work.
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
  const int64_t launched = row_tiles_max * splits * static_cast<int64_t>(w.lengths.size());
  if (w.lengths.size() == 1) expect(busy_blocks == launched, "one image: every block has work", w.name, sms, block);
  // Enough blocks to cover the SMs where the work allows it.
  std::printf("%-3s %3d SMs %3dx%-3d: %5d splits, %7lld of %7lld blocks with work\n", w.name, sms, block, block, splits,
              static_cast<long long>(busy_blocks), static_cast<long long>(launched));
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
  if (failures) {
    std::printf("%d failures\n", failures);
    return EXIT_FAILURE;
  }
  std::printf("merge splits: all checks passed\n");
  return EXIT_SUCCESS;
}
