// The op schemas of torch.ops.g2tr. Kernels register per dispatch key in csrc/cpu and
// csrc/cuda (one file per op); fake kernels for torch.compile sit with each op's record in
// g2tr_kernels/_registry.py. The schema of `reduce` is fixed: outside code calls it as written.
// What each op computes is docs/SPEC.md (the section named per op) and g2tr_kernels/reference/<op>.py.
#include <torch/library.h>

TORCH_LIBRARY(g2tr, m) {
  // Stage III score (SPEC.md §3): fp32 scores and local cell ids.
  m.def(
      "anchor_scores(Tensor tokens, Tensor anchors, int[] grids, int[] anchor_grids) -> (Tensor scores, Tensor cells)");
  // Stage III select (SPEC.md §3) with any fp32 score and per-image cell quotas; returns
  // global kept indices, ascending.
  m.def(
      "balanced_topk(Tensor scores, Tensor cells, int[] lengths, int[] budgets, int[] cell_counts, int[] cell_quotas) "
      "-> Tensor keep_idx");
  // Stage IV merge (SPEC.md §4) for any keep set.
  m.def(
      "merge(Tensor tokens, Tensor keep_idx, int[] lengths, int[] budgets, float merge_weight=1.0) -> (Tensor merged, "
      "Tensor assign)");
  // The three stages in one call (SPEC.md §6).
  m.def(
      "reduce(Tensor tokens, Tensor anchors, int[] grids, int[] anchor_grids, float keep_ratio=0.5, int min_keep=32, "
      "float merge_weight=1.0) -> (Tensor merged, Tensor keep_idx, Tensor cu_seqlens, Tensor scores, Tensor assign)");
}
