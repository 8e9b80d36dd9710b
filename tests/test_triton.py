"""What is specific to the Triton kernels (g2tr_kernels/triton): their launchers called
directly (kernel-level outputs such as inverse norms, per-cell best keys and column splits),
the torch.library.triton_op ops themselves, the interpreter, and CUDA devices. The op
contract on the Triton backend is tested with every other backend in tests/test_<op>.py
(the backend_device parametrisation runs it under the interpreter on the CPU).

On the CPU they run under the Triton interpreter, which @triton.jit picks when the kernel
modules are imported: TRITON_INTERPRET=1 must be set before that (conftest.py does; so does
this module, so that it also runs alone). The interpreter is slow, so shapes stay small:
D of 16..64 and grids of a few hundred tokens, but the geometry of the real workloads.

Selection is integer logic and must equal the reference exactly on the same scores. Scores
are fp32 sums in another order, so the checks are tie-aware (g2tr_kernels.testing); the
ternary workloads, where every sum is exact, must match the reference bit for bit.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

import importlib  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import textwrap  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

import g2tr_kernels as g2tr  # noqa: E402
from g2tr_kernels import reference  # noqa: E402
from g2tr_kernels.reference.anchor_scores import NORM_EPS  # noqa: E402
from g2tr_kernels.reference.balanced_topk import descending_order  # noqa: E402
from g2tr_kernels.reference.budget import budget  # noqa: E402

triton = pytest.importorskip("triton")  # an optional dependency of g2tr_kernels

from helpers import (  # noqa: E402
    DTYPE_IDS,
    DTYPES,
    assert_bitwise_equal,
    assert_close_report,
    assert_merge_matches,
    assert_reduce_matches,
    make_ternary_workload,
    make_workload,
    merge_from_assign,
)

# The package's functions (reduce, merge, ...) shadow its submodules of the same name.
scores_mod = importlib.import_module("g2tr_kernels.triton.anchor_scores")
topk_mod = importlib.import_module("g2tr_kernels.triton.balanced_topk")
merge_mod = importlib.import_module("g2tr_kernels.triton.merge")
common = importlib.import_module("g2tr_kernels.triton._common")

SCORE_ATOL = 1e-5
REPO = Path(__file__).resolve().parents[1]
CUDA = torch.cuda.is_available()

# A packed batch of mixed sizes: anchors coarser than the ViT grid (12x12 over 4x4), finer
# than it (5x9 over 10x18: more cells than tokens) and K below the number of cells (20x20
# over 15x15 at ratio 0.25 keeps 100 of 225 occupied cells).
MIXED = ([(12, 12), (5, 9), (20, 20)], [(4, 4), (10, 18), (15, 15)])


def flat(pairs):
    return [v for p in pairs for v in p]


def lengths_budgets(grids, keep_ratio, min_keep):
    lengths = [h * w for h, w in grids]
    return lengths, [budget(n, keep_ratio, min_keep) for n in lengths]


# ------------------------------------------------------------------------- score kernel


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_score_kernel(dtype):
    grids, anchor_grids = MIXED
    tokens, anchors = make_workload(grids, anchor_grids, 24, dtype, seed=1)
    tokens[5] = 0.0  # a zero row: normalize's eps, score 0
    scores, cells, inv_norms, cell_best = scores_mod.score(tokens, anchors, grids, anchor_grids, True, True)
    ref_scores, ref_cells = reference.anchor_scores(tokens, anchors, grids, anchor_grids)
    assert_close_report("scores", scores, ref_scores, atol=SCORE_ATOL, rtol=0)
    assert_bitwise_equal("cells", cells, ref_cells)
    norms = tokens.float().norm(dim=1).clamp_min(NORM_EPS)
    assert_close_report("inv_norms", inv_norms, 1.0 / norms, atol=0, rtol=1e-6)

    # The per-cell best folded in by atomic_max: each cell's best token by the kernel's own
    # scores (ties to the lower index), its local index in the key's low 31 bits; cells
    # without tokens keep the initial int64 min.
    t0 = c0 = 0
    for (h, w), (ha, wa) in zip(grids, anchor_grids):
        s, c = scores[t0 : t0 + h * w], cells[t0 : t0 + h * w]
        best = {}
        for i in descending_order(s).tolist():
            best.setdefault(int(c[i]), i)
        for cell in range(ha * wa):
            key = int(cell_best[c0 + cell])
            if cell in best:
                assert 2147483647 - (key & 0x7FFFFFFF) == best[cell], f"cell {cell}: best token"
            else:
                assert key == torch.iinfo(torch.int64).min, f"empty cell {cell} got a best token"
        t0, c0 = t0 + h * w, c0 + ha * wa


# --------------------------------------------------------------------- selection kernels


def tricky_scores(n, seed):
    """Few distinct values (ties), NaN, -inf, +inf and both zeros."""
    gen = torch.Generator().manual_seed(seed)
    s = torch.randint(-3, 4, (n,), generator=gen).float() / 4
    pick = torch.randperm(n, generator=gen)
    s[pick[: n // 10]] = float("nan")
    s[pick[n // 10 : n // 10 + 3]] = float("-inf")
    s[pick[n // 10 + 3 : n // 10 + 5]] = float("inf")
    s[pick[n // 10 + 5 : n // 10 + 9]] = -0.0
    return s


@pytest.mark.parametrize("quota", [1, 2, "window"])
def test_select_kernel_exact(quota):
    lengths = [150, 7, 300, 64]
    budgets = [40, 7, 20, 63]  # K == N, K below the number of cells, nearly all
    cell_counts = [30, 3, 64, 5]
    scores = tricky_scores(sum(lengths), seed=3)
    gen = torch.Generator().manual_seed(4)
    cells = torch.cat([torch.randint(-1, c + 2, (n,), generator=gen) for n, c in zip(lengths, cell_counts)])
    # Two one-cell images where only the tie rules decide: -0.0 ties +0.0, NaN ties -inf,
    # and the lower index goes first.
    signed_zeros = torch.tensor([float("nan"), float("-inf"), -0.0, 0.0] * 4)
    nan_and_inf = torch.tensor([float("nan"), float("-inf")] * 8)
    scores = torch.cat([scores, signed_zeros, nan_and_inf])
    cells = torch.cat([cells, torch.zeros(32, dtype=torch.int64)])
    lengths, budgets, cell_counts = lengths + [16, 16], budgets + [3, 3], cell_counts + [1, 1]
    if quota == "window":
        quotas = [-(-k // c) for k, c in zip(budgets, cell_counts)]
    else:
        quotas = [quota] * len(lengths)
    got = topk_mod.select(scores, cells, lengths, budgets, cell_counts, quotas)
    want = reference.balanced_topk(scores, cells, lengths, budgets, cell_counts, quotas)
    assert_bitwise_equal("keep_idx", got, want)
    api = g2tr.balanced_topk(scores, cells, lengths, budgets, cell_counts, quota, backend="triton")
    assert_bitwise_equal("keep_idx (g2tr.balanced_topk)", api, want)


def test_select_kernel_cell_best_path():
    """Seeds from the score kernel's per-cell best equal the counted ones."""
    grids, anchor_grids = MIXED
    tokens, anchors = make_ternary_workload(grids, anchor_grids, 16, seed=5)  # many exact ties
    scores, cells, _, cell_best = scores_mod.score(tokens, anchors, grids, anchor_grids, False, True)
    lengths, budgets = lengths_budgets(grids, 0.25, 8)
    counts = [h * w for h, w in anchor_grids]
    got = topk_mod.select(scores, cells, lengths, budgets, counts, [1] * 3, cell_best)
    want = reference.balanced_topk(scores, cells, lengths, budgets, counts, [1] * 3)
    assert_bitwise_equal("keep_idx", got, want)


