"""Token-level cross-entropy on response tokens (prompt and padding masked out)."""

from __future__ import annotations

import torch

from lightning_rlhf.rollout.scoring import shifted_token_logprobs


def masked_nll_sum(logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed negative log-likelihood of the response tokens, and how many there are.

    Returning the sum and the count (instead of a mean) lets callers normalise over a whole batch that was split
    into micro-batches, so accumulation gives exactly the full-batch token mean.

    Args:
        logits: ``(B, T, V)`` causal-LM logits over ``input_ids``.
        input_ids: ``(B, T)``.
        loss_mask: ``(B, T)`` 1 on response tokens (the tokens to predict), 0 on prompt and padding.

    Returns:
        ``(nll_sum, num_tokens)``: scalar float32 tensors.
    """
    logp = shifted_token_logprobs(logits, input_ids)  # (B, T-1)
    mask = loss_mask[:, 1:].to(logp.dtype)
    return -(logp * mask).sum(), mask.sum()
