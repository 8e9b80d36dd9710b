// Stage IV on the CPU, one image at a time (merging never crosses images).
//
// 1. assignment: for dropped rows in tiles, a matrix product against all kept rows of
//    the image with the row argmax folded in; nothing of size (N-K) x K is ever held.
//    bf16 on CPUs with AVX512-BF16: fp32-accumulated dot products of the bf16 values
//    themselves (dot_argmax.cpp); otherwise an fp32 GEMM per tile (at::mm).
// 2. mean: dropped tokens grouped by target in ascending index order (a counting sort),
//    then each kept row sums its group in that fixed order: deterministic, no atomics.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>

#include "cpu_kernels.h"
#include "dot_argmax.h"
#include "vec.h"

namespace g2tr::cpu {
namespace {

constexpr int64_t kRowTile = 128;  // dropped rows per fp32 GEMM tile: large enough for an efficient sgemm, its
                                   // 128 x K similarity tile (1.2 MB at K = 2450) small enough for L2/L3

// Dropped rows per task of the bf16 kernel: large, so each packed panel of kept rows is
// reused from L2 by many rows (dot_argmax.cpp blocks 192 rows), yet at least two tasks
// per thread so small images still use every core.
int64_t bf16_rows_per_task(int64_t m) {
  const int64_t tasks = 2 * at::get_num_threads();
  return std::clamp<int64_t>((m + tasks - 1) / tasks, 8, 192);
}

// Best kept column of each dropped row, fp32 GEMM per tile; same value and tie rule as
// dot_argmax_rows: value = (dot * b_scale[j]) * a_scale[i], strict > keeps the lowest j.
template <typename T>
void assign_generic(const T* rows, int64_t dim, const std::vector<int64_t>& dropped, const std::vector<int64_t>& kept,
                    const float* a_scale, const float* b_scale, int64_t* best) {
  const int64_t m = dropped.size(), n = kept.size();
  auto kept_rows = at::empty({n, dim}, at::kFloat);
  float* kr = kept_rows.data_ptr<float>();
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) widen_row(kr + j * dim, rows + kept[j] * dim, dim);
  });
  const at::Tensor kept_t = kept_rows.t();
  at::parallel_for(0, (m + kRowTile - 1) / kRowTile, 1, [&](int64_t tile_begin, int64_t tile_end) {
    auto tile = at::empty({kRowTile, dim}, at::kFloat);
    for (int64_t t = tile_begin; t < tile_end; ++t) {
      const int64_t r0 = t * kRowTile, rows_here = std::min(kRowTile, m - r0);
      float* tp = tile.data_ptr<float>();
      for (int64_t r = 0; r < rows_here; ++r) widen_row(tp + r * dim, rows + dropped[r0 + r] * dim, dim);
      const at::Tensor sim = at::mm(tile.narrow(0, 0, rows_here), kept_t);
      const float* sp = sim.const_data_ptr<float>();
      for (int64_t r = 0; r < rows_here; ++r) {
        float best_val = -std::numeric_limits<float>::infinity();
        int64_t best_j = 0;
        for (int64_t j = 0; j < n; ++j) {
          const float v = (sp[r * n + j] * b_scale[j]) * a_scale[r0 + r];
          if (v > best_val) {
            best_val = v;
            best_j = j;
          }
        }
        best[r0 + r] = best_j;
      }
    }
  });
}

void assign_bf16(const c10::BFloat16* rows, int64_t dim, const std::vector<int64_t>& dropped,
                 const std::vector<int64_t>& kept, const float* a_scale, const float* b_scale, int64_t* best) {
  const int64_t m = dropped.size(), n = kept.size();
  // at::empty gives the 64-byte alignment the panel loads want.
  const at::Tensor packed_t = at::empty({dot_argmax_packed_size(n, dim)}, at::kBFloat16);
  c10::BFloat16* packed = packed_t.data_ptr<c10::BFloat16>();
  dot_argmax_pack_b(rows, dim, kept.data(), n, dim, packed);
  const int64_t rows_per_task = bf16_rows_per_task(m);
  at::parallel_for(0, (m + rows_per_task - 1) / rows_per_task, 1, [&](int64_t task_begin, int64_t task_end) {
    std::vector<float> best_val(rows_per_task);
    for (int64_t t = task_begin; t < task_end; ++t) {
      const int64_t r0 = t * rows_per_task, rows_here = std::min(rows_per_task, m - r0);
      dot_argmax_rows(rows, dim, dropped.data() + r0, rows_here, packed, n, dim, a_scale + r0, b_scale, best + r0,
                      best_val.data());
    }
  });
}

template <typename T>
void assign_image(const T* rows, int64_t dim, const std::vector<int64_t>& dropped, const std::vector<int64_t>& kept,
                  const float* a_scale, const float* b_scale, int64_t* best) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    if (dot_argmax_bf16_supported()) return assign_bf16(rows, dim, dropped, kept, a_scale, b_scale, best);
  }
  assign_generic(rows, dim, dropped, kept, a_scale, b_scale, best);
}

}  // namespace

