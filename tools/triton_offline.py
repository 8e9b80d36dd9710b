"""Compiles the Triton kernels of g2tr_kernels for sm_80 / sm_90 without a GPU and returns
ptxas -v output per kernel specialisation (tools/ptxas_report.py --triton reads it).

Each kernel is compiled exactly as the launchers would launch it: the real launchers run
on meta tensors of the real shapes, with _common.launch (wrap_triton) replaced by JITFunction.warmup and
Triton's active driver by one that names the target arch. So block sizes, num_warps,
num_stages and Triton's specialisation of the arguments (divisibility by 16, pointer
alignment) are the launch's own. The PTX then goes through Triton's bundled ptxas with -v.
Must run in a process where TRITON_INTERPRET is unset (an interpreted kernel has no PTX).
"""
from __future__ import annotations

import importlib
import os
import re
import subprocess
import tempfile
from typing import Dict, List, Sequence, Tuple

# Shapes (SHAPES.md M1 geometry; D = BAGEL's 3584, an odd D that pads to it, and a small
# odd D whose narrow blocks are specialisations of their own) and dtypes: what CI checks.
# fp16 takes bf16's tiles and compiled without spills at all three D (2026-12-01): pass
# dtypes=("float16",) to look again.
DIMS = (3584, 3583, 17)
DTYPES = ("bfloat16", "float32")
GRIDS, ANCHOR_GRIDS = [(70, 70), (27, 27)], [(32, 32), (16, 16)]


class _OfflineDriver:
    """The part of Triton's driver that JITFunction.run asks for before compiling."""

    def __init__(self, arch: int) -> None:
        self.arch = arch

    def get_current_device(self) -> int:
        return self.arch  # one kernel cache per arch

    def get_current_stream(self, device=None) -> int:
        return 0

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", self.arch, 32)

    def get_active_torch_device(self):
        import torch

        return torch.device("meta")


def _launches(arch: int, dims: Sequence[int] = DIMS, dtypes: Sequence[str] = DTYPES) -> List[Tuple[str, object]]:
    """(label, CompiledKernel) of every launch the launchers make on the shapes above."""
    import torch
    from triton.runtime import driver

    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("triton_offline: unset TRITON_INTERPRET (interpreted kernels have no PTX)")
    stems = ("anchor_scores", "balanced_topk", "merge")
    modules = {m: importlib.import_module(f"g2tr_kernels.triton.{m}") for m in stems}
    reduce_mod = importlib.import_module("g2tr_kernels.triton.reduce")
    found: List[Tuple[str, object]] = []
    context = {"case": ""}

    class Warmup:
        def __init__(self, kernel) -> None:
            self.kernel = kernel

        def __getitem__(self, grid):
            def call(*args, **kwargs):
                compiled = self.kernel.warmup(*args, grid=grid, **kwargs)
                found.append((f"{self.kernel.__name__} [{context['case']}]", compiled))

            return call

    saved = {m: mod.launch for m, mod in modules.items()}
    previous = driver._active  # None here: no GPU, no driver (reading .active would raise)
    driver.set_active(_OfflineDriver(arch))
    try:
        for mod in modules.values():
            mod.launch = Warmup
        lengths = [h * w for h, w in GRIDS]
        cell_counts = [h * w for h, w in ANCHOR_GRIDS]
        for name in dtypes:
            dtype = getattr(torch, name)
            for dim in dims:
                context["case"] = f"{name}, D {dim}"
                tokens = torch.empty(sum(lengths), dim, dtype=dtype, device="meta")
                anchors = torch.empty(sum(cell_counts), dim, dtype=dtype, device="meta")
                reduce_mod.reduce_tokens(tokens, anchors, GRIDS, ANCHOR_GRIDS, 0.5, 32, 1.0)  # fused path
                budgets = [n // 2 for n in lengths]
                keep = torch.empty(sum(budgets), dtype=torch.int64, device="meta")
                modules["merge"].merge_tokens(tokens, keep, lengths, budgets, 1.0)  # norms computed here
                modules["anchor_scores"].score(tokens, anchors, GRIDS, ANCHOR_GRIDS)  # no norms, no cell best
        context["case"] = "quota 2"
        scores = torch.empty(sum(lengths), dtype=torch.float32, device="meta")
        cells = torch.empty(sum(lengths), dtype=torch.int64, device="meta")
        modules["balanced_topk"].select(scores, cells, lengths, [n // 2 for n in lengths], cell_counts, [2, 2])
    finally:
        for m, mod in modules.items():
            mod.launch = saved[m]
        driver._active = previous
    return found


def ptxas_logs(archs: Sequence[int], dims: Sequence[int] = DIMS, dtypes: Sequence[str] = DTYPES
               ) -> Dict[Tuple[str, str], str]:
    """{(label, arch name): ptxas -v output}, the archs compiled side by side in processes of their own."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(len(archs), mp_context=multiprocessing.get_context("spawn")) as pool:
        parts = list(pool.map(_arch_logs, archs, [dims] * len(archs), [dtypes] * len(archs)))
    return {key: text for part in parts for key, text in part.items()}


def _arch_logs(arch: int, dims: Sequence[int], dtypes: Sequence[str]) -> Dict[Tuple[str, str], str]:
    """{(label, arch name): ptxas -v output} for each distinct compiled kernel and arch.

    The label names the kernel and the first case that compiled it (later cases with the
    same specialisation reuse the binary: D = 3583 reads 3584 padded columns, D = 17 32)."""
    from triton.backends.nvidia.compiler import get_ptxas

    logs: Dict[Tuple[str, str], str] = {}
    seen = set()
    for label, compiled in _launches(arch, dims, dtypes):
        if compiled.hash in seen:
            continue
        seen.add(compiled.hash)
        ptx = compiled.asm["ptx"]
        target = re.search(r"^\.target\s+(sm_\w+)", ptx, re.M).group(1)
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "kernel.ptx")
            with open(path, "w") as f:
                f.write(ptx)
            res = subprocess.run(
                [get_ptxas(arch).path, "-v", "--warn-on-spills", f"--gpu-name={target}", path,
                 "-o", os.path.join(tmp, "kernel.cubin")],
                capture_output=True, text=True, check=False,
            )
        if res.returncode != 0:
            raise RuntimeError(f"ptxas failed on {label} for {target}:\n{res.stderr}")
        logs[(label, f"sm_{arch}")] = res.stdout + res.stderr
    return logs
