"""Shared test utilities: workloads, a literal SPEC.md selection, the parametrisations, and
the form of each op's sample and bad inputs (declared in tests/test_<op>.py, read by
test_library.py and test_errors.py through op_records()).

The tolerance table and the tie-aware comparisons with the reference (assert_*_matches,
with a report of where and by how much) are g2tr_kernels.testing, which benchmarks/ and
`g2tr bench` use too; they are re-exported here for the test files.
"""
from __future__ import annotations

import importlib
import math
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple, Type

import pytest
import torch

from g2tr_kernels import _native
from g2tr_kernels._registry import NAMES
from g2tr_kernels.testing import (  # noqa: F401  (re-exported for the test files)
    MERGED_TOL,
    SCORE_ATOL,
    SIM_TOL,
    assert_bitwise_equal,
    assert_close_report,
    assert_merge_matches,
    assert_outputs_bitwise_equal,
    assert_reduce_matches,
    assert_selection_matches,
    bits,
    check_structure,
    cosine64,
    image_of,
    lengths_of,
    merge_from_assign,
    mismatch_report,
    offsets,
)

SELECT_MAX_TOKENS = 8192  # kSelectMaxTokens in csrc/cuda/kernels/balanced_topk.cuh: the CUDA selection's capacity
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DTYPE_IDS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}

Pairs = List[Tuple[int, int]]

# Small versions of the SHAPES.md workloads: same grids and anchor grids (the geometry is
# what the selection sees), fewer images where the count only repeats, and a small D.
WORKLOADS: Dict[str, Tuple[Pairs, Pairs, int]] = {
    "S1": ([(16, 16)] * 4, [(32, 32)] * 4, 64),
    "S2": ([(37, 37)] * 2, [(16, 16)] * 2, 96),
    "M1": ([(70, 70)], [(32, 32)], 128),
    "M2": (
        [(70, 70), (52, 70), (70, 52), (39, 70), (37, 37), (27, 27)],
        [(32, 32), (24, 32), (32, 24), (18, 32), (16, 16), (16, 16)],
        64,
    ),
    "L2": (
        [(70, 70), (52, 70), (70, 52), (39, 70)] * 2,
        [(32, 32), (24, 32), (32, 24), (18, 32)] * 2,
        32,
    ),
}


# ---------------------------------------------------------------------------- workloads


def make_workload(grids, anchor_grids, d, dtype=torch.float32, seed=0, device="cpu", correlated=True):
    """Random packed tokens [N, D] and anchors [M, D].

    correlated=True makes each token lean towards the anchor of its cell (as real ViT tokens
    lean towards the VAE content), so scores spread over (-1, 1) instead of clustering at 0.
    """
    gen = torch.Generator().manual_seed(seed)
    n = sum(h * w for h, w in grids)
    m = sum(h * w for h, w in anchor_grids)
    anchors = torch.randn(m, d, generator=gen)
    tokens = torch.randn(n, d, generator=gen)
    if correlated and n:
        lean = torch.rand(n, 1, generator=gen) * 2.0
        tokens += lean * anchors[global_cells(grids, anchor_grids)]
    return tokens.to(dtype).to(device), anchors.to(dtype).to(device)


def make_ternary_workload(grids, anchor_grids, d=16, dtype=torch.float32, seed=0, device="cpu", nonzeros=4):
    """Rows of +-1 in `nonzeros` places and 0 elsewhere: with 4 of them every norm is 2, every
    cosine is a multiple of 1/4 and every sum is exact in any order. Ties everywhere, and all
    backends must agree on them bit for bit."""
    gen = torch.Generator().manual_seed(seed)

    def rows(count):
        out = torch.zeros(count, d)
        if count:
            where = torch.rand(count, d, generator=gen).argsort(dim=1)[:, :nonzeros]
            signs = torch.randint(0, 2, (count, nonzeros), generator=gen).float() * 2 - 1
            out.scatter_(1, where, signs)
        return out

    tokens = rows(sum(h * w for h, w in grids))
    anchors = rows(sum(h * w for h, w in anchor_grids))
    return tokens.to(dtype).to(device), anchors.to(dtype).to(device)


