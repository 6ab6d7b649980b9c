"""GIL math (spec 2): group inference, per-group surrogates, the V-REx variance penalty and Group-DRO weights.

Pure functions, no Lightning. Shapes: ``N`` (or ``B``) rollouts, ``M`` groups, ``T`` response tokens. ``q_ig =
q(g | tau_i)`` is the group posterior (``group_posterior``, detached on the policy side).

Group inference (the head's objective, the ARI) and the exploration scale live with their callbacks
(``callbacks/group_inference.py``, ``callbacks/adaptive_exploration.py``: callbacks import only lightning and torch)
and are re-exported here so that all of GIL's math is reachable from one module.

Invariant policy objective (spec 2b). ``J_i`` = token-mean over rollout ``i`` of the clipped PPO surrogate objective
(``PolicyLossOutput.per_sample_surrogate``), ``J_g = sum_i q_ig J_i / sum_i q_ig``:

- ``invariance: variance`` (V-REx style): ``L = L_pg + beta * Var_g[J_g]``, ``Var_g`` the population variance over
  the ``M`` groups, ``L_pg = -sum_{i,t} obj_it / N_tok`` PPO's token-mean loss;
- ``invariance: worst_group`` (Group DRO, Sagawa et al. 2020): ``L = -sum_g w_g J_g`` with group weights updated by
  exponentiated gradient ``w_g <- w_g exp(step * loss_g)``, normalised, ``loss_g = -J_g``.

Exact under micro-batching and DDP. ``Var_g[J_g]`` is not a sum over rollouts, so a per-micro-batch (or per-rank)
variance would be a different objective. Its gradient, though, is a per-rollout coefficient times ``dJ_i``:
``dL/dtheta = sum_i (dL/dJ_i) dJ_i/dtheta``, and ``dL/dJ_i`` depends only on ``q_i`` and the GLOBAL group statistics
``(sum_i q_ig J_i, sum_i q_ig)`` (2M numbers, one all-reduce). So each rollout's term of PPO's token-mean loss is
reweighted (``policy_loss(sample_weights=...)``) by :func:`loss_gradient_to_sample_weights` (for every
``loss_agg`` of PPO): the micro-batch losses
summed over the accumulation and averaged by DDP then have exactly the gradient of ``L`` on the whole minibatch.
``J_i`` must be the surrogate at the CURRENT parameters: at the first optimizer step of an iteration the ratio is 1,
so ``J_i`` is the token-mean of rollout ``i``'s advantages (free); at later steps it takes a no-grad forward pass of
the policy over the minibatch (see ``GILModule``).
"""

from __future__ import annotations

from typing import Callable, Literal, Union

import torch

from callbacks.adaptive_exploration import exploration_kl_scale
from callbacks.group_inference import (
    adjusted_rand_index,
    between_group_variance,
    group_inference_loss,
    group_masses,
    group_means,
)

Invariance = Literal["variance", "worst_group"]

__all__ = [
    "Invariance", "adjusted_rand_index", "between_group_variance", "exploration_kl_scale", "group_dro_gradient",
    "group_dro_update", "group_inference_loss", "group_masses", "group_means", "group_statistics",
    "group_surrogates", "loss_gradient_to_sample_weights", "variance_penalty", "variance_penalty_gradient",
    "invariance_sample_weights", "group_objective_row_gradients", "hosted_group_surrogate",
]

_EPS = 1e-12


def group_statistics(per_sample: torch.Tensor, posterior: torch.Tensor) -> torch.Tensor:
    """Sums that determine the group surrogates; add them over micro-batches and ranks for global statistics.

    Args:
        per_sample: ``(B,)`` per-rollout surrogates ``J_i``.
        posterior: ``(B, M)`` ``q(g | tau_i)``.

    Returns:
        ``(2, M)``: row 0 ``sum_i q_ig J_i``, row 1 the group mass ``sum_i q_ig``.
    """
    q = posterior.to(per_sample.dtype)
    return torch.stack([(q * per_sample[:, None]).sum(0), q.sum(0)])


