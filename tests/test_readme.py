"""The README runs as written: a README that drifts from the code fails here.

- Every ```python block is executed, each in a fresh namespace. What a snippet elides
  (the user's tensors, models, a FastV layer's locals) comes from a hidden preamble keyed
  by the block's section heading (plus "#i" for the i-th block of a section, from 0), and
  an optional postamble checks what the block computed. A new block is picked up
  automatically: it runs with no preamble until one is added here.
- The ```cpp block is compiled and run by the `g2tr_readme_snippet` ctest
  (CMakeLists.txt extracts it); here: there is exactly one, and it is a whole program.
- Every project command the README shows (```bash blocks and inline `g2tr ...`,
  `bash tools/...`, `python -m g2tr_kernels...`, `pytest benchmarks...` spans) exists and
  accepts the flags it is shown with.
- The API tables list every public function with every argument, and their defaults are
  the code's (inspect.signature); the op schemas block matches the registered schemas.
"""
from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
import inspect
import re
import shlex
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List

import pytest
import torch

import g2tr_kernels

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


@dataclass
class Block:
    lang: str
    code: str
    key: str  # section heading, plus "#i" when the section has more than one block of this language
    line: int  # 1-based line of the opening fence


def readme_blocks(text: str) -> List[Block]:
    blocks, heading, fence, body, start = [], "", None, [], 0
    for number, line in enumerate(text.splitlines(), 1):
        if fence is None:
            if line.startswith("#"):
                heading = line.lstrip("#").strip()
            elif line.startswith("```"):
                fence, body, start = line[3:].strip(), [], number
        elif line.startswith("```"):
            blocks.append(Block(fence, "\n".join(body) + "\n", heading, start))
            fence = None
        else:
            body.append(line)
    assert fence is None, f"README.md: the ``` fence opened at line {start} is never closed"
    per_section: Dict[tuple, List[Block]] = {}
    for b in blocks:
        per_section.setdefault((b.lang, b.key), []).append(b)
    for group in per_section.values():
        if len(group) > 1:
            for i, b in enumerate(group):
                b.key = f"{b.key}#{i}"
    return blocks


BLOCKS = readme_blocks(README.read_text())


def of(lang: str) -> List[Block]:
    return [b for b in BLOCKS if b.lang == lang]


# ----------------------------------------------------------------------------------------
# Hidden preambles: what each Python block takes as given, tiny and random, nothing downloaded.
def _api(ns):
    g = torch.Generator().manual_seed(0)
    ns["tokens"] = torch.randn(70 * 70 + 37 * 37, 16, generator=g)
    ns["anchors"] = torch.randn(32 * 32 + 16 * 16, 16, generator=g)


def _api_post(ns):
    out = ns["out"]
    assert out.merged.shape == (2450 + 684, 16) and out.cu_seqlens.tolist() == [0, 2450, 3134]


def _anchors(ns):
    g = torch.Generator().manual_seed(0)
    from helpers import tiny_vae

    ns["latents"] = [torch.randn(16, 32, 32, generator=g), torch.randn(16, 20, 28, generator=g)]
    ns["model"] = types.SimpleNamespace(vae2llm=torch.nn.Linear(64, 3584))
    ns["vit_grids"] = [(8, 8), (6, 10)]
    ns["vit_tokens"] = torch.randn(64 + 60, 2048, generator=g).bfloat16()
    ns["vae"] = tiny_vae()  # downsamples by 2: 32 x 32 and 24 x 40 images give 16 x 16 and 12 x 20 latents
    ns["img_a"] = torch.rand(3, 32, 32, generator=g) * 2 - 1
    ns["img_b"] = torch.rand(3, 24, 40, generator=g) * 2 - 1
    ns["images"] = [ns["img_a"], ns["img_b"]]


def _anchors_post(ns):
    # the last anchors: through the VAE, pool="auto" to no finer than each ViT grid
    assert ns["anchors"].dtype == torch.bfloat16 and ns["anchors"].shape[1] == 2048
    assert ns["anchor_grids"] == [(8, 8), (6, 10)]
    if "out" in ns:
        assert ns["out"].merged.shape == (32 + 32, 2048)  # min_keep = 32 for 64 and 60 tokens


