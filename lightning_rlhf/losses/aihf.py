"""AIHF losses (spec 5; Li et al., arXiv 2406.06874): the demonstration terms and the joint objective.

All functions are pure: tensors in, tensors out, no Lightning. ``log pi(y)`` is always the sum of the response
tokens' log-probs (as in DPO).
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch

from lightning_rlhf.losses.preference import DPOOutput, dpo_loss

DemoTerm = Literal["spin", "nll"]


def spin_loss(
    policy_demo_logps: torch.Tensor,
    policy_sample_logps: torch.Tensor,
    opponent_demo_logps: torch.Tensor,
    opponent_sample_logps: torch.Tensor,
    beta: float = 0.1,
) -> DPOOutput:
    """Self-play (SPIN) demonstration loss against an opponent ``pi_t`` (Chen et al. 2024; Self-Play AIHF).

    ``l_i = -log sigmoid(beta * [(log pi(y_E) - log pi_t(y_E)) - (log pi(y~) - log pi_t(y~))])``, ``y~ ~ pi_t(.|x)``:
    the DPO sigmoid loss with the demonstration as the chosen response, the opponent's sample as the rejected one
    and the opponent in the reference's place.

    Args:
        policy_demo_logps: ``(N,)`` ``log pi(y_E | x)`` under the trained policy.
        policy_sample_logps: ``(N,)`` ``log pi(y~ | x)``.
        opponent_demo_logps: ``(N,)`` ``log pi_t(y_E | x)`` under the opponent.
        opponent_sample_logps: ``(N,)`` ``log pi_t(y~ | x)``.
        beta: KL strength.

    Returns:
        :class:`DPOOutput` with per-demonstration losses ``(N,)`` and logits (the bracket times ``beta``).
    """
    return dpo_loss(policy_demo_logps, policy_sample_logps, opponent_demo_logps, opponent_sample_logps, beta=beta,
                    loss_type="sigmoid")


def nll_demo_loss(policy_demo_logps: torch.Tensor) -> torch.Tensor:
    """Per-demonstration negative log-likelihood ``-log pi(y_E | x)``. ``(N,)`` in, ``(N,)`` out."""
    return -policy_demo_logps


class AIHFDPOObjective(NamedTuple):
    """``total = w_P * preference + w_D * demonstration``; each term is the mean over its own pairs (0-d tensors)."""

    total: torch.Tensor
    preference: torch.Tensor
    demonstration: torch.Tensor


def aihf_dpo_objective(
    preference_losses: torch.Tensor, demo_losses: torch.Tensor, w_P: float = 1.0, w_D: float = 1.0
) -> AIHFDPOObjective:
    """AIHF-DPO / Self-Play AIHF objective ``L = w_P * mean_P l_DPO + w_D * mean_D l_demo`` (spec 5, variant B).

    Each term is averaged over its own pairs (``B`` preference pairs, ``N`` demonstrations), so the weights mean the
    same whatever the two batch sizes are. A term whose weight is 0 is left out (its mean is still reported).

    Args:
        preference_losses: ``(B,)`` per-pair DPO losses (:func:`~lightning_rlhf.losses.preference.dpo_loss`).
        demo_losses: ``(N,)`` per-demonstration losses (:func:`spin_loss` or :func:`nll_demo_loss`).
        w_P: Weight of the preference term.
        w_D: Weight of the demonstration term.
    """
    pref = preference_losses.mean() if preference_losses.numel() else preference_losses.new_zeros(())
    demo = demo_losses.mean() if demo_losses.numel() else demo_losses.new_zeros(())
    total = pref.new_zeros(())
    if w_P:
        total = total + w_P * pref
    if w_D:
        total = total + w_D * demo
    return AIHFDPOObjective(total, pref, demo)


__all__ = ["AIHFDPOObjective", "DemoTerm", "aihf_dpo_objective", "nll_demo_loss", "spin_loss"]
