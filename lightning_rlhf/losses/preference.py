"""Pairwise preference losses: Bradley-Terry reward-model loss and DPO (sigmoid / IPO / hinge, label smoothing).

All functions are pure: tensors in, tensors out, no Lightning.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

DPOLossType = Literal["sigmoid", "ipo", "hinge"]


def bradley_terry_loss(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor) -> torch.Tensor:
    """Per-pair Bradley-Terry loss ``-log sigmoid(r_w - r_l)``.

    Args:
        chosen_scores: ``(B,)`` scores ``r(x, y_w)``.
        rejected_scores: ``(B,)`` scores ``r(x, y_l)``.

    Returns:
        ``(B,)`` losses (take the mean for ``L_RM``).
    """
    return -F.logsigmoid(chosen_scores - rejected_scores)


def reward_centering_loss(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor) -> torch.Tensor:
    """Per-pair centering penalty ``(r_w + r_l)^2`` that keeps scores near zero. ``(B,)`` in, ``(B,)`` out."""
    return (chosen_scores + rejected_scores) ** 2


@dataclass
class DPOOutput:
    """Per-pair DPO quantities, each ``(B,)``."""

    losses: torch.Tensor
    logits: torch.Tensor  # h = beta * (chosen log-ratio - rejected log-ratio)
    chosen_rewards: torch.Tensor  # beta * (log pi(y_w) - log pi_ref(y_w)), detached
    rejected_rewards: torch.Tensor  # beta * (log pi(y_l) - log pi_ref(y_l)), detached


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    loss_type: DPOLossType = "sigmoid",
    label_smoothing: float = 0.0,
) -> DPOOutput:
    """DPO loss (Rafailov et al. 2023) and its IPO and hinge variants.

    ``h = beta * [(log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l))]``, with ``log pi(y)`` the sum
    of response-token log-probs.

    * ``sigmoid``: ``-(1 - eps) log sigmoid(h) - eps log sigmoid(-h)`` (``eps = label_smoothing``; conservative DPO).
    * ``ipo``: ``(h / beta - 1 / (2 beta))^2``.
    * ``hinge``: ``relu(1 - h)``.

    Args:
        policy_chosen_logps: ``(B,)`` summed log-probs of ``y_w`` under the policy.
        policy_rejected_logps: ``(B,)`` same for ``y_l``.
        ref_chosen_logps: ``(B,)`` summed log-probs of ``y_w`` under the reference.
        ref_rejected_logps: ``(B,)`` same for ``y_l``.
        beta: KL strength.
        loss_type: ``sigmoid`` | ``ipo`` | ``hinge``.
        label_smoothing: Probability ``eps`` that a label is flipped (``sigmoid`` only).

    Returns:
        :class:`DPOOutput` with per-pair losses ``(B,)``.
    """
    if label_smoothing and loss_type != "sigmoid":
        raise ValueError(f"label_smoothing applies to loss_type='sigmoid' only, got loss_type={loss_type!r}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    h = beta * (chosen_logratios - rejected_logratios)
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(h) - label_smoothing * F.logsigmoid(-h)
    elif loss_type == "ipo":
        losses = (h / beta - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        losses = torch.relu(1 - h)
    else:
        raise ValueError(f"loss_type must be sigmoid, ipo or hinge; got {loss_type!r}")
    return DPOOutput(
        losses=losses,
        logits=h,
        chosen_rewards=(beta * chosen_logratios).detach(),
        rejected_rewards=(beta * rejected_logratios).detach(),
    )
