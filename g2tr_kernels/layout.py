"""Rebuild the LLM's input layout after G2TR (SPEC.md §5).

Two layouts:

* packed (BAGEL / NaViT): every image is a block [SOI] + tokens + [EOI] appended to its
  sample's KV cache, with one shared RoPE id for the whole block. rebuild_packed() gives
  the kept ViT position ids (BAGEL adds its 2-D position embedding after the merge with
  them), the new cu_seqlens, the query-block indexes [SOI] + K_i + [EOI] per image and the
  true KV length after each image, old + K_i + 2. The field names follow BAGEL's
  prepare_vit_images() so the result drops into forward_cache_update_vit().
* padded (HF: InternVL, LLaVA): input_ids with runs of image-context tokens. Each run of
  N_i tokens becomes K_i; attention_mask, position_ids and labels are taken at the kept
  positions and the rows are padded to the new longest row. rebuild_padded().

Both take the reduce output's keep_idx: global indices into the packed image tokens, that
is, into the image-context tokens of the batch in row-major order (the order in which HF's
masked_scatter fills them).
"""
from __future__ import annotations

import functools
from typing import List, NamedTuple, Optional, Sequence

import torch


class PackedLayout(NamedTuple):
    position_ids: torch.Tensor  # [K_total] ViT position ids of the kept tokens (BAGEL packed_vit_position_ids)
    cu_seqlens: torch.Tensor  # [B + 1] int32 offsets of each image's kept tokens
    vit_token_seqlens: torch.Tensor  # [B] int32, K_i
    query_lens: torch.Tensor  # [B] int32, K_i + 2: the query block [SOI] + K_i + [EOI] (BAGEL packed_seqlens)
    query_indexes: torch.Tensor  # [sum(K_i + 2)] where each query row sits among KV + query rows (BAGEL packed_indexes)
    vit_token_indexes: torch.Tensor  # [K_total] rows of the kept tokens inside the query sequence
    text_indexes: torch.Tensor  # [2B] rows of SOI and EOI inside the query sequence
    key_value_indexes: torch.Tensor  # [sum(old kv lens)] where the cached rows sit (BAGEL packed_key_value_indexes)
    rope_position_ids: torch.Tensor  # [sum(K_i + 2)] the image's shared RoPE id, repeated (BAGEL packed_position_ids)
    key_values_lens: torch.Tensor  # [B] int32, the KV length before the image
    new_kv_lens: List[int]  # old + K_i + 2: the true cache length after the image
    new_rope: List[int]  # rope + 1: every image block consumes one RoPE id


def _keep_and_lengths(reduced, cu_seqlens):
    if hasattr(reduced, "keep_idx"):
        keep_idx, cu = reduced.keep_idx, reduced.cu_seqlens
    else:
        keep_idx, cu = reduced, cu_seqlens
        if cu is None:
            raise ValueError("g2tr.layout: pass a ReduceOutput, or keep_idx together with cu_seqlens")
    if not isinstance(keep_idx, torch.Tensor) or keep_idx.dim() != 1:
        raise TypeError("g2tr.layout: keep_idx must be a 1-D integer tensor")
    if isinstance(cu, torch.Tensor):
        cu = cu.tolist()  # host ints: the index lists below are built on the host, as BAGEL does
    cu = [int(c) for c in cu]
    if not cu or cu[0] != 0 or cu[-1] != keep_idx.numel() or any(b < a for a, b in zip(cu, cu[1:])):
        raise ValueError(f"g2tr.layout: cu_seqlens {cu} do not describe {keep_idx.numel()} kept tokens")
    return keep_idx, [b - a for a, b in zip(cu, cu[1:])]