class _TinyProcessor:
    """Stands in for AutoProcessor.from_pretrained("OpenGVLab/InternVL3-1B-hf"), whose
    tokenizer files cannot be downloaded here: the same call shapes, the tiny model's ids."""

    def __init__(self, image_token_id):
        self.image_token_id = image_token_id
        self.image_processor = types.SimpleNamespace(image_mean=[0.5] * 3, image_std=[0.5] * 3)

    def apply_chat_template(self, messages, add_generation_prompt, tokenize, return_dict, return_tensors):
        assert tokenize and return_dict and return_tensors == "pt"
        images = [c for m in messages for c in m["content"] if c["type"] == "image"]
        ids = [1, 2]
        for _ in images:
            ids += [self.image_token_id] * 16 + [3]
        ids += [4, 5] + ([6] if add_generation_prompt else [])
        ids = torch.tensor([ids])
        pixels = torch.stack([c["image"] for c in images])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels}

    def decode(self, ids, skip_special_tokens=False):
        return " ".join(str(int(i)) for i in ids)


def _hf(ns):
    pytest.importorskip("transformers")
    pytest.importorskip("diffusers")
    import diffusers
    import transformers

    import test_hf
    from helpers import tiny_vae

    model = test_hf.tiny_internvl()
    image_token_id = model.config.image_token_id
    picture = torch.rand(3, 64, 64) * 2 - 1
    patches = [
        (transformers.AutoModelForImageTextToText, lambda *a, **k: model),
        (transformers.AutoProcessor, lambda *a, **k: _TinyProcessor(image_token_id)),
        (diffusers.AutoencoderKL, lambda *a, **k: tiny_vae()),
    ]
    ns["_restore"] = [(cls, cls.__dict__.get("from_pretrained")) for cls, _ in patches]
    for cls, fake in patches:
        cls.from_pretrained = staticmethod(fake)
    ns["messages"] = [{"role": "user", "content": [{"type": "image", "image": picture},
                                                  {"type": "text", "text": "What is in the picture?"}]}]
    ns["vae_images"] = picture[None]


def _hf_post(ns):
    ids, inputs = ns["ids"], ns["inputs"]
    assert torch.equal(ids[0, : inputs["input_ids"].shape[1]], inputs["input_ids"][0])  # the prompt comes back
    assert isinstance(ns["answer"], str) and "forward" not in ns["model"].__dict__  # handle.remove() unpatched it


class _Bagel(torch.nn.Module):
    """The few pieces of BAGEL's Bagel module that forward_cache_update_vit uses, tiny."""

    def __init__(self, hidden=64):
        super().__init__()
        self.hidden_size = hidden
        self.connector = torch.nn.Linear(hidden, hidden)
        self.vae2llm = torch.nn.Linear(64, hidden)
        self.vit_pos_embed = torch.nn.Embedding(70 * 70, hidden)
        self.calls = []
        embed = torch.nn.Embedding(16, hidden)

        def forward_inference(**kwargs):
            self.calls.append(kwargs)
            return types.SimpleNamespace(packed_query_sequence=kwargs["packed_query_sequence"])

        self.language_model = types.SimpleNamespace(model=types.SimpleNamespace(embed_tokens=embed),
                                                    forward_inference=forward_inference)

    def vit_model(self, packed_pixel_values, packed_flattened_position_ids, cu_seqlens, max_seqlen):
        return packed_pixel_values[:, : self.hidden_size]


def _bagel(ns):
    from g2tr_kernels.layout import flattened_position_ids

    g = torch.Generator().manual_seed(0)
    grids = [(16, 16), (8, 12)]  # 224 x 224 and 112 x 168 images, 14 px patches
    n = [h * w for h, w in grids]
    ns["self"] = _Bagel()
    ns["vit_grids"] = grids
    ns["packed_vit_tokens"] = torch.randn(sum(n), 3 * 14 * 14, generator=g)
    ns["packed_vit_position_ids"] = torch.cat([flattened_position_ids(h, w, 70) for h, w in grids])
    ns["cu_seqlens"] = torch.tensor([0, n[0], sum(n)], dtype=torch.int32)
    ns["max_seqlen"] = max(n)
    ns["vae_latents"] = [torch.randn(16, 28, 28, generator=g), torch.randn(16, 14, 21, generator=g)]
    ns["curr_kvlens"], ns["curr_rope"] = [5, 3], [5, 3]
    ns["packed_text_ids"] = torch.tensor([1, 2, 1, 2])  # SOI, EOI of each image
    ns["past_key_values"] = None


