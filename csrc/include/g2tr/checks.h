// Argument checks and output sizes shared by the CPU and CUDA wrappers (host only).
//
// Every size an op returns comes from the host-side int lists, never from device
// memory, so nothing here syncs with a device. Messages name the argument and image.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

#include <cfloat>
#include <cmath>
#include <vector>

#include "g2tr/common.h"

// The three float dtypes the ops take; scalar_t is bound inside the body.
#define G2TR_DISPATCH_FLOAT_TYPES(TYPE, NAME, ...)                                                      \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                                                        \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__) \
                         AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

namespace g2tr {

// Sizes come from host ints a caller controls: every product and running sum is checked,
// so a wrapped value can never pass a size check and reach a kernel as an index.
inline bool mul_fits(int64_t a, int64_t b, int64_t* out) { return !__builtin_mul_overflow(a, b, out); }
inline bool add_fits(int64_t a, int64_t b, int64_t* out) { return !__builtin_add_overflow(a, b, out); }

// Per-image geometry of a packed batch, derived from the grids.
struct Images {
  std::vector<int64_t> h, w, h_a, w_a;
  std::vector<int64_t> tokens_begin;   // [B + 1] offsets of each image's tokens
  std::vector<int64_t> anchors_begin;  // [B + 1] offsets of each image's anchors
  std::vector<int64_t> kept_begin;     // [B + 1] offsets of each image's kept rows
  int64_t count() const { return static_cast<int64_t>(h.size()); }
  int64_t length(int64_t b) const { return tokens_begin[b + 1] - tokens_begin[b]; }
  int64_t cells(int64_t b) const { return anchors_begin[b + 1] - anchors_begin[b]; }
  int64_t kept(int64_t b) const { return kept_begin[b + 1] - kept_begin[b]; }
};

inline void check_float_tensor(const char* op, const char* name, const at::Tensor& t, int64_t dim) {
  TORCH_CHECK_VALUE(t.defined(), op, ": ", name, " is undefined");
  TORCH_CHECK_VALUE(t.dim() == dim, op, ": ", name, " must be ", dim, "-D, got shape ", t.sizes());
  const auto st = t.scalar_type();
  TORCH_CHECK_TYPE(st == at::kFloat || st == at::kHalf || st == at::kBFloat16, op, ": ", name,
                   " must be float32, float16 or bfloat16, got ", st);
}

inline void check_same_device(const char* op, const char* name_a, const at::Tensor& a, const char* name_b,
                              const at::Tensor& b) {
  TORCH_CHECK_VALUE(a.device() == b.device(), op, ": ", name_a, " is on ", a.device(), " but ", name_b, " is on ",
                    b.device());
}

// Reads a flat [h0, w0, h1, w1, ...] list into per-image pairs.
inline void read_grid_pairs(const char* op, const char* name, c10::IntArrayRef grid, std::vector<int64_t>& h,
                            std::vector<int64_t>& w) {
  TORCH_CHECK_VALUE(grid.size() % 2 == 0, op, ": ", name, " must hold one (h, w) pair per image, got ", grid.size(),
                    " ints");
  for (size_t b = 0; b < grid.size() / 2; ++b) {
    TORCH_CHECK_VALUE(grid[2 * b] > 0 && grid[2 * b + 1] > 0, op, ": ", name, " of image ", b,
                      " must be positive, got ", grid[2 * b], " x ", grid[2 * b + 1]);
    h.push_back(grid[2 * b]);
    w.push_back(grid[2 * b + 1]);
  }
}

// The kernels compute in fp32, so merge_weight is checked as the fp32 they will use:
// 1e-300 (0 in fp32) and 1e39 (inf in fp32) are finite positive doubles but not weights.
// The range test comes first: casting an out-of-range double to float is undefined.
inline void check_merge_weight(const char* op, double merge_weight) {
  TORCH_CHECK_VALUE(
      merge_weight > 0.0 && merge_weight <= static_cast<double>(FLT_MAX) && static_cast<float>(merge_weight) > 0.0f, op,
      ": merge_weight must be a finite positive float32 (in (0, 3.4e38], not 0 when rounded to "
      "float32), got ",
      merge_weight);
}

// End offset of image b's h x w rows, which start at `begin`. An image whose h * w, or
// whose end, does not fit in int64 cannot fit in any tensor: rejected here, naming the
// argument and the image, before a wrapped value could pass the N / M check that follows.
inline int64_t image_end(const char* op, const char* name, const char* tensor, int64_t b, int64_t h, int64_t w,
                         int64_t begin, int64_t rows) {
  int64_t size = 0, end = 0;
  TORCH_CHECK_VALUE(mul_fits(h, w, &size) && add_fits(begin, size, &end), op, ": image ", b, " of ", name, " (", h,
                    " x ", w, ") does not fit in ", tensor, " (", rows, " rows): with the ", begin,
                    " rows of the images before it, it overflows int64");
  return end;
}

// tokens [N, D], anchors [M, D], grids and anchor_grids: checks and per-image offsets.
inline Images check_images(const char* op, const at::Tensor& tokens, const at::Tensor& anchors, c10::IntArrayRef grids,
                           c10::IntArrayRef anchor_grids) {
  check_float_tensor(op, "tokens", tokens, 2);
  check_float_tensor(op, "anchors", anchors, 2);
  check_same_device(op, "tokens", tokens, "anchors", anchors);
  TORCH_CHECK_TYPE(anchors.scalar_type() == tokens.scalar_type(), op, ": anchors dtype ", anchors.scalar_type(),
                   " must match tokens dtype ", tokens.scalar_type());
  TORCH_CHECK_VALUE(anchors.size(1) == tokens.size(1), op, ": anchors have D = ", anchors.size(1),
                    " but tokens have D = ", tokens.size(1));
  Images im;
  read_grid_pairs(op, "grids", grids, im.h, im.w);
  read_grid_pairs(op, "anchor_grids", anchor_grids, im.h_a, im.w_a);
  TORCH_CHECK_VALUE(im.h_a.size() == im.h.size(), op, ": anchor_grids describe ", im.h_a.size(),
                    " images but grids describe ", im.h.size());
  im.tokens_begin.assign(1, 0);
  im.anchors_begin.assign(1, 0);
  for (int64_t b = 0; b < im.count(); ++b) {
    im.tokens_begin.push_back(
        image_end(op, "grids", "tokens", b, im.h[b], im.w[b], im.tokens_begin.back(), tokens.size(0)));
    im.anchors_begin.push_back(
        image_end(op, "anchor_grids", "anchors", b, im.h_a[b], im.w_a[b], im.anchors_begin.back(), anchors.size(0)));
    // The cell map multiplies a row (< h) by h_a and a column (< w) by w_a.
    int64_t unused;
    TORCH_CHECK_VALUE(mul_fits(im.h[b], im.h_a[b], &unused) && mul_fits(im.w[b], im.w_a[b], &unused), op,
                      ": grids and anchor_grids of image ", b, " (", im.h[b], " x ", im.w[b], " over ", im.h_a[b],
                      " x ", im.w_a[b], ") are too large: h * h_a and w * w_a must fit in int64");
  }
  TORCH_CHECK_VALUE(tokens.size(0) == im.tokens_begin.back(), op, ": tokens have N = ", tokens.size(0),
                    " rows but grids describe ", im.tokens_begin.back(), " tokens (sum of h * w over ", im.count(),
                    " images)");
  TORCH_CHECK_VALUE(anchors.size(0) == im.anchors_begin.back(), op, ": anchors have M = ", anchors.size(0),
                    " rows but anchor_grids describe ", im.anchors_begin.back(), " anchors (sum of h_a * w_a over ",
                    im.count(), " images)");
  return im;
}

// Fills kept_begin from per-image budgets given as a list (checked against lengths).
inline void set_budgets(const char* op, Images& im, c10::IntArrayRef budgets) {
  TORCH_CHECK_VALUE(static_cast<int64_t>(budgets.size()) == im.count(), op, ": budgets has ", budgets.size(),
                    " entries but there are ", im.count(), " images");
  im.kept_begin.assign(1, 0);
  for (int64_t b = 0; b < im.count(); ++b) {
    TORCH_CHECK_VALUE(budgets[b] >= 1 && budgets[b] <= im.length(b), op, ": budgets[", b, "] (image ", b,
                      ") must be in [1, ", im.length(b), "], got ", budgets[b]);
    im.kept_begin.push_back(im.kept_begin.back() + budgets[b]);  // <= tokens_begin[b + 1]: no overflow
  }
}

// Fills kept_begin from keep_ratio / min_keep with the shared budget rule.
inline void set_budgets(const char* op, Images& im, double keep_ratio, int64_t min_keep) {
  // keep_ratio is used as the double it arrives as (K = round(N * keep_ratio) in double).
  TORCH_CHECK_VALUE(keep_ratio > 0.0 && keep_ratio <= 1.0, op, ": keep_ratio must be a number in (0, 1], got ",
                    keep_ratio);
  TORCH_CHECK_VALUE(min_keep >= 1, op, ": min_keep must be >= 1, got ", min_keep);
  im.kept_begin.assign(1, 0);
  for (int64_t b = 0; b < im.count(); ++b)
    im.kept_begin.push_back(im.kept_begin.back() + budget(im.length(b), keep_ratio, min_keep));
}

// Images described by lengths only (balanced_topk and merge take no grids).
inline Images images_from_lengths(const char* op, c10::IntArrayRef lengths, int64_t total) {
  Images im;
  im.tokens_begin.assign(1, 0);
  for (size_t b = 0; b < lengths.size(); ++b) {
    TORCH_CHECK_VALUE(lengths[b] > 0, op, ": lengths[", b, "] (image ", b, ") must be positive, got ", lengths[b]);
    im.h.push_back(1);
    im.w.push_back(lengths[b]);
    im.tokens_begin.push_back(image_end(op, "lengths", "the input", b, 1, lengths[b], im.tokens_begin.back(), total));
  }
  TORCH_CHECK_VALUE(total == im.tokens_begin.back(), op, ": the input has ", total, " tokens but lengths sum to ",
                    im.tokens_begin.back());
  return im;
}

// balanced_topk(scores, cells, lengths, budgets, cell_counts, cell_quotas): checks and images.
constexpr int64_t kMaxCellsPerImage = int64_t{1} << 26;
inline Images check_balanced_topk(const char* op, const at::Tensor& scores, const at::Tensor& cells,
                                  c10::IntArrayRef lengths, c10::IntArrayRef budgets, c10::IntArrayRef cell_counts,
                                  c10::IntArrayRef cell_quotas) {
  TORCH_CHECK_TYPE(scores.dim() == 1 && scores.scalar_type() == at::kFloat, op,
                   ": scores must be a 1-D float32 tensor, got ", scores.scalar_type(), " of shape ", scores.sizes());
  TORCH_CHECK_TYPE(cells.dim() == 1 && cells.scalar_type() == at::kLong, op, ": cells must be a 1-D int64 tensor, got ",
                   cells.scalar_type(), " of shape ", cells.sizes());
  TORCH_CHECK_VALUE(cells.size(0) == scores.size(0), op, ": cells has ", cells.size(0), " entries but scores has ",
                    scores.size(0));
  check_same_device(op, "scores", scores, "cells", cells);
  Images im = images_from_lengths(op, lengths, scores.size(0));
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
  return im;
}

// merge(tokens, keep_idx, lengths, budgets, merge_weight): checks and images. The values
// of keep_idx are checked by the kernels that can read them without a sync.
inline Images check_merge(const char* op, const at::Tensor& tokens, const at::Tensor& keep_idx,
                          c10::IntArrayRef lengths, c10::IntArrayRef budgets, double merge_weight) {
  check_float_tensor(op, "tokens", tokens, 2);
  TORCH_CHECK_TYPE(keep_idx.dim() == 1 && keep_idx.scalar_type() == at::kLong, op,
                   ": keep_idx must be a 1-D int64 tensor, got ", keep_idx.scalar_type(), " of shape ",
                   keep_idx.sizes());
  check_same_device(op, "tokens", tokens, "keep_idx", keep_idx);
  check_merge_weight(op, merge_weight);
  Images im = images_from_lengths(op, lengths, tokens.size(0));
  set_budgets(op, im, budgets);
  TORCH_CHECK_VALUE(keep_idx.size(0) == im.kept_begin.back(), op, ": keep_idx has ", keep_idx.size(0),
                    " entries but budgets sum to ", im.kept_begin.back());
  return im;
}

// reduce(tokens, anchors, grids, anchor_grids, keep_ratio, min_keep, merge_weight).
inline Images check_reduce(const char* op, const at::Tensor& tokens, const at::Tensor& anchors, c10::IntArrayRef grids,
                           c10::IntArrayRef anchor_grids, double keep_ratio, int64_t min_keep, double merge_weight) {
  Images im = check_images(op, tokens, anchors, grids, anchor_grids);
  set_budgets(op, im, keep_ratio, min_keep);
  check_merge_weight(op, merge_weight);
  return im;
}

}  // namespace g2tr
