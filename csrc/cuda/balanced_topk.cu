// Stage III select on CUDA: torch.ops.g2tr.balanced_topk for the CUDA dispatch key, and the
// selection launcher reduce uses (kernels/balanced_topk.cuh: one block per image).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "kernels/balanced_topk.cuh"
#include "launch.cuh"

namespace g2tr::cuda {

void check_select_capacity(const char* op, const Images& im) {
  for (int64_t b = 0; b < im.count(); ++b)
    TORCH_CHECK_VALUE(im.length(b) <= kSelectMaxTokens, op, ": image ", b, " has ", im.length(b),
                      " tokens, but the CUDA selection sorts each image inside one thread block and takes at most ",
                      kSelectMaxTokens, " tokens per image; run this batch on the CPU or split the image");
}

void launch_select_tokens(const float* scores, const int64_t* cells, const Images& im, c10::IntArrayRef cell_counts,
                          c10::IntArrayRef quotas, int64_t* keep_idx, int32_t* cu_seqlens) {
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  for (const ImageTable& table : image_tables(im, cell_counts, quotas)) {
    int max_cells = 1;
    for (int i = 0; i < table.count; ++i) max_cells = std::max(max_cells, table.cell_count[i]);
    // Keys run up to the sentinel cell_count itself.
    const int cell_end_bit = bit_width(static_cast<uint32_t>(max_cells));
    if (max_length(table) <= SelectSmall::kCapacity) {
      select_tokens_kernel<SelectSmall>
          <<<table.count, SelectSmall::kThreads, 0, stream>>>(scores, cells, table, cell_end_bit, keep_idx, cu_seqlens);
    } else {
      select_tokens_kernel<SelectLarge>
          <<<table.count, SelectLarge::kThreads, 0, stream>>>(scores, cells, table, cell_end_bit, keep_idx, cu_seqlens);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

namespace {

// The checks of every backend (checks.h), then the CUDA capacity.
at::Tensor balanced_topk_cuda(const at::Tensor& scores_in, const at::Tensor& cells_in, c10::IntArrayRef lengths,
                              c10::IntArrayRef budgets, c10::IntArrayRef cell_counts, c10::IntArrayRef cell_quotas) {
  const char* op = "g2tr.balanced_topk";
  const Images im = check_balanced_topk(op, scores_in, cells_in, lengths, budgets, cell_counts, cell_quotas);
  check_int_sizes(op, im);
  check_select_capacity(op, im);
  const c10::cuda::CUDAGuard guard(scores_in.device());
  const at::Tensor scores = scores_in.contiguous(), cells = cells_in.contiguous();
  auto keep_idx = at::empty({im.kept_begin.back()}, cells.options());
  if (im.count() > 0)
    launch_select_tokens(scores.const_data_ptr<float>(), cells.const_data_ptr<int64_t>(), im, cell_counts, cell_quotas,
                         keep_idx.data_ptr<int64_t>(), nullptr);
  return keep_idx;
}

}  // namespace

TORCH_LIBRARY_IMPL(g2tr, CUDA, m) { m.impl("balanced_topk", &balanced_topk_cuda); }

}  // namespace g2tr::cuda
