"""Packing: several sequences laid end to end in a row, without padding between them, attention kept per sequence.

A transformers decoder called with ``position_ids`` that restart at 0 for each sequence and ``attention_mask=None``
(and no cache) detects the restarts (``transformers.masking_utils.find_packed_sequence_indices``) and builds a
block-diagonal causal mask, so each token attends within its own sequence only and its logits / hidden state equal
those of the padded batch. With ``sdpa`` or ``eager`` attention that mask is dense: a row of ``T`` tokens costs
``T^2`` attention work, so packing a whole batch into one long row can cost more than the padding it saves; rows no
longer than the batch's longest sequence (``row_length``) never cost more attention than the padded batch.
``flash_attention_2`` computes a packed row per sequence.

Used by DPO (``padding_free``), the reward model and its relatives (``padding_free``) and SFT (``packing``):

* :func:`pack_sequences` turns a padded batch into packed rows (:class:`PackedSequences`);
* :func:`first_fit_rows` decides which sequences share a row (also used by the SFT data module's greedy packing);
* :func:`packed_sequence_logprobs`, :func:`packed_token_nll` and :func:`packed_score_index` read the packed forward
  pass the way :func:`~lightning_rlhf.rollout.scoring.sequence_logprobs`,
  :func:`~lightning_rlhf.losses.sft.masked_nll_sum` and :func:`~lightning_rlhf.rollout.scoring.score_token_index`
  read a padded one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from lightning_rlhf.rollout.scoring import position_ids_from_attention_mask, score_token_index, shifted_token_logprobs


class PackedSequences(NamedTuple):
    """``B`` sequences laid end to end in ``R`` rows of ``T`` slots (see :func:`pack_sequences`)."""

    input_ids: torch.Tensor  # (R, T) the real tokens of the sequences; 0 on the padding at the end of a row
    position_ids: torch.Tensor  # (R, T) restarting at 0 for each sequence; 0 on padding (each pad its own sequence)
    segment: torch.Tensor  # (R, T) long: index of the sequence each token belongs to; -1 on padding
    loss_mask: torch.Tensor  # (R, T) the tokens to score; 0 on padding
    num_sequences: int  # B
    token_index: torch.Tensor  # (R, T) long: which real token of the padded batch (row-major order) sits there; N on pad


def has_padding(attention_mask: torch.Tensor) -> bool:
    """Whether a ``(B, L)`` batch has any padding. Without padding, packing saves nothing: the padding-free paths then
    run the plain forward pass (same math, and the attention needs no packed-sequence mask)."""
    return not bool(attention_mask.bool().all())


def first_fit_rows(lengths: Sequence[int], capacity: int, decreasing: bool = True) -> list[list[int]]:
    """Group sequences into rows of at most ``capacity`` tokens, first fit.

    Args:
        lengths: Token count of each sequence.
        capacity: Most tokens per row; a sequence longer than it gets a row of its own.
        decreasing: Place the longest sequences first (first-fit decreasing: fewer, fuller rows); ``False`` places
            them in the given order (greedy packing of a stream).

    Returns:
        The sequence indices of each row, ascending within a row; rows in the order they were opened.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i]) if decreasing else range(len(lengths))
    rows: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = lengths[i]
        for r, free in enumerate(room):
            if n <= free:
                rows[r].append(i)
                room[r] -= n
                break
        else:
            rows.append([i])
            room.append(capacity - n)
    return [sorted(row) for row in rows]


def pack_sequences(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, loss_mask: torch.Tensor, row_length: int | None = None
) -> PackedSequences:
    """Drop the padding of a batch and lay its sequences end to end (padding-free forward passes).

    Call the model with ``input_ids=packed.input_ids, position_ids=packed.position_ids, attention_mask=None,
    use_cache=False``: every real token then gets the logits / hidden state it has in the padded batch.

    Args:
        input_ids: ``(B, L)`` left- or right-padded ids.
        attention_mask: ``(B, L)`` 1 on real tokens.
        loss_mask: ``(B, L)`` 1 on the tokens to score.
        row_length: ``None``: one row holding every sequence (``T = attention_mask.sum()``, no padding at all).
            Otherwise rows of at most ``max(row_length, longest sequence)`` tokens, filled first-fit decreasing and
            right-padded to the longest row.

    Returns:
        :class:`PackedSequences`.
    """
    keep = attention_mask.bool()
    B = input_ids.shape[0]
    seqs = torch.arange(B, device=input_ids.device)[:, None].expand_as(input_ids)
    positions = position_ids_from_attention_mask(attention_mask)
    ids, pos, seg, loss = input_ids[keep], positions[keep], seqs[keep], loss_mask[keep]
    N = ids.numel()
    if row_length is None:
        index = torch.arange(N, device=input_ids.device)[None]
        return PackedSequences(ids[None], pos[None], seg[None], loss[None], B, index)
    lengths = keep.sum(1).tolist()
    rows = first_fit_rows(lengths, max(row_length, max(lengths)))
    starts = [0]
    for n in lengths:
        starts.append(starts[-1] + n)
    T = max(sum(lengths[i] for i in row) for row in rows)
    index = torch.full((len(rows), T), N, dtype=torch.long)
    for r, row in enumerate(rows):
        slots = torch.cat([torch.arange(starts[i], starts[i + 1]) for i in row])
        index[r, : slots.numel()] = slots
    index = index.to(input_ids.device)

    def padded(t: torch.Tensor, fill: int) -> torch.Tensor:  # (N,) -> (R, T) with `fill` on the row-end padding
        return torch.cat([t, t.new_full((1,), fill)])[index]

    return PackedSequences(padded(ids, 0), padded(pos, 0), padded(seg, -1), padded(loss, 0), B, index)


