"""Stage IV in Triton (the rule: SPEC.md §4 in docs/SPEC.md, g2tr_kernels/reference/merge.py).
Four launches, each over all images of the packed batch at once:

1. _prepare_kernel (token blocks x images): binary search of each token in the image's
   kept indices -> kept tokens get their output row, dropped ones their slot in a dense
   per-image list of dropped tokens (ascending). Standalone merge also computes the
   tokens' inverse norms here (reduce reuses the ones of the score kernel).
2. _assign_kernel (dropped-row tiles x column splits x images): tiled tl.dot of dropped
   rows against kept rows with fp32 accumulation and a running row argmax; nothing of size
   (N-K) x K is ever in memory. value = (dot * inv_norm[k]) * inv_norm[j]; inside a program
   a strictly greater value replaces the best and tiles ascend, which gives SPEC.md §4's
   tie rule (NaN compares false, so it never replaces). Column splits (more programs for one large image) combine through
   tl.atomic_max on rank_key(value, k): integer max is order independent, so the result is
   the same bit for bit.
3. _group_kernel (dropped-row blocks x images): stable counting sort of the dropped
   tokens by target (the slot of a token = how many have a lower target, or the same
   target and a lower index), writing each dropped token's output row.
4. _mean_kernel (kept-row blocks x D blocks x images): each kept row starts at
   merge_weight * v_k and adds its group in ascending token order, in fp32, counting in
   fp32 from merge_weight, and divides (IEEE) once: the order the reference uses. No float
   atomics anywhere.

keep_idx must be strictly ascending inside each image (as every selection returns it).
torch.ops.g2tr.triton_merge checks that on the host before any launch and raises the cpu
backend's ValueError (_checks.kept_indices); on CUDA tensors that reads keep_idx back, one
sync of K_total int64. Under torch.compile tracing there is no data to read and the check
is skipped; the kernels are then defined for any keep_idx instead: every index they use is
clamped into its image and assign starts at zeros, so they never read or write out of
bounds and every assign value is an output row in [0, K_total). The fused reduce passes the
keep_idx its own selection made, valid by construction, and does not check it.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from .. import _checks
from ._common import (
    aligned_rows,
    count_blocks,
    image_table,
    interpreted,
    inv_norm,
    key_index,
    launch,
    launch_guard,
    launchable,
    needs_rescale,
    padded_width,
    rank_key,
    row_pow2,
    starts,
)

# The merge kernels read one int64 row per image (_image_row): tok_begin, n, k, keep_begin
# (= output row of the image's first kept token), drop_begin (first slot of its dropped
# tokens in the dense per-batch lists).


@triton.jit
def _image_row(table, image):
    row = table + image * 5
    return tl.load(row + 0), tl.load(row + 1), tl.load(row + 2), tl.load(row + 3), tl.load(row + 4)


@triton.jit
def _lower_bound(base, size, value, STEPS: tl.constexpr):
    """First position in sorted base[0:size] whose entry is >= value (vectorised over value).

    STEPS >= bit_length(size) iterations make it exact; extra ones change nothing.
    """
    lo = tl.zeros_like(value).to(tl.int64)
    hi = lo + size
    for _ in tl.static_range(STEPS):
        active = lo < hi
        mid = (lo + hi) // 2
        entry = tl.load(base + mid, mask=active, other=0)
        right = active & (entry < value)
        lo = tl.where(right, mid + 1, lo)
        hi = tl.where(active & (entry >= value), mid, hi)
    return lo


@triton.jit
def _prepare_kernel(
    tokens,  # [N, D]
    keep_idx,  # int64 [K_total], global, ascending per image
    table,  # int64 [B, 5]
    assign,  # int64 [N] out: output rows of kept tokens (dropped ones: _group_kernel)
    dropped,  # int64 [N - K_total] out: dropped tokens (global), ascending per image
    inv_norms,  # fp32 [N] out (WRITE_NORMS)
    pow2s,  # fp32 [N] out (WRITE_NORMS): cosine_pow2 of each token (anchor_scores.py)
    D,  # columns to read: padded_width(D), zeros past the true D (_common.aligned_rows)
    stride,  # row stride of tokens (a multiple of 16)
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
    STEPS: tl.constexpr,
    WRITE_NORMS: tl.constexpr,
):
    block = tl.program_id(0)
    image = tl.program_id(1)
    tok_begin, n, k, keep_begin, drop_begin = _image_row(table, image)
    if block * BLOCK_T >= n:
        return

    token = tok_begin + block * BLOCK_T + tl.arange(0, BLOCK_T)
    live = token < tok_begin + n
    kept_before = _lower_bound(keep_idx + keep_begin, k, token, STEPS)
    at = tl.load(keep_idx + keep_begin + tl.minimum(kept_before, k - 1))
    is_kept = (kept_before < k) & (at == token)
    tl.store(assign + token, keep_begin + kept_before, mask=live & is_kept)
    # The dropped tokens before this one are the tokens before it minus the kept ones.
    slot = token - tok_begin - kept_before
    tl.store(dropped + drop_begin + slot, token, mask=live & ~is_kept & (slot >= 0) & (slot < n - k))

    if WRITE_NORMS:
        row = token.to(tl.int64) * stride
        sq = tl.zeros([BLOCK_T], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            x = tl.load(tokens + row[:, None] + d[None, :], mask=live[:, None] & (d < D)[None, :], other=0.0)
            x = x.to(tl.float32)
            sq += tl.sum(x * x, axis=1)
        pow2 = tl.full([BLOCK_T], 1.0, dtype=tl.float32)
        if tl.max((live & needs_rescale(sq)).to(tl.int32), axis=0) > 0:  # rare: extreme magnitudes
            pow2 = tl.where(needs_rescale(sq), row_pow2(tokens, row, live, D, BLOCK_D), 1.0)
            sq = tl.zeros([BLOCK_T], dtype=tl.float32)
            for d0 in range(0, D, BLOCK_D):
                d = d0 + tl.arange(0, BLOCK_D)
                x = tl.load(tokens + row[:, None] + d[None, :], mask=live[:, None] & (d < D)[None, :], other=0.0)
                x = x.to(tl.float32) * pow2[:, None]
                sq += tl.sum(x * x, axis=1)
        tl.store(inv_norms + token, inv_norm(sq, pow2), mask=live)
        tl.store(pow2s + token, pow2, mask=live)


@triton.jit
def _assign_kernel(
    tokens,  # [N, D]
    keep_idx,  # int64 [K_total]
    dropped,  # int64 [N - K_total], from _prepare_kernel
    inv_norms,  # fp32 [N]
    pow2s,  # fp32 [N]
    table,  # int64 [B, 5]
    best,  # int64 [N - K_total] in/out: max rank_key(value, local kept row), starts at int64 min
    D,  # columns to read: padded_width(D)
    stride,  # row stride of tokens (a multiple of 16)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr,  # dot in fp32 (the interpreter's tl.dot mishandles bf16)
    PRECISION: tl.constexpr,  # "ieee" for fp32 inputs (TF32 would change the argmax), else None
):
    tile_m = tl.program_id(0)
    split = tl.program_id(1)
    splits = tl.num_programs(1)
    image = tl.program_id(2)
    tok_begin, n, k, keep_begin, drop_begin = _image_row(table, image)
    num_dropped = n - k
    if tile_m * BLOCK_M >= num_dropped:
        return
    # This split's contiguous run of kept-column tiles.
    tiles = tl.cdiv(k, BLOCK_N)
    per_split = tl.cdiv(tiles, splits)
    first_tile = split * per_split
    last_tile = tl.minimum(first_tile + per_split, tiles)
    if first_tile >= last_tile:
        return

    m = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_live = m < num_dropped
    # Indices are clamped into the image, so padding rows and columns read real tokens and
    # need no masks in the inner loop (their results are discarded); bad keep_idx cannot
    # read out of bounds either.
    row_tok = tl.load(dropped + drop_begin + m, mask=m_live, other=0)
    row_tok = tl.minimum(tl.maximum(row_tok, tok_begin), tok_begin + n - 1)
    row_inv = tl.load(inv_norms + row_tok)
    a_pow2 = tl.load(pow2s + row_tok)
    rows_scaled = tl.max((a_pow2 != 1.0).to(tl.int32), axis=0) > 0
    dk = tl.arange(0, BLOCK_K)
    a_ptrs = tokens + row_tok.to(tl.int64)[:, None] * stride + dk[None, :]

    best_value = tl.full([BLOCK_M], -float("inf"), dtype=tl.float32)
    best_col = tl.zeros([BLOCK_M], dtype=tl.int32)
    for tile_n in range(first_tile, last_tile):
        col = (tile_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int32)
        col_live = col < k
        col_tok = tl.load(keep_idx + keep_begin + col, mask=col_live, other=0)
        col_tok = tl.minimum(tl.maximum(col_tok, tok_begin), tok_begin + n - 1)
        col_inv = tl.load(inv_norms + col_tok)
        b_pow2 = tl.load(pow2s + col_tok)
        b_ptrs = tokens + col_tok.to(tl.int64)[None, :] * stride + dk[:, None]
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        if rows_scaled | (tl.max((b_pow2 != 1.0).to(tl.int32), axis=0) > 0):
            # Rare: rows of extreme magnitude enter the dot scaled by their exact power of
            # two (_common.cosine_pow2), so no product overflows. The scaled values are cast
            # back to the input dtype and go through the same dot as below: a power of two is
            # exact in bf16 and fp32 (fp32's exponent range; fp16 rows never need it: their
            # sums of squares stay inside [2^-100, 2^100]), and the same instruction keeps the
            # kernel's registers as they are (an fp32 "ieee" dot here spilled kilobytes).
            for d0 in range(0, D, BLOCK_K):
                d_live = dk < D - d0
                a = tl.load(a_ptrs + d0, mask=d_live[None, :], other=0.0)
                b = tl.load(b_ptrs + d0, mask=d_live[:, None], other=0.0)
                a = (a.to(tl.float32) * a_pow2[:, None]).to(a.dtype)
                b = (b.to(tl.float32) * b_pow2[None, :]).to(b.dtype)
                if UPCAST:
                    a = a.to(tl.float32)
                    b = b.to(tl.float32)
                acc = tl.dot(a, b, acc, input_precision=PRECISION)
        else:
            for d0 in range(0, D, BLOCK_K):
                d_live = dk < D - d0
                a = tl.load(a_ptrs + d0, mask=d_live[None, :], other=0.0)
                b = tl.load(b_ptrs + d0, mask=d_live[:, None], other=0.0)
                if UPCAST:
                    a = a.to(tl.float32)
                    b = b.to(tl.float32)
                acc = tl.dot(a, b, acc, input_precision=PRECISION)
        value = (acc * col_inv[None, :]) * row_inv[:, None]
        # NaN and padding columns can never win.
        value = tl.where(col_live[None, :] & (value == value), value, -float("inf"))
        tile_best = tl.max(value, axis=1)
        tile_col = tl.min(tl.where(value == tile_best[:, None], col[None, :], 2147483647), axis=1)
        better = tile_best > best_value  # strictly: equal values keep the earlier (lower) column
        best_value = tl.where(better, tile_best, best_value)
        best_col = tl.where(better, tile_col, best_col)
    # A row whose values are all NaN / -inf keeps (-inf, 0) from every split: the first kept.
    tl.atomic_max(best + drop_begin + m, rank_key(best_value, best_col), mask=m_live)


@triton.jit
def _group_kernel(
    dropped,  # int64 [N - K_total]
    best,  # int64 [N - K_total], from _assign_kernel
    table,  # int64 [B, 5]
    assign,  # int64 [N] out: output rows of dropped tokens
    group_tok,  # int64 [N - K_total] out: dropped tokens grouped by target, ascending inside
    group_target,  # int32 [N - K_total] out: their targets (local kept row), ascending
    BLOCK_I: tl.constexpr,
    BLOCK_J: tl.constexpr,
):
    block = tl.program_id(0)
    image = tl.program_id(1)
    tok_begin, n, k, keep_begin, drop_begin = _image_row(table, image)
    num_dropped = n - k
    if block * BLOCK_I >= num_dropped:
        return

    i = block * BLOCK_I + tl.arange(0, BLOCK_I)
    live_i = i < num_dropped
    target_i = tl.minimum(tl.maximum(key_index(tl.load(best + drop_begin + i, mask=live_i, other=0)), 0), k - 1)
    token_i = tl.load(dropped + drop_begin + i, mask=live_i, other=0)
    token_i = tl.minimum(tl.maximum(token_i, tok_begin), tok_begin + n - 1)
    tl.store(assign + token_i, keep_begin + target_i, mask=live_i)
    # Stable counting sort by target: the slot of i is the number of dropped tokens with a
    # lower target, or the same target and a lower position (positions ascend with tokens).
    slot = tl.zeros([BLOCK_I], dtype=tl.int32)
    for j0 in range(0, num_dropped, BLOCK_J):
        j = j0 + tl.arange(0, BLOCK_J)
        live_j = j < num_dropped
        target_j = tl.minimum(tl.maximum(key_index(tl.load(best + drop_begin + j, mask=live_j, other=0)), 0), k - 1)
        lower = target_j[None, :] < target_i[:, None]
        tied_earlier = (target_j[None, :] == target_i[:, None]) & (j[None, :] < i[:, None])
        before = lower | tied_earlier
        slot += tl.sum((live_j[None, :] & before).to(tl.int32), axis=1)
    tl.store(group_tok + drop_begin + slot, token_i, mask=live_i)
    tl.store(group_target + drop_begin + slot, target_i.to(tl.int32), mask=live_i)


@triton.jit
def _round_bf16(x):
    """fp32 -> bf16, round to nearest even, in integer arithmetic (c10::BFloat16's rule).

    The Triton interpreter truncates on fp32 -> bf16 casts; integers round the same
    everywhere. NaN stays NaN (its high bits are kept, with the quiet bit set).
    """
    bits = x.to(tl.int32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    rounded = tl.where(x != x, (bits >> 16) | 0x40, rounded)
    return rounded.to(tl.int16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _mean_kernel(
    tokens,  # [N, D]
    keep_idx,  # int64 [K_total]
    group_tok,  # int64 [N - K_total]
    group_target,  # int32 [N - K_total]
    table,  # int64 [B, 5]
    merged,  # [K_total, D] out, input dtype
    merge_weight,  # fp32
    D,  # columns to read and write: padded_width(D)
    stride,  # row strides of tokens and merged (multiples of 16)
    out_stride,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
    STEPS: tl.constexpr,
):
    block_r = tl.program_id(0)
    block_d = tl.program_id(1)
    image = tl.program_id(2)
    tok_begin, n, k, keep_begin, drop_begin = _image_row(table, image)
    if block_r * BLOCK_R >= k:
        return

    r = block_r * BLOCK_R + tl.arange(0, BLOCK_R)
    r_live = r < k
    d = block_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_live = d < D
    # Each row's group is a run of the target-sorted list: [lower_bound(r), lower_bound(r + 1)).
    begin = _lower_bound(group_target + drop_begin, n - k, r, STEPS)
    end = _lower_bound(group_target + drop_begin, n - k, r + 1, STEPS)
    size = tl.where(r_live, end - begin, 0)

    kept_tok = tl.load(keep_idx + keep_begin + r, mask=r_live, other=0)
    kept_tok = tl.minimum(tl.maximum(kept_tok, tok_begin), tok_begin + n - 1)
    live = r_live[:, None] & d_live[None, :]
    acc = tl.load(tokens + kept_tok.to(tl.int64)[:, None] * stride + d[None, :], mask=live, other=0.0).to(tl.float32)
    acc = acc * merge_weight
    count = tl.zeros([BLOCK_R], dtype=tl.float32) + merge_weight
    for g in range(0, tl.max(size, axis=0)):
        member = g < size
        tok = tl.load(group_tok + drop_begin + begin + g, mask=member, other=0)
        tok = tl.minimum(tl.maximum(tok, tok_begin), tok_begin + n - 1)
        x = tl.load(tokens + tok.to(tl.int64)[:, None] * stride + d[None, :], mask=member[:, None] & live, other=0.0)
        # where(), not "+ 0": rows past their group must stay bit-identical (-0.0 + 0.0 = +0.0).
        acc = tl.where(member[:, None], acc + x.to(tl.float32), acc)
        count = tl.where(member, count + 1.0, count)
    out = tl.math.div_rn(acc, count[:, None])
    if merged.dtype.element_ty == tl.bfloat16:
        out = _round_bf16(out)
    tl.store(merged + (keep_begin + r).to(tl.int64)[:, None] * out_stride + d[None, :],
             out.to(merged.dtype.element_ty), mask=live)


# Tiles of _assign_kernel, as data: (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages).
# Fixed, not autotuned: BLOCK_K and the MMA shape decide the fp32 summation order of every
# similarity, and a timing-based choice could differ between runs and break the bit-for-bit
# determinism SPEC.md promises. All of them compile without spills for sm_80 and sm_90.
ASSIGN_TILES = {
    torch.bfloat16: (128, 128, 64, 8, 3),
    torch.float16: (128, 128, 64, 8, 3),
    torch.float32: (64, 64, 32, 4, 3),  # IEEE fp32 dot: CUDA cores, not tensor cores
}
# The interpreter runs numpy per op: big tiles, few iterations.
ASSIGN_TILES_INTERPRETED = (64, 64, 32, 4, 1)
# Tiles of _mean_kernel (BLOCK_R rows x BLOCK_D columns): fp32 rows hold twice the bytes,
# and at 16 x 128 ptxas spills 8-12 bytes (sm_80 and sm_90); 16 x 64 fits.
MEAN_TILES = {torch.bfloat16: (16, 128), torch.float16: (16, 128), torch.float32: (16, 64)}


def _splits(dropped_tiles: int, kept_tiles: int, device: torch.device) -> int:
    """Column splits so that even one large image gives every SM a few programs."""
    if device.type != "cuda":
        return min(2, kept_tiles)  # exercises the atomic combine under the interpreter
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(kept_tiles, triton.cdiv(2 * sms, max(1, dropped_tiles))))


def merge_tokens(
    tokens: torch.Tensor,
    keep_idx: torch.Tensor,
    lengths: Sequence[int],
    budgets: Sequence[int],
    merge_weight: float,
    inv_norms: Optional[torch.Tensor] = None,
    splits: Optional[int] = None,
    op: str = "g2tr.triton_merge",
    pow2s: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Launcher: (merged [sum(budgets), D] input dtype, assign int64 [N] global output rows).

    inv_norms, pow2s: fp32 [N] each from the score kernel, or None to compute them here.
    splits: column splits of the assignment (None: chosen from the device's SM count).
    """
    lengths, budgets = list(lengths), list(budgets)
    tokens, keep_idx = aligned_rows(tokens), keep_idx.contiguous()
    n_total, dim = tokens.shape
    width = padded_width(dim)
    device = tokens.device
    k_total = sum(budgets)
    merged = torch.empty((k_total, dim), dtype=tokens.dtype, device=device)
    # Zeros, not empty: with an invalid keep_idx (not checked on this path, see triton_merge)
    # some tokens are never written, and they must still hold an in-range row.
    assign = torch.zeros(n_total, dtype=torch.int64, device=device)
    if not lengths:
        return merged, assign
    drops = [n - k for n, k in zip(lengths, budgets)]
    drop_begin = starts(drops)
    table = image_table((starts(lengths), lengths, budgets, starts(budgets), drop_begin), tokens)
    num_dropped = max(1, drop_begin[-1])  # never a zero-size buffer: kernels index them masked
    dropped = torch.empty(num_dropped, dtype=torch.int64, device=device)
    best = torch.full((num_dropped,), torch.iinfo(torch.int64).min, dtype=torch.int64, device=device)
    group_tok = torch.empty(num_dropped, dtype=torch.int64, device=device)
    group_target = torch.empty(num_dropped, dtype=torch.int32, device=device)
    write_norms = inv_norms is None
    if write_norms:
        inv_norms = torch.empty(n_total, dtype=torch.float32, device=device)
        pow2s = torch.empty(n_total, dtype=torch.float32, device=device)
    elif pow2s is None:
        pow2s = torch.ones(n_total, dtype=torch.float32, device=device)
    if not launchable(tokens, op):
        return merged, assign

    with launch_guard(tokens):
        b = len(lengths)
        # fp32 rows hold twice the registers of a bf16 block: half the columns per step
        # (32 x 128 fp32 spilled 4 B on sm_80 once the rescale pass was added).
        block_t, block_d = (64, 128) if interpreted() else (32, 64 if tokens.dtype == torch.float32 else 128)
        block_d = min(block_d, max(16, triton.next_power_of_2(dim)))
        launch(_prepare_kernel)[(triton.cdiv(max(lengths), block_t), b)](
            tokens, keep_idx, table, assign, dropped, inv_norms, pow2s, width, tokens.stride(0),
            BLOCK_T=block_t, BLOCK_D=block_d, STEPS=max(budgets).bit_length(), WRITE_NORMS=write_norms,
        )
        max_drop = max(drops)
        if max_drop > 0:
            upcast = interpreted() and tokens.dtype == torch.bfloat16
            precision = "ieee" if tokens.dtype == torch.float32 or upcast else None

            tiles = ASSIGN_TILES_INTERPRETED if interpreted() else ASSIGN_TILES[tokens.dtype]
            block_m, block_n, block_k, warps, stages = tiles
            kept_tiles = triton.cdiv(max(budgets), block_n)
            if splits is None:
                splits = _splits(sum(triton.cdiv(m, block_m) for m in drops), kept_tiles, device)
            grid = (triton.cdiv(max_drop, block_m), max(1, min(splits, kept_tiles)), b)
            launch(_assign_kernel)[grid](
                tokens, keep_idx, dropped, inv_norms, pow2s, table, best, width, tokens.stride(0),
                BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
                UPCAST=upcast, PRECISION=precision, num_warps=warps, num_stages=stages,
            )
            block_i, block_j = count_blocks()
            launch(_group_kernel)[(triton.cdiv(max_drop, block_i), b)](
                dropped, best, table, assign, group_tok, group_target, BLOCK_I=block_i, BLOCK_J=block_j,
            )
        block_r, mean_d = (64, block_d) if interpreted() else MEAN_TILES[tokens.dtype]
        mean_d = min(mean_d, block_d)
        # Rows D apart are not 16-element aligned for odd D: write padded rows, copy once.
        out = merged if width == dim else torch.empty((k_total, width), dtype=tokens.dtype, device=device)
        launch(_mean_kernel)[(triton.cdiv(max(budgets), block_r), triton.cdiv(dim, mean_d), b)](
            tokens, keep_idx, group_tok, group_target, table, out, float(merge_weight), width,
            tokens.stride(0), out.stride(0),
            BLOCK_R=block_r, BLOCK_D=mean_d, STEPS=max(max_drop, 1).bit_length(),
        )
        if out is not merged:
            merged.copy_(out[:, :dim])
    return merged, assign


@triton_op("g2tr::triton_merge", mutates_args=())
def triton_merge(
    tokens: torch.Tensor, keep_idx: torch.Tensor, lengths: List[int], budgets: List[int], merge_weight: float = 1.0
) -> Tuple[torch.Tensor, torch.Tensor]:
    """torch.ops.g2tr.triton_merge: same contract as torch.ops.g2tr.merge."""
    op = "g2tr.triton_merge"
    lengths, budgets = _checks.merge_args(op, tokens, keep_idx, lengths, budgets, merge_weight)
    _checks.kept_indices(op, keep_idx, lengths, budgets)
    return merge_tokens(tokens, keep_idx, lengths, budgets, merge_weight, op=op)
