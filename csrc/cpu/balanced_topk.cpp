// Stage III select on the CPU: per image, one sort of its N scores, then two walks.
//
// In descending score order (ties to the lower index) a token is taken while its cell
// holds fewer than `quota` taken tokens, until K are taken; then the best tokens not
// yet taken fill up to K. With quota 1 the first token met of each cell is its best and
// cells are met in the order of their best score: G2TR's "top min(K, #cells) cell
// seeds, then fill". See g2tr_kernels/reference/balanced_topk.py.
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
    std::vector<int64_t> order;
    std::vector<int32_t> taken_in_cell;
    std::vector<uint8_t> taken;
    for (int64_t b = begin; b < end; ++b) {
      const int64_t first = im.tokens_begin[b], n = im.length(b), k = im.kept(b);
      const float* s = scores + first;
      const int64_t* c = cells + first;
      order.resize(n);
      std::iota(order.begin(), order.end(), int64_t{0});
      std::sort(order.begin(), order.end(), [&](int64_t x, int64_t y) { return ranks_before(s[x], x, s[y], y); });
      taken_in_cell.assign(cell_counts[b], 0);
      taken.assign(n, 0);
      int64_t count = 0;
      for (int64_t pos = 0; pos < n && count < k; ++pos) {
        const int64_t t = order[pos], cell = c[t];
        if (cell >= 0 && cell < cell_counts[b] && taken_in_cell[cell] < cell_quotas[b]) {
          ++taken_in_cell[cell];
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

constexpr int64_t kMaxCellsPerImage = int64_t{1} << 26;

at::Tensor balanced_topk_cpu(const at::Tensor& scores_in, const at::Tensor& cells_in, c10::IntArrayRef lengths,
                             c10::IntArrayRef budgets, c10::IntArrayRef cell_counts,
                             c10::IntArrayRef cell_quotas) {
  const char* op = "g2tr.balanced_topk";
  TORCH_CHECK_TYPE(scores_in.dim() == 1 && scores_in.scalar_type() == at::kFloat, op,
              ": scores must be a 1-D float32 tensor, got ", scores_in.scalar_type(), " of shape ", scores_in.sizes());
  TORCH_CHECK_TYPE(cells_in.dim() == 1 && cells_in.scalar_type() == at::kLong, op,
              ": cells must be a 1-D int64 tensor, got ", cells_in.scalar_type(), " of shape ", cells_in.sizes());
  TORCH_CHECK_VALUE(cells_in.size(0) == scores_in.size(0), op, ": cells has ", cells_in.size(0),
              " entries but scores has ", scores_in.size(0));
  check_same_device(op, "scores", scores_in, "cells", cells_in);
  Images im = images_from_lengths(op, lengths, scores_in.size(0));
  set_budgets(op, im, budgets);
  TORCH_CHECK_VALUE(static_cast<int64_t>(cell_counts.size()) == im.count(), op, ": cell_counts has ",
              cell_counts.size(), " entries but there are ", im.count(), " images");
  TORCH_CHECK_VALUE(static_cast<int64_t>(cell_quotas.size()) == im.count(), op, ": cell_quotas has ",
              cell_quotas.size(), " entries but there are ", im.count(), " images");
  for (int64_t b = 0; b < im.count(); ++b) {
    TORCH_CHECK_VALUE(cell_counts[b] >= 1 && cell_counts[b] <= kMaxCellsPerImage, op, ": cell_counts[", b, "] (image ",
                b, ") must be in [1, 2^26], got ", cell_counts[b]);
    TORCH_CHECK_VALUE(cell_quotas[b] >= 1, op, ": cell_quotas[", b, "] (image ", b, ") must be >= 1, got ",
                cell_quotas[b]);
  }
  const at::Tensor scores = scores_in.contiguous(), cells = cells_in.contiguous();
  auto keep_idx = at::empty({im.kept_begin.back()}, cells.options());
  select_tokens(scores.const_data_ptr<float>(), cells.const_data_ptr<int64_t>(), im, cell_counts.data(),
                cell_quotas.data(), keep_idx.data_ptr<int64_t>());
  return keep_idx;
}

}  // namespace

TORCH_LIBRARY_IMPL(g2tr, CPU, m) { m.impl("balanced_topk", &balanced_topk_cpu); }

}  // namespace g2tr::cpu
