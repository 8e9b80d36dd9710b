// Stage IV on CUDA: torch.ops.g2tr.merge for the CUDA dispatch key, and the merge launcher
// reduce uses (kernels/merge.cuh: assign, group, sum; one launch each per 64 images).
//
// Workspace, all from the caching allocator on the current stream: the split partials
// (splits x dropped rows, value + index), per kept row a count and an end, the grouped
// dropped-token list, and the token norms when the caller has none. The split count is
// chosen so that about two blocks per SM have work and no split of an image is empty, and
// the launch holds only blocks with work (g2tr/merge_splits.h); neither changes a result
// (the argmax order is total), only how the columns are shared out.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <limits>

#include "kernels/merge.cuh"
#include "launch.cuh"

namespace g2tr::cuda {
namespace {

// Column splits of the assign launch (g2tr/merge_splits.h).
int launch_splits(const Images& im, int block_rows, int block_cols) {
  std::vector<int64_t> lengths(im.count()), kept(im.count());
  for (int64_t b = 0; b < im.count(); ++b) {
    lengths[b] = im.length(b);
    kept[b] = im.kept(b);
  }
  return choose_splits(lengths.data(), kept.data(), im.count(), block_rows, block_cols,
                       at::cuda::getCurrentDeviceProperties()->multiProcessorCount);
}

// The launch's work list (g2tr/merge_splits.h): only blocks with work, built on the host
// from the grids and passed by value like the table. Returns its block count.
int work_list(const ImageTable& t, int block_rows, int block_cols, int splits, AssignBlocks* blocks) {
  const int64_t total =
      assign_blocks(t.token_begin, t.kept_begin, t.count, block_rows, block_cols, splits, blocks->begin);
  TORCH_CHECK(total <= std::numeric_limits<int>::max(), "g2tr merge: ", total, " assign blocks exceed the grid limit");
  return static_cast<int>(total);
}

template <bool kBf16>
void launch_assign_mma(const at::Tensor& tokens, const std::vector<ImageTable>& tables, const int64_t* keep_idx,
                       const float* inv_norms, const float* pow2s, int splits, AssignPartials partials,
                       cudaStream_t stream) {
  const int64_t dim = tokens.size(1);
  const auto* x = reinterpret_cast<const uint16_t*>(tokens.const_data_ptr());
  const bool vectorized = vectorizable(dim, 2, x);
  // 60 KB of pipeline: above the 48 KB default, so opt in (per device, cheap, capturable).
  C10_CUDA_CHECK(
      cudaFuncSetAttribute(assign_mma_kernel<kBf16>, cudaFuncAttributeMaxDynamicSharedMemorySize, mma::kSmemBytes));
  for (const ImageTable& table : tables) {
    AssignBlocks blocks;
    const int grid = work_list(table, mma::kBlockRows, mma::kBlockCols, splits, &blocks);
    if (grid == 0) continue;
    assign_mma_kernel<kBf16><<<grid, mma::kThreads, mma::kSmemBytes, stream>>>(x, dim, vectorized, keep_idx, inv_norms,
                                                                               pow2s, table, blocks, splits, partials);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

void launch_assign_fma(const at::Tensor& tokens, const std::vector<ImageTable>& tables, const int64_t* keep_idx,
                       const float* inv_norms, const float* pow2s, int splits, AssignPartials partials,
                       cudaStream_t stream) {
  const int64_t dim = tokens.size(1);
  const float* x = tokens.const_data_ptr<float>();
  const bool vectorized = vectorizable(dim, sizeof(float), x);
  for (const ImageTable& table : tables) {
    AssignBlocks blocks;
    const int grid = work_list(table, fma::kBlockRows, fma::kBlockCols, splits, &blocks);
    if (grid == 0) continue;
    assign_fma_kernel<<<grid, fma::kThreads, 0, stream>>>(x, dim, vectorized, keep_idx, inv_norms, pow2s, table, blocks,
                                                          splits, partials);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace

void launch_merge_tokens(const at::Tensor& tokens, const Images& im, const int64_t* keep_idx, double merge_weight,
                         const float* inv_norms, const float* pow2s, at::Tensor& merged, int64_t* assign) {
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t n = tokens.size(0), dim = tokens.size(1), k = im.kept_begin.back(), dropped = n - k;
  const auto int_options = tokens.options().dtype(at::kInt);
  at::Tensor norms;
  if (inv_norms == nullptr) {  // [0, n): inv_norms, [n, 2n): pow2s
    norms = at::empty({2 * n}, tokens.options().dtype(at::kFloat));
    launch_score_tokens(tokens, nullptr, im, nullptr, nullptr, norms.data_ptr<float>(), norms.data_ptr<float>() + n);
    inv_norms = norms.const_data_ptr<float>();
    pow2s = inv_norms + n;
  }
  const std::vector<ImageTable> tables = image_tables(im);
  const bool fp32 = tokens.scalar_type() == at::kFloat;

  int splits = 1;
  const int block_cols = fp32 ? fma::kBlockCols : mma::kBlockCols;
  at::Tensor part_value, part_index;
  AssignPartials partials{nullptr, nullptr, dropped};
  if (dropped > 0) {
    splits = fp32 ? launch_splits(im, fma::kBlockRows, fma::kBlockCols)
                  : launch_splits(im, mma::kBlockRows, mma::kBlockCols);
    part_value = at::empty({splits * dropped}, tokens.options().dtype(at::kFloat));
    part_index = at::empty({splits * dropped}, int_options);
    partials.value = part_value.data_ptr<float>();
    partials.index = part_index.data_ptr<int>();
    switch (tokens.scalar_type()) {
      case at::kFloat:
        launch_assign_fma(tokens, tables, keep_idx, inv_norms, pow2s, splits, partials, stream);
        break;
      case at::kBFloat16:
        launch_assign_mma<true>(tokens, tables, keep_idx, inv_norms, pow2s, splits, partials, stream);
        break;
      case at::kHalf:
        launch_assign_mma<false>(tokens, tables, keep_idx, inv_norms, pow2s, splits, partials, stream);
        break;
      default:
        TORCH_CHECK_TYPE(false, "g2tr merge: unsupported dtype ", tokens.scalar_type());
    }
  }

  at::Tensor count = at::empty({k}, int_options), end = at::empty({k}, int_options);
  at::Tensor member = at::empty({std::max<int64_t>(dropped, 1)}, int_options);
  const MergeGroups groups{count.data_ptr<int>(), end.data_ptr<int>(), member.data_ptr<int>()};
  for (const ImageTable& table : tables) {
    // Targets run up to the padding key K itself.
    const int target_end_bit = bit_width(static_cast<uint32_t>(max_kept(table)));
    group_kernel<<<table.count, kGroupThreads, 0, stream>>>(keep_idx, table, splits, block_cols, partials,
                                                            target_end_bit, assign, groups);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  G2TR_DISPATCH_FLOAT_TYPES(tokens.scalar_type(), "g2tr_merge_rows", [&] {
    using T = typename DeviceType<scalar_t>::type;
    const T* x = reinterpret_cast<const T*>(tokens.const_data_ptr<scalar_t>());
    T* out = reinterpret_cast<T*>(merged.data_ptr<scalar_t>());
    const bool vectorized = vectorizable(dim, sizeof(T), x) && vectorizable(dim, sizeof(T), out);
    for (const ImageTable& table : tables) {
      const dim3 grid(max_kept(table), table.count);
      merge_rows_kernel<T><<<grid, kSumThreads, 0, stream>>>(x, dim, vectorized, keep_idx, table,
                                                             static_cast<float>(merge_weight), groups, out);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
}

namespace {

// The checks of every backend (checks.h). keep_idx is not validated on
// the device (that would need a sync): a bad one gives unspecified rows, never an
// out-of-bounds access; the CPU kernel raises instead.
std::tuple<at::Tensor, at::Tensor> merge_cuda(const at::Tensor& tokens_in, const at::Tensor& keep_idx_in,
                                              c10::IntArrayRef lengths, c10::IntArrayRef budgets, double merge_weight) {
  const char* op = "g2tr.merge";
  const Images im = check_merge(op, tokens_in, keep_idx_in, lengths, budgets, merge_weight);
  check_int_sizes(op, im);
  const c10::cuda::CUDAGuard guard(tokens_in.device());
  const at::Tensor tokens = tokens_in.contiguous(), keep_idx = keep_idx_in.contiguous();
  auto merged = at::empty({im.kept_begin.back(), tokens.size(1)}, tokens.options());
  auto assign = at::empty({tokens.size(0)}, keep_idx.options());
  if (im.count() > 0)
    launch_merge_tokens(tokens, im, keep_idx.const_data_ptr<int64_t>(), merge_weight, nullptr, nullptr, merged,
                        assign.data_ptr<int64_t>());
  return {merged, assign};
}

}  // namespace

TORCH_LIBRARY_IMPL(g2tr, CUDA, m) { m.impl("merge", &merge_cuda); }

}  // namespace g2tr::cuda