def _bagel_post(ns):
    k = ns["out"].cu_seqlens.diff().tolist()
    assert k == [128, 48] and ns["newlens"] == [5 + 128 + 2, 3 + 48 + 2] and ns["new_rope"] == [6, 4]
    (call,) = ns["self"].calls
    assert call["packed_query_sequence"].shape == (128 + 2 + 48 + 2, 64)


def _fastv(ns):
    g = torch.Generator().manual_seed(0)
    image_start, image_len, text = 35, 576, 20  # LLaVA-1.5: 35 system tokens, a 24 x 24 image
    length = image_start + image_len + text
    ns.update(image_start=image_start, image_len=image_len, seq_length=length, ratio=0.5)
    ns["last_layer_attention"] = torch.rand(1, 4, length, length, generator=g).softmax(-1)
    ns["hidden_states"] = torch.randn(1, length, 32, generator=g)


def _fastv_before_post(ns):
    ns_after = {}
    _fastv(ns_after)
    from g2tr_kernels.integrations.pruning import fastv_keep_indexes

    # FastV's own top-k and the drop-in agree (random scores: no ties)
    assert torch.equal(ns["keep_indexs"], fastv_keep_indexes(ns_after["last_layer_attention"], 35, 576, 0.5))


def _fastv_after_post(ns):
    assert ns["keep_indexs"].shape == (35 + 288 + 20,)
    assert ns["hidden_states"].shape == (1, 35 + 288 + 20, 32) and ns["position_ids"].shape == (1, 343)


def _tome(ns):
    g = torch.Generator().manual_seed(0)
    ns["x"] = torch.randn(2, 17, 8, generator=g)  # class token + 16
    ns["metric"] = torch.randn(2, 17, 8, generator=g)
    ns["scores"] = torch.rand(2, 17, generator=g)
    ns["size"], ns["r"] = None, 8

    def merge_wavg(merge, x, size=None):  # ToMe's helper, as in tome/merge.py
        if size is None:
            size = torch.ones_like(x[..., 0, None])
        x = merge(x * size, mode="sum")
        size = merge(size, mode="sum")
        return x / size, size

    def bipartite_soft_matching(metric, r, class_token=False):  # the call shape of ToMe's, dropping the last r
        return (lambda x, mode="mean": x[:, : x.shape[1] - r]), None

    ns["merge_wavg"], ns["bipartite_soft_matching"] = merge_wavg, bipartite_soft_matching


def _tome_after_post(ns):
    assert ns["x"].shape == (2, 1 + 8, 8) and ns["size"].sum(dim=1).flatten().tolist() == [17.0, 17.0]


def _viz(ns):
    pytest.importorskip("PIL")
    g = torch.Generator().manual_seed(0)
    grids = [(6, 8), (4, 4)]
    tokens = torch.randn(48 + 16, 8, generator=g)
    anchors = torch.randn(3 * 4 + 2 * 2, 8, generator=g)
    ns["grids"] = grids
    ns["out"] = g2tr_kernels.reduce(tokens, anchors, grids, [(3, 4), (2, 2)], min_keep=1)
    ns["picture"] = torch.rand(3, 48, 64, generator=g)


def _viz_post(ns):
    assert Path("reduction.png").stat().st_size > 0


def _vllm(ns):
    # vLLM is not a dependency of the main environment: the block runs where tools/vllm_env.sh
    # installed it (.venv-vllm). There, the paths it names are made: a tiny LLaVA and VAE.
    pytest.importorskip("vllm.entrypoints.llm", reason="vLLM is installed only in .venv-vllm (tools/vllm_env.sh)")
    spec = importlib.util.spec_from_file_location("readme_tiny_models", ROOT / "tests" / "vllm" / "tiny_models.py")
    tiny = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tiny)
    tiny.build_llava("path/to/llava")
    tiny.build_vae("path/to/diffusers/vae")
    ns["pil_image"] = tiny.make_image(64, 64)


