// Stage IV on the CPU; the rule is SPEC.md §4 (docs/SPEC.md) as g2tr_kernels/reference/merge.py states it.
//
// 1. assignment: for dropped rows in tiles, a matrix product against all kept rows of
//    the image with the row argmax folded in; nothing of size (N-K) x K is ever held.
//    The product runs on the path merge_path.h picks for this CPU and dtype: the
//    AVX512-BF16 dot-argmax micro-kernel (dot_argmax.cpp), fp32 GEMM blocks (at::mm) or
//    bf16 GEMM blocks with fp32 output (MKL through at::native::cpublas::brgemm).
// 2. mean: dropped tokens grouped by target in ascending index order (a counting sort),
//    then each kept row sums its group in that fixed order: deterministic, no atomics.
// Large images run one after another, each spread over all threads; many small images
// (S1: 16 tiles of 256 tokens) run one image per task, since an image that small cannot
// keep every thread busy on its own. Either way a row's result does not depend on the split.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>

#include "cpu_kernels.h"
#include "dot_argmax.h"
#include "merge_path.h"
#include "vec.h"

namespace g2tr::cpu {
namespace {

// Dropped rows per GEMM call: each call re-packs all K kept rows inside the library, so the
// block is large (packing amortised over 512 rows) while its 512 x K similarity block stays
// small (4.8 MB at K = 2450). The call itself is threaded by the library (MKL),
// which partitions it better than fixed row tiles do.
constexpr int64_t kGemmRows = 512;

// Below this much assignment work ((N-K) * K * D multiply-adds) per image, images are spread
// over the threads instead of the rows of each image (S1 images: 128 * 128 * 2048 = 2^25).
constexpr int64_t kSmallImageWork = int64_t{1} << 27;

// Dropped rows per task of the bf16 kernel: large, so each packed panel of kept rows is
// reused from L2 by many rows (dot_argmax.cpp blocks 192 rows), yet at least two tasks
// per thread so small images still use every core.
int64_t bf16_rows_per_task(int64_t m) {
  const int64_t tasks = 2 * at::get_num_threads();
  return std::clamp<int64_t>((m + tasks - 1) / tasks, 8, 192);
}

// best[r] = the lowest j with the largest (sim[r][j] * b_scale[j]) * a_scale[r]: the value
// and tie rule of dot_argmax_rows, so every path ranks the same similarities the same way.
void tile_argmax(const float* sim, int64_t rows, int64_t n, const float* a_scale, const float* b_scale, int64_t* best) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* sp = sim + r * n;
    float best_val = -std::numeric_limits<float>::infinity();
    int64_t best_j = 0;
    for (int64_t j = 0; j < n; ++j) {
      const float v = (sp[j] * b_scale[j]) * a_scale[r];
      if (v > best_val) {
        best_val = v;
        best_j = j;
      }
    }
    best[r] = best_j;
  }
}

// A GEMM path: for blocks of dropped rows, gather them (gather_rows), one library GEMM
// against all kept rows (gemm), then the row argmax of the block spread over the threads.
template <typename Gather, typename Gemm>
void assign_by_gemm(int64_t m, int64_t n, const float* a_scale, const float* b_scale, int64_t* best, Gather gather_rows,
                    Gemm gemm) {
  auto sim = at::empty({std::min(kGemmRows, m), n}, at::kFloat);
  float* sp = sim.data_ptr<float>();
  for (int64_t r0 = 0; r0 < m; r0 += kGemmRows) {
    const int64_t rows_here = std::min(kGemmRows, m - r0);
    gather_rows(r0, rows_here);
    gemm(rows_here, sp);
    at::parallel_for(0, rows_here, 16, [&](int64_t begin, int64_t end) {
      tile_argmax(sp + begin * n, end - begin, n, a_scale + r0 + begin, b_scale, best + r0 + begin);
    });
  }
}

