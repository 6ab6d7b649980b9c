"""GAE, masked statistics and whitening checked against plain Python loops."""

from __future__ import annotations

import math
import threading

import pytest
import torch

from lightning_rlhf.advantages import explained_variance, gae, masked_mean, masked_sum, masked_var, masked_whiten


def _random_batch(seed: int, B: int = 5, T: int = 7):
    """Random rewards/values and a prefix mask with trailing zeros (one row full, one row of length 1)."""
    g = torch.Generator().manual_seed(seed)
    rewards = torch.randn(B, T, generator=g, dtype=torch.float64)
    values = torch.randn(B, T, generator=g, dtype=torch.float64)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[0], lengths[1] = T, 1
    mask = (torch.arange(T)[None, :] < lengths[:, None]).long()
    return rewards, values, mask


def _gae_loop(rewards, values, mask, gamma, lam):
    """Reference GAE: per row, over its response tokens only, V after the last token = 0."""
    B, T = rewards.shape
    adv = [[0.0] * T for _ in range(B)]
    ret = [[0.0] * T for _ in range(B)]
    for i in range(B):
        L = int(mask[i].sum())
        last = 0.0
        for t in reversed(range(L)):
            next_v = float(values[i, t + 1]) if t + 1 < L else 0.0
            delta = float(rewards[i, t]) + gamma * next_v - float(values[i, t])
            last = delta + gamma * lam * last
            adv[i][t] = last
            ret[i][t] = last + float(values[i, t])
    return torch.tensor(adv, dtype=torch.float64), torch.tensor(ret, dtype=torch.float64)


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8), (1.0, 1.0)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gae_matches_python_loop(seed, gamma, lam):
    rewards, values, mask = _random_batch(seed)
    # garbage on masked positions must not leak into anything
    rewards = torch.where(mask.bool(), rewards, torch.full_like(rewards, 1e3))
    values = torch.where(mask.bool(), values, torch.full_like(values, -1e3))
    adv, ret = gae(rewards, values, mask, gamma=gamma, lam=lam)
    ref_adv, ref_ret = _gae_loop(rewards, values, mask, gamma, lam)
    torch.testing.assert_close(adv, ref_adv)
    torch.testing.assert_close(ret, ref_ret)
    assert (adv[mask == 0] == 0).all() and (ret[mask == 0] == 0).all()


def test_gae_hand_example():
    # one row, 3 tokens, last one masked; gamma=1, lam=0.5
    rewards = torch.tensor([[0.0, 1.0, 5.0]])
    values = torch.tensor([[0.5, 0.25, 9.0]])
    mask = torch.tensor([[1, 1, 0]])
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.5)
    # delta_1 = 1 + 0 - 0.25 = 0.75 ; delta_0 = 0 + 0.25 - 0.5 = -0.25 ; A_0 = -0.25 + 0.5 * 0.75 = 0.125
    torch.testing.assert_close(adv, torch.tensor([[0.125, 0.75, 0.0]]))
    torch.testing.assert_close(ret, torch.tensor([[0.625, 1.0, 0.0]]))


def test_masked_stats_match_python():
    x, _, mask = _random_batch(3)
    kept = [float(x[i, t]) for i in range(x.shape[0]) for t in range(x.shape[1]) if mask[i, t]]
    n = len(kept)
    mean = sum(kept) / n
    var_b = sum((v - mean) ** 2 for v in kept) / n
    assert math.isclose(float(masked_sum(x, mask)), sum(kept), rel_tol=1e-12)
    assert math.isclose(float(masked_mean(x, mask)), mean, rel_tol=1e-12)
    assert math.isclose(float(masked_var(x, mask, unbiased=False)), var_b, rel_tol=1e-12)
    assert math.isclose(float(masked_var(x, mask, unbiased=True)), var_b * n / (n - 1), rel_tol=1e-12)
    row_means = masked_mean(x, mask, dim=-1)
    for i in range(x.shape[0]):
        L = int(mask[i].sum())
        assert math.isclose(float(row_means[i]), sum(float(v) for v in x[i, :L]) / L, rel_tol=1e-12)
    # nan/inf on masked positions are ignored
    x_bad = torch.where(mask.bool(), x, torch.full_like(x, float("nan")))
    assert math.isclose(float(masked_mean(x_bad, mask)), mean, rel_tol=1e-12)


