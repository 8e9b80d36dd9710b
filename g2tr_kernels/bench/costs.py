"""A device-independent GPU cost account: ESTIMATE, NOT MEASURED.

For each workload it counts, per stage, the kernel launches, the compulsory bytes moved
to and from HBM and the FLOPs of one reduce call, for two structures:
- ours: the CUDA path of this project (five launches per call whatever the number of
  anchor cells, for up to 64 images; the merge never materialises a similarity matrix,
  it keeps a running argmax per dropped token);
- published: the structure of the authors' code (bench/published.py): a few launches
  and a host sync per anchor cell, and one dense (N-K) x K similarity over the whole
  packed batch, written to and read back from memory.
Each stage's roofline time on an H100 SXM is max(bytes / 3.35 TB/s, FLOPs / 990 TFLOP/s
dense bf16); launches and syncs are charged at the assumed costs below. These are lower bounds
under stated assumptions, to read the measured CPU numbers against, never results.
"""
from __future__ import annotations

from typing import Any, Dict, List

from .published import launches_per_call, occupied_cells
from .workloads import Workload

H100 = {"name": "H100 SXM", "hbm_bytes_per_s": 3.35e12, "bf16_dense_flops": 990e12}
LAUNCH_S = 4e-6  # assumed per-kernel cost of an eager launch from PyTorch
SYNC_S = 15e-6  # assumed cost of a device-to-host sync that drains the stream

# Launches per reduce call of the project's CUDA path, by stage, as csrc/cuda/reduce.cu
# launches them for up to 64 images: one scoring kernel (which also keeps the token
# norms), one selection kernel (which also writes cu_seqlens), and for the merge a tiled
# dot-product argmax, a grouping of dropped tokens by target and an ordered row sum.
# Update this when the CUDA path changes.
OURS_LAUNCHES = {"score": 1, "select": 1, "merge": 3}


def _stage(name: str, launches: int, bytes_moved: float, flops: float, syncs: int = 0, note: str = "") -> Dict[str, Any]:
    t_mem = bytes_moved / H100["hbm_bytes_per_s"]
    t_math = flops / H100["bf16_dense_flops"]
    return {
        "stage": name,
        "launches": launches,
        "host_syncs": syncs,
        "bytes": bytes_moved,
        "flops": flops,
        "roofline_s": max(t_mem, t_math),
        "bound": "memory" if t_mem >= t_math else "compute",
        "overhead_s": launches * LAUNCH_S + syncs * SYNC_S,
        "note": note,
    }


def _total(stages: List[Dict[str, Any]]) -> Dict[str, Any]:
    keys = ("launches", "host_syncs", "bytes", "flops", "roofline_s", "overhead_s")
    total = {k: sum(s[k] for s in stages) for k in keys}
    total["estimate_s"] = total["roofline_s"] + total["overhead_s"]
    return total


def cost_account(workload: Workload, keep_ratio: float = 0.5, min_keep: int = 32, elem_bytes: int = 2) -> Dict[str, Any]:
    n = workload.n_total
    d = workload.dim
    m = sum(workload.cell_counts)
    budgets = workload.budgets(keep_ratio, min_keep)
    k = sum(budgets)
    e = elem_bytes
    per_image_pairs = sum((ni - ki) * ki for ni, ki in zip(workload.lengths, budgets))
    batch_pairs = (n - k) * k

    ours = [
        _stage("score", OURS_LAUNCHES["score"], n * d * e + m * d * e + n * (4 + 8), 4 * n * d + 2 * m * d,
               note="tokens and anchors read once; scores and cells written"),
        _stage("select", OURS_LAUNCHES["select"], 4 * n * 12 + k * 8 + 4 * (workload.images + 1), 0,
               note="per-image sort of (score, index) keys: a few passes over N; cu_seqlens written"),
        _stage("merge", OURS_LAUNCHES["merge"], 2 * n * d * e + k * d * e + 2 * n * 8 + (n - k) * 8,
               2 * per_image_pairs * d + n * d,
               note="per image, never materialised: tokens read for the products and the mean, merged written"),
    ]

    launches = launches_per_call(workload.grids, workload.anchor_grids)
    occupied = launches["occupied_cells"]
    # Every visited cell reads the image's cell ids and writes a mask (eq), then reads
    # the mask (any): 10 bytes a token. An occupied cell adds not (2), masked_fill (9)
    # and argmax (4) over the image's fp32 scores.
    cell_loop_bytes = sum(
        h * w * (10 * ha * wa + 15 * occupied_cells(h, w, ha, wa))
        for (h, w), (ha, wa) in zip(workload.grids, workload.anchor_grids)
    )
    pub = [
        _stage("score", workload.images * 4, 4 * n * d * e + m * d * e, 6 * n * d,
               note="anchors gathered to N x D, then cosine"),
        _stage("select: cell loop", 2 * m + 4 * occupied, cell_loop_bytes, 0, syncs=m,
               note=f"{m} cells ({occupied} occupied): eq + any (sync) per cell, masked argmax per occupied cell"),
        _stage("select: rank + fill", workload.images * 9, 6 * n * 4 + k * 8, 0),
        _stage("merge: dense similarity", 6,
               2 * n * d * e + 2 * n * d * e + batch_pairs * e,
               2 * batch_pairs * d + 3 * n * d,
               note=f"normalise, gather, ({n - k} x {k}) matmul over the whole batch, written in bf16"),
        _stage("merge: argmax + mean", 16, batch_pairs * e + n * d * (e + 4) + 3 * k * d * 4 + n * 16, n * d, syncs=1),
    ]
    return {
        "label": "estimate, not measured",
        "device_model": H100,
        "assumptions": {
            "launch_s": LAUNCH_S,
            "sync_s": SYNC_S,
            "element_bytes": e,
            "bytes": "compulsory HBM traffic: each operand once (one BAGEL image's kept block fits the 50 MB L2)",
        },
        "workload": workload.id,
        "merge_flops_per_image": 2 * per_image_pairs * d,
        "merge_flops_whole_batch": 2 * batch_pairs * d,
        "similarity_bytes_whole_batch": batch_pairs * e,
        "ours": {"stages": ours, "total": _total(ours)},
        "published": {"stages": pub, "total": _total(pub), "launch_count_detail": launches},
    }
