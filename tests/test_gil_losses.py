"""GIL math against hand-worked numbers, plain-loop formulas and autograd (lightning_rlhf/losses/gil.py)."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_rlhf.losses.gil import (
    adjusted_rand_index,
    exploration_kl_scale,
    group_dro_update,
    group_inference_loss,
    group_statistics,
    invariance_sample_weights,
    variance_penalty,
)
from lightning_rlhf.losses.ppo import policy_loss


# ------------------------------------------------------------------------------------------------ ARI
def test_adjusted_rand_index_hand_worked_case():
    # contingency [[2, 1, 0], [0, 1, 2]]: sum C(n_ij) = 2, rows C(3)+C(3) = 6, cols 3 x C(2) = 3, C(6) = 15
    # E = 6 * 3 / 15 = 1.2, max = (6 + 3) / 2 = 4.5, ARI = (2 - 1.2) / (4.5 - 1.2) = 0.8 / 3.3
    a = torch.tensor([0, 0, 0, 1, 1, 1])
    b = torch.tensor([0, 0, 1, 1, 2, 2])
    assert adjusted_rand_index(a, b) == pytest.approx(0.8 / 3.3, abs=1e-12)
    assert adjusted_rand_index(b, a) == pytest.approx(0.8 / 3.3, abs=1e-12)


def test_adjusted_rand_index_renaming_and_trivial_cases():
    a = torch.tensor([0, 0, 1, 1, 2, 2])
    assert adjusted_rand_index(a, torch.tensor([5, 5, 3, 3, 9, 9])) == pytest.approx(1.0)
    # perfectly crossed 2x2 partition of 4 items: index 0, E = 2*2/6, max = 2 -> (0 - 2/3) / (2 - 2/3) = -0.5
    assert adjusted_rand_index(torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 0, 1])) == pytest.approx(-0.5)
    assert adjusted_rand_index(torch.zeros(5, dtype=torch.long), torch.zeros(5, dtype=torch.long)) == 1.0


# ------------------------------------------------------------------------------------------------ group inference
def test_group_inference_loss_hand_worked_value():
    # hard groups {0, 1} and {2, 3}: pi = (.5, .5), R_g = (1, 3), Rbar = 2, J_var = 1, H(pi) = log 2
    returns = torch.tensor([1.0, 1.0, 3.0, 3.0], dtype=torch.float64)
    q = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]], dtype=torch.float64)
    assert float(group_inference_loss(returns, q, 0.01)) == pytest.approx(-1.0 - 0.01 * math.log(2), abs=1e-12)


def _loop_loss(returns: list[float], q: list[list[torch.Tensor]], lam: float) -> torch.Tensor:
    """Spec 2a written with plain loops."""
    N, M = len(returns), len(q[0])
    mass = [sum(q[i][g] for i in range(N)) for g in range(M)]
    r_g = [sum(q[i][g] * returns[i] for i in range(N)) / mass[g] for g in range(M)]
    pi = [mass[g] / N for g in range(M)]
    r_bar = sum(pi[g] * r_g[g] for g in range(M))
    j_var = sum(pi[g] * (r_g[g] - r_bar) ** 2 for g in range(M))
    entropy = -sum(pi[g] * torch.log(pi[g]) for g in range(M))
    return -j_var - lam * entropy


def test_group_inference_loss_gradient_matches_autograd_of_the_written_formula():
    torch.manual_seed(0)
    N, M, lam = 7, 3, 0.05
    returns = torch.randn(N, dtype=torch.float64)
    logits = torch.randn(N, M, dtype=torch.float64, requires_grad=True)
    group_inference_loss(returns, torch.softmax(logits, -1), lam).backward()
    ours = logits.grad.clone()

    logits2 = logits.detach().clone().requires_grad_(True)
    q = torch.softmax(logits2, -1)
    _loop_loss(returns.tolist(), [[q[i, g] for g in range(M)] for i in range(N)], lam).backward()
    torch.testing.assert_close(ours, logits2.grad, atol=1e-12, rtol=0)

    # and central finite differences on a few entries
    def f(lg):
        return float(group_inference_loss(returns, torch.softmax(lg, -1), lam))

    h = 1e-6
    for i, g in [(0, 0), (3, 2), (6, 1)]:
        plus, minus = logits.detach().clone(), logits.detach().clone()
        plus[i, g] += h
        minus[i, g] -= h
        assert (f(plus) - f(minus)) / (2 * h) == pytest.approx(float(ours[i, g]), abs=1e-7)


# ------------------------------------------------------------------------------------------------ exploration
def test_exploration_kl_scale_forms():
    q_high = torch.tensor([0.0, 0.25, 0.5, 1.0])
    torch.testing.assert_close(exploration_kl_scale(q_high, "paper"), q_high)
    torch.testing.assert_close(exploration_kl_scale(q_high, "mean_preserving", 0.5, 1.5),
                               torch.tensor([0.5, 0.75, 1.0, 1.5]))
    torch.testing.assert_close(exploration_kl_scale(q_high, "mean_preserving", 0.2, 1.0),
                               torch.tensor([0.2, 0.4, 0.6, 1.0]))


# ------------------------------------------------------------------------------------------------ Group DRO
def test_group_dro_update_follows_the_exponentiated_gradient_rule():
    w = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    losses = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    step = 0.1
    unnorm = [0.5 * math.exp(0.1), 0.3 * math.exp(-0.2), 0.2 * math.exp(0.05)]
    want = torch.tensor([u / sum(unnorm) for u in unnorm], dtype=torch.float64)
    got = group_dro_update(w, losses, step)
    torch.testing.assert_close(got, want, atol=1e-15, rtol=0)
    # repeated steps put the weight on the group with the largest loss
    for _ in range(500):
        w = group_dro_update(w, losses, step)
    assert int(w.argmax()) == 0 and float(w[0]) > 0.99


# ------------------------------------------------------------------------------------------------ the policy objective
def _toy_batch(B=8, T=5, H=3, M=2, seed=0):
    """Per-token log-probs linear in theta: ``logp_it = x_it . theta`` (float64), with ragged response lengths."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, H, generator=g, dtype=torch.float64) * 0.3
    theta_old = torch.randn(H, generator=g, dtype=torch.float64)
    old = torch.einsum("bth,h->bt", x, theta_old)
    adv = torch.randn(B, T, generator=g, dtype=torch.float64)
    lengths = torch.tensor([5, 3, 1, 4, 2, 5, 0, 3][:B])
    mask = (torch.arange(T)[None, :] < lengths[:, None]).to(torch.float64)
    q = torch.softmax(torch.randn(B, M, generator=g, dtype=torch.float64) * 2, -1)
    theta = theta_old + 0.4 * torch.randn(H, generator=g, dtype=torch.float64)  # ratios away from 1, some clipped
    return x, old, adv, mask, lengths, q, theta