def test_whiten_matches_python():
    x, _, mask = _random_batch(4)
    kept = [float(x[i, t]) for i in range(x.shape[0]) for t in range(x.shape[1]) if mask[i, t]]
    n = len(kept)
    mean = sum(kept) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in kept) / (n - 1) + 1e-8)
    w = masked_whiten(x, mask)
    expected = torch.where(mask.bool(), (x - mean) / std, torch.zeros_like(x))
    torch.testing.assert_close(w, expected)
    w_noshift = masked_whiten(x, mask, shift_mean=False)
    torch.testing.assert_close(w_noshift, torch.where(mask.bool(), (x - mean) / std + mean, torch.zeros_like(x)))


def _simulate_ranks(fn, per_rank_args):
    """Run ``fn(*args, reduce_fn=...)`` for each simulated rank in its own thread; ``reduce_fn`` sums across them."""
    world = len(per_rank_args)
    barrier = threading.Barrier(world)
    slots: list = [None] * world
    results: list = [None] * world
    errors: list = []

    def worker(rank, args):
        def reduce_fn(t):
            slots[rank] = t.clone()
            barrier.wait()
            total = sum(slots)
            barrier.wait()  # everyone has read before the next stage overwrites the slots
            return total

        try:
            results[rank] = fn(*args, reduce_fn=reduce_fn)
        except Exception as e:  # pragma: no cover - surfaced below
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=worker, args=(r, a)) for r, a in enumerate(per_rank_args)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not errors, errors
    return results


def test_whiten_with_reduce_fn_equals_whiten_of_concatenation():
    """Two simulated ranks with different batch sizes, masks and distributions."""
    x_a, _, mask_a = _random_batch(5, B=3, T=6)
    x_b, _, mask_b = _random_batch(6, B=4, T=6)
    x_b = 3.0 * x_b + 2.0
    expected = masked_whiten(torch.cat([x_a, x_b]), torch.cat([mask_a, mask_b]))
    w_a, w_b = _simulate_ranks(masked_whiten, [(x_a, mask_a), (x_b, mask_b)])
    torch.testing.assert_close(torch.cat([w_a, w_b]), expected)
    # the same with shift_mean=False
    expected_ns = masked_whiten(torch.cat([x_a, x_b]), torch.cat([mask_a, mask_b]), shift_mean=False)
    ns = _simulate_ranks(lambda x, m, reduce_fn: masked_whiten(x, m, shift_mean=False, reduce_fn=reduce_fn),
                         [(x_a, mask_a), (x_b, mask_b)])
    torch.testing.assert_close(torch.cat(ns), expected_ns)
    # sanity: the local whitening differs, so the test can fail
    assert not torch.allclose(masked_whiten(x_b, mask_b), expected[3:])
    # masked_var / masked_mean with reduce_fn give the global numbers on both ranks
    v_a, v_b = _simulate_ranks(masked_var, [(x_a, mask_a), (x_b, mask_b)])
    v_all = masked_var(torch.cat([x_a, x_b]), torch.cat([mask_a, mask_b]))
    torch.testing.assert_close(v_a, v_all)
    torch.testing.assert_close(v_b, v_all)


def test_explained_variance():
    returns = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    assert float(explained_variance(returns, returns, mask)) == pytest.approx(1.0)
    const = torch.full_like(returns, 2.0)
    assert float(explained_variance(const, returns, mask)) == pytest.approx(0.0)
    # residual [1,1,1]-ish offset: var(residual)=0 -> 1.0 ; residual [-1, 0, 1]*2 -> 1 - 4 = -3
    assert float(explained_variance(returns - 1.0, returns, mask)) == pytest.approx(1.0)
    assert float(explained_variance(-returns + 4.0, returns, mask)) == pytest.approx(-3.0)
    assert math.isnan(float(explained_variance(const, const, mask)))
