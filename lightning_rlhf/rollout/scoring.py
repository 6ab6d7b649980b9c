"""Sequence scoring: per-token log-probabilities of given tokens under a causal LM.

Token alignment used everywhere in the package: the logits at position ``t-1`` score token ``t``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Log-probability of each label token under ``logits``, without shifting.

    Args:
        logits: ``(B, T, V)`` logits already aligned with ``labels`` (``logits[:, t]`` scores ``labels[:, t]``).
        labels: ``(B, T)`` token ids.

    Returns:
        ``(B, T)`` float32 log-probabilities. Computed with ``log_softmax`` in float32 for stability.
    """
    logp = F.log_softmax(logits.float(), dim=-1)
    return torch.gather(logp, -1, labels.unsqueeze(-1)).squeeze(-1)


def shifted_token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Log-probabilities of ``input_ids[:, 1:]`` from the logits of a causal LM forward on ``input_ids``.

    Args:
        logits: ``(B, T, V)`` logits of a forward pass over ``input_ids``.
        input_ids: ``(B, T)`` token ids.

    Returns:
        ``(B, T-1)`` log-probabilities; entry ``t`` is ``log p(input_ids[:, t+1] | input_ids[:, :t+1])``.
    """
    return token_logprobs(logits[:, :-1], input_ids[:, 1:])


def sequence_logprobs(logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Sum of response-token log-probabilities of each sequence.

    Args:
        logits: ``(B, T, V)`` logits of a forward pass over ``input_ids``.
        input_ids: ``(B, T)`` token ids (left or right padded).
        loss_mask: ``(B, T)`` 1 on the response tokens to score (prompt and padding are 0). Position 0 is
            never scored (no logits predict it).

    Returns:
        ``(B,)`` ``sum_t loss_mask[t] * log p(input_ids[t] | input_ids[:t])``.
    """
    logp = shifted_token_logprobs(logits, input_ids)  # (B, T-1)
    mask = loss_mask[:, 1:].to(logp.dtype)
    return (logp * mask).sum(-1)


def position_ids_from_attention_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that ignore padding, so left- and right-padded copies of a sequence get the same positions.

    Args:
        attention_mask: ``(B, T)`` 1 on real tokens, 0 on padding.

    Returns:
        ``(B, T)`` long tensor: ``cumsum(mask) - 1`` clamped at 0 (padding positions get 0).
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last non-pad token of each row, for left or right padding.

    Args:
        attention_mask: ``(B, T)`` 1 on real tokens, 0 on padding.

    Returns:
        ``(B,)`` long tensor of positions.
    """
    T = attention_mask.shape[-1]
    positions = torch.arange(T, device=attention_mask.device).expand_as(attention_mask)
    return torch.where(attention_mask.bool(), positions, -1).max(-1).values.clamp(min=0)
