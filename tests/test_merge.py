"""g2tr_kernels.merge: every dropped token joins its most similar kept token of the same
image; merged = (merge_weight * v_k + sum v_j) / (merge_weight + n_k), in fp32."""
import pytest
import torch

import g2tr_kernels as g2tr
from g2tr_kernels import reference
from g2tr_kernels.reference.budget import budget

from helpers import (
    DTYPE_WORDS,
    MERGED_TOL,
    Case,
    assert_bitwise_equal,
    assert_close_report,
    assert_merge_matches,
    backend_device,
    dtypes,
    kernel_device,
    lengths_of,
    make_ternary_workload,
    merge_from_assign,
    offsets,
    setter,
    tensor_setter,
)

NAN, INF = float("nan"), float("inf")


def run(backend, device, rows, keep, lengths, budgets, merge_weight=1.0, dtype=torch.float32):
    tokens = torch.tensor(rows, dtype=dtype, device=device)
    keep_idx = torch.tensor(keep, dtype=torch.int64, device=device)
    merged, assign = g2tr.merge(tokens, keep_idx, lengths, budgets, merge_weight, backend=backend)
    return merged.cpu(), assign.tolist()


@backend_device
@pytest.mark.parametrize("merge_weight,row1", [(1.0, [0.0, 2 / 3]), (3.0, [0.4, 0.8]), (0.5, [-0.2, 0.6])])
def test_by_hand(backend, device, merge_weight, row1):
    # Kept 0 = [1, 0] and 2 = [1, 1]. Token 1 [0, 1]: cos 0 vs .707 -> row 1;
    # token 3 [-1, 0]: cos -1 vs -.707 -> row 1. Row 1 = (w [1, 1] + [0, 1] + [-1, 0]) / (w + 2).
    merged, assign = run(backend, device, [[1, 0], [0, 1], [1, 1], [-1, 0]], [0, 2], [4], [2], merge_weight)
    assert assign == [0, 1, 1, 1]
    torch.testing.assert_close(merged, torch.tensor([[1.0, 0.0], row1]), atol=1e-6, rtol=1e-6)


@backend_device
def test_ties_go_to_the_lower_kept_index(backend, device):
    # Kept 1 and 3 are the same vector: token 0 (cos .707 to both) and token 2 (cos 0 to
    # both) join the lower one, row 0.
    merged, assign = run(backend, device, [[1, 1], [1, 0], [0, 1], [1, 0]], [1, 3], [4], [2])
    assert assign == [0, 0, 0, 1]
    torch.testing.assert_close(merged, torch.tensor([[2 / 3, 2 / 3], [1.0, 0.0]]), atol=1e-6, rtol=1e-6)


@backend_device
def test_nan_never_wins(backend, device):
    # Kept 0 is NaN: even the token at cos -1 with kept 1 prefers kept 1. A NaN dropped
    # token has no finite similarity at all and joins the first kept row.
    merged, assign = run(backend, device, [[NAN, 0], [1, 0], [1, 1], [-1, 0], [NAN, NAN]], [0, 1], [5], [2])
    assert assign == [0, 1, 1, 1, 0]
    assert torch.isnan(merged[0]).all()
    torch.testing.assert_close(merged[1], torch.tensor([1 / 3, 1 / 3]), atol=1e-6, rtol=1e-6)


@backend_device
def test_zero_vectors(backend, device):
    # A zero vector has cosine 0 with everything (normalize's eps): token 2 [-1, 0] prefers
    # the zero kept token (0) to kept 1 (-1); the dropped zero token ties and takes row 0.
    merged, assign = run(backend, device, [[0, 0], [1, 0], [-1, 0], [0, 0]], [0, 1], [4], [2])
    assert assign == [0, 1, 0, 0]
    torch.testing.assert_close(merged, torch.tensor([[-1 / 3, 0.0], [1.0, 0.0]]), atol=1e-6, rtol=1e-6)


@backend_device
def test_merging_stays_inside_each_image(backend, device):
    # Image 1's dropped tokens [1, 0] are copies of image 0's kept token 0 (cos 1), yet they
    # join image 1's only kept token (cos 0); indices and rows are global.
    rows = [[1, 0], [0, 1], [0, 1], [0, 1], [1, 0], [1, 0]]
    merged, assign = run(backend, device, rows, [0, 1, 3], [3, 3], [2, 1])
    assert assign == [0, 1, 1, 2, 2, 2]
    torch.testing.assert_close(merged, torch.tensor([[1.0, 0.0], [0.0, 1.0], [2 / 3, 1 / 3]]))


