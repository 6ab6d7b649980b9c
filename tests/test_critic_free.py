"""Critic-free online RL (GRPO, RLOO, REINFORCE++): the estimators against plain loops, GRPO's gradient against a
hand-written REINFORCE-with-group-baseline gradient, no value model in memory, the tiny configs learning, and the
contrastive reward and the adaptive-KL controller on top. (2 ranks == 1 process: tests/test_ddp.py, variant grpo.)"""

from __future__ import annotations

import copy
import math
import random
from pathlib import Path

import lightning as L
import pytest
import torch

from callbacks.adaptive_kl import AdaptiveKLController
from lightning_rlhf.advantages import grpo_advantages, reinforce_pp_advantages, rloo_advantages
from lightning_rlhf.data import PromptDataModule
from lightning_rlhf.methods.ppo import PPOModule
from lightning_rlhf.models.value import ScalarHeadModel
from lightning_rlhf.rollout.experience import Experience

REPO = Path(__file__).resolve().parent.parent
TOKEN_REWARD = {"class_path": "lightning_rlhf.rewards.TokenCountReward", "init_args": {"token": "e"}}

pytestmark = pytest.mark.usefixtures("single_thread")


# ------------------------------------------------------------------------------------------ estimators vs loops
def _mean(xs):
    return sum(xs) / len(xs)


def _std(xs):  # unbiased
    m = _mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


@pytest.mark.parametrize("k", [2, 3, 5])
def test_group_estimators_equal_plain_loops(k):
    rng = random.Random(k)
    G = 4
    R = [rng.gauss(0, 2) for _ in range(G * k)]
    t = torch.tensor(R, dtype=torch.float64)
    groups = [R[g * k : (g + 1) * k] for g in range(G)]
    # GRPO, group std (the paper), batch std, none
    exp_group = [(r - _mean(grp)) / (_std(grp) + 1e-4) for grp in groups for r in grp]
    exp_batch = [(r - _mean(grp)) / (_std(R) + 1e-4) for grp in groups for r in grp]
    exp_none = [r - _mean(grp) for grp in groups for r in grp]
    for scale, expected in (("group", exp_group), ("batch", exp_batch), ("none", exp_none)):
        got = grpo_advantages(t, k, scale).tolist()
        assert got == pytest.approx(expected, rel=1e-12, abs=1e-12), scale
    # RLOO: R_i minus the mean of the OTHER samples of its prompt
    exp_rloo = [grp[i] - _mean(grp[:i] + grp[i + 1 :]) for grp in groups for i in range(k)]
    assert rloo_advantages(t, k).tolist() == pytest.approx(exp_rloo, rel=1e-12, abs=1e-12)


def test_grpo_batch_scaling_reduces_across_ranks():
    """Two halves with a summing reduce_fn (what 2 ranks see) give the whole batch's advantages."""
    t = torch.tensor([1.0, 4.0, 2.0, 2.5, -1.0, 3.0, 0.5, 7.0], dtype=torch.float64)
    whole = grpo_advantages(t, 2, "batch")
    halves = [t[:4], t[4:]]
    sums = [torch.stack([h.sum(), (h * h).sum(), torch.tensor(4.0, dtype=torch.float64)]) for h in halves]
    reduce_fn = lambda s: sums[0] + sums[1]  # noqa: E731  (the all-reduce of both ranks' partial sums)
    split = torch.cat([grpo_advantages(h, 2, "batch", reduce_fn=reduce_fn) for h in halves])
    torch.testing.assert_close(split, whole, rtol=1e-12, atol=1e-12)