def group_surrogates(stats: torch.Tensor) -> torch.Tensor:
    """``J_g = sum_i q_ig J_i / sum_i q_ig`` from :func:`group_statistics` (global sums).

    Args:
        stats: ``(2, M)``.

    Returns:
        ``(M,)`` (0 for an empty group).
    """
    return stats[0] / stats[1].clamp_min(_EPS)


def variance_penalty(group_values: torch.Tensor) -> torch.Tensor:
    """``Var_g[J_g] = mean_g (J_g - mean_g J_g)^2`` (population variance over the ``M`` groups).

    Args:
        group_values: ``(M,)``.

    Returns:
        Scalar.
    """
    return ((group_values - group_values.mean()) ** 2).mean()


def variance_penalty_gradient(posterior: torch.Tensor, stats: torch.Tensor) -> torch.Tensor:
    """``dVar_g[J_g] / dJ_i = sum_g (2 / M) (J_g - Jbar) q_ig / sum_j q_jg`` for the rows of ``posterior``.

    Args:
        posterior: ``(B, M)`` this micro-batch's (or rank's) rows.
        stats: ``(2, M)`` GLOBAL :func:`group_statistics` of the whole minibatch (all ranks).

    Returns:
        ``(B,)`` coefficients.
    """
    q = posterior.to(stats.dtype)
    j_g = group_surrogates(stats)  # (M,)
    M = j_g.shape[0]
    d_var_d_jg = 2.0 / M * (j_g - j_g.mean())  # (M,)
    return (q * (d_var_d_jg / stats[1].clamp_min(_EPS))[None, :]).sum(-1)


def group_dro_update(group_weights: torch.Tensor, group_losses: torch.Tensor, step_size: float) -> torch.Tensor:
    """One exponentiated-gradient step of the Group-DRO weights: ``w_g <- w_g exp(step * loss_g) / Z``.

    Args:
        group_weights: ``(M,)`` current weights on the simplex.
        group_losses: ``(M,)`` per-group losses (here ``-J_g``).
        step_size: the EG step (``model.dro_step_size``).

    Returns:
        ``(M,)`` new weights, summing to 1 (computed in log space for stability).
    """
    logits = torch.log(group_weights.clamp_min(_EPS)) + step_size * group_losses
    return torch.softmax(logits, dim=0)


def group_dro_gradient(posterior: torch.Tensor, stats: torch.Tensor, group_weights: torch.Tensor) -> torch.Tensor:
    """``dL/dJ_i`` of ``L = -sum_g w_g J_g`` (weights fixed): ``-sum_g w_g q_ig / sum_j q_jg``.

    Args:
        posterior: ``(B, M)``.
        stats: ``(2, M)`` global :func:`group_statistics`.
        group_weights: ``(M,)``.

    Returns:
        ``(B,)``.
    """
    q = posterior.to(stats.dtype)
    return -(q * (group_weights.to(stats.dtype) / stats[1].clamp_min(_EPS))[None, :]).sum(-1)


def loss_gradient_to_sample_weights(
    d_loss_d_j: torch.Tensor, row_coefficients: torch.Tensor, normalizer: Union[torch.Tensor, float]
) -> torch.Tensor:
    """Per-sample weights ``w_i`` of PPO's policy loss that reproduce the gradient of a loss ``L(J)``.

    PPO's policy loss on a minibatch is ``L_pg = -sum_i c_i J_i / D`` (``J_i`` the token-mean surrogate of row
    ``i``), where, by ``model.loss_agg``: ``token_mean``: ``c_i = n_i`` (the row's response tokens), ``D`` = the
    minibatch's response tokens; ``seq_mean_token_sum``: ``c_i = n_i``, ``D`` = its rows; ``seq_mean_token_mean``:
    ``c_i = 1``, ``D`` = its rows (all ranks together). Weighting row ``i`` by ``w_i`` gives ``-sum_i w_i c_i J_i / D``;
    matching ``dL/dJ_i`` gives ``w_i = -D (dL/dJ_i) / c_i``. For ``L = L_pg`` itself this is 1.

    Args:
        d_loss_d_j: ``(B,)`` ``dL/dJ_i``.
        row_coefficients: ``(B,)`` ``c_i`` (a row without tokens gets a finite weight that multiplies nothing).
        normalizer: ``D`` of the WHOLE minibatch over all ranks.

    Returns:
        ``(B,)`` weights.
    """
    c = row_coefficients.to(d_loss_d_j.dtype).clamp_min(1e-12)
    return -d_loss_d_j * normalizer / c