# ------------------------------------------------------------------------- merge kernels


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("splits,merge_weight", [(1, 1.0), (3, 0.5)])
def test_merge_kernel(dtype, splits, merge_weight):
    grids, anchor_grids = MIXED
    tokens, anchors = make_workload(grids, anchor_grids, 40, dtype, seed=6)
    tokens[10:20] = tokens[30:40]  # duplicated tokens: equal similarities, lowest kept row wins
    lengths, budgets = lengths_budgets(grids, 0.25, 8)
    scores, cells = reference.anchor_scores(tokens, anchors, grids, anchor_grids)
    keep = reference.balanced_topk(scores, cells, lengths, budgets, [h * w for h, w in anchor_grids], [1] * 3)
    merged, assign = merge_mod.merge_tokens(tokens, keep, lengths, budgets, merge_weight, splits=splits)
    assert_merge_matches("merge", tokens, keep, merged, assign, lengths, budgets, merge_weight)
    # Groups are summed in the reference's order (ascending token index, fp32) and rounded
    # once to the dtype (round to nearest even): the mean of the kernel's own assignment,
    # bit for bit.
    assert_bitwise_equal("merged", merged, merge_from_assign(tokens, keep, assign, merge_weight))


# -------------------------------------------------------------------- whole reduction


def test_ops_opcheck_fake():
    """Schemas and fake (shape) implementations of the four triton_ops."""
    grids, anchor_grids = [(6, 6), (3, 5)], [(3, 3), (2, 2)]
    tokens, anchors = make_workload(grids, anchor_grids, 16, torch.float32, seed=14)
    lengths, budgets = lengths_budgets(grids, 0.5, 4)
    scores, cells = reference.anchor_scores(tokens, anchors, grids, anchor_grids)
    keep = reference.balanced_topk(scores, cells, lengths, budgets, [9, 4], [1, 1])
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    cases = [
        (torch.ops.g2tr.triton_anchor_scores.default, (tokens, anchors, flat(grids), flat(anchor_grids))),
        (torch.ops.g2tr.triton_balanced_topk.default, (scores, cells, lengths, budgets, [9, 4], [1, 1])),
        (torch.ops.g2tr.triton_merge.default, (tokens, keep, lengths, budgets, 1.0)),
        (torch.ops.g2tr.triton_reduce.default, (tokens, anchors, flat(grids), flat(anchor_grids), 0.5, 4, 1.0)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args, test_utils=utils)


def test_ops_reject_bad_input():
    """Direct torch.ops.g2tr.triton_* callers get the same clear errors as the API."""
    tokens, anchors = make_workload([(4, 4)], [(2, 2)], 16, torch.float32, seed=18)
    with pytest.raises(ValueError, match="N = 16 rows but grids describe 20"):
        torch.ops.g2tr.triton_reduce(tokens, anchors, [4, 5], [2, 2], 0.5, 4, 1.0)
    with pytest.raises(ValueError, match="keep_ratio"):
        torch.ops.g2tr.triton_reduce(tokens, anchors, [4, 4], [2, 2], 1.5, 4, 1.0)
    with pytest.raises(ValueError, match="budgets\\[0\\] \\(image 0\\)"):
        torch.ops.g2tr.triton_merge(tokens, torch.arange(17), [16], [17], 1.0)
    with pytest.raises(TypeError, match="cells must be a 1-D int64"):
        torch.ops.g2tr.triton_balanced_topk(tokens[:, 0].contiguous(), torch.zeros(16, dtype=torch.int32), [16], [4],
                                           [4], [1])


def test_compile_under_interpreter_raises():
    """torch.compile cannot trace interpreted kernels: a clear error, never a graph without them."""
    if not common.interpreted():
        pytest.skip("kernels are compiled for the GPU in this process (TRITON_INTERPRET unset)")
    grids, anchor_grids = [(4, 4)], [(2, 2)]
    tokens, anchors = make_workload(grids, anchor_grids, 16, torch.float32, seed=15)
    compiled = torch.compile(torch.ops.g2tr.triton_anchor_scores, backend="aot_eager", fullgraph=True)
    with pytest.raises(Exception, match="TRITON_INTERPRET"):
        compiled(tokens, anchors, [4, 4], [2, 2])


def _run_without_interpreter(code: str) -> subprocess.CompletedProcess:
    """Runs code in a fresh interpreter where TRITON_INTERPRET is unset (TESTS: this folder).

    The package this process imported comes first on the child's path (a build outside the
    tree, as tools/gpu_check.sh makes, must not be shadowed by the sources in REPO)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    package_root = str(Path(g2tr.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in [package_root, env.get("PYTHONPATH", ""), str(REPO)] if p)
    code = f"TESTS = {str(Path(__file__).resolve().parent)!r}\n" + textwrap.dedent(code)
    # cwd: the tests folder, so that the "" entry of sys.path (python -c) finds no package either.
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                          cwd=str(Path(__file__).resolve().parent))


def test_cpu_tensors_without_interpreter_raise():
    result = _run_without_interpreter(
        """
        import torch, g2tr_kernels as g2tr
        try:
            g2tr.reduce(torch.randn(4, 8), torch.randn(1, 8), [(2, 2)], [(1, 1)], backend="triton")
        except RuntimeError as error:
            print("ERROR:", error)
        """
    )
    assert result.returncode == 0, result.stderr
    assert "ERROR:" in result.stdout and "TRITON_INTERPRET=1" in result.stdout, result.stdout + result.stderr


# ------------------------------------------------------------------------------- CUDA


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_reduce_on_device(device):
    if device == "cuda" and not CUDA:
        pytest.skip("no CUDA device")
    grids, anchor_grids = [(9, 9), (6, 4)], [(3, 3), (12, 8)]
    tokens, anchors = make_workload(grids, anchor_grids, 32, torch.bfloat16, seed=16, device=device)
    out = g2tr.reduce(tokens, anchors, grids, anchor_grids, 0.5, 4, backend="triton")
    assert all(t.device.type == device for t in out)
    assert_reduce_matches(out, tokens, anchors, grids, anchor_grids, 0.5, 4, name=f"triton on {device}")


@pytest.mark.skipif(not CUDA, reason="no CUDA device: torch.compile of the Triton ops needs real kernels")
def test_compile_fullgraph_cuda():
    """Compiled on a GPU (in a process without the interpreter): same outputs as eager,
    bit for bit, and as the reference (tie-aware); reduce at SHAPES.md scale included."""
    result = _run_without_interpreter(
        """
        import sys, torch
        sys.path.insert(0, TESTS)
        import g2tr_kernels as g2tr, g2tr_kernels.triton
        from helpers import assert_outputs_bitwise_equal, assert_reduce_matches, make_workload

        op = torch.ops.g2tr.triton_reduce
        compiled = torch.compile(lambda *a: op(*a), fullgraph=True)
        for grids, anchor_grids, d, dtype in [
            ([(37, 37), (16, 16)], [(16, 16), (32, 32)], 64, torch.float32),
            ([(70, 70), (52, 70), (27, 27)], [(32, 32), (24, 32), (16, 16)], 256, torch.bfloat16),
        ]:
            tokens, anchors = make_workload(grids, anchor_grids, d, dtype, seed=17, device="cuda")
            flat = lambda p: [v for pair in p for v in pair]
            args = (tokens, anchors, flat(grids), flat(anchor_grids), 0.5, 32, 1.0)
            eager = g2tr.ReduceOutput(*op(*args))
            assert_reduce_matches(eager, tokens, anchors, grids, anchor_grids, name="cuda eager")
            assert_outputs_bitwise_equal("compiled vs eager", g2tr.ReduceOutput(*compiled(*args)), eager)
            assert_outputs_bitwise_equal("eager run-to-run", g2tr.ReduceOutput(*op(*args)), eager)
        print("OK")
        """
    )
    assert result.returncode == 0 and "OK" in result.stdout, result.stdout + result.stderr
