"""Masked statistics, advantage whitening and GAE for token-level RL on language models.

Pure functions: tensors in, tensors out, no Lightning. Shapes: ``B`` sequences, ``T`` response tokens.
A ``mask`` / ``action_mask`` is ``(B, T)`` with 1 on response tokens (up to and including the first EOS)
and 0 on padding after it.

Multi-rank statistics: functions that take ``reduce_fn`` call it with a 1-D tensor of partial *sums*
and expect the element-wise SUM over all ranks back (e.g. ``lambda t: strategy.reduce(t, reduce_op="sum")``
or ``torch.distributed.all_reduce``); with ``reduce_fn=None`` the statistics are local.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

ReduceFn = Callable[[torch.Tensor], torch.Tensor]
"""All-reduces a 1-D tensor of partial sums by SUM across ranks and returns the result."""

_EPS = 1e-8


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: Optional[int] = None) -> torch.Tensor:
    """Sum of ``x`` over the positions where ``mask`` is non-zero.

    Args:
        x: ``(B, T)`` (any shape) values.
        mask: same shape as ``x``; 1 keeps a value, 0 drops it (fractional weights also work).
        dim: dimension to sum over; ``None`` sums everything.

    Returns:
        A scalar (``dim=None``) or ``x`` reduced over ``dim``. Masked-out values never contribute, even
        if they are ``inf``/``nan``.
    """
    mask = mask.to(x.dtype)
    prod = torch.where(mask != 0, x * mask, torch.zeros_like(x))
    return prod.sum() if dim is None else prod.sum(dim)


def masked_mean(
    x: torch.Tensor,
    mask: torch.Tensor,
    dim: Optional[int] = None,
    reduce_fn: Optional[ReduceFn] = None,
) -> torch.Tensor:
    """Mean of ``x`` over the positions where ``mask`` is non-zero.

    Args:
        x: ``(B, T)`` values.
        mask: ``(B, T)`` 0/1 mask.
        dim: dimension to average over (e.g. ``-1`` gives a per-row mean ``(B,)``); ``None`` averages over all
            masked entries (a token-level mean).
        reduce_fn: with ``dim=None`` only: sums ``[sum, count]`` across ranks so the mean is global.

    Returns:
        The mean; 0 where the mask is empty.
    """
    total = masked_sum(x, mask, dim)
    count = mask.to(x.dtype).sum() if dim is None else mask.to(x.dtype).sum(dim)
    if reduce_fn is not None:
        if dim is not None:
            raise ValueError("masked_mean: reduce_fn is only supported with dim=None")
        total, count = reduce_fn(torch.stack([total, count])).unbind(0)
    return total / count.clamp_min(_EPS)


def masked_var(
    x: torch.Tensor,
    mask: torch.Tensor,
    unbiased: bool = True,
    reduce_fn: Optional[ReduceFn] = None,
) -> torch.Tensor:
    """Variance of ``x`` over the masked entries (two-pass: mean first, then mean squared deviation).

    Args:
        x: ``(B, T)`` values.
        mask: ``(B, T)`` 0/1 mask.
        unbiased: apply Bessel's correction ``n / (n - 1)`` (``n`` = number of masked entries, global when
            ``reduce_fn`` is given). With ``n <= 1`` the biased value is returned.
        reduce_fn: sums partial sums across ranks so the variance is over all ranks' masked entries.

    Returns:
        A scalar tensor.
    """
    mean = masked_mean(x, mask, reduce_fn=reduce_fn)
    sq = masked_sum((x - mean) ** 2, mask)
    count = mask.to(x.dtype).sum()
    if reduce_fn is not None:
        sq, count = reduce_fn(torch.stack([sq, count])).unbind(0)
    var = sq / count.clamp_min(_EPS)
    if unbiased:  # no host sync: torch.where instead of `if count > 1`
        var = torch.where(count > 1, var * count / (count - 1).clamp_min(_EPS), var)
    return var


def masked_whiten(
    x: torch.Tensor,
    mask: torch.Tensor,
    shift_mean: bool = True,
    reduce_fn: Optional[ReduceFn] = None,
    unbiased: bool = True,
    eps: float = _EPS,
) -> torch.Tensor:
    """Normalise ``x`` to zero mean and unit variance over its masked entries (e.g. advantages).

    Args:
        x: ``(B, T)`` values.
        mask: ``(B, T)`` 0/1 mask; statistics use only masked entries.
        shift_mean: if False, the mean is added back (only the scale is normalised).
        reduce_fn: sums partial sums across ranks: mean and variance are then those of the concatenation
            of every rank's masked entries (all ranks must call it).
        unbiased: Bessel-corrected variance (as TRL / OpenRLHF).
        eps: added to the variance before the square root.

    Returns:
        ``(B, T)`` whitened values; masked-out positions are 0.
    """
    mean = masked_mean(x, mask, reduce_fn=reduce_fn)
    var = masked_var(x, mask, unbiased=unbiased, reduce_fn=reduce_fn)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask != 0, whitened, torch.zeros_like(whitened))


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    action_mask: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over response tokens (spec 1.4 step 4).

    ``delta_t = r_t + gamma * V_{t+1} - V_t`` with ``V`` after the last response token equal to 0,
    ``A_t = sum_l (gamma * lam)^l delta_{t+l}``, ``R_t = A_t + V_t``.

    Args:
        rewards: ``(B, T)`` per-token rewards ``r_t``.
        values: ``(B, T)`` critic values ``V_t`` (old values, from the rollout).
        action_mask: ``(B, T)`` 1 on response tokens; each row's ones must form a prefix (response tokens,
            then padding after EOS), which is what generation produces.
        gamma: discount.
        lam: GAE lambda.

    Returns:
        ``(advantages, returns)``, both ``(B, T)``, detached from the inputs' graphs, 0 on masked positions.
        Masked positions contribute nothing: their rewards and values are treated as 0.
    """
    mask = action_mask.to(values.dtype)
    rewards = rewards.detach() * mask  # (B, T)
    values = values.detach() * mask  # (B, T)
    T = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    last_gae = torch.zeros_like(rewards[:, 0])  # (B,)
    next_value = torch.zeros_like(rewards[:, 0])  # (B,)
    for t in reversed(range(T)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last_gae = (delta + gamma * lam * last_gae) * mask[:, t]
        advantages[:, t] = last_gae
        next_value = values[:, t]
    returns = (advantages + values) * mask
    return advantages, returns


def explained_variance(
    values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    reduce_fn: Optional[ReduceFn] = None,
) -> torch.Tensor:
    """Fraction of the variance of the returns explained by the critic: ``1 - Var[R - V] / Var[R]``.

    Args:
        values: ``(B, T)`` critic predictions.
        returns: ``(B, T)`` GAE returns (targets).
        mask: ``(B, T)`` response-token mask.
        reduce_fn: optional cross-rank sum for global statistics.

    Returns:
        A scalar: 1 is a perfect critic, 0 no better than a constant, negative worse; ``nan`` when the returns
        have zero variance.
    """
    var_returns = masked_var(returns, mask, unbiased=False, reduce_fn=reduce_fn)
    var_residual = masked_var(returns - values, mask, unbiased=False, reduce_fn=reduce_fn)
    nan = torch.full_like(var_returns, float("nan"))
    return torch.where(var_returns > 0, 1.0 - var_residual / var_returns.clamp_min(_EPS), nan)


# ---------------------------------------------------------------------------------------------------------------
# Critic-free estimators (GRPO, RLOO, REINFORCE++). Sequence-level estimators take one return per rollout, with the
# ``k`` rollouts of one prompt in adjacent rows (row ``b * k + j`` is sample ``j`` of prompt ``b``; a rank's batch
# always holds whole groups), and give one advantage per rollout, which the caller spreads over its response tokens.
# ---------------------------------------------------------------------------------------------------------------


def _groups(returns: torch.Tensor, group_size: int) -> torch.Tensor:
    """``(B,)`` -> ``(B / k, k)``, checking that ``B`` is a multiple of ``k``."""
    if group_size < 1 or returns.shape[0] % group_size != 0:
        raise ValueError(f"{returns.shape[0]} rollouts do not split into groups of {group_size} (one group = the "
                         "n_samples_per_prompt rollouts of one prompt)")
    return returns.reshape(-1, group_size)


def grpo_advantages(
    returns: torch.Tensor,
    group_size: int,
    scale_rewards: str = "group",
    eps: float = 1e-4,
    reduce_fn: Optional[ReduceFn] = None,
) -> torch.Tensor:
    """GRPO's group-relative advantage (Shao et al. 2024, DeepSeekMath, outcome supervision).

    ``A_i = (R_i - mean_{j in g(i)} R_j) / (s + eps)`` where ``s`` is, by ``scale_rewards``:

    - ``group``: the standard deviation of the rollout's own group (unbiased, as ``torch.std``): the paper's form;
    - ``batch``: the standard deviation of all returns of the batch (all ranks, unbiased);
    - ``none``: 1 and no ``eps`` (Dr. GRPO, Liu et al. 2025: the plain REINFORCE-with-group-baseline advantage).

    Args:
        returns: ``(B,)`` sequence returns ``R_i``, the ``k`` rollouts of a prompt adjacent.
        group_size: ``k`` (>= 2 for a non-trivial baseline).
        scale_rewards: ``group`` | ``batch`` | ``none``.
        eps: added to the scale (``group`` / ``batch``).
        reduce_fn: sums partial sums across ranks (``batch`` scaling only).

    Returns:
        ``(B,)`` advantages, detached.
    """
    returns = returns.detach()
    grouped = _groups(returns, group_size)  # (G, k)
    centred = (grouped - grouped.mean(-1, keepdim=True)).reshape(-1)  # (B,)
    if scale_rewards == "none":
        return centred
    if scale_rewards == "group":
        std = grouped.std(-1, keepdim=True).expand_as(grouped).reshape(-1)  # (B,)
    elif scale_rewards == "batch":
        x = returns.double()
        sums = torch.stack([x.sum(), (x * x).sum(), torch.tensor(float(x.numel()), dtype=torch.float64,
                                                                   device=x.device)])
        if reduce_fn is not None:
            sums = reduce_fn(sums)
        n = sums[2]
        var = (sums[1] - sums[0] ** 2 / n) / (n - 1).clamp_min(1)
        std = var.clamp_min(0).sqrt().to(returns.dtype)
    else:
        raise ValueError(f"scale_rewards must be group | batch | none, got {scale_rewards!r}")
    return centred / (std + eps)


def rloo_advantages(returns: torch.Tensor, group_size: int) -> torch.Tensor:
    """RLOO's leave-one-out advantage (Ahmadian et al. 2024, after Kool et al. 2019).

    ``A_i = R_i - 1/(k-1) * sum_{j in g(i), j != i} R_j  =  k/(k-1) * (R_i - mean_{j in g(i)} R_j)``.

    Args:
        returns: ``(B,)`` sequence returns, the ``k`` rollouts of a prompt adjacent.
        group_size: ``k >= 2``.

    Returns:
        ``(B,)`` advantages, detached.
    """
    if group_size < 2:
        raise ValueError("RLOO needs at least 2 samples per prompt (n_samples_per_prompt >= 2)")
    grouped = _groups(returns.detach(), group_size)  # (G, k)
    others = (grouped.sum(-1, keepdim=True) - grouped) / (group_size - 1)  # (G, k) mean of the other k-1
    return (grouped - others).reshape(-1)


def reinforce_pp_advantages(
    rewards: torch.Tensor, action_mask: torch.Tensor, reduce_fn: Optional[ReduceFn] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE++ (Hu 2025): undiscounted returns-to-go of token rewards (score at the last token, the token-level
    KL penalty ``-beta * kl_t`` in every token's reward), normalised over the whole batch.

    ``G_t = sum_{s >= t} r_s``, ``A_t = (G_t - mean(G)) / std(G)`` with the mean and std over all response tokens of
    the batch (all ranks).

    Args:
        rewards: ``(B, T)`` token rewards.
        action_mask: ``(B, T)`` response-token mask (a prefix per row).
        reduce_fn: sums partial sums across ranks.

    Returns:
        ``(advantages, returns)``: the normalised advantages and the raw returns-to-go, both ``(B, T)``, 0 off the
        mask.
    """
    mask = action_mask.to(rewards.dtype)
    r = rewards.detach() * mask
    returns = r.flip(-1).cumsum(-1).flip(-1) * mask  # (B, T) sum_{s >= t} r_s
    return masked_whiten(returns, action_mask, reduce_fn=reduce_fn), returns