// fp32_gemm: kept rows widened to fp32 once, dropped rows a block at a time, at::mm (MKL).
// a_pow2 / b_pow2 (null: all 1): rows of extreme magnitude enter the GEMM multiplied by
// their power of two (common.h cosine_pow2), so no dot product overflows. Its buffers are
// the kept rows and one block, in fp32: at most twice the rows they widen.
template <typename T>
void assign_fp32_gemm(const T* rows, int64_t dim, const std::vector<int64_t>& dropped, const std::vector<int64_t>& kept,
                      const float* a_scale, const float* b_scale, const float* a_pow2, const float* b_pow2,
                      int64_t* best) {
  const int64_t m = dropped.size(), n = kept.size();
  auto widen = [&](const std::vector<int64_t>& which, const float* pow2, int64_t first, int64_t count, float* out) {
    at::parallel_for(0, count, 16, [&](int64_t begin, int64_t end) {
      for (int64_t j = begin; j < end; ++j) {
        if (pow2)
          scale_row(out + j * dim, rows + which[first + j] * dim, pow2[first + j], dim);
        else
          widen_row(out + j * dim, rows + which[first + j] * dim, dim);
      }
    });
  };
  auto kept_rows = at::empty({n, dim}, at::kFloat);
  widen(kept, b_pow2, 0, n, kept_rows.data_ptr<float>());
  const at::Tensor kept_t = kept_rows.t();
  auto block = at::empty({std::min(kGemmRows, m), dim}, at::kFloat);
  assign_by_gemm(
      m, n, a_scale, b_scale, best,
      [&](int64_t r0, int64_t count) { widen(dropped, a_pow2, r0, count, block.data_ptr<float>()); },
      [&](int64_t count, float* sim) {
        auto out = at::from_blob(sim, {count, n}, at::kFloat);
        at::mm_out(out, block.narrow(0, 0, count), kept_t);
      });
}

// bf16_gemm: the library's bf16 x bf16 -> fp32 GEMM. cpublas::brgemm without VNNI packing
// is ATen's exported entry to it (MKL cblas_gemm_bf16bf16f32, on AMX tiles where present); it takes
// row-major A [rows, d] and B [d, n], so the kept rows are gathered transposed once.
void assign_bf16_gemm(const c10::BFloat16* rows, int64_t dim, const std::vector<int64_t>& dropped,
                      const std::vector<int64_t>& kept, const float* a_scale, const float* b_scale, int64_t* best) {
  const int64_t m = dropped.size(), n = kept.size();
  const at::Tensor index = at::from_blob(const_cast<int64_t*>(kept.data()), {n}, at::kLong);
  const at::Tensor image = at::from_blob(const_cast<c10::BFloat16*>(rows), {kept.back() + 1, dim}, at::kBFloat16);
  const at::Tensor kept_t = image.index_select(0, index).t().contiguous();  // [d, n]
  const c10::BFloat16* kt = kept_t.const_data_ptr<c10::BFloat16>();
  auto block = at::empty({std::min(kGemmRows, m), dim}, at::kBFloat16);
  c10::BFloat16* bp = block.data_ptr<c10::BFloat16>();
  assign_by_gemm(
      m, n, a_scale, b_scale, best,
      [&](int64_t r0, int64_t count) {
        at::parallel_for(0, count, 16, [&](int64_t begin, int64_t end) {
          for (int64_t r = begin; r < end; ++r) std::copy_n(rows + dropped[r0 + r] * dim, dim, bp + r * dim);
        });
      },
      [&](int64_t count, float* sim) {
        at::native::cpublas::brgemm(count, n, dim, dim, n, n, /*add_C=*/false, bp, kt, sim, /*is_vnni=*/false);
      });
}

void assign_bf16_dot(const c10::BFloat16* rows, int64_t dim, const std::vector<int64_t>& dropped,
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

// a_pow2 / b_pow2: null when every row of the image has normal magnitude.
template <typename T>
void assign_image(MergePath path, const T* rows, int64_t dim, const std::vector<int64_t>& dropped,
                  const std::vector<int64_t>& kept, const float* a_scale, const float* b_scale, const float* a_pow2,
                  const float* b_pow2, int64_t* best) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    // Extreme rows need their exact power-of-two scaling, which only the fp32 path applies.
    if (!a_pow2) {
      // The packed panels pad the kept rows to a multiple of the panel width: with few kept
      // rows and a large D that padding would dwarf the input (2 x 2^24 bf16, one kept row:
      // 1.5 GiB). The micro-kernel runs only when packing at most doubles the kept rows;
      // otherwise the fp32 GEMM path, whose buffers are at most twice the rows they widen.
      const int64_t kept_elems = static_cast<int64_t>(kept.size()) * (dim + 1);
      if (path == MergePath::bf16_dot && dot_argmax_packed_size(kept.size(), dim) <= 2 * kept_elems)
        return assign_bf16_dot(rows, dim, dropped, kept, a_scale, b_scale, best);
      if (path == MergePath::bf16_gemm) return assign_bf16_gemm(rows, dim, dropped, kept, a_scale, b_scale, best);
    }
  }
  assign_fp32_gemm(rows, dim, dropped, kept, a_scale, b_scale, a_pow2, b_pow2, best);
}

