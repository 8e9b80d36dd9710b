"""No host sync in the wrapped prefill (issue 12, deliverable 6), on tiny random configs built offline.

One prompt: every size comes from host-side grids (test_hf_families checks its trace). A batch
of prompts needs each row's image-token count on the host (it sizes the reduced prompt): it is
copied at the very start of the prefill, before the vision tower and the VAE are enqueued, so
the layout waits for a finished copy, not for the ViT. These tests check that order without
CUDA, that the result is the one the device recount gives, bit for bit, and what
torch._dynamo.explain sees of the batched prefill.
"""
import inspect
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("diffusers")

from test_hf_families import build  # noqa: E402

import g2tr_kernels  # noqa: E402
from g2tr_kernels import ops  # noqa: E402
from g2tr_kernels.integrations import hf  # noqa: E402
from g2tr_kernels.integrations.hf import G2TRHandle, apply_g2tr  # noqa: E402
from g2tr_kernels.layout import rebuild_padded  # noqa: E402


def _logged(log, name, function):
    def wrapper(*args, **kwargs):
        log.append(name)
        return function(*args, **kwargs)

    return wrapper


def test_batched_prefill_copies_the_row_counts_before_the_vision_tower(monkeypatch):
    case = build("gemma3")  # two left-padded prompts, with one and two images
    model, inputs = case.model, case.inputs
    with torch.no_grad():
        apply_g2tr(model, case.model_vae, keep_ratio=0.5, min_keep=1, pool=case.pool)
        log = []
        monkeypatch.setattr(hf._HostCopy, "__init__", _logged(log, "copy row counts", hf._HostCopy.__init__))
        monkeypatch.setattr(hf._HostCopy, "wait", _logged(log, "wait for the copy", hf._HostCopy.wait))
        monkeypatch.setattr(model, "get_image_features", _logged(log, "vision tower", model.get_image_features))
        monkeypatch.setattr(case.model_vae, "encode", _logged(log, "vae", case.model_vae.encode))
        monkeypatch.setattr(ops, "reduce", _logged(log, "reduce", ops.reduce))

        def no_device_read(*args, **kwargs):
            raise AssertionError("the batched prefill counted the kept tokens on the device")

        monkeypatch.setattr(G2TRHandle, "_row_lengths_from_device", no_device_read)
        out = model(**inputs, vae_pixel_values=case.vae_images).logits
        assert log == ["copy row counts", "vision tower", "vae", "reduce", "wait for the copy"]
        layout = model._g2tr_handle.last.layout
        monkeypatch.undo()

        # The same prefill through the device recount (what every batch did before): the same
        # row lengths, the same prompt, the same logits, bit for bit.
        monkeypatch.setattr(hf, "_image_rows", lambda per_row, lengths: None)
        again = model(**inputs, vae_pixel_values=case.vae_images).logits
    # 40 columns; row 0 (17 padding) drops 8 of one image, row 1 8 of each of two
    assert layout.lengths == model._g2tr_handle.last.layout.lengths == [32, 24]
    assert torch.equal(layout.input_ids, model._g2tr_handle.last.layout.input_ids)
    assert torch.equal(out, again)


def test_image_rows_from_host_counts():
    counts = torch.tensor([16, 0, 32])  # row 1 holds no image
    assert hf._image_rows(counts, [16, 16, 16]).tolist() == [0, 2, 2]
    assert hf._image_rows(counts, [8, 24, 16]) is None  # image 1 would run across rows 0 and 2
    assert hf._image_rows(counts, [16, 16]) is None  # more image tokens than features: the model says so
    assert hf._image_rows(torch.tensor([3, 4]), [3, 4]).tolist() == [0, 1]


def test_padding_side_auto_is_decided_on_the_device():
    ids = torch.tensor([[0, 0, 1, 9, 9, 9, 2], [3, 9, 9, 9, 4, 9, 9]])
    keep = torch.tensor([0, 2, 3, 5, 6])
    left_mask = (ids != 0).long()
    right_ids = torch.tensor([[1, 9, 9, 9, 2, 0, 0], [3, 9, 9, 9, 4, 9, 9]])
    right_mask = (right_ids != 0).long()
    for input_ids, mask, side in ((ids, left_mask, "left"), (right_ids, right_mask, "right"), (ids, None, "right")):
        auto = rebuild_padded(input_ids, keep, 9, attention_mask=mask, padding_side="auto")
        fixed = rebuild_padded(input_ids, keep, 9, attention_mask=mask, padding_side=side)
        for a, b in zip(auto, fixed):
            assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b
    auto = rebuild_padded(ids, keep, 9, attention_mask=left_mask, padding_side="auto")
    assert auto.input_ids.tolist() == [[0, 0, 1, 9, 9, 2], [0, 3, 9, 9, 4, 9]]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the pinned copy and its event exist on CUDA only")
def test_device_values_go_to_pinned_memory_with_an_event_on_cuda():
    ids = torch.tensor([[7, 7, 1], [7, 2, 3]], device="cuda")
    sizes = torch.tensor([[30, 60], [20, 32]], device="cuda")
    counts = G2TRHandle._start_host_copies(SimpleNamespace(image_token_id=7), ids, {"image_sizes": sizes})
    assert counts.values.is_pinned() and counts.event is not None
    assert counts.wait().tolist() == [2, 1]
    assert hf._COPIES[sizes].values.is_pinned() and hf._host(sizes) == [[30, 60], [20, 32]]


@pytest.mark.parametrize("capture_scalar_outputs", [False, True], ids=["default", "capture_scalar_outputs"])
def test_batched_prefill_trace(capture_scalar_outputs):
    # Under torch.compile the row lengths cannot come from an event: they are counted on the
    # device and read back. By default that read is the one graph break of ours; with
    # capture_scalar_outputs the lengths are unbacked sizes and g2tr_kernels traces through.
    case = build("gemma3")
    model, inputs = case.model, case.inputs
    apply_g2tr(model, case.model_vae, keep_ratio=0.5, min_keep=1, pool=case.pool)
    traced = []
    with torch.no_grad():
        eager = model(**inputs, vae_pixel_values=case.vae_images).logits
        torch._dynamo.reset()
        with torch._dynamo.config.patch(capture_scalar_outputs=capture_scalar_outputs):
            explained = torch._dynamo.explain(
                lambda **kw: traced.append(model(**kw, vae_pixel_values=case.vae_images).logits))(**inputs)
        torch._dynamo.reset()
    ours, torch_dir = str(Path(g2tr_kernels.__file__).parent), str(Path(torch.__file__).parent)
    # Where each break is: its innermost frame outside torch itself (an aten op's trace
    # wrapper is not the code that called it).
    sites = [next((f for f in reversed(b.user_stack) if not f.filename.startswith(torch_dir)), None)
             for b in explained.break_reasons]
    breaks = {(f.filename, f.lineno) for f in sites if f is not None and f.filename.startswith(ours)}
    if capture_scalar_outputs:
        assert breaks == set()
    else:
        source, first = inspect.getsourcelines(G2TRHandle._row_lengths_from_device)
        assert len(breaks) == 1
        (filename, line), = breaks
        assert filename == inspect.getsourcefile(hf) and first <= line < first + len(source)
    assert torch.equal(traced[-1], eager)  # the traced prefill reduces exactly as eager does