PREAMBLES: Dict[str, Callable] = {
    "API": _api,
    "Anchors from the VAE#0": _anchors,
    "Anchors from the VAE#1": _anchors,
    "Hugging Face VLMs: one call": _hf,
    "BAGEL and other packed (NaViT) layouts": _bagel,
    "FastV-style code#0": _fastv,
    "FastV-style code#1": _fastv,
    "ToMe-style code#0": _tome,
    "ToMe-style code#1": _tome,
    "Seeing what was kept": _viz,
}
POSTAMBLES: Dict[str, Callable] = {
    "API": _api_post,
    "Anchors from the VAE#0": _anchors_post,
    "Anchors from the VAE#1": _anchors_post,
    "Hugging Face VLMs: one call": _hf_post,
    "BAGEL and other packed (NaViT) layouts": _bagel_post,
    "FastV-style code#0": _fastv_before_post,
    "FastV-style code#1": _fastv_after_post,
    "ToMe-style code#1": _tome_after_post,
    "Seeing what was kept": _viz_post,
}


if "Serving with vLLM" in {b.key for b in of("python")}:  # the section lands with the vLLM plugin
    PREAMBLES["Serving with vLLM"] = _vllm


@pytest.mark.parametrize("block", of("python"), ids=lambda b: f"L{b.line}:{b.key}")
def test_python_block_runs_as_written(block, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a block that writes files writes them here
    ns: dict = {"__name__": "__readme__", "torch": torch}  # every snippet lives in code that imported torch
    try:
        PREAMBLES.get(block.key, lambda ns: None)(ns)
        code = compile(block.code, f"README.md:{block.line}", "exec")
        exec(code, ns)  # noqa: S102 - the point of this test
        if block.key in POSTAMBLES:
            POSTAMBLES[block.key](ns)
    finally:
        for cls, original in ns.get("_restore", []):
            if original is None:
                del cls.from_pretrained
            else:
                cls.from_pretrained = original


def test_every_preamble_has_its_block():
    keys = {b.key for b in of("python")}
    stale = sorted(set(PREAMBLES) - keys) + sorted(set(POSTAMBLES) - keys)
    assert not stale, f"preambles for README blocks that no longer exist (renamed heading?): {stale}"


def test_the_cpp_block_is_one_whole_program():
    cpp = of("cpp")
    assert len(cpp) == 1, "CMakeLists.txt compiles the README's only ```cpp block (the g2tr_readme_snippet ctest)"
    assert "int main(" in cpp[0].code and "using ReduceFn" in cpp[0].code
    cmake = (ROOT / "CMakeLists.txt").read_text()
    assert "g2tr_readme_snippet" in cmake and "```cpp" in cmake


# ----------------------------------------------------------------------------------------
# Commands: every project command shown exists and takes the flags it is shown with.
def _inline_commands(text: str) -> List[str]:
    spans = re.findall(r"`([^`\n]+)`", text)
    # `g2tr` followed by one of its subcommands (a span like `g2tr cpu, <path>` is a table row label)
    starts = ("g2tr bench", "g2tr info", "bash tools/", "python -m g2tr_kernels", "pytest benchmarks", "python tools/",
              ".venv/bin/python -m pytest", "python tests/")
    return [s for s in spans if s.startswith(starts)]


def _block_commands() -> List[str]:
    lines = []
    for b in of("bash"):
        for line in b.code.splitlines():
            line = line.split(" #", 1)[0].strip()
            if line and not line.startswith("#"):
                lines.append(line)
    return lines


def _bench_parser() -> argparse.ArgumentParser:
    from g2tr_kernels import cli

    return cli._parser()


def _parses(parser: argparse.ArgumentParser, argv: List[str]) -> None:
    try:
        parser.parse_args(argv)
    except SystemExit as error:
        raise AssertionError(f"`{' '.join(argv)}` is refused by the parser (exit {error.code})") from None


class _Parsed(Exception):
    pass


def _main_parses(command: str, module, argv: List[str]) -> None:
    """Runs module.main() only as far as its argparse call, with argv as the arguments."""
    assert callable(getattr(module, "main", None)), f"{command}: {module.__name__} has no main()"
    original = argparse.ArgumentParser.parse_args

    def parse_and_stop(self, args=None, namespace=None):
        try:
            original(self, argv, namespace)
        except SystemExit as error:
            raise AssertionError(f"`{command}` is refused by the parser (exit {error.code})") from None
        raise _Parsed

    argparse.ArgumentParser.parse_args = parse_and_stop
    try:
        module.main()
    except _Parsed:
        return
    finally:
        argparse.ArgumentParser.parse_args = original
    raise AssertionError(f"{command}: main() returned without parsing its arguments")


def check_command(command: str) -> None:
    words = shlex.split(command)
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):  # VAR=value prefixes
        words = words[1:]
    if words[:1] == ["bash"]:
        script = ROOT / words[1]
        assert script.is_file(), f"{command}: {words[1]} does not exist"
        if words[1] == "tools/bench.sh" and words[2:] == ["--results"]:  # its own mode
            assert '"--results"' in script.read_text(), f"{command}: tools/bench.sh does not handle --results"
        elif words[1] == "tools/bench.sh":  # passes its arguments to `g2tr bench`
            _parses(_bench_parser(), ["bench", *words[2:]])
        else:  # a shell script parses its own flags: each one shown must be one it handles
            source = script.read_text()
            for flag in (w.split("=")[0] for w in words[2:] if w.startswith("-")):
                assert re.search(rf"(^|[\s|\"'(]){re.escape(flag)}($|[\s|\"')=])", source, re.M), (
                    f"{command}: {words[1]} does not handle {flag}"
                )
    elif words[:1] == ["g2tr"] or words[:3] == ["python", "-m", "g2tr_kernels"]:
        _parses(_bench_parser(), words[1:] if words[0] == "g2tr" else words[3:])
    elif words[:2] == ["python", "-m"] and words[2].startswith("g2tr_kernels."):
        _main_parses(command, importlib.import_module(words[2]), words[3:])
    elif "pytest" in words:
        at = words.index("pytest")
        paths = [w for w in words[at + 1:] if not w.startswith("-") and "/" in w]
        for path in paths:
            assert (ROOT / path).exists(), f"{command}: {path} does not exist"
        conftest = (ROOT / "benchmarks" / "conftest.py").read_text()
        for flag in (w.split("=")[0] for w in words[at + 1:] if w.startswith("--g2tr")):
            assert f'"{flag}"' in conftest, f"{command}: benchmarks/conftest.py does not add {flag}"
    elif words[:1] == ["python"] or words[0].endswith("/python"):
        path = next(w for w in words[1:] if not w.startswith("-"))
        assert (ROOT / path).is_file(), f"{command}: {path} does not exist"
    elif words[:2] == ["pip", "install"]:
        extras = re.findall(r"\.\[([a-z,]+)\]", command)
        import tomllib

        declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
        for name in (e for group in extras for e in group.split(",")):
            assert name in declared, f"{command}: pyproject.toml declares no extra {name!r}"