@backend_device
def test_sums_in_fp32_whatever_the_dtype(backend, device):
    # 256 + 256 ones: a bf16 running sum sticks at 256 (257 is not representable), fp32
    # gives 512, and 512 / 257 rounds once to bf16.
    rows = [[256.0, 256.0]] + [[1.0, 1.0]] * 256
    merged, assign = run(backend, device, rows, [0], [257], [1], dtype=torch.bfloat16)
    assert assign == [0] * 257
    assert_bitwise_equal("merged", merged, torch.full((1, 2), 512 / 257).to(torch.bfloat16))


@backend_device
@dtypes
def test_keep_everything_is_the_identity(backend, device, dtype):
    tokens = torch.randn(40, 12, generator=torch.Generator().manual_seed(0)).to(dtype).to(device)
    merged, assign = g2tr.merge(tokens, torch.arange(40, device=device), [15, 25], [15, 25], backend=backend)
    assert_bitwise_equal("merged", merged, tokens)
    assert assign.tolist() == list(range(40))


@backend_device
@pytest.mark.parametrize("merge_weight", [1.0, 0.5, 3.0])
def test_single_kept_token_absorbs_the_image(backend, device, merge_weight):
    tokens = torch.randn(30, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    merged, assign = g2tr.merge(tokens.float().to(device), torch.tensor([7, 10], device=device), [10, 20], [1, 1],
                                merge_weight, backend=backend)
    assert assign.tolist() == [0] * 10 + [1] * 20
    x = tokens.float().double()
    want = torch.stack([(merge_weight * x[7] + x[:10].sum(0) - x[7]) / (merge_weight + 9),
                        (merge_weight * x[10] + x[10:].sum(0) - x[10]) / (merge_weight + 19)])
    torch.testing.assert_close(merged.cpu().double(), want, atol=1e-5, rtol=1e-5)


def _random_keep(lengths, seed):
    gen = torch.Generator().manual_seed(seed)
    budgets, keep, start = [], [], 0
    for n in lengths:
        k = int(torch.randint(1, n + 1, (1,), generator=gen))
        keep.append(torch.sort(torch.randperm(n, generator=gen)[:k]).values + start)
        budgets.append(k)
        start += n
    return torch.cat(keep), budgets


@kernel_device
@dtypes
@pytest.mark.parametrize("merge_weight", [1.0, 0.5, 3.0])
@pytest.mark.parametrize("seed", range(4))
def test_arbitrary_keep_sets_match_reference(dtype, merge_weight, seed, kernel, device):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 300, (int(torch.randint(1, 5, (1,), generator=gen)),), generator=gen).tolist()
    d = int(torch.randint(1, 130, (1,), generator=gen))
    tokens = torch.randn(sum(lengths), d, generator=gen).to(dtype).to(device)
    keep, budgets = _random_keep(lengths, seed)
    keep = keep.to(device)
    merged, assign = g2tr.merge(tokens, keep, lengths, budgets, merge_weight, backend=kernel)
    assert_merge_matches(f"seed {seed} d {d}", tokens.cpu(), keep.cpu(), merged, assign, lengths, budgets, merge_weight)


@kernel_device
@dtypes
@pytest.mark.parametrize("merge_weight", [1.0, 3.0])
def test_exact_ties_are_bitwise_equal(dtype, merge_weight, kernel, device):
    # +-1 rows with 4 nonzeros: all similarities are exact multiples of 1/4, ties abound,
    # and the kernel must resolve every one exactly as the reference does.
    gen = torch.Generator().manual_seed(2)
    lengths = [256, 100, 333]
    n, d = sum(lengths), 16
    rows = torch.zeros(n, d)
    rows.scatter_(1, torch.rand(n, d, generator=gen).argsort(1)[:, :4],
                  torch.randint(0, 2, (n, 4), generator=gen).float() * 2 - 1)
    tokens = rows.to(dtype).to(device)
    keep, budgets = _random_keep(lengths, 5)
    keep = keep.to(device)
    got = g2tr.merge(tokens, keep, lengths, budgets, merge_weight, backend=kernel)
    want = g2tr.merge(tokens, keep, lengths, budgets, merge_weight, backend="reference")
    assert_bitwise_equal("assign", got[1].cpu(), want[1].cpu())
    assert_bitwise_equal("merged", got[0].cpu(), want[0].cpu())


@backend_device
@dtypes
def test_merged_is_the_mean_of_its_own_assignment(backend, device, dtype):
    # Whatever the targets, merged rows are the fp32 weighted means they imply, written once.
    gen = torch.Generator().manual_seed(3)
    lengths = [70, 45]
    tokens = torch.randn(115, 48, generator=gen).to(dtype).to(device)
    keep, budgets = _random_keep(lengths, 9)
    keep = keep.to(device)
    merged, assign = g2tr.merge(tokens, keep, lengths, budgets, 2.5, backend=backend)
    want = merge_from_assign(tokens, keep, assign, 2.5)
    assert_close_report("merged", merged.cpu(), want, **MERGED_TOL[dtype])
    k_off = offsets(budgets)
    assert assign[:70].min() >= k_off[0] and assign[:70].max() < k_off[1]
    assert assign[70:].min() >= k_off[1] and assign[70:].max() < k_off[2]


