"""What the Triton op files share: the ranking key, the inverse norm, per-image tables on
the device, and when and where kernels may be launched. No op file imports another.

Per-image tables (host ints: offsets, lengths, budgets) reach the kernels as small int64
tensors. They are uploaded once per distinct content and device and then reused from a
small LRU cache: no host-to-device copy per call, so an eager call costs launches only,
and a call inside a CUDA graph capture finds its tables already on the device (the
capture records their addresses, so a table a graph uses is never evicted). Kernels only
read tables; outputs built from one (cu_seqlens) are fresh device copies.
"""
from __future__ import annotations

import collections
import contextlib
import itertools
import threading
from typing import ContextManager, Dict, List, Sequence, Tuple

import torch
import triton
import triton.language as tl

from ..reference.anchor_scores import NORM_EPS

_NORM_EPS = tl.constexpr(NORM_EPS)  # the one eps of every backend, as a constant the kernels can read

# ---------------------------------------------------------------------------------------
# The one ordering (common.h ranks_before) as an int64 key: a larger key ranks first.
# ---------------------------------------------------------------------------------------


@triton.jit
def needs_rescale(sum_of_squares):
    """common.h needs_rescale: a sum of squares outside [2^-100, 2^100] (NaN: False)."""
    return (sum_of_squares < 7.888609052210118e-31) | (sum_of_squares > 1.2676506002282294e30)


@triton.jit
def cosine_pow2(max_abs):
    """common.h cosine_pow2: 2^p with p = 126 - biased exponent of max_abs, clamped to
    [-126, 127]; 1 for zero or non-finite max_abs. Bit arithmetic (no libdevice frexp)."""
    biased = (max_abs.to(tl.int32, bitcast=True) >> 23) & 0xFF
    p = tl.minimum(tl.maximum(126 - biased, -126), 127)
    pow2 = ((p + 127) << 23).to(tl.float32, bitcast=True)
    return tl.where((max_abs == 0.0) | (biased == 0xFF), 1.0, pow2)


