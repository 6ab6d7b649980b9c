"""Batch containers and padding. Dataclasses so Lightning moves their tensors to the device."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

PaddingSide = Literal["left", "right"]


def pad_sequences(
    seqs: Sequence[Sequence[int]], pad_value: int, side: PaddingSide = "right", length: int | None = None
) -> torch.Tensor:
    """Stack variable-length integer sequences into a ``(B, T)`` long tensor padded on ``side``.

    Args:
        seqs: ``B`` sequences.
        pad_value: Fill value.
        side: ``right`` (tokens first) or ``left`` (padding first, as generation needs).
        length: Pad to this length (default: the longest sequence).
    """
    T = length if length is not None else max(len(s) for s in seqs)
    out = torch.full((len(seqs), T), pad_value, dtype=torch.long)
    for i, s in enumerate(seqs):
        s = list(s)[:T]
        if not s:
            continue
        if side == "right":
            out[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        else:
            out[i, T - len(s) :] = torch.tensor(s, dtype=torch.long)
    return out


def occupied_columns(attention_mask: torch.Tensor) -> slice:
    """The column range that holds every row's real tokens: padding columns shared by all rows (on the right or the
    left) fall outside it. ``(B, T)`` mask in; a ``slice`` of ``[0, T)`` out (the whole range for an all-pad mask)."""
    cols = attention_mask.any(0).nonzero()
    if cols.numel() == 0:
        return slice(0, attention_mask.shape[1])
    return slice(int(cols[0]), int(cols[-1]) + 1)


@dataclass
class TokenBatch:
    """Prompt + response sequences for SFT / demonstrations.

    Packed batches (``DemonstrationDataModule(packing="greedy")``) have ``position_ids``: each row then holds several
    sequences end to end, position ids restart at 0 for each, ``loss_mask`` is 0 on every sequence's first token,
    the padding sits at the row ends, ``domain_ids`` is the domain of each row's first sequence, and there are no
    prompt tensors. The model is called with these ``position_ids`` and no attention mask (packed-sequence masks).
    """

    input_ids: torch.Tensor  # (B, T) (packed: R rows)
    attention_mask: torch.Tensor  # (B, T) 1 on real tokens
    loss_mask: torch.Tensor  # (B, T) 1 on response tokens
    domain_ids: torch.Tensor  # (B,) index into the data module's domain_names
    prompt_input_ids: torch.Tensor | None = None  # (B, P) left-padded prompts (for sampling on demo prompts)
    prompt_attention_mask: torch.Tensor | None = None  # (B, P)
    position_ids: torch.Tensor | None = None  # (R, T) packed rows only: restarting at 0 per sequence, 0 on padding

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def slice(self, start: int, stop: int) -> "TokenBatch":
        """Rows ``start:stop`` (a micro-batch), without the padding columns that all of its rows share."""
        opt = lambda t: None if t is None else t[start:stop]  # noqa: E731
        cols = occupied_columns(self.attention_mask[start:stop])
        return TokenBatch(
            self.input_ids[start:stop, cols],
            self.attention_mask[start:stop, cols],
            self.loss_mask[start:stop, cols],
            self.domain_ids[start:stop],
            opt(self.prompt_input_ids),
            opt(self.prompt_attention_mask),
            None if self.position_ids is None else self.position_ids[start:stop, cols],
        )


@dataclass
class PreferenceBatch:
    """``B`` preference pairs stored as ``2B`` sequences: rows ``0..B-1`` chosen, rows ``B..2B-1`` rejected."""

    input_ids: torch.Tensor  # (2B, T)
    attention_mask: torch.Tensor  # (2B, T)
    loss_mask: torch.Tensor  # (2B, T) 1 on response tokens
    domain_ids: torch.Tensor  # (B,)
    ref_logps: torch.Tensor | None = None  # (2B,) cached reference log-probs (DPO precompute_ref_logprobs)
    index: torch.Tensor | None = None  # (B,) dataset row indices

    @property
    def num_pairs(self) -> int:
        return self.domain_ids.shape[0]

    def __len__(self) -> int:
        return self.num_pairs

    def slice(self, start: int, stop: int) -> "PreferenceBatch":
        """Pairs ``start:stop`` (a micro-batch), chosen and rejected rows kept together, without the padding columns
        that all of its rows share."""
        B = self.num_pairs
        rows = torch.cat([torch.arange(start, stop), torch.arange(B + start, B + stop)]).to(self.input_ids.device)
        mask = self.attention_mask[rows]
        cols = occupied_columns(mask)
        return PreferenceBatch(
            self.input_ids[rows][:, cols],
            mask[:, cols],
            self.loss_mask[rows][:, cols],
            self.domain_ids[start:stop],
            None if self.ref_logps is None else self.ref_logps[rows],
            None if self.index is None else self.index[start:stop],
        )


@dataclass
class PromptBatch:
    """Left-padded prompts for generation."""

    input_ids: torch.Tensor  # (B, P) left padded
    attention_mask: torch.Tensor  # (B, P)
    domain_ids: torch.Tensor  # (B,)
    prompt_ids: list[str] = field(default_factory=list)  # stable ids (sha256 of the prompt text)
    prompts: list[str] = field(default_factory=list)  # the prompt text as given
    domains: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return self.input_ids.shape[0]


@dataclass
class SampleSetBatch:
    """``B`` prompts with ``k`` responses each (a sample set: e.g. MetaRM's meta batch of policy samples), stored as
    ``B * k`` prompt + response sequences: row ``b * k + j`` is response ``j`` of prompt ``b`` (rows of one prompt are
    adjacent)."""

    input_ids: torch.Tensor  # (B*k, T) prompt + response
    attention_mask: torch.Tensor  # (B*k, T) 1 on real tokens
    loss_mask: torch.Tensor  # (B*k, T) 1 on response tokens
    domain_ids: torch.Tensor  # (B,) index into the data module's domain_names
    num_samples: int = 1  # k
    prompt_ids: list[str] = field(default_factory=list)  # (B,) stable ids (sha256 of the prompt text)
    scores: torch.Tensor | None = None  # (B*k,) scores stored in the sample-set file, when it has them
    index: torch.Tensor | None = None  # (B,) dataset row indices

    @property
    def num_prompts(self) -> int:
        return self.domain_ids.shape[0]

    def __len__(self) -> int:
        return self.num_prompts

    def slice(self, start: int, stop: int) -> "SampleSetBatch":
        """Prompts ``start:stop`` (a micro-batch) with all ``k`` responses of each, without the padding columns that
        all of its rows share."""
        k = self.num_samples
        rows = slice(start * k, stop * k)
        cols = occupied_columns(self.attention_mask[rows])
        return SampleSetBatch(
            self.input_ids[rows, cols],
            self.attention_mask[rows, cols],
            self.loss_mask[rows, cols],
            self.domain_ids[start:stop],
            k,
            list(self.prompt_ids[start:stop]),
            None if self.scores is None else self.scores[rows],
            None if self.index is None else self.index[start:stop],
        )