@backend_device
def test_non_contiguous_inputs(backend, device):
    gen = torch.Generator().manual_seed(4)
    tokens = torch.randn(90, 20, generator=gen).to(torch.bfloat16).to(device)
    keep, budgets = _random_keep([50, 40], 11)
    keep = keep.to(device)
    want = g2tr.merge(tokens, keep, [50, 40], budgets, backend=backend)
    keep_strided = torch.stack([keep, keep], 1)[:, 1]
    assert not keep_strided.is_contiguous()
    got = g2tr.merge(tokens.t().contiguous().t(), keep_strided, [50, 40], budgets, backend=backend)
    if backend == "reference":  # PyTorch's matmul rounds differently per layout
        assert_merge_matches("column-major", tokens.cpu(), keep.cpu(), got[0], got[1], [50, 40], budgets, 1.0)
    else:
        assert_bitwise_equal("assign", got[1], want[1])
        assert_bitwise_equal("merged", got[0], want[0])


@backend_device
def test_zero_images(backend, device):
    merged, assign = g2tr.merge(torch.empty(0, 6, dtype=torch.float16, device=device),
                                torch.empty(0, dtype=torch.int64, device=device), [], [], backend=backend)
    assert merged.shape == (0, 6) and merged.dtype == torch.float16
    assert assign.shape == (0,) and assign.dtype == torch.int64


def test_deterministic_bf16():
    # bf16 takes the CPU's dedicated dot-argmax path: its tiling must not leak into the bits.
    gen = torch.Generator().manual_seed(5)
    tokens = torch.randn(2000, 96, generator=gen).to(torch.bfloat16)
    keep, budgets = _random_keep([1500, 500], 13)
    first = g2tr.merge(tokens, keep, [1500, 500], budgets, backend="cpu")
    second = g2tr.merge(tokens.clone(), keep.clone(), [1500, 500], budgets, backend="cpu")
    assert_bitwise_equal("assign", second[1], first[1])
    assert_bitwise_equal("merged", second[0], first[0])


@backend_device
def test_ternary_ties_and_nan_bitwise(backend, device):
    """Exact arithmetic (ternary rows): every tie is real, and the rule must match bit for bit.
    A NaN row never wins as a target and, dropped, joins the first kept token."""
    grids = [(9, 10), (6, 6)]
    tokens, _ = make_ternary_workload(grids, [(3, 3), (2, 2)], 16, seed=7)
    tokens[3] = float("nan")
    lengths = lengths_of(grids)
    budgets = [budget(n, 0.3, 4) for n in lengths]
    gen = torch.Generator().manual_seed(8)
    others = torch.randperm(lengths[0], generator=gen)
    first = torch.cat([torch.tensor([3]), others[others != 3][: budgets[0] - 1]])  # the NaN token kept
    second = torch.randperm(lengths[1], generator=gen)[: budgets[1]] + lengths[0]
    keep = torch.cat([first.sort().values, second.sort().values])
    tokens = torch.cat([tokens, tokens[:10]])  # and a NaN token dropped, in another image
    lengths = lengths_of(grids + [(2, 5)])
    budgets = [budget(n, 0.3, 4) for n in lengths]
    keep = torch.cat([keep, torch.tensor([lengths[0] + lengths[1] + i for i in (0, 4, 5, 9)])])
    merged, assign = g2tr.merge(tokens.to(device), keep.to(device), lengths, budgets, 2.0, backend=backend)
    ref_merged, ref_assign = reference.merge(tokens, keep, lengths, budgets, 2.0)
    assert_bitwise_equal("assign", assign.cpu(), ref_assign)
    assert_bitwise_equal("merged", merged.cpu(), ref_merged)


# ---------------------------------------------------------------------------- the device kernels
# On a GPU kernel_device adds cuda and triton on CUDA: their oracle is the CPU kernel's
# result (tie-aware, see helpers.py); the CPU kernel's own oracle is the reference.


