"""PPO for language models: KL penalty, token rewards, clipped policy and value losses, entropy (spec 1.4).

Pure functions, no Lightning. Shapes: ``B`` sequences, ``T`` response tokens, ``V`` vocabulary.
``action_mask`` ``(B, T)`` is 1 on response tokens up to and including the first EOS and 0 after it; masked
positions never contribute to a reward, a KL term or a loss, whatever values they hold.

Loss normalisation: by default each loss is a token-level mean over the masked tokens of the batch it is given.
Pass ``normalizer`` (the number of response tokens of the whole minibatch) when a minibatch is split into
micro-batches: the micro-batch losses, summed over the accumulation, then equal the minibatch token mean exactly.
"""

from __future__ import annotations

from typing import Literal, NamedTuple, Optional, Union

import torch

from lightning_rlhf.advantages import masked_mean, masked_sum

KLEstimator = Literal["k1", "k3"]


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: KLEstimator = "k1") -> torch.Tensor:
    """Per-token estimate of ``KL(pi || pi_ref)`` from log-probs of the sampled tokens.

    With ``d = logprobs - ref_logprobs``: ``k1 = d`` (unbiased, can be negative), ``k3 = exp(-d) - 1 + d``
    (unbiased, always >= 0, lower variance; Schulman's estimator).

    Args:
        logprobs: ``(B, T)`` log-probs of the sampled tokens under the policy (old, from the rollout).
        ref_logprobs: ``(B, T)`` log-probs of the same tokens under the reference model.
        estimator: ``"k1"`` or ``"k3"``.

    Returns:
        ``(B, T)`` per-token KL (not masked: multiply by ``action_mask`` or use ``masked_*``).
    """
    d = logprobs - ref_logprobs  # (B, T)
    if estimator == "k1":
        return d
    if estimator == "k3":
        return torch.expm1(-d) + d
    raise ValueError(f"kl_penalty: unknown estimator {estimator!r}; use 'k1' or 'k3'")