// One image: kept/dropped split, assignment, grouped mean. Parallel inside (its loops run
// inline when the caller already spreads images over the threads).
template <typename T>
void merge_image(MergePath path, const T* tokens, int64_t dim, const Images& im, int64_t b, const int64_t* keep_idx,
                 float lambda, const float* inv_norms, const float* pow2s, T* merged, int64_t* assign) {
  std::vector<int64_t> kept, dropped, target, group_begin, group;
  std::vector<float> inv, pow2, kept_inv, dropped_inv, kept_pow2, dropped_pow2;
  const int64_t first = im.tokens_begin[b], n = im.length(b), k = im.kept(b), out0 = im.kept_begin[b];
  const T* rows = tokens + first * dim;
  // Kept rows must be strictly ascending inside the image: checked, never trusted.
  kept.resize(k);
  dropped.clear();
  for (int64_t r = 0, prev = -1; r < k; ++r) {
    // Compared before subtracting: keep_idx may hold any int64 (-2^63 - first overflows).
    const int64_t global = keep_idx[out0 + r];
    TORCH_CHECK_VALUE(global > first + prev && global < first + n, "g2tr.merge: keep_idx of image ", b,
                      " must be strictly ascending within [", first, ", ", first + n, "), got ", global,
                      " at position ", out0 + r);
    const int64_t t = global - first;
    for (int64_t d = prev + 1; d < t; ++d) dropped.push_back(d);
    kept[r] = t;
    prev = t;
    if (r == k - 1)
      for (int64_t d = t + 1; d < n; ++d) dropped.push_back(d);
  }
  const float* image_inv = inv_norms ? inv_norms + first : nullptr;
  const float* image_pow2 = inv_norms ? pow2s + first : nullptr;
  if (!image_inv) {
    inv.resize(n);
    pow2.resize(n);
    at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const T* x = rows + t * dim;
        inv[t] = cosine_scale(x, dim, sumsq(x, dim), &pow2[t]);
      }
    });
    image_inv = inv.data();
    image_pow2 = pow2.data();
  }
  const bool rescaled = std::any_of(image_pow2, image_pow2 + n, [](float p) { return p != 1.0f; });
  kept_inv.resize(k);
  dropped_inv.resize(dropped.size());
  for (int64_t r = 0; r < k; ++r) kept_inv[r] = image_inv[kept[r]];
  for (size_t r = 0; r < dropped.size(); ++r) dropped_inv[r] = image_inv[dropped[r]];
  if (rescaled) {
    kept_pow2.resize(k);
    dropped_pow2.resize(dropped.size());
    for (int64_t r = 0; r < k; ++r) kept_pow2[r] = image_pow2[kept[r]];
    for (size_t r = 0; r < dropped.size(); ++r) dropped_pow2[r] = image_pow2[dropped[r]];
  }
  target.resize(dropped.size());
  if (!dropped.empty())
    assign_image(path, rows, dim, dropped, kept, dropped_inv.data(), kept_inv.data(),
                 rescaled ? dropped_pow2.data() : nullptr, rescaled ? kept_pow2.data() : nullptr, target.data());

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
      // SPEC.md §4's mean, summed in ascending j like the reference.
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

}  // namespace

bool spread_images(const Images& im, int64_t dim) {
  int64_t largest_work = 0;
  for (int64_t b = 0; b < im.count(); ++b)
    largest_work = std::max(largest_work, (im.length(b) - im.kept(b)) * im.kept(b) * dim);
  return im.count() > 1 && largest_work <= kSmallImageWork;
}

template <typename T>
void merge_tokens(const T* tokens, int64_t dim, const Images& im, const int64_t* keep_idx, double merge_weight,
                  const float* inv_norms, const float* pow2s, T* merged, int64_t* assign) {
  const float lambda = static_cast<float>(merge_weight);
  const MergePath path = merge_path_for(c10::CppTypeToScalarType<T>::value).path;
  if (spread_images(im, dim)) {
    at::parallel_for(0, im.count(), 1, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b)
        merge_image(path, tokens, dim, im, b, keep_idx, lambda, inv_norms, pow2s, merged, assign);
    });
    return;
  }
  for (int64_t b = 0; b < im.count(); ++b)
    merge_image(path, tokens, dim, im, b, keep_idx, lambda, inv_norms, pow2s, merged, assign);
}

#define G2TR_INSTANTIATE(T)                                                                                           \
  template void merge_tokens<T>(const T*, int64_t, const Images&, const int64_t*, double, const float*, const float*, \
                                T*, int64_t*);
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
                           merge_weight, nullptr, nullptr, merged.data_ptr<scalar_t>(), assign.data_ptr<int64_t>());
  });
  return {merged, assign};
}

}  // namespace

TORCH_LIBRARY_IMPL(g2tr, CPU, m) { m.impl("merge", &merge_cpu); }

}  // namespace g2tr::cpu
