// Stage III select on the CPU: per image, one sort of its N scores (ranks_before), then
// two walks over that order, the seeds and the fill. The rule itself is SPEC.md §3 as
// g2tr_kernels/reference/balanced_topk.py states it.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <numeric>

#include "cpu_kernels.h"

namespace g2tr::cpu {

void select_tokens(const float* scores, const int64_t* cells, const Images& im, const int64_t* cell_counts,
                   const int64_t* cell_quotas, int64_t* keep_idx) {
  at::parallel_for(0, im.count(), 1, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> order, present;
    std::vector<int32_t> taken_in_cell;
    std::vector<uint8_t> taken;
    for (int64_t b = begin; b < end; ++b) {
      const int64_t first = im.tokens_begin[b], n = im.length(b), k = im.kept(b);
      const float* s = scores + first;
      const int64_t* c = cells + first;
      order.resize(n);
      std::iota(order.begin(), order.end(), int64_t{0});
      std::sort(order.begin(), order.end(), [&](int64_t x, int64_t y) { return ranks_before(s[x], x, s[y], y); });
      // Counters only for the cells that occur: at most n of them, so memory stays O(n)
      // however large cell_counts[b] is.
      present.clear();
      for (int64_t t = 0; t < n; ++t)
        if (c[t] >= 0 && c[t] < cell_counts[b]) present.push_back(c[t]);
      std::sort(present.begin(), present.end());
      present.erase(std::unique(present.begin(), present.end()), present.end());
      taken_in_cell.assign(present.size(), 0);
      taken.assign(n, 0);
      int64_t count = 0;
      for (int64_t pos = 0; pos < n && count < k; ++pos) {
        const int64_t t = order[pos], cell = c[t];
        if (cell < 0 || cell >= cell_counts[b]) continue;
        int32_t& in_cell = taken_in_cell[std::lower_bound(present.begin(), present.end(), cell) - present.begin()];
        if (in_cell < cell_quotas[b]) {
          ++in_cell;
          taken[t] = 1;
          ++count;
        }
      }
      for (int64_t pos = 0; pos < n && count < k; ++pos) {
        const int64_t t = order[pos];
        if (!taken[t]) {
          taken[t] = 1;
          ++count;
        }
      }
      int64_t* out = keep_idx + im.kept_begin[b];
      for (int64_t t = 0; t < n; ++t)
        if (taken[t]) *out++ = first + t;
    }
  });
}

namespace {

at::Tensor balanced_topk_cpu(const at::Tensor& scores_in, const at::Tensor& cells_in, c10::IntArrayRef lengths,
                             c10::IntArrayRef budgets, c10::IntArrayRef cell_counts, c10::IntArrayRef cell_quotas) {
  const Images im =
      check_balanced_topk("g2tr.balanced_topk", scores_in, cells_in, lengths, budgets, cell_counts, cell_quotas);
  const at::Tensor scores = scores_in.contiguous(), cells = cells_in.contiguous();
  auto keep_idx = at::empty({im.kept_begin.back()}, cells.options());
  select_tokens(scores.const_data_ptr<float>(), cells.const_data_ptr<int64_t>(), im, cell_counts.data(),
                cell_quotas.data(), keep_idx.data_ptr<int64_t>());
  return keep_idx;
}

}  // namespace

TORCH_LIBRARY_IMPL(g2tr, CPU, m) { m.impl("balanced_topk", &balanced_topk_cpu); }

}  // namespace g2tr::cpu
