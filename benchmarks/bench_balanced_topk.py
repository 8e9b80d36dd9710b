"""g2tr.balanced_topk (stage III select) against plain torch.topk / torch.sort selection."""
import torch

from g2tr_kernels import ops
from g2tr_kernels.bench import peers

PEERS = ("torch.topk", "torch.sort")


def test_balanced_topk(problem, backend, measure):
    p = problem
    scores = p.ref.scores
    if backend in PEERS:
        select = peers.topk_select if backend == "torch.topk" else peers.sort_select
        fn = lambda: select(scores, p.lengths, p.budgets)  # noqa: E731
        keep_idx = fn()
        # A different rule (no per-cell seeds): each image keeps K of its own tokens, its K best.
        assert keep_idx.shape == p.ref.keep_idx.shape
        t0 = k0 = 0
        for n, k in zip(p.lengths, p.budgets):
            kept = keep_idx[k0 : k0 + k]
            assert bool(((kept >= t0) & (kept < t0 + n)).all())
            assert torch.equal(torch.sort(scores[kept]).values, torch.sort(torch.topk(scores[t0 : t0 + n], k).values).values)
            t0 += n
            k0 += k
    else:
        fn = lambda: ops.balanced_topk(scores, p.cells, p.lengths, p.budgets, p.cell_counts, backend=backend)  # noqa: E731
        assert torch.equal(fn(), p.ref.keep_idx)
    measure(p, "balanced_topk", backend, fn)