template <typename T>
void merge_tokens(const T* tokens, int64_t dim, const Images& im, const int64_t* keep_idx, double merge_weight,
                  const float* inv_norms, T* merged, int64_t* assign) {
  const float lambda = static_cast<float>(merge_weight);
  std::vector<int64_t> kept, dropped, target, group_begin, group;
  std::vector<float> inv, kept_inv, dropped_inv;
  for (int64_t b = 0; b < im.count(); ++b) {
    const int64_t first = im.tokens_begin[b], n = im.length(b), k = im.kept(b), out0 = im.kept_begin[b];
    const T* rows = tokens + first * dim;
    // Kept rows must be strictly ascending inside the image: checked, never trusted.
    kept.resize(k);
    dropped.clear();
    for (int64_t r = 0, prev = -1; r < k; ++r) {
      const int64_t t = keep_idx[out0 + r] - first;
      TORCH_CHECK_VALUE(t > prev && t < n, "g2tr.merge: keep_idx of image ", b, " must be strictly ascending within [",
                        first, ", ", first + n, "), got ", keep_idx[out0 + r], " at position ", out0 + r);
      for (int64_t d = prev + 1; d < t; ++d) dropped.push_back(d);
      kept[r] = t;
      prev = t;
      if (r == k - 1)
        for (int64_t d = t + 1; d < n; ++d) dropped.push_back(d);
    }
    const float* image_inv = inv_norms ? inv_norms + first : nullptr;
    if (!image_inv) {
      inv.resize(n);
      at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
        for (int64_t t = begin; t < end; ++t) inv[t] = inv_norm(sumsq(rows + t * dim, dim));
      });
      image_inv = inv.data();
    }
    kept_inv.resize(k);
    dropped_inv.resize(dropped.size());
    for (int64_t r = 0; r < k; ++r) kept_inv[r] = image_inv[kept[r]];
    for (size_t r = 0; r < dropped.size(); ++r) dropped_inv[r] = image_inv[dropped[r]];
    target.resize(dropped.size());
    if (!dropped.empty()) assign_image(rows, dim, dropped, kept, dropped_inv.data(), kept_inv.data(), target.data());

    // Group dropped tokens by target; walking them in ascending order keeps each group ascending.
    group_begin.assign(k + 1, 0);
    for (int64_t tgt : target) ++group_begin[tgt + 1];
    for (int64_t r = 0; r < k; ++r) group_begin[r + 1] += group_begin[r];
    group.resize(dropped.size());
    {
      std::vector<int64_t> fill(group_begin.begin(), group_begin.end() - 1);
      for (size_t r = 0; r < dropped.size(); ++r) group[fill[target[r]]++] = dropped[r];
    }
    for (int64_t r = 0; r < k; ++r) assign[first + kept[r]] = out0 + r;
    for (size_t r = 0; r < dropped.size(); ++r) assign[first + dropped[r]] = out0 + target[r];

    at::parallel_for(0, k, 8, [&](int64_t begin, int64_t end) {
      std::vector<float> acc(dim);
      for (int64_t r = begin; r < end; ++r) {
        // (lambda * v_k + sum_j v_j) / (lambda + n_k), summed in ascending j like the reference.
        scale_row(acc.data(), rows + kept[r] * dim, lambda, dim);
        float count = lambda;
        for (int64_t g = group_begin[r]; g < group_begin[r + 1]; ++g) {
          add_row(acc.data(), rows + group[g] * dim, dim);
          count += 1.0f;
        }
        divide_row(merged + (out0 + r) * dim, acc.data(), count, dim);
      }
    });
  }
}

#define G2TR_INSTANTIATE(T) \
  template void merge_tokens<T>(const T*, int64_t, const Images&, const int64_t*, double, const float*, T*, int64_t*);
G2TR_INSTANTIATE(float)
G2TR_INSTANTIATE(c10::BFloat16)
G2TR_INSTANTIATE(c10::Half)
#undef G2TR_INSTANTIATE

namespace {

std::tuple<at::Tensor, at::Tensor> merge_cpu(const at::Tensor& tokens_in, const at::Tensor& keep_idx_in,
                                             c10::IntArrayRef lengths, c10::IntArrayRef budgets, double merge_weight) {
  const Images im = check_merge("g2tr.merge", tokens_in, keep_idx_in, lengths, budgets, merge_weight);
  const at::Tensor tokens = tokens_in.contiguous(), keep_idx = keep_idx_in.contiguous();
  auto merged = at::empty({im.kept_begin.back(), tokens.size(1)}, tokens.options());
  auto assign = at::empty({tokens.size(0)}, keep_idx.options());
  G2TR_DISPATCH_FLOAT_TYPES(tokens.scalar_type(), "g2tr_merge", [&] {
    merge_tokens<scalar_t>(tokens.const_data_ptr<scalar_t>(), tokens.size(1), im, keep_idx.const_data_ptr<int64_t>(),
                           merge_weight, nullptr, merged.data_ptr<scalar_t>(), assign.data_ptr<int64_t>());
  });
  return {merged, assign};
}

}  // namespace

TORCH_LIBRARY_IMPL(g2tr, CPU, m) { m.impl("merge", &merge_cpu); }

}  // namespace g2tr::cpu
