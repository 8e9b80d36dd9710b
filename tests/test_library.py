"""torch.ops.g2tr as a library: opcheck, the dispatch table, torch.compile, build_info."""
import os
import re
import subprocess
import sys

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import g2tr_kernels as g2tr
from g2tr_kernels._registry import BY_NAME, NAMES

from helpers import assert_outputs_bitwise_equal, make_workload, op_records

OPS = list(NAMES)
BACKENDS = g2tr.build_info()["backends"]


# ---------------------------------------------------------------------------- opcheck


# Each op's samples live with its tests: tests/test_<op>.py opcheck_samples().
RECORDS = op_records()


@pytest.mark.parametrize("op", OPS)
def test_opcheck(op):
    overload = getattr(torch.ops.g2tr, op).default
    for args in RECORDS[op].opcheck_samples():
        results = torch.library.opcheck(overload, args)
        assert all(v == "SUCCESS" for v in results.values()), results


def test_fake_sizes_match_real_sizes():
    # Output sizes come from the int lists alone: a fake run must predict every shape.
    for args in RECORDS["reduce"].opcheck_samples():
        real = torch.ops.g2tr.reduce(*args)
        with FakeTensorMode() as mode:
            fake = torch.ops.g2tr.reduce(mode.from_tensor(args[0]), mode.from_tensor(args[1]), *args[2:])
        for r, f in zip(real, fake):
            assert r.shape == f.shape and r.dtype == f.dtype


# ---------------------------------------------------------------------------- dispatch table


def _dispatch_sites(op):
    """{dispatch key: registration site} from torch._C._dispatch_dump."""
    sites = {}
    for line in torch._C._dispatch_dump(f"g2tr::{op}").splitlines():
        m = re.match(r"^(\w+)(?:\[alias\])?( \(inactive\))?: registered at (\S+)", line)
        if m and m.group(1) != "debug":  # "debug:" is where the schema was defined
            # A second registration for a key shadows the first, which the dump lists as
            # "(inactive)": two owners for one (op, key) pair.
            assert not m.group(2), f"g2tr::{op}: {m.group(1)} has more than one kernel:\n{line}"
            assert m.group(1) not in sites, f"g2tr::{op}: {m.group(1)} listed twice"
            sites[m.group(1)] = m.group(3).replace(os.sep, "/")
    return sites


