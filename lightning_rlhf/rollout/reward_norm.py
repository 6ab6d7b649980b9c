"""Running normalisation of sequence scores (spec 1.4 step 2): moments merged batch by batch, then the transform.

Pure functions on Python floats and tensors; the module that owns the moments keeps them (PPO: float64 buffers
``reward_mean``, ``reward_var``, ``reward_count``, saved in checkpoints) and sums a batch's statistics over ranks
before merging them, so every rank holds the same moments.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

RewardNorm = Literal["none", "scale", "norm", "norm_clip"]
REWARD_NORMS: tuple[str, ...] = ("none", "scale", "norm", "norm_clip")


def update_moments(
    count: float, mean: float, var: float, batch_n: float, batch_sum: float, batch_sq_sum: float
) -> tuple[float, float, float]:
    """Merge a batch into running moments (Chan et al.'s parallel update of the population variance).

    Args:
        count: samples folded in so far.
        mean: their mean.
        var: their population variance.
        batch_n: samples in the batch (all ranks).
        batch_sum: sum of the batch's scores.
        batch_sq_sum: sum of their squares.

    Returns:
        ``(count, mean, var)`` after the batch; unchanged when ``batch_n <= 0``.
    """
    if batch_n <= 0:
        return count, mean, var
    batch_mean = batch_sum / batch_n
    batch_var = max(batch_sq_sum / batch_n - batch_mean**2, 0.0)
    total = count + batch_n
    delta = batch_mean - mean
    new_mean = mean + delta * batch_n / total
    m2 = var * count + batch_var * batch_n + delta**2 * count * batch_n / total
    return total, new_mean, m2 / total


def normalize_scores(scores: torch.Tensor, mean: float, var: float, mode: RewardNorm, clip: float) -> torch.Tensor:
    """Apply the running normalisation ``mode`` to ``(B,)`` scores.

    ``scale``: ``s / sigma``; ``norm``: ``(s - mu) / sigma``; ``norm_clip``: ``norm`` clipped to ``[-clip, clip]``;
    ``none``: unchanged. ``sigma = sqrt(var + 1e-8)``.
    """
    if mode == "none":
        return scores
    std = math.sqrt(var + 1e-8)
    if mode == "scale":
        return scores / std
    normed = (scores - mean) / std
    if mode == "norm_clip":
        normed = normed.clamp(-clip, clip)
    return normed