def test_project_commands_exist_with_their_flags():
    text = README.read_text()
    commands = _block_commands() + _inline_commands(text)
    assert any(c.startswith("bash tools/test.sh") for c in commands)
    checked = 0
    for command in commands:
        if command.split()[0] in ("cmake", "ctest"):
            continue  # the CMake build runs in test.sh itself
        check_command(command)
        checked += 1
    assert checked >= 8


def test_command_check_catches_a_wrong_flag():
    with pytest.raises(AssertionError, match="refused"):
        check_command("g2tr bench --no-such-flag")
    with pytest.raises(AssertionError, match="does not exist"):
        check_command("bash tools/no_such_tool.sh")
    with pytest.raises(AssertionError, match="does not handle --no-such-flag"):
        check_command("bash tools/setup.sh --no-such-flag")
    with pytest.raises(AssertionError, match="refused"):
        check_command("python -m g2tr_kernels.bench.e2e --e2e-no-such-flag 3")


# ----------------------------------------------------------------------------------------
# The API tables against the code.
ENTRY_POINTS = [  # beyond g2tr_kernels.__all__: what the integrations sections tell users to call
    "anchors.anchors_from_latents", "anchors.anchors_from_vae", "anchors.encode_latents",
    "anchors.normalize_latents", "anchors.prepare_anchors",
    "integrations.hf.apply_g2tr",
    "integrations.pruning.select_with_scores", "integrations.pruning.g2tr_select_with_scores",
    "integrations.pruning.fastv_scores", "integrations.pruning.fastv_keep_indexes",
    "integrations.pruning.g2tr_soft_matching", "integrations.pruning.tome_style_merge",
    "integrations.pruning.window_cells",
    "layout.rebuild_packed", "layout.rebuild_padded", "layout.gather_columns",
    "viz.image_reduction", "viz.draw_reduction",
]