def invariance_sample_weights(
    invariance: Invariance,
    posterior: torch.Tensor,
    row_coefficients: torch.Tensor,
    stats: torch.Tensor,
    normalizer: Union[torch.Tensor, float],
    beta: float = 1.0,
    group_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sample weights of the policy loss for GIL's invariant objective (see the module docstring).

    Args:
        invariance: ``variance``: ``L_pg + beta Var_g[J_g]`` -> ``w_i = 1 - beta D c'_i / c_i`` with
            ``c'_i = dVar/dJ_i``; ``worst_group``: ``-sum_g w_g J_g`` -> ``w_i = D sum_g w_g q_ig / (c_i m_g)``.
        posterior: ``(B, M)`` rows of this micro-batch.
        row_coefficients: ``(B,)`` ``c_i`` of :func:`loss_gradient_to_sample_weights` (the response lengths for
            PPO's default ``token_mean``).
        stats: ``(2, M)`` global :func:`group_statistics` of the minibatch at the current parameters.
        normalizer: ``D`` (the minibatch's response tokens, all ranks, for ``token_mean``).
        beta: ``beta_policy`` (``variance`` only).
        group_weights: ``(M,)`` Group-DRO weights (``worst_group`` only).

    Returns:
        ``(B,)`` weights.
    """
    c = row_coefficients.to(stats.dtype)
    if invariance == "variance":
        pg = -c / normalizer  # dL_pg/dJ_i
        grad = pg + beta * variance_penalty_gradient(posterior, stats)
    elif invariance == "worst_group":
        if group_weights is None:
            raise ValueError("invariance_sample_weights: worst_group needs group_weights")
        grad = group_dro_gradient(posterior, stats, group_weights)
    else:
        raise ValueError(f"invariance must be 'variance' or 'worst_group', got {invariance!r}")
    return loss_gradient_to_sample_weights(grad, c, normalizer)


# ------------------------------------------------------------------------------ the group head inside the critic
def group_objective_row_gradients(
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], returns: torch.Tensor, posterior: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Value of a batch objective of the group posterior and its gradient with respect to every row's posterior.

    ``placement: critic`` (the head inside the critic): ``L_group`` (e.g. :func:`group_inference_loss`) couples all
    rollouts of a minibatch (group means, masses), so it is evaluated once on the minibatch of ALL ranks at the
    current parameters; each micro-batch then adds :func:`hosted_group_surrogate` with these coefficients, whose
    gradient summed over micro-batches and ranks is exactly ``dL_group / dtheta = sum_i sum_g (dL/dq_ig) dq_ig/dtheta``.

    Args:
        loss_fn: ``(returns (N,), posterior (N, M)) -> scalar``.
        returns: ``(N,)`` sequence returns (constants).
        posterior: ``(N, M)`` ``q(g | tau_i)`` at the current parameters (detached here).

    Returns:
        ``(loss, c)``: the scalar ``L_group`` (detached) and ``c = dL_group / dq`` ``(N, M)``.
    """
    q = posterior.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        loss = loss_fn(returns.detach(), q)
        (grad,) = torch.autograd.grad(loss, q)
    return loss.detach(), grad


def hosted_group_surrogate(posterior: torch.Tensor, coefficients: torch.Tensor) -> torch.Tensor:
    """``sum_i sum_g c_ig q_ig`` over a micro-batch's rows: its gradient (``c`` held fixed) is the micro-batch's share
    of ``dL_group / dtheta`` (see :func:`group_objective_row_gradients`).

    Args:
        posterior: ``(b, M)`` ``q(g | tau_i)`` with grad (through the head and the critic's trunk).
        coefficients: ``(b, M)`` ``dL_group / dq`` of these rows.

    Returns:
        Scalar (its value is not ``L_group``; log the value of :func:`group_objective_row_gradients`).
    """
    return (coefficients.to(posterior.dtype) * posterior).sum()
