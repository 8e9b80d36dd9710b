"""g2tr.merge (stage IV) against FAISS exact inner-product search + index_add, on the reference keep set."""
from g2tr_kernels import ops
from g2tr_kernels.bench import peers

PEERS = ("faiss",) if peers.faiss_available() else ()
CPU_ONLY_PEERS = ("faiss",)


def test_merge(problem, backend, measure, merge_check):
    p = problem
    keep_idx = p.ref.keep_idx
    if backend == "faiss":
        fn = lambda: peers.faiss_merge(p.tokens, keep_idx, p.lengths, p.budgets)  # noqa: E731
    else:
        fn = lambda: ops.merge(p.tokens, keep_idx, p.lengths, p.budgets, backend=backend)  # noqa: E731
    merged, assign = fn()
    merge_check(p, keep_idx, assign, merged)
    measure(p, "merge", backend, fn)