@kernel_device
@dtypes
@pytest.mark.parametrize("case", ["keep_all", "keep_one", "many_images", "odd_dim"])
def test_merge_edge_cases_against_cpu(dtype, case, kernel, device):
    gen = torch.Generator().manual_seed(1)
    if case == "many_images":  # over one CUDA launch's 64 images, mixed sizes
        lengths = [1 + (b * 7) % 23 for b in range(70)]
    else:
        lengths = [40, 1, 300]
    d = 67 if case == "odd_dim" else 32
    tokens = torch.randn(sum(lengths), d, generator=gen).to(dtype)
    keep, budgets = [], []
    for b, n in enumerate(lengths):
        k = n if case == "keep_all" else (1 if case == "keep_one" else max(1, n // 3))
        local = torch.randperm(n, generator=gen)[:k].sort().values
        keep.append(local + sum(lengths[:b]))
        budgets.append(k)
    keep_idx = torch.cat(keep)
    want = None if kernel == "cpu" else torch.ops.g2tr.merge(tokens, keep_idx, lengths, budgets, 1.0)
    merged, assign = g2tr.merge(tokens.to(device), keep_idx.to(device), lengths, budgets, 1.0, backend=kernel)
    assert_merge_matches(case, tokens, keep_idx, merged.cpu(), assign.cpu(), lengths, budgets, 1.0, expected=want)


# ---------------------------------------------------------------------------- the op's inputs
# Read by test_library.py (opcheck) and test_errors.py (bad input through every path);
# the form is described in helpers.py.


def opcheck_samples():
    gen = torch.Generator().manual_seed(2)
    tokens = torch.randn(30, 8, generator=gen)
    keep = torch.tensor([0, 4, 9, 10, 15, 16, 29])
    return [
        (tokens, keep, [10, 20], [3, 4], 1.0),
        (tokens.bfloat16(), keep, [10, 20], [3, 4], 2.5),
        (tokens.half(), torch.arange(30), [30], [30], 1.0),
    ]


def valid_args() -> dict:
    gen = torch.Generator().manual_seed(2)
    return dict(tokens=torch.randn(10, 4, generator=gen), keep_idx=torch.tensor([1, 3, 4, 6, 9]), lengths=[4, 6],
                budgets=[2, 3], merge_weight=1.0)


def keep(values):
    return setter(keep_idx=torch.tensor(values))


ERROR_CASES = [
    Case("keep-not-ascending", keep([3, 1, 4, 6, 9]), ValueError, ["keep_idx", "image 0", "ascending"],
         reads_data=True),
    Case("keep-repeated", keep([1, 3, 4, 6, 6]), ValueError, ["keep_idx", "image 1", "ascending"], reads_data=True),
    Case("keep-in-next-image", keep([1, 5, 4, 6, 9]), ValueError, ["keep_idx", "image 0"], reads_data=True),
    Case("keep-in-previous-image", keep([1, 3, 2, 6, 9]), ValueError, ["keep_idx", "image 1"], reads_data=True),
    Case("keep-negative", keep([-1, 3, 4, 6, 9]), ValueError, ["keep_idx", "image 0"], reads_data=True),
    Case("keep-past-the-end", keep([1, 3, 4, 6, 10]), ValueError, ["keep_idx", "image 1"], reads_data=True),
    Case("keep-count", keep([1, 3, 4, 6]), ValueError, ["keep_idx", "4", "5"]),
    Case("keep-int32", tensor_setter("keep_idx", lambda t: t.int()), TypeError, ["keep_idx", "int64"]),
    Case("keep-2d", tensor_setter("keep_idx", lambda t: t[None]), TypeError, ["keep_idx", "1-D"]),
    Case("tokens-int", tensor_setter("tokens", lambda t: t.int()), TypeError, ["tokens"] + DTYPE_WORDS),
    Case("tokens-complex", tensor_setter("tokens", lambda t: t.to(torch.complex64)), TypeError, ["tokens"]),
    Case("tokens-1d", tensor_setter("tokens", lambda t: t.reshape(-1)), ValueError, ["tokens", "2-D"]),
    Case("merge-weight-zero", setter(merge_weight=0.0), ValueError, ["merge_weight"]),
    Case("merge-weight-negative", setter(merge_weight=-2.0), ValueError, ["merge_weight"]),
    Case("merge-weight-inf", setter(merge_weight=INF), ValueError, ["merge_weight"]),
    Case("budget-above-length", setter(budgets=[5, 3]), ValueError, ["budgets[0]", "image 0"]),
    Case("budget-zero", setter(budgets=[0, 3]), ValueError, ["budgets[0]", "image 0"]),
    Case("lengths-do-not-sum", setter(lengths=[4, 7]), ValueError, ["lengths sum", "11", "10"]),
    Case("length-negative", setter(lengths=[-4, 14]), ValueError, ["lengths[0]", "image 0"]),
    Case("mixed-devices", tensor_setter("keep_idx", lambda t: t.to("meta")), ValueError,
         ["tokens", "keep_idx", "meta"]),
]