def rebuild_packed(
    reduced,
    position_ids: torch.Tensor,
    key_values_lens: Optional[Sequence[int]] = None,
    rope: Optional[Sequence[int]] = None,
    cu_seqlens=None,
) -> PackedLayout:
    """BAGEL / NaViT layout after G2TR.

    reduced: the ReduceOutput (or keep_idx, with cu_seqlens=). position_ids: the original
    per-token ViT position ids [N_total] (BAGEL: flattened 2-D ids row * 70 + col).
    key_values_lens: each image's sample KV length before the image (BAGEL curr_kvlens,
    default 0); rope: each sample's current RoPE id (BAGEL curr_rope, default 0).
    """
    keep_idx, kept = _keep_and_lengths(reduced, cu_seqlens)
    if not isinstance(position_ids, torch.Tensor) or position_ids.dim() != 1:
        raise TypeError("g2tr.layout.rebuild_packed: position_ids must be a 1-D tensor [N_total]")
    images = len(kept)
    kv = [0] * images if key_values_lens is None else [int(v) for v in key_values_lens]
    rp = [0] * images if rope is None else [int(v) for v in rope]
    for name, values in (("key_values_lens", kv), ("rope", rp)):
        if len(values) != images:
            raise ValueError(f"g2tr.layout.rebuild_packed: {name} has {len(values)} entries for {images} images")
    device = keep_idx.device

    query_indexes, vit_token_indexes, text_indexes, kv_indexes, rope_ids = [], [], [], [], []
    curr = query = 0  # curr: rows of KV + query so far; query: rows of the query sequence so far
    for k, old, r in zip(kept, kv, rp):
        kv_indexes.extend(range(curr, curr + old))
        curr += old
        text_indexes.append(query)  # SOI
        vit_token_indexes.extend(range(query + 1, query + 1 + k))
        text_indexes.append(query + 1 + k)  # EOI
        query_indexes.extend(range(curr, curr + k + 2))
        rope_ids.extend([r] * (k + 2))
        curr += k + 2
        query += k + 2

    def t(values, dtype=torch.long):
        return torch.tensor(values, dtype=dtype, device=device)

    cu = [0]
    for k in kept:
        cu.append(cu[-1] + k)
    return PackedLayout(
        position_ids=position_ids[keep_idx.to(position_ids.device)],
        cu_seqlens=t(cu, torch.int32),
        vit_token_seqlens=t(kept, torch.int32),
        query_lens=t([k + 2 for k in kept], torch.int32),
        query_indexes=t(query_indexes),
        vit_token_indexes=t(vit_token_indexes),
        text_indexes=t(text_indexes),
        key_value_indexes=t(kv_indexes),
        rope_position_ids=t(rope_ids),
        key_values_lens=t(kv, torch.int32),
        new_kv_lens=[old + k + 2 for old, k in zip(kv, kept)],
        new_rope=[r + 1 for r in rp],
    )


def flattened_position_ids(h: int, w: int, max_per_side: int, device=None) -> torch.Tensor:
    """BAGEL's extrapolated ViT position ids of an h x w grid: row * max_per_side + col."""
    rows = torch.arange(h, device=device)[:, None]
    cols = torch.arange(w, device=device)[None, :]
    return (rows * max_per_side + cols).reshape(-1)


class PaddedLayout(NamedTuple):
    input_ids: torch.Tensor  # [B, L'] image runs shortened to K_i, rows padded
    attention_mask: torch.Tensor  # [B, L'] 0 on the new padding (and wherever the input had 0)
    position_ids: Optional[torch.Tensor]  # [..., B, L'] taken at the kept positions, or None
    labels: Optional[torch.Tensor]  # [B, L'] taken at the kept positions, or None
    index: torch.Tensor  # [B, L'] original column of each new column, -1 on the new padding
    keep: torch.Tensor  # [B, L] bool, which original columns survive
    lengths: List[int]  # tokens per row before padding


