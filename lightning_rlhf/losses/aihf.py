"""AIHF losses (spec 5; Li et al., arXiv 2406.06874): the demonstration terms and the joint objective.

All functions are pure: tensors in, tensors out, no Lightning. ``log pi(y)`` is always the sum of the response
tokens' log-probs (as in DPO).
"""

from __future__ import annotations

from typing import Literal, NamedTuple, Optional

import torch

from lightning_rlhf.losses.preference import DPOOutput, bradley_terry_loss, dpo_loss

DemoTerm = Literal["spin", "nll"]
RewardDemoTerm = Literal["bt", "linear"]
TermNorm = Literal["per_term", "pooled"]


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


class AIHFRewardLoss(NamedTuple):
    """The explicit-reward step's loss (0-d) and its two terms, each the mean over its own pairs (0-d)."""

    total: torch.Tensor
    demonstration: torch.Tensor
    preference: torch.Tensor


def aihf_reward_loss(
    demo_scores: torch.Tensor,
    sample_scores: torch.Tensor,
    chosen_scores: torch.Tensor,
    rejected_scores: torch.Tensor,
    w_D: float = 1.0,
    w_P: float = 1.0,
    demo_term: RewardDemoTerm = "bt",
    term_norm: TermNorm = "per_term",
    beta: float = 0.1,
    num_demo_pairs: Optional[int] = None,
    num_pref_pairs: Optional[int] = None,
) -> AIHFRewardLoss:
    """AIHF's reward step (spec 5, variant A): ``L_R = w_D * BT(y_E > y~) + w_P * BT(y_w > y_l)``.

    * ``demo_term: bt``: ``l_D = -log sigmoid(r(x, y_E) - r(x, y~))``;
      ``linear``: ``l_D = -(r(x, y_E) - r(x, y~)) / beta``.
    * ``l_P = -log sigmoid(r(x, y_w) - r(x, y_l))`` (Bradley-Terry).
    * ``term_norm: per_term`` (default): ``L_R = w_D * mean_D l_D + w_P * mean_P l_P``, each term over its own pairs;
      ``pooled``: ``L_R = (w_D * sum_D l_D + w_P * sum_P l_P) / (N + B)``, both kinds of pairs in one mean (the
      authors' code, which mixes them in one dataset).

    ``w_D = 0`` is plain Bradley-Terry reward-model training (``per_term``: ``w_P * mean_P l_P``).

    Args:
        demo_scores: ``(N,)`` ``r(x, y_E)`` of the demonstrations.
        sample_scores: ``(N,)`` ``r(x, y~)`` of the policy's samples on the same prompts.
        chosen_scores: ``(B,)`` ``r(x, y_w)``.
        rejected_scores: ``(B,)`` ``r(x, y_l)``.
        w_D: Weight of the demonstration pairs.
        w_P: Weight of the preference pairs.
        demo_term: ``bt`` or ``linear``.
        term_norm: ``per_term`` or ``pooled``.
        beta: KL strength of the inner problem (scales the ``linear`` term).
        num_demo_pairs: ``N`` of the whole batch when these tensors are a micro-batch of it (the micro-batches'
            totals then add up to the batch's loss); default: ``demo_scores.numel()``.
        num_pref_pairs: ``B`` of the whole batch likewise; default: ``chosen_scores.numel()``.

    Returns:
        :class:`AIHFRewardLoss`: the total and each term's sum over these pairs divided by its own pair count
        (unweighted; the mean when the tensors are the whole batch).
    """
    if demo_term == "bt":
        l_d = bradley_terry_loss(demo_scores, sample_scores)
    elif demo_term == "linear":
        l_d = -(demo_scores - sample_scores) / beta
    else:
        raise ValueError(f"demo_term must be 'bt' or 'linear', got {demo_term!r}")
    l_p = bradley_terry_loss(chosen_scores, rejected_scores)
    n_d = max(l_d.numel() if num_demo_pairs is None else num_demo_pairs, 1)
    n_p = max(l_p.numel() if num_pref_pairs is None else num_pref_pairs, 1)
    term_d, term_p = l_d.sum() / n_d, l_p.sum() / n_p
    if term_norm == "per_term":
        total = l_p.new_zeros(())
        if w_D:
            total = total + w_D * term_d
        if w_P:
            total = total + w_P * term_p
    elif term_norm == "pooled":
        count = (n_d if w_D else 0) + (n_p if w_P else 0)
        total = l_p.new_zeros(())
        if w_D:
            total = total + w_D * l_d.sum()
        if w_P:
            total = total + w_P * l_p.sum()
        total = total / max(count, 1)
    else:
        raise ValueError(f"term_norm must be 'per_term' or 'pooled', got {term_norm!r}")
    return AIHFRewardLoss(total, term_d.detach(), term_p.detach())


__all__ = [
    "AIHFDPOObjective", "AIHFRewardLoss", "DemoTerm", "RewardDemoTerm", "TermNorm", "aihf_dpo_objective",
    "aihf_reward_loss", "nll_demo_loss", "spin_loss",
]