@pytest.mark.parametrize("op", OPS)
def test_dispatch_table_has_one_owner_per_key(op):
    name = f"g2tr::{op}"
    dump = torch._C._dispatch_dump(name)
    assert re.search(r"debug: registered at \S*csrc/ops\.cpp:\d+", dump), f"{name}: schema not from csrc/ops.cpp"
    sites = _dispatch_sites(op)
    # CPU is the C++ kernel of the op's own file, never a Python kernel that replaced it.
    assert re.search(rf"csrc/cpu/{op}\.cpp:\d+$", sites.get("CPU", "")), f"{name} CPU kernel: {sites.get('CPU')}"
    # Meta is the Python fake kernel of the op's record, registered once, from g2tr_kernels/_registry.py.
    assert "Meta" in sites, f"{name}: no Meta kernel"
    entry = torch._library.simple_registry.singleton.find(name)
    assert len(entry.fake_impl.kernels) == 1, f"{name}: {len(entry.fake_impl.kernels)} fake kernels"
    assert "g2tr_kernels/_registry.py" in entry.fake_impl.kernel.source.replace(os.sep, "/")
    # CUDA exactly when this build compiled it, from csrc/cuda/<op>.cu.
    if "cuda" in BACKENDS:
        assert re.search(rf"csrc/cuda/{op}\.cu:\d+$", sites.get("CUDA", "")), f"{name} CUDA: {sites.get('CUDA')}"
    else:
        assert "CUDA" not in sites, f"{name}: CUDA kernel {sites['CUDA']} in a build without CUDA"
    # Autograd, when present, is torch.library.register_autograd's (it wraps the device
    # kernels, it does not replace them). A composite kernel would shadow every device kernel.
    extra = sorted(set(sites) - {"CPU", "CUDA", "Meta", "Autograd"})
    assert not extra, f"{name}: unexpected kernels for {extra}"
    if "Autograd" in sites:
        assert sites["Autograd"].split(":")[0].endswith("torch/library.py"), f"{name} Autograd: {sites['Autograd']}"
    for key in ("CPU", "Meta"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(name, key)
    for key in ("CompositeImplicitAutograd", "CompositeExplicitAutograd"):
        assert not torch._C._dispatch_has_kernel_for_dispatch_key(name, key), f"{name}: {key} kernel"


def test_registry_lists_every_op_with_its_schema():
    # The records (_registry.py) are what routing, fake and autograd registration and these
    # tests are built from: they must name every op of the library, with csrc/ops.cpp's schema,
    # and the Triton ops must share that schema under their own name.
    assert sorted(NAMES) == sorted(name.split("::")[1] for name in torch._C._dispatch_get_all_op_names()
                                   if name.startswith("g2tr::") and not name.startswith("g2tr::triton_"))
    triton_loaded = True
    try:
        import g2tr_kernels.triton  # noqa: F401  (registers the Triton ops where triton imports)
    except ImportError:
        triton_loaded = False
    for name in OPS:
        record = BY_NAME[name]
        expected = torch._C.parse_schema(record.qualname + record.schema[len(name):])
        native = getattr(torch.ops.g2tr, name).default._schema
        assert str(native) == str(expected), f"{name}: csrc/ops.cpp {native} != _registry.py {expected}"
        if triton_loaded:
            # Inferred from the annotations: SymInt for int and unnamed returns, else the same.
            triton = getattr(torch.ops.g2tr, f"triton_{name}").default._schema
            assert [(a.name, a.default_value) for a in triton.arguments] == \
                [(a.name, a.default_value) for a in expected.arguments], f"{name}: {triton}"
            assert len(triton.returns) == len(expected.returns), f"{name}: {triton}"


def test_import_overrides_no_kernel():
    # Registering a Python kernel for a key C++ already owns replaces it with one warning
    # only; a fresh interpreter is the one place that warning can be seen.
    code = "import warnings; warnings.simplefilter('always'); import g2tr_kernels, torch; torch.ops.g2tr.reduce"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "Overriding a previously registered kernel" not in proc.stderr, proc.stderr


# ---------------------------------------------------------------------------- torch.compile

GRIDS, ANCHOR_GRIDS = [(9, 7), (6, 6)], [(3, 3), (2, 4)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_compile_python_api(dtype):
    tokens, anchors = make_workload(GRIDS, ANCHOR_GRIDS, 16, dtype, seed=3)

    def fn(x, a):
        return g2tr.reduce(x, a, GRIDS, ANCHOR_GRIDS, keep_ratio=0.5, min_keep=4, merge_weight=2.0)

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True)
    got = compiled(tokens, anchors)
    assert isinstance(got, g2tr.ReduceOutput)
    assert_outputs_bitwise_equal("compiled g2tr_kernels.reduce", got, fn(tokens, anchors))


def test_compile_torch_ops_with_surrounding_code():
    # The op inside a larger graph: inductor needs exact fake sizes to plan the rest.
    tokens, anchors = make_workload(GRIDS, ANCHOR_GRIDS, 16, seed=4)
    flat_g = [v for p in GRIDS for v in p]
    flat_a = [v for p in ANCHOR_GRIDS for v in p]

    def fn(x, a):
        merged, keep_idx, cu, scores, assign = torch.ops.g2tr.reduce(x * 2.0, a, flat_g, flat_a, 0.5, 4, 1.0)
        return merged + 1.0, keep_idx, cu, scores, assign

    torch._dynamo.reset()
    got = torch.compile(fn, fullgraph=True)(tokens, anchors)
    want = fn(tokens, anchors)
    for name, g, w in zip(["merged", "keep_idx", "cu_seqlens", "scores", "assign"], got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0, msg=lambda m: f"{name}: {m}")  # noqa: B023


# ---------------------------------------------------------------------------- build_info


def test_build_info():
    info = g2tr.build_info()
    assert info["version"] == g2tr.__version__
    assert "cpu" in info["backends"] and set(info["backends"]) <= {"cpu", "cuda"}
    assert isinstance(info["cuda_archs"], str)
    assert bool(info["cuda_archs"]) == ("cuda" in info["backends"])
    assert isinstance(info["openmp_threads"], int) and info["openmp_threads"] >= 1
    assert isinstance(info["parallel_backend"], str) and info["parallel_backend"]
    assert {"vendor", "avx512_bf16", "amx_bf16"} <= set(info["cpu_features"])
    for dtype in ("bfloat16", "float16", "float32"):
        choice = info["cpu_merge"][dtype]
        assert choice["path"] in ("bf16_dot", "fp32_gemm", "bf16_gemm") and choice["reason"]
    assert info["cpu_merge"]["float32"]["path"] == "fp32_gemm"
    # A fresh dict each call: callers may edit it.
    info["backends"].append("x")
    assert "x" not in g2tr.build_info()["backends"]


def test_version_is_pep440():
    assert re.fullmatch(r"\d+\.\d+\.\d+([.+-]\w+)*", g2tr.__version__)