def rebuild_padded(
    input_ids: torch.Tensor,
    keep_idx,
    image_token_id: int,
    attention_mask: Optional[torch.Tensor] = None,
    position_ids: Optional[torch.Tensor] = None,
    labels: Optional[torch.Tensor] = None,
    pad_token_id: int = 0,
    attention_pad: int = 0,
    label_pad_id: int = -100,
    position_pad_id: int = 0,
    padding_side: str = "right",
    image_tokens: Optional[int] = None,
    row_lengths: Optional[Sequence[int]] = None,
) -> PaddedLayout:
    """HF padded layout after G2TR.

    keep_idx: the ReduceOutput (or its keep_idx): indices into the image-context tokens of
    the batch counted in row-major order, i.e. into the packed image features. Every other
    column is kept. position_ids may carry leading dims ([B, L] or e.g. [3, B, L]).
    padding_side="right" appends the new padding (training, plain forward); "left"
    prepends it, which keeps left-padded generation prompts left-padded; "auto" prepends it
    where attention_mask shows left-padded prompts (every row ends with a real token and
    some row starts with padding) and appends it otherwise, decided on the device.
    image_tokens (the image tokens in input_ids) and row_lengths (each row's length after
    the reduction), when the caller knows them on the host, make the rebuild read nothing
    back from the device (no sync, torch.compile without graph breaks); keep_idx is then
    trusted, not checked. row_lengths may be unbacked SymInts (traced .tolist() under
    torch._dynamo.config.capture_scalar_outputs): nothing below branches on them.
    """
    op = "g2tr.layout.rebuild_padded"
    if hasattr(keep_idx, "keep_idx"):
        keep_idx = keep_idx.keep_idx
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError(f"{op}: input_ids must be a [B, L] tensor")
    if padding_side not in ("right", "left", "auto"):
        raise ValueError(f"{op}: padding_side must be 'right', 'left' or 'auto', got {padding_side!r}")
    b, length = input_ids.shape
    device = input_ids.device
    is_image = input_ids == image_token_id
    keep_idx = keep_idx.to(device=device, dtype=torch.long)
    if image_tokens is None:
        total = int(is_image.sum())
        if keep_idx.numel() and (int(keep_idx.min()) < 0 or int(keep_idx.max()) >= total):
            raise ValueError(
                f"{op}: keep_idx points past the {total} image tokens (id {image_token_id}) of input_ids; "
                "keep_idx must index the image tokens in row-major order"
            )
    else:
        # Host-side sizes (the caller's reduce output): nothing below reads the device. Extra
        # image tokens in input_ids clamp to the last one here and fail the model's own
        # token / feature count check.
        total = int(image_tokens)
    kept_image = torch.zeros(max(total, 1), dtype=torch.bool, device=device)
    kept_image[keep_idx] = True
    occurrence = (torch.cumsum(is_image.reshape(-1), 0) - 1).clamp(min=0, max=max(total - 1, 0)).reshape(b, length)
    keep = ~is_image | kept_image[occurrence] if total else torch.ones_like(is_image)

    row_len = keep.sum(1)
    if row_lengths is None:
        lengths = row_len.tolist()
    else:
        lengths = [n if isinstance(n, torch.SymInt) else int(n) for n in row_lengths]
        if len(lengths) != b:
            raise ValueError(f"{op}: row_lengths has {len(lengths)} entries for {b} rows")
    # sym_max, not max(): max() compares, and a comparison of unbacked sizes cannot be traced.
    new_len = functools.reduce(torch.sym_max, lengths) if b else 0
    mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
    if mask.shape != input_ids.shape:
        raise ValueError(f"{op}: attention_mask must have the shape of input_ids {list(input_ids.shape)}")
    offset = torch.zeros_like(row_len)
    if padding_side == "left":
        offset = new_len - row_len
    elif padding_side == "auto" and b and length:
        # A device-side choice: reading the side back would be a host sync for two bits.
        left = (mask[:, -1] != 0).all() & (mask[:, 0] == 0).any()
        offset = torch.where(left, new_len - row_len, offset)
    column = torch.cumsum(keep.long(), 1) - 1 + offset[:, None]
    # Dropped columns go to a spare column past the end that is cut off: a scatter with a
    # shape known on the host, where nonzero() would need the device's count.
    target = torch.where(keep, column, new_len)

    def rebuild(values: torch.Tensor, fill) -> torch.Tensor:
        lead = values.shape[:-2]
        out = values.new_full((*lead, b, new_len + 1), fill)
        out.scatter_(-1, target.expand(*lead, b, length), values.expand(*lead, b, length))
        return out.narrow(-1, 0, new_len)  # narrow, not a slice: an unbacked new_len stays one symbol

    index = rebuild(torch.arange(length, device=device).expand(b, length), -1)
    new_pos = None
    if position_ids is not None:
        if position_ids.shape[-2:] != input_ids.shape:
            raise ValueError(f"{op}: position_ids must end in the shape of input_ids {list(input_ids.shape)}")
        new_pos = rebuild(position_ids, position_pad_id)
    new_labels = None
    if labels is not None:
        if labels.shape != input_ids.shape:
            raise ValueError(f"{op}: labels must have the shape of input_ids {list(input_ids.shape)}")
        new_labels = rebuild(labels, label_pad_id)
    return PaddedLayout(
        input_ids=rebuild(input_ids, pad_token_id),
        attention_mask=rebuild(mask, attention_pad),
        position_ids=new_pos,
        labels=new_labels,
        index=index,
        keep=keep,
        lengths=lengths,
    )


def gather_columns(values: torch.Tensor, index: torch.Tensor, fill=0) -> torch.Tensor:
    """Any per-token tensor [..., B, L] taken at the kept columns: [..., B, L'].

    index: PaddedLayout.index (the original column of each new column, -1 on new padding,
    which gets `fill`). For inputs rebuild_padded does not name: token_type_ids,
    mm_token_type_ids, 3-D M-RoPE position ids.
    """
    if values.shape[-2] != index.shape[0]:
        raise ValueError(
            f"g2tr.layout.gather_columns: values of shape {list(values.shape)} do not have the batch of the "
            f"index {list(index.shape)}"
        )
    index = index.to(values.device)
    taken = values.gather(-1, index.clamp(min=0).expand(*values.shape[:-2], *index.shape))
    return taken.masked_fill(index < 0, fill)


def image_runs(input_ids: torch.Tensor, image_token_id: int) -> List[List[int]]:
    """Lengths of the contiguous runs of image_token_id in each row (handy for checks)."""
    runs = []
    for row in input_ids.tolist():
        row_runs, count = [], 0
        for token in row + [None]:
            if token == image_token_id:
                count += 1
            elif count:
                row_runs.append(count)
                count = 0
        runs.append(row_runs)
    return runs


__all__ = [
    "PackedLayout",
    "PaddedLayout",
    "flattened_position_ids",
    "gather_columns",
    "image_runs",
    "rebuild_packed",
    "rebuild_padded",
]