def _scored_pairs(packed: PackedSequences) -> tuple[torch.Tensor, torch.Tensor]:
    """``(R, T-1)`` mask of the tokens ``t+1`` that are scored and predicted from within their own sequence, and the
    ``(R, T-1)`` sequence they belong to (clamped to 0 on padding)."""
    seg = packed.segment
    same = (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] >= 0)
    return packed.loss_mask[:, 1:].bool() & same, seg[:, 1:].clamp(min=0)


def packed_sequence_logprobs(logits: torch.Tensor, packed: PackedSequences) -> torch.Tensor:
    """:func:`~lightning_rlhf.rollout.scoring.sequence_logprobs` of packed sequences: the summed log-probs of each
    sequence's scored tokens.

    Args:
        logits: ``(R, T, V)`` logits of a forward pass over ``packed.input_ids``.
        packed: the packed batch.

    Returns:
        ``(B,)``; the first token of each sequence is never scored (the logits before it belong to another sequence).
    """
    logp = shifted_token_logprobs(logits, packed.input_ids)  # (R, T-1) token t+1 given the tokens up to t
    scored, seg = _scored_pairs(packed)
    out = torch.zeros(packed.num_sequences, dtype=logp.dtype, device=logp.device)
    return out.index_add(0, seg.reshape(-1), (logp * scored.to(logp.dtype)).reshape(-1))


def packed_token_nll(logits: torch.Tensor, packed: PackedSequences) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`~lightning_rlhf.losses.sft.masked_nll_sum` of packed sequences: the summed NLL of the scored tokens (a
    sequence's first token is never scored) and how many there are.

    Args:
        logits: ``(R, T, V)`` logits of a forward pass over ``packed.input_ids``.
        packed: the packed batch.

    Returns:
        ``(nll_sum, num_tokens)``: scalar float32 tensors.
    """
    logp = shifted_token_logprobs(logits, packed.input_ids)  # (R, T-1)
    mask = _scored_pairs(packed)[0].to(logp.dtype)
    return -(logp * mask).sum(), mask.sum()


def packed_score_index(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, pad_token_id: int | None, packed: PackedSequences
) -> torch.Tensor:
    """Where each sequence's score is read (:func:`~lightning_rlhf.rollout.scoring.score_token_index`), as an index
    into the flattened ``(R * T)`` slots of ``packed`` (built from this ``input_ids`` / ``attention_mask``).

    Args:
        input_ids: ``(B, L)`` left- or right-padded ids.
        attention_mask: ``(B, L)`` 1 on real tokens.
        pad_token_id: The model's pad id (``None``: the last real token).
        packed: :func:`pack_sequences` of this batch.

    Returns:
        ``(B,)`` long.
    """
    idx = score_token_index(input_ids, attention_mask, pad_token_id)  # (B,) padded column
    # rank of every real token among the batch's real tokens, row-major (what token_index refers to)
    rank = (attention_mask.reshape(-1).long().cumsum(0) - 1).clamp(min=0).view_as(attention_mask)
    real = rank.gather(1, idx[:, None]).squeeze(1)  # (B,)
    N = int(attention_mask.sum())
    slot_of = torch.zeros(N + 1, dtype=torch.long, device=input_ids.device)
    flat = packed.token_index.reshape(-1)
    slot_of[flat] = torch.arange(flat.numel(), device=input_ids.device)  # padding (N) may collide: never read
    return slot_of[real]


def packed_sequences_supported() -> bool:
    """Whether the installed transformers builds packed-sequence attention masks from restarting position ids
    (``transformers.masking_utils.find_packed_sequence_indices``); older versions would attend across sequences."""
    import importlib

    try:
        masking = importlib.import_module("transformers.masking_utils")
    except ImportError:
        return False
    return hasattr(masking, "find_packed_sequence_indices")