def spec_cells(h: int, w: int, h_a: int, w_a: int) -> List[int]:
    """SPEC.md §3 cell map, written out in plain Python."""
    out = []
    for i in range(h * w):
        r, c = divmod(i, w)
        a_r = min(r * h_a // h, h_a - 1)
        a_c = min(c * w_a // w, w_a - 1)
        out.append(a_r * w_a + a_c)
    return out


def local_cells(grids, anchor_grids) -> torch.Tensor:
    """Cell id of every packed token, local to its image (what anchor_scores returns)."""
    out = []
    for (h, w), (h_a, w_a) in zip(grids, anchor_grids):
        out.extend(spec_cells(h, w, h_a, w_a))
    return torch.tensor(out, dtype=torch.int64)


def global_cells(grids, anchor_grids) -> torch.Tensor:
    """Packed anchor row of every token."""
    out, a0 = [], 0
    for (h, w), (h_a, w_a) in zip(grids, anchor_grids):
        out.extend(c + a0 for c in spec_cells(h, w, h_a, w_a))
        a0 += h_a * w_a
    return torch.tensor(out, dtype=torch.int64)


def spec_budget(n: int, keep_ratio: float, min_keep: int) -> int:
    return min(n, max(min_keep, round(n * keep_ratio)))


def spec_selection(scores: Sequence[float], cells: Sequence[int], k: int, num_cells: int) -> List[int]:
    """SPEC.md §3 selection of one image in its own words (quota 1), as an independent check
    of the reference's one-pass formulation: the best token of every occupied cell; the cells
    ranked by that best score; seeds of the top min(K, #occupied); fill with the best of the
    rest. Ties to the lower index, NaN below everything. Returns local indices, ascending."""

    def key(i):
        s = float(scores[i])
        return (-(s if s == s else -math.inf), i)

    best: Dict[int, int] = {}
    for i in sorted(range(len(scores)), key=key):
        c = int(cells[i])
        if 0 <= c < num_cells and c not in best:
            best[c] = i
    seeds = sorted(best.values(), key=key)[: min(k, len(best))]
    taken = set(seeds)
    for i in sorted(range(len(scores)), key=key):
        if len(taken) >= k:
            break
        taken.add(i)
    return sorted(taken)


def occupied_cells(grids, anchor_grids) -> List[int]:
    return [len(set(spec_cells(h, w, ha, wa))) for (h, w), (ha, wa) in zip(grids, anchor_grids)]


def dtype_id(dtype: Optional[torch.dtype]) -> str:
    return DTYPE_IDS.get(dtype, str(dtype))


# ---------------------------------------------------------------------------- backends


def _triton_missing() -> Optional[str]:
    try:
        import triton  # noqa: F401
    except ImportError as error:
        return f"triton is not installed ({error})"
    return None


def _backend(backend: str, device: str, missing: Optional[str] = None):
    return pytest.param(backend, device, id=f"{backend}-{device}",
                        marks=[pytest.mark.skip(reason=missing)] if missing else [])


CUDA = torch.cuda.is_available()
# (backend, device) pairs every handcrafted case runs on: the oracle itself and each kernel,
# the Triton kernels under the interpreter on the CPU (conftest.py switches it on). The CUDA
# pairs exist where a GPU does (no wall of skips on a CPU machine); a pair is skipped only
# where its package (triton) is absent.
BACKEND_DEVICES = [
    _backend("reference", "cpu"),
    _backend("cpu", "cpu"),
    _backend("triton", "cpu", _triton_missing()),
] + ([
    _backend("reference", "cuda"),
    _backend("cuda", "cuda", None if _native.loaded() and "cuda" in _native.compiled_backends()
             else "this build of g2tr_kernels has no CUDA kernels (G2TR_BUILD_CUDA=1)"),
    _backend("triton", "cuda", _triton_missing()),
] if CUDA else [])
BACKEND_DEVICE_IDS = [p.id for p in BACKEND_DEVICES]
# The kernels compared with the reference on the SHAPES.md geometries: too large for the
# Triton interpreter (test_triton.py runs the same comparisons on smaller shapes).
KERNEL_DEVICES = [p for p in BACKEND_DEVICES if p.values[0] != "reference" and p.id != "triton-cpu"]
# The parametrizations the op test files share.
backend_device = pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
kernel_device = pytest.mark.parametrize("kernel,device", KERNEL_DEVICES)
dtypes = pytest.mark.parametrize("dtype", DTYPES, ids=[DTYPE_IDS[d] for d in DTYPES])


def tiny_vae():
    """A random-weight AutoencoderKL from a config (nothing downloaded); it downsamples by 2."""
    AutoencoderKL = pytest.importorskip("diffusers").AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=4, sample_size=32,
    ).eval()


# ---------------------------------------------------------------------------- per-op inputs

# Every op's test file, tests/test_<op>.py, declares next to its tests:
#   opcheck_samples()  valid schema arguments (tuples) for torch.library.opcheck (test_library.py);
#   valid_args()       a dict of valid arguments, keyed by the API's names in schema order, that
#                      each bad-input case edits (test_errors.py calls the API with it as keywords
#                      and torch.ops.g2tr.<op> with its values in order);
#   ERROR_CASES        the bad-input cases, run through every backend, the raw op and the fake kernel.


class Case(NamedTuple):
    id: str
    changes: Callable[[Dict], None]  # edits the valid arguments in place
    error: Type[Exception]
    fragments: Sequence[str]  # every one must appear in the message
    ops_error: Optional[Type[Exception]] = None  # when torch.ops raises something else
    ops_fragments: Optional[Sequence[str]] = None
    python_only: bool = False  # argument forms that only the Python API accepts
    reads_data: bool = False  # the check needs the values: no fake/meta kernel can make it


def setter(**values):
    def change(args):
        args.update(values)

    return change


def tensor_setter(name, fn):
    def change(args):
        args[name] = fn(args[name])

    return change


DTYPE_WORDS = ["float32, float16 or bfloat16"]


def op_records() -> Dict[str, object]:
    """{op: its test module}, for every op of the registry (tests/ is on sys.path)."""
    return {name: importlib.import_module(f"test_{name}") for name in NAMES}
