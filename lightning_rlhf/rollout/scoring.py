"""Sequence scoring: per-token log-probabilities of given tokens under a causal LM.

Token alignment used everywhere in the package: the logits at position ``t-1`` score token ``t``.
"""

from __future__ import annotations

import torch


#: elements of one float32 chunk in :func:`token_logprobs` (64M floats = 256 MiB)
CHUNK_ELEMENTS = 1 << 26


def _chunk_rows(logits: torch.Tensor) -> int:
    """Rows of ``(B, T, V)`` logits per float32 chunk of about :data:`CHUNK_ELEMENTS` elements (at least one)."""
    _, T, V = logits.shape
    return max(1, CHUNK_ELEMENTS // max(1, T * V))


def _chunked_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log p(labels), logsumexp(logits))``, both ``(B, T)`` float32, computed one float32 row chunk at a time."""
    B, T, _ = logits.shape
    rows = _chunk_rows(logits)
    out = torch.empty(B, T, dtype=torch.float32, device=logits.device)
    lse = torch.empty(B, T, dtype=torch.float32, device=logits.device)
    for s in range(0, B, rows):
        x = logits[s : s + rows].float()
        lse[s : s + rows] = torch.logsumexp(x, dim=-1)
        out[s : s + rows] = x.gather(-1, labels[s : s + rows].unsqueeze(-1)).squeeze(-1) - lse[s : s + rows]
    return out, lse


class _TokenLogProbs(torch.autograd.Function):
    """``log_softmax(logits)[labels]`` in float32, computed over row chunks.

    Saves only the logits (in their own dtype, e.g. bf16) and a ``(B, T)`` logsumexp for the backward pass, instead of
    a full float32 ``log_softmax`` output; the backward pass recomputes the softmax chunk by chunk:
    ``d/dx_j (x_y - lse(x)) = 1[j = y] - softmax(x)_j``.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        out, lse = _chunked_logprobs(logits, labels)
        ctx.save_for_backward(logits, labels, lse)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        logits, labels, lse = ctx.saved_tensors
        rows = _chunk_rows(logits)
        grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        for s in range(0, logits.shape[0], rows):
            g_out = grad_out[s : s + rows].float().unsqueeze(-1)  # (b, T, 1)
            g = torch.exp(logits[s : s + rows].float() - lse[s : s + rows].unsqueeze(-1)).mul_(-g_out)
            g.scatter_add_(-1, labels[s : s + rows].unsqueeze(-1), g_out)
            grad[s : s + rows] = g
        return grad, None


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Log-probability of each label token under ``logits``, without shifting.

    Args:
        logits: ``(B, T, V)`` logits already aligned with ``labels`` (``logits[:, t]`` scores ``labels[:, t]``).
        labels: ``(B, T)`` token ids.

    Returns:
        ``(B, T)`` float32 log-probabilities, computed in float32 over row chunks; with gradients, only the logits
        and a ``(B, T)`` logsumexp are kept for the backward pass (no float32 copy of the ``(B, T, V)`` softmax).
    """
    if torch.is_grad_enabled() and logits.requires_grad:
        return _TokenLogProbs.apply(logits, labels)
    return _chunked_logprobs(logits, labels)[0]


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


def score_token_index(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, pad_token_id: int | None
) -> torch.Tensor:
    """Where a sequence score is read: the last real token whose id is not the pad id.

    This is the position transformers' ``*ForSequenceClassification`` models read, so a reward model trained here
    scores the same when loaded with plain transformers or TRL, also when the pad id equals the eos id (a trailing
    eos is then skipped, like padding). Rows with no such token fall back to their last real token.

    Args:
        input_ids: ``(B, T)`` token ids, left or right padded.
        attention_mask: ``(B, T)`` 1 on real tokens.
        pad_token_id: The model's pad id (``None``: read at the last real token).

    Returns:
        ``(B,)`` long positions.
    """
    last_real = last_token_index(attention_mask)
    if pad_token_id is None:
        return last_real
    keep = attention_mask.bool() & (input_ids != pad_token_id)
    return torch.where(keep.any(-1), last_token_index(keep), last_real)
