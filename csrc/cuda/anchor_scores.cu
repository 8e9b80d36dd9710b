// Stage III score on CUDA: torch.ops.g2tr.anchor_scores for the CUDA dispatch key, and the
// scoring launcher that reduce and merge share (kernels/anchor_scores.cuh).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "kernels/anchor_scores.cuh"
#include "launch.cuh"

namespace g2tr::cuda {

void launch_score_tokens(const at::Tensor& tokens, const at::Tensor* anchors, const Images& im, float* scores,
                         int64_t* cells, float* inv_norms, float* pow2s) {
  const int64_t dim = tokens.size(1);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  G2TR_DISPATCH_FLOAT_TYPES(tokens.scalar_type(), "g2tr_score_tokens", [&] {
    using T = typename DeviceType<scalar_t>::type;
    const T* x = reinterpret_cast<const T*>(tokens.const_data_ptr<scalar_t>());
    const T* a = anchors != nullptr ? reinterpret_cast<const T*>(anchors->const_data_ptr<scalar_t>()) : nullptr;
    const bool vectorized = vectorizable(dim, sizeof(T), x) && (a == nullptr || vectorizable(dim, sizeof(T), a));
    for (const ImageTable& table : image_tables(im)) {
      const dim3 grid((max_length(table) + kScoreWarps - 1) / kScoreWarps, table.count);
      if (a != nullptr) {
        score_tokens_kernel<T, true>
            <<<grid, kScoreThreads, 0, stream>>>(x, a, dim, vectorized, table, scores, cells, inv_norms, pow2s);
      } else {
        score_tokens_kernel<T, false><<<grid, kScoreThreads, 0, stream>>>(x, nullptr, dim, vectorized, table, nullptr,
                                                                          nullptr, inv_norms, pow2s);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
}

namespace {

std::tuple<at::Tensor, at::Tensor> anchor_scores_cuda(const at::Tensor& tokens_in, const at::Tensor& anchors_in,
                                                      c10::IntArrayRef grids, c10::IntArrayRef anchor_grids) {
  const char* op = "g2tr.anchor_scores";
  const Images im = check_images(op, tokens_in, anchors_in, grids, anchor_grids);
  check_int_sizes(op, im);
  const c10::cuda::CUDAGuard guard(tokens_in.device());
  const at::Tensor tokens = tokens_in.contiguous(), anchors = anchors_in.contiguous();
  auto scores = at::empty({tokens.size(0)}, tokens.options().dtype(at::kFloat));
  auto cells = at::empty({tokens.size(0)}, tokens.options().dtype(at::kLong));
  if (tokens.size(0) > 0)
    launch_score_tokens(tokens, &anchors, im, scores.data_ptr<float>(), cells.data_ptr<int64_t>(), nullptr, nullptr);
  return {scores, cells};
}

}  // namespace

TORCH_LIBRARY_IMPL(g2tr, CUDA, m) { m.impl("anchor_scores", &anchor_scores_cuda); }

}  // namespace g2tr::cuda