def _per_sample_j(theta, x, old, adv, mask, clip=0.2):
    """The written formula: ``J_i`` = token-mean over row i of ``min(A r, A clip(r))``."""
    ratio = torch.exp(torch.einsum("bth,h->bt", x, theta) - old)
    obj = torch.minimum(adv * ratio, adv * ratio.clamp(1 - clip, 1 + clip))
    n = mask.sum(-1)
    return (obj * mask).sum(-1) / n.clamp_min(1), obj


@pytest.mark.parametrize("loss_agg", ["token_mean", "seq_mean_token_sum", "seq_mean_token_mean"])
@pytest.mark.parametrize("invariance", ["variance", "worst_group"])
def test_invariant_objective_with_micro_batches_and_ranks_equals_the_whole_batch(invariance, loss_agg):
    """2 simulated ranks x 2 micro-batches, weights from the GLOBAL group statistics (one all-reduce of 2M sums),
    PPO's normaliser / world and DDP's gradient average == autograd of the whole-batch objective, for each of PPO's
    loss aggregations (L_pg = -sum_i c_i J_i / D)."""
    x, old, adv, mask, lengths, q, theta = _toy_batch()
    beta, w_dro = 0.7, torch.tensor([0.3, 0.7], dtype=torch.float64)
    n = mask.sum(-1)
    # PPOModule: row weights a_i (1 / n_i for seq_mean_token_mean) and normaliser D (tokens or rows)
    a = 1.0 / n.clamp_min(1) if loss_agg == "seq_mean_token_mean" else torch.ones_like(n)
    D = mask.sum() if loss_agg == "token_mean" else torch.tensor(float(len(n)), dtype=torch.float64)
    coef = torch.ones_like(n) if loss_agg == "seq_mean_token_mean" else n  # c_i = a_i n_i

    # whole batch, the objective written out
    th = theta.clone().requires_grad_(True)
    j, obj = _per_sample_j(th, x, old, adv, mask)
    j_g = torch.stack([(q[:, g] * j).sum() / q[:, g].sum() for g in range(2)])
    if invariance == "variance":
        loss = -(a[:, None] * obj * mask).sum() / D + beta * ((j_g - j_g.mean()) ** 2).mean()
    else:
        loss = -(w_dro * j_g).sum()
    (want,) = torch.autograd.grad(loss, th)

    # 2 ranks x 2 micro-batches
    world, rank_rows = 2, [torch.arange(0, 4), torch.arange(4, 8)]
    with torch.no_grad():  # the pre-pass: J_i at the current parameters, group sums all-reduced
        stats = sum(group_statistics(_per_sample_j(theta, x[r], old[r], adv[r], mask[r])[0], q[r]) for r in rank_rows)
    grads = []
    for rows in rank_rows:
        th_r = theta.clone().requires_grad_(True)
        normalizer = D / world  # PPOModule: mean_over_ranks(tokens or rows)
        for micro in rows.split(2):
            logp = torch.einsum("bth,h->bt", x[micro], th_r)
            weights = invariance_sample_weights(invariance, q[micro], coef[micro], stats, D, beta, w_dro)
            out = policy_loss(logp, old[micro], adv[micro], mask[micro], 0.2, normalizer,
                              sample_weights=weights * a[micro])  # PPOModule.loss_weights multiplies a_i in
            out.loss.backward()
        grads.append(th_r.grad)
    got = sum(grads) / world  # DDP averages
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)