def documented_calls(text: str) -> Dict[str, str]:
    """`name(args)` of every API table row: {dotted name: argument text}."""
    rows = {}
    for match in re.finditer(r"^\| `([\w.]+)\((.*?)\)` \|", text, re.M):
        rows[match.group(1)] = match.group(2)
    return rows


def parse_arguments(name: str, text: str) -> List[tuple]:
    """[(name, kind, default text or None)] of a row; `tokens[B,N,D]` shape notes are dropped."""
    text = re.sub(r"(\w)\[[^\]]*\]", r"\1", text)
    tree = ast.parse(f"def f({text}): pass")
    args = tree.body[0].args
    out = []
    positional = args.posonlyargs + args.args
    defaults = [None] * (len(positional) - len(args.defaults)) + list(args.defaults)
    for a, d in zip(positional, defaults):
        out.append((a.arg, "POSITIONAL_OR_KEYWORD", None if d is None else ast.literal_eval(d)))
    if args.vararg:
        out.append((args.vararg.arg, "VAR_POSITIONAL", None))
    for a, d in zip(args.kwonlyargs, args.kw_defaults):
        out.append((a.arg, "KEYWORD_ONLY", None if d is None else ast.literal_eval(d)))
    if args.kwarg:
        out.append((args.kwarg.arg, "VAR_KEYWORD", None))
    return out


def resolve(name: str):
    module, _, attr = name.rpartition(".")
    return getattr(importlib.import_module("g2tr_kernels" + ("." + module if module else "")), attr)


def signature_rows(fn) -> List[tuple]:
    out = []
    for p in inspect.signature(fn).parameters.values():
        kind = p.kind.name if p.kind.name != "POSITIONAL_ONLY" else "POSITIONAL_OR_KEYWORD"
        out.append((p.name, kind, None if p.default is p.empty else p.default))
    return out


def api_drift(text: str) -> List[str]:
    rows = documented_calls(text)
    public = [n for n in g2tr_kernels.__all__ if inspect.isfunction(getattr(g2tr_kernels, n))]
    problems = [f"{n}: no row in the README's API tables" for n in public + ENTRY_POINTS if n not in rows]
    for name, arguments in rows.items():
        try:
            fn = resolve(name)
        except (ImportError, AttributeError):
            problems.append(f"{name}: the README documents it, the code has no such function")
            continue
        documented, actual = parse_arguments(name, arguments), signature_rows(fn)
        if documented != actual:
            problems.append(f"{name}: README says ({arguments}), the code is {inspect.signature(fn)}")
    return problems


def test_api_tables_match_the_signatures():
    problems = api_drift(README.read_text())
    assert not problems, "\n".join(problems)


def test_api_check_catches_a_renamed_argument():
    text = README.read_text()
    assert "`merge(tokens, keep_idx, lengths, budgets, merge_weight=1.0" in text
    drifted = text.replace("`merge(tokens, keep_idx, lengths, budgets, merge_weight=1.0",
                           "`merge(tokens, keep_idx, lengths, budgets, weight=1.0")
    assert any(p.startswith("merge:") for p in api_drift(drifted))
    drifted = text.replace('min_keep=32, merge_weight=1.0, projection="interpolate"',
                           'min_keep=16, merge_weight=1.0, projection="interpolate"')
    assert any(p.startswith("integrations.hf.apply_g2tr:") for p in api_drift(drifted))


def test_op_schemas_block_matches_the_registered_ops():
    from g2tr_kernels import _native

    if not _native.loaded():
        pytest.skip("the native extension is not built: no registered schemas to compare")
    block = next(b for b in of("") if "g2tr::reduce(" in b.code)
    flat = re.sub(r"\s+", " ", block.code)
    found = re.findall(r"g2tr::(\w+)\((.*?)\) ->", flat)
    assert {name for name, _ in found} >= {"reduce", "anchor_scores", "balanced_topk", "merge"}
    for name, arguments in found:
        schema = getattr(torch.ops.g2tr, name).default._schema
        actual = [(a.name, None if a.default_value is None else a.default_value) for a in schema.arguments]
        documented = []
        for part in arguments.split(", "):
            decl, _, default = part.partition("=")
            documented.append((decl.split()[-1], None if not default else ast.literal_eval(default)))
        assert documented == actual, f"g2tr::{name}: README ({arguments}) vs registered {schema}"


def test_no_machine_paths_in_the_readme():
    assert "/work/" not in README.read_text()
