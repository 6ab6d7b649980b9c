"""PPO losses, KL penalty and token rewards against numbers worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_rlhf.losses.ppo import (
    entropy_from_logits,
    kl_penalty,
    policy_loss,
    token_rewards,
    value_loss,
)


def _policy_example():
    """2x3 example. Row 0: ratios 1.5, 0.5, 1.1 with advantages 1, -1, 2. Row 1: ratio 1, A = 0.5, then 2 tokens
    after EOS carrying garbage (huge log-probs and advantages) that must not matter."""
    old = torch.zeros(2, 3)
    logprobs = torch.tensor([[math.log(1.5), math.log(0.5), math.log(1.1)], [0.0, 50.0, -50.0]], requires_grad=True)
    advantages = torch.tensor([[1.0, -1.0, 2.0], [0.5, 7.0, -9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    return logprobs, old, advantages, mask


def test_policy_loss_hand_computed():
    logprobs, old, adv, mask = _policy_example()
    out = policy_loss(logprobs, old, adv, mask, clip_eps=0.2)
    # token objectives min(A r, A clip(r)):
    #   r=1.5, A=1  -> min(1.5, 1.2)  = 1.2   (clipped)
    #   r=0.5, A=-1 -> min(-0.5,-0.8) = -0.8  (clipped)
    #   r=1.1, A=2  -> min(2.2, 2.2)  = 2.2
    #   r=1.0, A=.5 -> 0.5
    assert out.loss.item() == pytest.approx(-(1.2 - 0.8 + 2.2 + 0.5) / 4, abs=1e-6)
    assert out.clip_frac.item() == pytest.approx(2 / 4)
    kl_terms = [(r - 1) - math.log(r) for r in (1.5, 0.5, 1.1, 1.0)]
    assert out.approx_kl.item() == pytest.approx(sum(kl_terms) / 4, abs=1e-6)
    torch.testing.assert_close(out.per_sample_surrogate, torch.tensor([(1.2 - 0.8 + 2.2) / 3, 0.5]))
    # gradients: zero on clipped and masked tokens; d(-A r / 4)/d logp = -A r / 4 on the others
    out.loss.backward()
    expected_grad = torch.tensor([[0.0, 0.0, -2.2 / 4], [-0.5 / 4, 0.0, 0.0]])
    torch.testing.assert_close(logprobs.grad, expected_grad)


def test_policy_loss_normalizer_accumulates_to_full_batch():
    logprobs, old, adv, mask = _policy_example()
    full = policy_loss(logprobs, old, adv, mask).loss
    n = mask.sum()
    parts = [policy_loss(logprobs[i : i + 1], old[i : i + 1], adv[i : i + 1], mask[i : i + 1], normalizer=n).loss for i in range(2)]
    torch.testing.assert_close(sum(parts), full)


def test_value_loss_hand_computed():
    values = torch.tensor([[1.0, 0.0, 2.0, 123.0]], requires_grad=True)
    old_values = torch.tensor([[0.5, 0.5, 2.0, 0.0]])
    returns = torch.tensor([[2.0, 1.0, 0.0, -50.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    loss, clip_frac = value_loss(values, old_values, returns, mask, clip=0.2)
    # tok0: V_clip = 0.7, max((1-2)^2, (0.7-2)^2) = 1.69 (clipped branch)
    # tok1: V_clip = 0.3, max((0-1)^2, (0.3-1)^2) = 1.0
    # tok2: V_clip = 2.0, max(4, 4) = 4.0 ; tok3 masked
    assert loss.item() == pytest.approx(0.5 * (1.69 + 1.0 + 4.0) / 3, abs=1e-6)
    assert clip_frac.item() == pytest.approx(1 / 3)
    loss.backward()
    # clipped branch has no gradient w.r.t. values (clamp saturated); others 0.5 * 2 (V - R) / 3
    torch.testing.assert_close(values.grad, torch.tensor([[0.0, -1.0 / 3, 2.0 / 3, 0.0]]))
    unclipped, _ = value_loss(values, old_values, returns, mask, clip=None)
    assert unclipped.item() == pytest.approx(0.5 * (1.0 + 1.0 + 4.0) / 3, abs=1e-6)


def test_kl_penalty_estimators():
    logprobs = torch.tensor([[-1.0, -2.0]])
    ref = torch.tensor([[-1.5, -1.5]])  # d = +0.5, -0.5
    torch.testing.assert_close(kl_penalty(logprobs, ref, "k1"), torch.tensor([[0.5, -0.5]]))
    k3 = kl_penalty(logprobs, ref, "k3")
    expected = torch.tensor([[math.exp(-0.5) - 1 + 0.5, math.exp(0.5) - 1 - 0.5]])  # 0.10653, 0.14872
    torch.testing.assert_close(k3, expected)
    assert (k3 >= 0).all()
    assert kl_penalty(ref, ref, "k3").abs().max() == 0
    with pytest.raises(ValueError, match="k1"):
        kl_penalty(logprobs, ref, "k2")  # type: ignore[arg-type]


def test_token_rewards_hand_computed_and_masked():
    scores = torch.tensor([2.0, -1.0])
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.5, 9.0, 9.0]])  # row 1: 9.0 after EOS must not count
    kl_coef = torch.tensor([0.5, 0.1])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    rewards = token_rewards(scores, kl, kl_coef, mask)
    expected = torch.tensor([[-0.05, -0.1, -0.15 + 2.0], [-0.05 - 1.0, 0.0, 0.0]])
    torch.testing.assert_close(rewards, expected)
    # a float coefficient broadcasts
    torch.testing.assert_close(
        token_rewards(scores, kl, 0.5, mask), torch.tensor([[-0.05, -0.1, 1.85], [-0.25 - 1.0, 0.0, 0.0]])
    )


def test_tokens_after_eos_do_not_matter():
    """Changing anything on masked positions changes no reward, KL, loss or gradient."""
    g = torch.Generator().manual_seed(0)
    B, T = 3, 5
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0]])
    logprobs = torch.randn(B, T, generator=g)
    old = logprobs + 0.1 * torch.randn(B, T, generator=g)
    ref = torch.randn(B, T, generator=g)
    adv = torch.randn(B, T, generator=g)
    values = torch.randn(B, T, generator=g)
    returns = torch.randn(B, T, generator=g)
    junk = torch.randn(B, T, generator=g) * 100
    off = mask == 0

    def run(shift):
        lp = torch.where(off, logprobs + shift, logprobs).requires_grad_(True)
        v = torch.where(off, values + shift, values).requires_grad_(True)
        kl = kl_penalty(lp.detach(), torch.where(off, ref - shift, ref), "k1")
        rewards = token_rewards(torch.ones(B), kl, torch.full((B,), 0.2), mask)
        pl = policy_loss(lp, torch.where(off, old - shift, old), torch.where(off, adv + shift, adv), mask)
        vl, _ = value_loss(v, torch.where(off, values, values), torch.where(off, returns + shift, returns), mask)
        (pl.loss + vl).backward()
        masked_kl = torch.where(off, torch.zeros_like(kl), kl)
        return rewards, masked_kl, pl.loss.detach(), vl.detach(), lp.grad, v.grad, pl.approx_kl, pl.clip_frac

    base = run(torch.zeros(B, T))
    shifted = run(junk)
    for a, b in zip(base, shifted):
        torch.testing.assert_close(a, b)
    rewards, _, _, _, lp_grad, v_grad, _, _ = base
    assert (rewards[off] == 0).all() and (lp_grad[off] == 0).all() and (v_grad[off] == 0).all()


def test_entropy_from_logits_matches_categorical():
    g = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(2, 5, 11, generator=g)).requires_grad_(True)
    ent = entropy_from_logits(logits, chunk_size=3)  # chunks that do not divide B*T
    ref_logits = logits.detach().clone().requires_grad_(True)
    ref = torch.distributions.Categorical(logits=ref_logits).entropy()
    torch.testing.assert_close(ent, ref)
    ent.sum().backward()
    ref.sum().backward()
    torch.testing.assert_close(logits.grad, ref_logits.grad)
    # uniform distribution: log V
    assert entropy_from_logits(torch.zeros(1, 2, 8)).sub(math.log(8)).abs().max() < 1e-6
    assert entropy_from_logits(torch.zeros(1, 2, 8, dtype=torch.bfloat16)).dtype == torch.float32


def test_policy_loss_sample_weights_weight_each_rows_tokens():
    """Per-sample weights w_i: L = -sum_{i,t} w_i * m_it * min(A r, A clip(r)) / sum m, by a plain loop."""
    torch.manual_seed(0)
    B, T = 3, 4
    logp, old = torch.randn(B, T, dtype=torch.float64), torch.randn(B, T, dtype=torch.float64)
    adv = torch.randn(B, T, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.float64)
    w = torch.tensor([0.5, 0.0, 2.0], dtype=torch.float64)
    total, count = 0.0, 0.0
    for i in range(B):
        for t in range(T):
            if mask[i, t]:
                r = math.exp(float(logp[i, t] - old[i, t]))
                a = float(adv[i, t])
                total += float(w[i]) * min(a * r, a * min(max(r, 0.8), 1.2))
                count += 1
    out = policy_loss(logp, old, adv, mask, 0.2, sample_weights=w)
    assert abs(float(out.loss) - (-total / count)) < 1e-12
    out_n = policy_loss(logp, old, adv, mask, 0.2, normalizer=10.0, sample_weights=w)
    assert abs(float(out_n.loss) - (-total / 10.0)) < 1e-12
    # weights of one change nothing, and the per-sample surrogate stays unweighted
    plain = policy_loss(logp, old, adv, mask, 0.2)
    ones = policy_loss(logp, old, adv, mask, 0.2, sample_weights=torch.ones(B, dtype=torch.float64))
    assert torch.equal(plain.loss, ones.loss)
    torch.testing.assert_close(out.per_sample_surrogate, plain.per_sample_surrogate)
