"""MetaRM's difference loss and the statistics of reward differences on sample sets (spec 3; Dou et al. 2024).

A sample set holds ``B`` prompts with ``k`` responses each, scored as a flat ``(B*k,)`` vector whose row ``b*k + j``
is response ``j`` of prompt ``b`` (:class:`~lightning_rlhf.data.batches.SampleSetBatch`), or as a ``(B, k)`` matrix.
All functions are pure: tensors in, tensors out, no Lightning.
"""

from __future__ import annotations

from typing import Literal

import torch

DifferenceNorm = Literal["paper", "pairs"]


def as_sample_matrix(scores: torch.Tensor, num_samples: int | None = None) -> torch.Tensor:
    """``(B*k,)`` scores (rows of one prompt adjacent) as a ``(B, k)`` matrix; a ``(B, k)`` input is returned as is."""
    if scores.dim() == 2:
        return scores
    if num_samples is None or num_samples < 1 or scores.numel() % num_samples:
        raise ValueError(f"cannot split {scores.numel()} scores into sets of num_samples={num_samples}")
    return scores.view(-1, num_samples)


def pairwise_abs_differences(scores: torch.Tensor, num_samples: int | None = None, abs_eps: float = 0.0) -> torch.Tensor:
    """``|r_i - r_j|`` for every pair ``i < j`` of responses to the same prompt.

    Args:
        scores: ``(B, k)``, or ``(B*k,)`` with ``num_samples = k``.
        num_samples: ``k`` when ``scores`` is flat.
        abs_eps: 0 takes the exact ``|d|``; ``> 0`` the smooth ``sqrt(d^2 + abs_eps)`` (e.g. ``1e-12``), differentiable
            at ``d = 0``.

    Returns:
        ``(B, k(k-1)/2)`` differences, pairs in ``torch.triu_indices(k, k, 1)`` order.
    """
    r = as_sample_matrix(scores, num_samples)
    k = r.shape[1]
    i, j = torch.triu_indices(k, k, offset=1, device=r.device)
    d = r[:, i] - r[:, j]
    return torch.sqrt(d * d + abs_eps) if abs_eps > 0 else d.abs()


def difference_loss(
    scores: torch.Tensor,
    num_samples: int | None = None,
    difference_norm: DifferenceNorm = "paper",
    abs_eps: float = 0.0,
) -> torch.Tensor:
    """MetaRM's difference loss per prompt, the quantity the meta step MAXIMISES:

    ``J(x) = c * sum_{i<j} sigmoid(|r(x, s_i) - r(x, s_j)|)``, with ``c = 2 / k^2`` (``difference_norm: paper``, the
    paper's Algorithm 1) or ``c = 2 / (k (k - 1))`` (``pairs``: the mean over the ``k(k-1)/2`` pairs). Each term is in
    ``[0.5, 1)``: it grows as the reward model tells the responses apart. A minibatch's ``J`` is the mean over its
    prompts (our choice; the paper leaves it open).

    Args:
        scores: ``(B, k)`` rewards of ``k >= 2`` responses per prompt, or ``(B*k,)`` with ``num_samples = k``.
        num_samples: ``k`` when ``scores`` is flat.
        difference_norm: ``paper`` (``2/k^2``) or ``pairs`` (``2/(k(k-1))``).
        abs_eps: See :func:`pairwise_abs_differences` (0 = exact ``|d|``).

    Returns:
        ``(B,)`` per-prompt ``J``.
    """
    r = as_sample_matrix(scores, num_samples)
    k = r.shape[1]
    if k < 2:
        raise ValueError(f"the difference loss needs k >= 2 responses per prompt, got k={k}")
    if difference_norm == "paper":
        c = 2.0 / (k * k)
    elif difference_norm == "pairs":
        c = 2.0 / (k * (k - 1))
    else:
        raise ValueError(f"difference_norm must be 'paper' or 'pairs', got {difference_norm!r}")
    return c * torch.sigmoid(pairwise_abs_differences(r, abs_eps=abs_eps)).sum(1)


def within_prompt_std(scores: torch.Tensor, num_samples: int | None = None) -> torch.Tensor:
    """Population standard deviation of the ``k`` scores of each prompt (the RM's "score spread" on a sample set).

    Args:
        scores: ``(B, k)``, or ``(B*k,)`` with ``num_samples = k``.
        num_samples: ``k`` when ``scores`` is flat.

    Returns:
        ``(B,)`` standard deviations.
    """
    return as_sample_matrix(scores, num_samples).float().std(dim=1, unbiased=False)


def normalized_difference_histogram(abs_differences: torch.Tensor, bins: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's view of discrimination on policy samples: pairwise ``|delta r|`` divided by the largest one, and the
    share of pairs in each of ``bins`` equal bins of ``[0, 1]`` (a vanilla RM's mass sits in the lowest bins).

    Args:
        abs_differences: ``(N,)`` pairwise ``|r_i - r_j|`` of responses to the same prompt, pooled over prompts.
        bins: Number of equal-width bins of ``[0, 1]``.

    Returns:
        ``(normalized (N,), fractions (bins,))``; the fractions sum to 1 (all zeros for ``N = 0``). When every
        difference is 0 the normalized values are 0.
    """
    d = abs_differences.detach().float().flatten()
    if d.numel() == 0:
        return d, torch.zeros(bins)
    top = d.max()
    normalized = d / top if top > 0 else torch.zeros_like(d)
    index = (normalized * bins).long().clamp(max=bins - 1)
    counts = torch.bincount(index, minlength=bins).float()
    return normalized, counts / d.numel()
