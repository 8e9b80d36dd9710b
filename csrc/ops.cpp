// The op schemas of torch.ops.g2tr. Kernels register per dispatch key in csrc/cpu and
// csrc/cuda (one file per op); fake kernels for torch.compile live in
// g2tr_kernels/_fake.py. The schema of `reduce` is fixed: outside code calls it as written.
#include <torch/library.h>

TORCH_LIBRARY(g2tr, m) {
  // Stage III score: cosine of each token with its cell's anchor (fp32), and the local
  // cell id of each token.
  m.def(
      "anchor_scores(Tensor tokens, Tensor anchors, int[] grids, int[] anchor_grids) -> (Tensor scores, Tensor cells)");
  // Stage III select: per image, up to cell_quotas[b] tokens per cell in descending score
  // order, then fill to budgets[b]. Any fp32 score; cells outside [0, cell_counts[b])
  // take part in the fill only. Returns global kept indices, ascending.
  m.def(
      "balanced_topk(Tensor scores, Tensor cells, int[] lengths, int[] budgets, int[] cell_counts, int[] cell_quotas) "
      "-> Tensor keep_idx");
  // Stage IV: every dropped token joins its most similar kept token of the same image;
  // merged row = (merge_weight * v_k + sum v_j) / (merge_weight + n_k).
  m.def(
      "merge(Tensor tokens, Tensor keep_idx, int[] lengths, int[] budgets, float merge_weight=1.0) -> (Tensor merged, "
      "Tensor assign)");
  // The three stages in one call (SPEC.md §6).
  m.def(
      "reduce(Tensor tokens, Tensor anchors, int[] grids, int[] anchor_grids, float keep_ratio=0.5, int min_keep=32, "
      "float merge_weight=1.0) -> (Tensor merged, Tensor keep_idx, Tensor cu_seqlens, Tensor scores, Tensor assign)");
}