def test_variance_penalty_hand_worked():
    assert float(variance_penalty(torch.tensor([1.0, 3.0]))) == pytest.approx(1.0)
    # J = (1, 2, 4, 5), hard groups {0, 1}, {2, 3}: J_g = (1.5, 4.5), Var = 2.25
    j = torch.tensor([1.0, 2.0, 4.0, 5.0], dtype=torch.float64)
    q = torch.tensor([[1, 0], [1, 0], [0, 1], [0, 1]], dtype=torch.float64)
    stats = group_statistics(j, q)
    torch.testing.assert_close(stats, torch.tensor([[3.0, 9.0], [2.0, 2.0]], dtype=torch.float64))
    assert float(variance_penalty(stats[0] / stats[1])) == pytest.approx(2.25)


def test_variance_weights_are_one_when_the_groups_agree():
    # equal group surrogates: the penalty's gradient vanishes and the weights are PPO's (all 1)
    j = torch.tensor([1.0, 3.0, 1.0, 3.0], dtype=torch.float64)
    q = torch.tensor([[1, 0], [1, 0], [0, 1], [0, 1]], dtype=torch.float64)
    w = invariance_sample_weights("variance", q, torch.tensor([2, 3, 4, 5]), group_statistics(j, q), 14.0, beta=1.0)
    torch.testing.assert_close(w, torch.ones(4, dtype=torch.float64))


def _written_group_loss(returns: list[float], q: torch.Tensor, lam: float) -> torch.Tensor:
    """L_group = -sum_g pi_g (R_g - Rbar)^2 - lam H(pi), written out with loops (spec 2a)."""
    n, m = q.shape
    pi = [sum(q[i, g] for i in range(n)) / n for g in range(m)]
    r_g = [sum(q[i, g] * returns[i] for i in range(n)) / sum(q[i, g] for i in range(n)) for g in range(m)]
    r_bar = sum(pi[g] * r_g[g] for g in range(m))
    j_var = sum(pi[g] * (r_g[g] - r_bar) ** 2 for g in range(m))
    entropy = -sum(pi[g] * torch.log(pi[g]) for g in range(m))
    return -j_var - lam * entropy


def test_hosted_group_head_gradient_matches_autograd_of_the_written_formula():
    """placement: critic: L_group's value and dL/dq on the whole batch, then sum_i c_i . q_i per chunk (micro-batch):
    the summed gradient of the head's weights AND of the trunk's features equals autograd of the written formula."""
    from lightning_rlhf.losses.gil import group_objective_row_gradients, hosted_group_surrogate

    returns = [1.0, -0.5, 2.0, 0.25, -1.5, 0.75]
    feats = torch.tensor([[0.3, -1.0, 0.5], [1.2, 0.1, -0.4], [-0.7, 0.9, 0.2], [0.05, -0.3, 1.1], [0.8, 0.6, -0.9],
                          [-0.2, -0.5, 0.4]], dtype=torch.float64)
    weight = torch.tensor([[0.5, -0.3, 0.8], [-0.6, 0.4, 0.1]], dtype=torch.float64)
    bias = torch.tensor([0.1, -0.2], dtype=torch.float64)
    lam = 0.05

    def leaves():
        return (feats.clone().requires_grad_(True), weight.clone().requires_grad_(True),
                bias.clone().requires_grad_(True))

    x, w, b = leaves()
    want = _written_group_loss(returns, torch.softmax(x @ w.T + b, -1), lam)
    want_grads = torch.autograd.grad(want, (x, w, b))

    r = torch.tensor(returns, dtype=torch.float64)
    x, w, b = leaves()
    with torch.no_grad():
        q_now = torch.softmax(x @ w.T + b, -1)
    loss, coef = group_objective_row_gradients(lambda ret, q: group_inference_loss(ret, q, lam), r, q_now)
    assert float(loss) == pytest.approx(float(want), rel=1e-12)
    for rows in (slice(0, 2), slice(2, 5), slice(5, 6)):  # three micro-batches, gradients accumulate
        hosted_group_surrogate(torch.softmax(x[rows] @ w.T + b, -1), coef[rows]).backward()
    for got, expected in zip((x.grad, w.grad, b.grad), want_grads):
        torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-10)
    assert float(w.grad.abs().max()) > 1e-3
