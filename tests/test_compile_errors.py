"""Bad input under torch.compile(fullgraph=True): the user gets the project's own exception
(ValueError / TypeError, its message), not dynamo's TorchRuntimeError or
Unsupported("Observed exception") with ours in its context (_checks.py: Compile*Error).
Every bad-argument case of test_errors.py runs through the compiled Python API; valid
calls still compile into one graph and give eager's bits.
"""
import re

import pytest
import torch
from test_errors import all_cases, bad_args, call_api, check_message

import g2tr_kernels as g2tr
from g2tr_kernels import _checks


def compiled(fn):
    torch._dynamo.reset()
    return torch.compile(fn, fullgraph=True, backend="eager")


def first_line(error: BaseException) -> str:
    return str(error).splitlines()[0]  # dynamo appends the user's stack after our message


@pytest.mark.parametrize("op,case", all_cases(lambda c: c.id != "mixed-devices"))
def test_compiled_api_raises_the_projects_error(op, case):
    args = bad_args(op, case)
    with pytest.raises(case.error) as eager:
        call_api(op, args, "cpu")
    with pytest.raises(case.error) as info:
        compiled(lambda: call_api(op, args, "cpu"))()
    assert not isinstance(info.value, torch._dynamo.exc.TorchDynamoException), type(info.value)
    check_message(info.value, case.fragments)
    if case.reads_data:  # raised by the kernel when the graph runs: eager's exception itself
        assert first_line(info.value) == first_line(eager.value)


def test_compiled_raw_op_and_api_bad_grid():
    # The case, through torch.ops and through the API, with the exact message.
    message = "g2tr.reduce: tokens have N = 15 rows but grids describe 16 tokens (sum of h * w over 1 images)"
    tokens, anchors = torch.randn(15, 8), torch.randn(4, 8)
    for fn in (lambda t, a: g2tr.reduce(t, a, [(4, 4)], [(2, 2)]),
               lambda t, a: torch.ops.g2tr.reduce(t, a, [4, 4], [2, 2], 0.5, 32, 1.0)):
        with pytest.raises(ValueError, match=re.escape(message)) as info:
            compiled(fn)(tokens, anchors)
        assert isinstance(info.value, _checks.CompileValueError)


@pytest.mark.parametrize("change,error,fragment", [
    (dict(keep_ratio="0.5"), TypeError, "g2tr.reduce: keep_ratio must be a float, got '0.5'"),
    (dict(min_keep=2**63), ValueError, "g2tr.reduce: min_keep must fit in int64, got 9223372036854775808"),
    (dict(merge_weight=1e-300), ValueError, "g2tr.reduce: merge_weight must be a finite positive float32"),
], ids=["keep-ratio-str", "min-keep-2**63", "merge-weight-1e-300"])
def test_compiled_normaliser_errors(change, error, fragment):
    # Raised by traced Python (the API's normalisers), not by a fake kernel.
    def fn(t, a):
        return g2tr.reduce(t, a, [(4, 4)], [(2, 2)], **change)

    with pytest.raises(error, match=re.escape(fragment)):
        compiled(fn)(torch.randn(16, 8), torch.randn(4, 8))


def test_valid_calls_compile_in_one_graph_with_eagers_bits():
    # The decorator and the fake wrapper must not add a graph break or change a result.
    gen = torch.Generator().manual_seed(5)
    tokens, anchors = torch.randn(36 + 20, 16, generator=gen), torch.randn(9 + 4, 16, generator=gen)
    grids, anchor_grids = [(6, 6), (4, 5)], [(3, 3), (2, 2)]

    def fn(t, a):
        out = g2tr.reduce(t, a, grids, anchor_grids, keep_ratio=0.5, min_keep=4)
        scores, cells = g2tr.anchor_scores(t, a, grids, anchor_grids)
        k = g2tr.budgets([36, 20], 0.5, 4)
        keep = g2tr.balanced_topk(scores, cells, [36, 20], k, [9, 4])
        merged, assign = g2tr.merge(t, keep, [36, 20], k)
        return (*out, scores, cells, keep, merged, assign)

    torch._dynamo.reset()
    explained = torch._dynamo.explain(fn)(tokens, anchors)
    assert explained.graph_break_count == 0, explained.break_reasons
    torch._dynamo.reset()
    got = torch.compile(fn, fullgraph=True)(tokens, anchors)
    for i, (g, w) in enumerate(zip(got, fn(tokens, anchors))):
        assert torch.equal(g, w), f"output {i} differs from eager"