@triton.jit
def row_pow2(x_ptr, row, live, D, BLOCK_D: tl.constexpr):
    """cosine_pow2 of the max-abs of rows x_ptr + row[i] (int64 offsets); a second pass
    over D, run only for blocks holding a row that needs_rescale."""
    m = tl.zeros(row.shape, dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        x = tl.load(x_ptr + row[:, None] + d[None, :], mask=live[:, None] & (d < D)[None, :], other=0.0)
        a = tl.abs(x.to(tl.float32))
        m = tl.maximum(m, tl.max(tl.where(a == a, a, 0.0), axis=1))  # NaN ignored, as in max_abs
    return cosine_pow2(m)


@triton.jit
def order_bits(value):
    """fp32 -> int32 whose signed order is the float order; NaN ranks with -inf, -0 == +0."""
    value = tl.where(value != value, -float("inf"), value)
    value = tl.where(value == 0.0, 0.0, value)  # -0.0 and +0.0 compare equal: one key
    bits = value.to(tl.int32, bitcast=True)
    # Negative floats order backwards in their magnitude bits: flip those (not the sign).
    return tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


@triton.jit
def rank_key(value, index):
    """Packed (value, index): higher value first, then the lower index (0 <= index < 2^31)."""
    return (order_bits(value).to(tl.int64) << 32) | (2147483647 - index.to(tl.int64))


@triton.jit
def key_index(key):
    """The index packed into a rank_key."""
    return 2147483647 - (key & 2147483647)


@triton.jit
def inv_norm(sum_of_squares, pow2):
    """1 / max(|x|, NORM_EPS) with IEEE sqrt and division (common.h inv_norm); for a row scaled
    by the power of two pow2 (cosine_pow2 above, 1 for normal rows),
    x / max(|x|, eps) = (x * pow2) * result."""
    return tl.math.div_rn(1.0, tl.maximum(tl.math.sqrt_rn(sum_of_squares), pow2 * _NORM_EPS))


# ---------------------------------------------------------------------------------------
# Per-image tables
# ---------------------------------------------------------------------------------------


def starts(sizes: Sequence[int]) -> List[int]:
    """Where each image's run begins in a packed array: [0, s0, s0 + s1, ..., sum(sizes)]."""
    return list(itertools.accumulate(sizes, initial=0))


class TableCache:
    """Read-only device tables keyed by (content, dtype, device): uploaded once, then reused.

    At most `capacity` entries are kept, least recently used first out, except entries
    used while the current stream was capturing a CUDA graph: the graph holds their
    addresses, so they stay for the life of the process (a few hundred bytes each).
    """

    def __init__(self, capacity: int = 64) -> None:
        self.capacity = capacity
        self._recent: "collections.OrderedDict[tuple, torch.Tensor]" = collections.OrderedDict()
        self._captured: Dict[tuple, torch.Tensor] = {}
        self._lock = threading.Lock()
        self.uploads = 0  # tables created (tests read this)

    def __len__(self) -> int:
        return len(self._recent) + len(self._captured)

    def clear(self) -> None:
        with self._lock:
            self._recent.clear()
            self._captured.clear()

    def get(self, rows: Tuple, dtype: torch.dtype, device: torch.device, capturing: bool = False) -> torch.Tensor:
        key = (rows, dtype, device)
        with self._lock:
            table = self._captured.get(key)
            if table is None:
                table = self._recent.get(key)
                if table is not None:
                    self._recent.move_to_end(key)
            if table is None:
                if capturing:
                    raise RuntimeError(
                        "g2tr triton: these image grids were not seen before this CUDA graph capture, so their "
                        "per-image tables are not on the device (a copy cannot be captured): run the op once "
                        "with the same grids before capturing (a warm-up, as torch.cuda.graphs recommends)"
                    )
                table = torch.tensor(rows, dtype=dtype, device=device)  # the one upload of this content
                self.uploads += 1
                self._recent[key] = table
                while len(self._recent) > self.capacity:
                    self._recent.popitem(last=False)
            if capturing and key not in self._captured:
                self._captured[key] = self._recent.pop(key, table)
        if not capturing and device.type == "cuda":
            # Used on another stream than it was made on: an eviction must not hand its
            # memory to that stream's next allocation while a kernel here still reads it.
            # (record_stream on the stream it was made on is a no-op.)
            table.record_stream(torch.cuda.current_stream(device))
        return table


TABLES = TableCache()


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def device_table(values: list, like: torch.Tensor, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """A read-only table of host ints (nested lists) on like's device, uploaded once per content.

    Under tracing (fake tensors) a plain constant is what the graph wants; under the
    interpreter (CPU tensors) a fresh tensor costs nothing worth caching.
    """
    from torch._subclasses.fake_tensor import is_fake

    device = like.device
    if device.type != "cuda" or is_fake(like):
        return torch.tensor(values, dtype=dtype, device=device)
    rows = tuple(tuple(r) if isinstance(r, (list, tuple)) else r for r in values)
    with torch.cuda.device(device):
        return TABLES.get(rows, dtype, device, _capturing(device))


def image_table(columns: Sequence[Sequence[int]], like: torch.Tensor) -> torch.Tensor:
    """int64 [B, len(columns)] on like's device: row b holds entry b of every column (device_table)."""
    return device_table([[int(v) for v in row] for row in zip(*columns)], like)


def fresh_table(values: Sequence[int], like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An output made of host ints (cu_seqlens): a device copy of the cached table, never the
    cached tensor itself (a caller may write to its outputs). Capturable: device-to-device."""
    return device_table(list(values), like, dtype).clone()


ROW_ALIGN = 16  # elements: Triton vectorises a row's loads only when its stride is a multiple of 16


def padded_width(dim: int) -> int:
    """D rounded up to ROW_ALIGN: the columns the kernels read from aligned_rows' result."""
    return -(-dim // ROW_ALIGN) * ROW_ALIGN


def aligned_rows(x: torch.Tensor) -> torch.Tensor:
    """x, or a copy of it whose rows start on 16-element boundaries (a [:, :D] view of a
    zero-padded buffer), so that the kernels' row loads are 16 bytes wide for any D.

    Triton specialises an integer argument on divisibility by 16 and a pointer on 16-byte
    alignment. Without that (D = 3583, or a storage offset) every load is a masked scalar
    one and the merge tile kernel needs 255 registers and spills. The kernels take the
    row stride separately and read padded_width(D) columns: the padding holds zeros, which
    add nothing to a norm or a dot product; only the merged rows stop at D.
    """
    from torch._subclasses.fake_tensor import is_fake

    if x.dim() != 2 or x.shape[1] == 0:
        return x.contiguous()
    dim = x.shape[1]
    if dim % ROW_ALIGN == 0 and x.stride(1) == 1 and x.stride(0) % ROW_ALIGN == 0 and (
        is_fake(x) or x.data_ptr() % 16 == 0
    ):
        return x
    padded = x.new_zeros(x.shape[0], padded_width(dim))
    padded[:, :dim] = x
    return padded[:, :dim]


# ---------------------------------------------------------------------------------------
# When and where kernels run
# ---------------------------------------------------------------------------------------


def interpreted() -> bool:
    """Whether @triton.jit built the kernels for the Triton interpreter (TRITON_INTERPRET=1 at import)."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(order_bits, InterpretedFunction)


def launchable(like: torch.Tensor, op: str) -> bool:
    """False where the kernels must not run: fake tensors under the interpreter (shapes only).

    Raises where they cannot run: CPU tensors without the interpreter, or torch.compile
    tracing interpreted kernels (the compiled graph would silently lose them).
    """
    from torch._subclasses.fake_tensor import is_fake
    from torch._subclasses.functional_tensor import FunctionalTensor

    if not interpreted():
        if like.device.type not in ("cuda", "meta") and not is_fake(like):
            raise RuntimeError(
                f"{op}: backend='triton' on {like.device} tensors needs the Triton interpreter: set "
                "TRITON_INTERPRET=1 before g2tr_kernels.triton is first imported (tests do), or use CUDA tensors"
            )
        return True  # real launches; under tracing wrap_triton records them
    if isinstance(like, FunctionalTensor):
        raise RuntimeError(
            f"{op}: torch.compile cannot trace Triton kernels running under TRITON_INTERPRET=1; "
            "compile with CUDA tensors and the interpreter off"
        )
    return not is_fake(like) and like.device.type != "meta"


def launch(kernel):
    """What the launchers index with a grid: torch.library.wrap_triton(kernel), so that
    torch.compile records the launch, or the kernel itself under the interpreter (nothing
    traces interpreted kernels: launchable() refuses, and torch 2.11's wrap_triton rejects
    Triton 3.6's InterpretedFunction)."""
    if interpreted():
        return kernel
    from torch.library import wrap_triton

    return wrap_triton(kernel)


def launch_guard(like: torch.Tensor) -> ContextManager:
    """Makes like's GPU the current device for the launches inside it.

    Triton launches on the current device and its current stream, whatever device the
    arguments are on: with tensors on cuda:1 and cuda:0 current, the kernels would run on
    cuda:0 (an illegal access without peer access, unordered with cuda:1's stream).
    """
    from torch._subclasses.fake_tensor import is_fake

    if like.device.type == "cuda" and not is_fake(like):
        return torch.cuda.device(like.device)
    return contextlib.nullcontext()


def count_blocks() -> Tuple[int, int]:
    """(BLOCK_I, BLOCK_J) of the counting kernels: the interpreter pays per op, a GPU per register."""
    return (256, 256) if interpreted() else (64, 64)