def test_reinforce_pp_returns_to_go_and_batch_normalisation_equal_a_loop():
    rng = random.Random(0)
    B, T = 3, 5
    lengths = [5, 2, 4]
    rewards = [[rng.gauss(0, 1) if t < lengths[b] else 0.0 for t in range(T)] for b in range(B)]
    mask = torch.tensor([[1.0 if t < lengths[b] else 0.0 for t in range(T)] for b in range(B)], dtype=torch.float64)
    G = [[sum(rewards[b][t:lengths[b]]) if t < lengths[b] else 0.0 for t in range(T)] for b in range(B)]
    flat = [G[b][t] for b in range(B) for t in range(lengths[b])]
    m, s = _mean(flat), _std(flat)
    adv, ret = reinforce_pp_advantages(torch.tensor(rewards, dtype=torch.float64), mask)
    torch.testing.assert_close(ret, torch.tensor(G, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    expected = [[(G[b][t] - m) / math.sqrt(s * s + 1e-8) if t < lengths[b] else 0.0 for t in range(T)]
                for b in range(B)]
    torch.testing.assert_close(adv, torch.tensor(expected, dtype=torch.float64), rtol=1e-9, atol=1e-12)


def test_group_estimators_refuse_split_groups():
    with pytest.raises(ValueError, match="groups of 3"):
        grpo_advantages(torch.zeros(7), 3)
    with pytest.raises(ValueError, match="at least 2"):
        rloo_advantages(torch.zeros(4), 1)


# ------------------------------------------------------------------------------------------ the module
def _module(**overrides) -> PPOModule:
    kwargs = dict(model_name_or_path="builtin:tiny-llama", reward_fn=TOKEN_REWARD, lr=1e-2, advantage="grpo",
                  critic="none", n_samples_per_prompt=4, max_new_tokens=8, log_samples_every_n=0, export_dir=None,
                  seed=0, reward_norm="none")
    kwargs.update(overrides)
    return PPOModule(**kwargs)


def _fit(tmp_path: Path, module: PPOModule, callbacks=None, batch_size: int = 2, data=None) -> None:
    dm = data or PromptDataModule(train_path="builtin:hh-rlhf", batch_size=batch_size, max_prompt_length=48,
                                  skip_invalid_rows=True, max_train_rows=64, max_val_rows=8)
    L.Trainer(accelerator="cpu", devices=1, max_steps=-1, logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path,
              callbacks=callbacks or []).fit(module, dm)


@pytest.mark.parametrize("bad,match", [
    (dict(advantage="grpo", critic="separate"), "model.critic: none"),
    (dict(advantage="gae", critic="none"), "needs a critic"),
    (dict(advantage="rloo", n_samples_per_prompt=1), "n_samples_per_prompt >= 2"),
    (dict(advantage="grpo", scale_rewards="std"), "model.scale_rewards"),
    (dict(loss_agg="sum"), "model.loss_agg"),
])
def test_misconfiguration_names_the_flag(bad, match):
    with pytest.raises(ValueError, match=match):
        _module(**bad)


def test_grpo_gradient_equals_hand_written_reinforce_with_group_baseline(tmp_path):
    """One epoch, one minibatch, ``scale_rewards: none``, no KL: the first update's gradient is that of
    ``-(1 / N_tokens) * sum_i A_i * sum_t log pi(y_it)`` with ``A_i = R_i - mean_{j in group(i)} R_j``."""
    module = _module(scale_rewards="none", kl_in="reward", kl_coef=0.0, ppo_epochs=1, mini_batch_size=None,
                     micro_batch_size=4, max_grad_norm=None, max_iterations=1)
    module.configure_model()
    start = copy.deepcopy(module.policy).double()
    captured: list[Experience] = []
    grads: list[dict[str, torch.Tensor]] = []
    compute, update = module.compute_advantages, module.optimizer_update

    def capture(exp: Experience) -> Experience:
        captured.append(compute(exp))
        return captured[-1]

    def grab(*args, **kwargs):
        grads.append({n: p.grad.detach().clone() for n, p in module.policy.named_parameters() if p.grad is not None})
        return update(*args, **kwargs)

    module.compute_advantages = capture  # type: ignore[method-assign]
    module.optimizer_update = grab  # type: ignore[method-assign]
    _fit(tmp_path, module, batch_size=2)
    exp = captured[0]
    assert len(exp) == 8 and len(grads) == 1
    scores = exp.scores.double().tolist()
    adv = [scores[i] - _mean(scores[(i // 4) * 4 : (i // 4) * 4 + 4]) for i in range(8)]
    assert any(abs(a) > 0 for a in adv)
    P, mask = exp.prompt_length, exp.action_mask.double()
    positions = (exp.attention_mask.long().cumsum(-1) - 1).clamp_min(0)
    logits = start(input_ids=exp.sequences, attention_mask=exp.attention_mask, position_ids=positions).logits
    logp = torch.log_softmax(logits[:, P - 1 : -1].double(), -1).gather(-1, exp.responses[..., None]).squeeze(-1)
    loss = -(torch.tensor(adv, dtype=torch.float64)[:, None] * logp * mask).sum() / mask.sum()
    loss.backward()
    expected = {n: p.grad for n, p in start.named_parameters() if p.grad is not None}
    assert grads[0].keys() == expected.keys()
    for n, g in grads[0].items():
        torch.testing.assert_close(g.double(), expected[n], rtol=1e-4, atol=1e-6, msg=n)


def test_no_value_model_is_built_and_rloo_reinforce_pp_run(tmp_path):
    for advantage in ("grpo", "rloo", "reinforce_pp"):
        module = _module(advantage=advantage, max_iterations=1, n_samples_per_prompt=2,
                         **({"kl_in": "loss", "kl_loss_coef": 0.04} if advantage == "grpo" else {}))
        _fit(tmp_path, module)
        assert module.critic is None and module.value_head is None
        assert not any(isinstance(m, ScalarHeadModel) for m in module.modules())
        assert not any("critic" in n or "value_head" in n for n, _ in module.named_parameters())
        assert module.iteration == 1


def test_adaptive_kl_and_contrastive_reward_work_with_grpo(tmp_path):
    from lightning_rlhf.contrastive import write_baseline_file
    from lightning_rlhf.methods.contrastive import ContrastivePPOModule

    module = _module(max_iterations=2, kl_coef=0.05)
    ctl = AdaptiveKLController(target=0.01, horizon=10)
    _fit(tmp_path, module, callbacks=[ctl])
    assert ctl.num_updates == 2 and module.kl_coef == ctl.kl_coef != 0.05
    # contrastive: every prompt has a baseline of 1.0, so the shaped score is the raw score minus 1
    dm = PromptDataModule(train_path="builtin:hh-rlhf", batch_size=2, max_prompt_length=48, skip_invalid_rows=True,
                          max_train_rows=8, max_val_rows=4)
    dm.set_tokenizer(module.tokenizer)
    dm.setup("fit")
    from lightning_rlhf.data.sources import prompt_id

    path = tmp_path / "baseline.jsonl"
    write_baseline_file(path, [{"prompt_id": prompt_id(r["prompt"]), "baseline": 1.0, "count": 4,
                                "scores": [1.0] * 4, "agg": "mean"} for r in dm.train_dataset])
    contrastive = ContrastivePPOModule(model_name_or_path="builtin:tiny-llama", reward_fn=TOKEN_REWARD, lr=1e-2,
                                       advantage="grpo", critic="none", n_samples_per_prompt=2, max_new_tokens=8,
                                       log_samples_every_n=0, export_dir=None, reward_norm="none",
                                       baseline_path=str(path), on_missing_baseline="error", max_iterations=1)
    captured: list[Experience] = []
    compute = contrastive.compute_advantages
    contrastive.compute_advantages = lambda exp: captured.append(compute(exp)) or captured[-1]  # type: ignore
    _fit(tmp_path, contrastive, data=dm)
    torch.testing.assert_close(captured[0].shaped_scores, captured[0].scores - 1.0)


def test_grpo_tiny_config_raises_the_score_with_no_critic(tmp_path):
    """configs/grpo/tiny.yaml's model and data: the rule-based score rises over the run, as PPO's does on
    configs/ppo/tiny.yaml, with no value model in memory."""
    import yaml

    scores: list[float] = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            scores.append(float(outputs["score/mean"]))

    cfg = yaml.safe_load((REPO / "configs/grpo/tiny.yaml").read_text())
    L.seed_everything(cfg["seed_everything"])
    module = PPOModule(**{**cfg["model"]["init_args"], "export_dir": None, "log_samples_every_n": 0})
    _fit(tmp_path, module, callbacks=[Record()], data=PromptDataModule(**cfg["data"]["init_args"]))
    assert module.critic is None and module.value_head is None
    assert len(scores) == cfg["model"]["init_args"]["max_iterations"]
    first, last = _mean(scores[:4]), _mean(scores[-4:])
    assert last > first + 2.0, scores


def test_gil_callbacks_work_with_critic_free_grpo(tmp_path):
    """GroupInference + AdaptiveExploration on GRPO with no critic: the features are the policy's last-token hidden
    state (feature_source critic falls back to the policy when there is no critic), and every rollout's KL
    coefficient is ``kl_coef * q(g_high | tau_i)`` (the paper's form)."""
    from callbacks.adaptive_exploration import AdaptiveExploration
    from callbacks.group_inference import GroupInference

    module = _module(max_iterations=2, kl_coef=0.05, n_samples_per_prompt=2)
    captured: list[Experience] = []
    compute = module.compute_advantages
    module.compute_advantages = lambda exp: captured.append(compute(exp)) or captured[-1]  # type: ignore
    _fit(tmp_path, module, callbacks=[GroupInference(num_groups=2), AdaptiveExploration()])
    assert module.critic is None and len(captured) == 2
    view = module.rollout_view()
    assert view["features"].shape == (len(captured[-1]), module.policy.config.hidden_size)
    for exp in captured:
        q, g_high = exp.extras["group_posterior"], int(exp.extras["group_high"][0])
        torch.testing.assert_close(exp.kl_coef, 0.05 * q[:, g_high].float(), rtol=1e-6, atol=0)