def last_token_index(action_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last response token of each row.

    Args:
        action_mask: ``(B, T)`` response-token mask.

    Returns:
        ``(B,)`` long; the position of the last non-zero entry (0 for an empty row).
    """
    positions = torch.arange(action_mask.shape[1], device=action_mask.device)  # (T,)
    return (positions * (action_mask != 0)).amax(dim=-1)


def token_rewards(
    scores: torch.Tensor,
    kl: torch.Tensor,
    kl_coef: Union[torch.Tensor, float],
    action_mask: torch.Tensor,
) -> torch.Tensor:
    """Per-token rewards ``r_t = -kl_coef_i * kl_t``, with the sequence score added at the last response token.

    Args:
        scores: ``(B,)`` shaped sequence scores ``s_i``.
        kl: ``(B, T)`` per-token KL (``kl_penalty``).
        kl_coef: ``(B,)`` per-sample KL coefficients ``eta_i`` (a float is broadcast to every sample).
        action_mask: ``(B, T)`` response-token mask.

    Returns:
        ``(B, T)`` rewards; 0 on masked positions. A row with no response token gets no score.
    """
    mask = action_mask != 0  # (B, T)
    kl_coef = torch.as_tensor(kl_coef, dtype=kl.dtype, device=kl.device)
    if kl_coef.ndim == 0:
        kl_coef = kl_coef.expand(kl.shape[0])
    rewards = -kl_coef[:, None] * kl  # (B, T)
    rewards = torch.where(mask, rewards, torch.zeros_like(rewards))
    last = last_token_index(action_mask)  # (B,)
    has_tokens = mask.any(dim=-1).to(rewards.dtype)  # (B,)
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards[rows, last] += scores.to(rewards.dtype) * has_tokens
    return rewards


class PolicyLossOutput(NamedTuple):
    """Result of :func:`policy_loss`.

    Attributes:
        loss: scalar clipped surrogate loss (with grad).
        clip_frac: scalar fraction of response tokens where the clipped branch was active (detached).
        approx_kl: scalar ``mean((ratio - 1) - log ratio)`` over response tokens (detached).
        per_sample_surrogate: ``(B,)`` token-mean per row of the clipped surrogate *objective*
            ``min(A * ratio, A * clip(ratio))`` (with grad; the quantity GIL's ``J_i`` is built from).
    """

    loss: torch.Tensor
    clip_frac: torch.Tensor
    approx_kl: torch.Tensor
    per_sample_surrogate: torch.Tensor


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    action_mask: torch.Tensor,
    clip_eps: float = 0.2,
    normalizer: Optional[Union[torch.Tensor, float]] = None,
    sample_weights: Optional[torch.Tensor] = None,
    clip_eps_high: Optional[float] = None,
) -> PolicyLossOutput:
    """PPO clipped surrogate loss (spec 1.4 step 5).

    ``ratio = exp(logprobs - old_logprobs)``;
    ``L_pg = masked_mean(max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)))``; with per-sample weights ``w_i``
    every token of row ``i`` is weighted by ``w_i`` (the normaliser stays the token count: weights of 1 change nothing).
    With ``clip_eps_high`` the clip range is asymmetric, ``[1 - eps, 1 + eps_high]`` (DAPO's "clip-higher").

    Args:
        logprobs: ``(B, T)`` log-probs of the sampled tokens under the current policy (with grad).
        old_logprobs: ``(B, T)`` log-probs from the rollout policy.
        advantages: ``(B, T)`` (whitened) advantages.
        action_mask: ``(B, T)`` response-token mask.
        clip_eps: ratio clip range ``eps``.
        normalizer: divide the masked sum by this instead of the number of masked tokens (see module doc).
        sample_weights: ``(B,)`` per-sample weights of the loss (e.g. a callback's ``sample_weight``); ``None`` = 1.
        clip_eps_high: upper clip range; ``None`` = ``clip_eps``.

    Returns:
        :class:`PolicyLossOutput` (``per_sample_surrogate`` is unweighted).
    """
    mask = action_mask != 0
    log_ratio = torch.where(mask, logprobs - old_logprobs, torch.zeros_like(logprobs))  # (B, T); 0 off-mask
    ratio = torch.exp(log_ratio)  # (B, T)
    surr = advantages * ratio  # (B, T)
    high = clip_eps if clip_eps_high is None else clip_eps_high
    surr_clipped = advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + high)  # (B, T)
    objective = torch.minimum(surr, surr_clipped)  # (B, T)
    if sample_weights is not None:
        weighted = objective * sample_weights.to(objective.dtype).unsqueeze(-1)  # (B, T)
    else:
        weighted = objective
    if normalizer is None:
        loss = -masked_mean(weighted, action_mask)
    else:
        loss = -masked_sum(weighted, action_mask) / normalizer
    with torch.no_grad():
        clip_frac = masked_mean((surr_clipped < surr).to(logprobs.dtype), action_mask)
        approx_kl = masked_mean((ratio - 1.0) - log_ratio, action_mask)
    per_sample_surrogate = masked_mean(objective, action_mask, dim=-1)  # (B,)
    return PolicyLossOutput(loss, clip_frac, approx_kl, per_sample_surrogate)


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    action_mask: torch.Tensor,
    clip: Optional[float] = 0.2,
    normalizer: Optional[Union[torch.Tensor, float]] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss (spec 1.4 step 5).

    ``V_clip = V_old + clip(V_new - V_old, -c, c)``,
    ``L_v = 0.5 * masked_mean(max((V_new - R)^2, (V_clip - R)^2))``.

    Args:
        values: ``(B, T)`` current critic values (with grad).
        old_values: ``(B, T)`` critic values from the rollout.
        returns: ``(B, T)`` GAE returns.
        action_mask: ``(B, T)`` response-token mask.
        clip: value clip range ``c``; ``None`` disables clipping (plain squared error).
        normalizer: divide the masked sum by this instead of the number of masked tokens.

    Returns:
        ``(loss, clip_frac)``: the scalar loss (with grad) and the detached fraction of response tokens where
        the clipped branch was the larger one.
    """
    err = (values - returns) ** 2  # (B, T)
    if clip is None:
        per_token = err
        clipped_active = torch.zeros_like(err, dtype=torch.bool)
    else:
        values_clipped = old_values + torch.clamp(values - old_values, -clip, clip)  # (B, T)
        err_clipped = (values_clipped - returns) ** 2  # (B, T)
        per_token = torch.maximum(err, err_clipped)
        clipped_active = err_clipped > err
    if normalizer is None:
        loss = 0.5 * masked_mean(per_token, action_mask)
    else:
        loss = 0.5 * masked_sum(per_token, action_mask) / normalizer
    with torch.no_grad():
        clip_frac = masked_mean(clipped_active.to(values.dtype), action_mask)
    return loss, clip_frac


def entropy_from_logits(logits: torch.Tensor, chunk_size: int = 1024) -> torch.Tensor:
    """Entropy of the categorical distribution at every position, computed in row chunks to save memory.

    ``H = logsumexp(z) - sum_v softmax(z)_v * z_v``; each chunk of ``chunk_size`` positions is upcast to
    float32 on its own, so no full-size float32 copy of ``logits`` (or of its softmax) is ever materialised
    at once when no gradient is needed.

    Args:
        logits: ``(B, T, V)`` logits (already divided by the sampling temperature if one is used).
        chunk_size: number of ``(b, t)`` positions per chunk.

    Returns:
        ``(B, T)`` float32 entropies (differentiable).
    """
    B, T, V = logits.shape
    flat = logits.reshape(B * T, V)
    out = []
    for chunk in flat.split(chunk_size, dim=0):
        z = chunk.float()
        lse = torch.logsumexp(z, dim=-1)  # (n,)
        probs = torch.softmax(z, dim=-1)  # (n, V)
        out.append(lse - (probs * z).sum(-1))
    if not out:
        return logits.new_zeros((B, T), dtype=torch.float32)
    return torch.cat(out).reshape(B, T)
