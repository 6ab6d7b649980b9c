"""PPOModule end to end on the built-in tiny Llama (CPU): KL at init, learning on a rule-based reward, hooks,
checkpoints without frozen models, critic warm-up / shared critic / k3 / ptx, and a reward model from the CLI."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import lightning as L
import pytest
import torch

from callbacks.adaptive_kl import AdaptiveKLController
from lightning_rlhf.data import MultiStreamDataModule, PromptDataModule
from lightning_rlhf.data.batches import PromptBatch
from lightning_rlhf.methods.ppo import PPOForwardOutput, PPOModule
from lightning_rlhf.rollout.experience import Experience

REPO = Path(__file__).resolve().parent.parent
TOKEN_REWARD = {"class_path": "lightning_rlhf.rewards.TokenCountReward", "init_args": {"token": "e"}}


pytestmark = pytest.mark.usefixtures("single_thread")


def _module(cls: type = PPOModule, **overrides: Any) -> PPOModule:
    kwargs: dict[str, Any] = dict(
        model_name_or_path="builtin:tiny-llama", reward_fn=TOKEN_REWARD, lr=1e-2, critic_lr=1e-3, kl_coef=0.01,
        ppo_epochs=2, mini_batch_size=4, micro_batch_size=2, max_new_tokens=8, log_samples_every_n=0,
        export_dir=None, seed=0,
    )
    kwargs.update(overrides)
    return cls(**kwargs)


def _data(batch_size: int = 4) -> PromptDataModule:
    return PromptDataModule(
        train_path="builtin:hh-rlhf", batch_size=batch_size, max_prompt_length=48, skip_invalid_rows=True,
        max_train_rows=64, max_val_rows=8,
    )


def _trainer(tmp_path: Path, callbacks: Optional[list] = None, **kwargs: Any) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu", devices=1, max_steps=-1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
        default_root_dir=tmp_path, callbacks=callbacks or [], **kwargs,
    )


def _prompt_batch(module: PPOModule, texts: list[str]) -> PromptBatch:
    ids = [module.tokenizer(t)["input_ids"] for t in texts]
    P = max(map(len, ids))
    input_ids = torch.tensor([[module.tokenizer.pad_token_id] * (P - len(r)) + r for r in ids])
    mask = torch.tensor([[0] * (P - len(r)) + [1] * len(r) for r in ids])
    return PromptBatch(input_ids, mask, torch.zeros(len(texts), dtype=torch.long), [f"id{i}" for i in range(len(texts))],
                       texts, ["d"] * len(texts))


def test_kl_is_zero_at_iteration_0():
    module = _module()
    module.configure_model()
    exp = module.make_experience(_prompt_batch(module, ["\n\nHuman: hi there\n\nAssistant:", "\n\nHuman: why?\n\nAssistant:"]))
    module.compute_advantages(exp)
    assert exp.action_mask.sum() > 0
    assert exp.kl.abs().max().item() < 1e-6
    assert (exp.logprobs - exp.ref_logprobs).abs().max().item() < 1e-6
    # token rewards: only the shaped score at the last response token (KL term is 0)
    last = exp.action_mask.sum(-1) - 1
    torch.testing.assert_close(exp.rewards.sum(-1), exp.shaped_scores, atol=1e-6, rtol=0)
    torch.testing.assert_close(exp.rewards[torch.arange(2), last], exp.shaped_scores, atol=1e-6, rtol=0)


def test_tiny_config_raises_rule_based_reward(in_tmp):
    """The shipped CPU config, shortened to 12 iterations, raises the mean count of 'e' well above its start."""
    from lightning_rlhf.cli import main
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cli = main(["fit", "-c", str(REPO / "configs/ppo/tiny.yaml"), "--model.max_iterations", "12",
                "--trainer.enable_progress_bar", "false", "--model.export_dir", "null"])
    assert cli.model.iteration == 12
    events = EventAccumulator(cli.trainer.logger.log_dir)
    events.Reload()
    scores = [e.value for e in events.Scalars("score/mean")]
    assert len(scores) == 12
    start, end = sum(scores[:3]) / 3, sum(scores[-3:]) / 3
    print(f"tiny PPO mean score: first 3 iterations {start:.2f}, last 3 {end:.2f}; all {[round(s, 2) for s in scores]}")
    assert end > start + 3.0 and end > 1.4 * start, scores
    assert any(t.startswith("rollout/samples") for t in events.Tags()["tensors"])  # sample table (add_text)
    timing = {k: round(sum(e.value for e in events.Scalars(k)), 1) for k in ("time/generate", "time/score", "time/update")}
    print("tiny PPO seconds per phase (12 iterations):", timing)


class HookedPPO(PPOModule):
    """Exercises the hooks: score transform, per-sample KL coefficients, extra loss, extras."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.seen: dict[str, Any] = {"transform": [], "extra_calls": 0, "micro_ids": []}
        self.extra_weight = torch.nn.Parameter(torch.ones(()))  # not in the optimizer: its grad stays visible

    def param_groups(self):
        groups = super().param_groups()
        ids = {id(self.extra_weight)}
        return [{**g, "params": [p for p in g["params"] if id(p) not in ids]} for g in groups]

    def transform_scores(self, scores: torch.Tensor, experience: Experience) -> torch.Tensor:
        self.seen["transform"].append((scores.clone(), list(experience.extras["prompt_ids"]), list(experience.extras["domains"])))
        return scores + 100.0

    def extra_loss(self, minibatch: Experience, outputs: PPOForwardOutput) -> Optional[torch.Tensor]:
        self.seen["extra_calls"] += 1
        assert len(minibatch.extras["prompt_ids"]) == len(minibatch) == outputs.values.shape[0]
        assert outputs.policy is not None and outputs.policy.per_sample_surrogate.shape == (len(minibatch),)
        self.seen["micro_ids"] += list(minibatch.extras["prompt_ids"])
        return self.extra_weight * outputs.policy.per_sample_surrogate.mean()


def test_hooks_transform_kl_coef_extra_loss_and_extras(tmp_path):
    module = _module(HookedPPO, reward_norm="none", ppo_epochs=2, mini_batch_size=4, micro_batch_size=2,
                     max_iterations=1)
    scales = torch.tensor([0.5, 1.0, 2.0, 4.0])
    module.register_experience_hook("scale", lambda view: {"kl_scale": scales})
    coefs = 0.01 * scales  # the module's kl_coef times the hook's per-sample scale
    captured: list[Experience] = []
    original = module.compute_advantages

    def capture(exp: Experience) -> Experience:
        captured.append(original(exp))
        return captured[-1]

    module.compute_advantages = capture  # type: ignore[method-assign]

    class PerturbReference(L.Callback):
        """Make the reference differ from the policy so that the KL and the per-sample coefficients matter."""

        def on_train_start(self, trainer, pl_module):
            with torch.no_grad():
                for p in pl_module.reference.parameters():
                    p.add_(0.05 * torch.randn_like(p))

    _trainer(tmp_path, callbacks=[PerturbReference()]).fit(module, _data(batch_size=4))
    exp = captured[0]
    # transform hook: saw raw scores and the batch's extras; shaped = raw + 100 with reward_norm none
    raw, prompt_ids, domains = module.seen["transform"][0]
    torch.testing.assert_close(exp.shaped_scores, raw + 100.0)
    assert prompt_ids == exp.extras["prompt_ids"] and len(prompt_ids) == 4 and all(isinstance(d, str) for d in domains)
    # per-sample KL coefficients reach the token rewards: r_t = -eta_i kl_t (+ score at the last token)
    torch.testing.assert_close(exp.kl_coef, coefs)
    assert exp.kl.abs().sum() > 0
    last = exp.action_mask.sum(-1) - 1
    expected = -coefs[:, None] * exp.kl
    expected[torch.arange(4), last] += exp.shaped_scores
    torch.testing.assert_close(exp.rewards, expected * exp.action_mask)
    # extra loss: called once per micro-batch (2 epochs x 1 minibatch x 2 micro-batches) and back-propagated
    assert module.seen["extra_calls"] == 4
    assert sorted(module.seen["micro_ids"][:4]) == sorted(prompt_ids)
    assert module.extra_weight.grad is not None and module.extra_weight.grad.abs() > 0


def test_checkpoint_drops_frozen_models_and_resumes_with_adaptive_kl(tmp_path):
    module = _module(max_iterations=2)
    ctl = AdaptiveKLController(target=0.5, horizon=100)
    trainer = _trainer(tmp_path, callbacks=[ctl])
    trainer.fit(module, _data())
    assert module.iteration == 2 and ctl.num_updates == 2 and module.kl_coef == ctl.kl_coef != 0.01
    ckpt = tmp_path / "ppo.ckpt"
    trainer.save_checkpoint(ckpt)
    state = torch.load(ckpt, weights_only=False)
    keys = state["state_dict"].keys()
    assert not any(k.startswith(("reference.", "reward_model.")) for k in keys)
    assert any(k.startswith("policy.") for k in keys) and any(k.startswith("critic.") for k in keys)
    assert state["iteration"] == 2 and float(state["state_dict"]["reward_count"]) == 8
    saved_beta, saved_policy = ctl.kl_coef, {k: v.clone() for k, v in module.policy.state_dict().items()}

    resumed = _module(max_iterations=3, kl_coef=0.3)
    betas: list[float] = []

    class Spy(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            betas.append(pl_module.kl_coef)
            if not betas[1:]:  # weights restored before the first resumed iteration
                for k, v in pl_module.policy.state_dict().items():
                    torch.testing.assert_close(v, saved_policy[k])

    ctl2 = AdaptiveKLController(target=0.5, horizon=100)
    _trainer(tmp_path, callbacks=[ctl2, Spy()]).fit(resumed, _data(), ckpt_path=ckpt)
    assert resumed.iteration == 3 and betas == [saved_beta]
    assert float(resumed.reward_count) == 12  # running reward moments continued from the checkpoint
    assert resumed.reference is not None  # rebuilt from its path


def test_shared_critic_warmup_k3_ptx_and_no_eos_penalty(tmp_path):
    module = _module(critic="shared", critic_warmup_iters=1, kl_estimator="k3", no_eos_penalty=1.0, ptx_coef=0.1,
                     max_iterations=1, reward_norm="none")
    ptx = {"class_path": "lightning_rlhf.data.DemonstrationDataModule",
           "init_args": {"train_path": "builtin:hh-rlhf", "batch_size": 2, "max_length": 96, "max_prompt_length": 48,
                         "skip_invalid_rows": True, "max_train_rows": 16}}
    module.configure_model()
    before = {k: v.clone() for k, v in module.policy.state_dict().items()}
    head_before = module.value_head.weight.clone()
    trainer = _trainer(tmp_path)
    trainer.fit(module, MultiStreamDataModule(streams={"prompts": _data(), "ptx": ptx}))
    # critic warm-up iteration: the value head learned, the policy did not move (ptx is a policy loss, also off)
    assert not torch.equal(module.value_head.weight, head_before)
    assert all(torch.equal(v, before[k]) for k, v in module.policy.state_dict().items())
    metrics = trainer.callback_metrics
    assert float(metrics["policy/clip_frac"]) == 0 and float(metrics["response/no_eos_frac"]) > 0
    # no-EOS penalty: shaped = raw - 1 where no EOS (reward_norm none)
    assert float(metrics["score/shaped_mean"]) == pytest.approx(
        float(metrics["score/mean"]) - float(metrics["response/no_eos_frac"]), abs=1e-5)
    # second iteration trains the policy (PPO + ptx)
    module.max_iterations = 2
    trainer2 = _trainer(tmp_path)
    trainer2.fit(module, MultiStreamDataModule(streams={"prompts": _data(), "ptx": ptx}))
    assert module.iteration == 2
    assert any(not torch.equal(v, before[k]) for k, v in module.policy.state_dict().items())
    assert float(trainer2.callback_metrics["ptx/loss"]) > 0


def test_ppo_with_reward_model_from_rm_tiny_via_cli(in_tmp):
    """configs/rm/tiny.yaml (shortened) trains and exports a reward model; PPO uses it from the CLI."""
    from lightning_rlhf.cli import main

    rm = main(["fit", "-c", str(REPO / "configs/rm/tiny.yaml"), "--trainer.max_steps", "3",
               "--trainer.val_check_interval", "3", "--trainer.limit_val_batches", "1",
               "--trainer.enable_progress_bar", "false", "--data.max_train_rows", "64", "--data.max_val_rows", "16",
               "--model.export_dir", str(in_tmp / "rm_export")])
    assert (in_tmp / "rm_export" / "config.json").exists(), rm
    ppo = main(["fit", "-c", str(REPO / "configs/ppo/tiny.yaml"), "--model.reward_fn", "null",
                "--model.reward_model_name_or_path", str(in_tmp / "rm_export"), "--model.max_iterations", "2",
                "--data.batch_size", "8", "--data.max_train_rows", "32", "--trainer.enable_progress_bar", "false",
                "--model.export_dir", str(in_tmp / "ppo_export")])
    assert ppo.model.iteration == 2 and ppo.model.reward_model is not None
    # the critic starts as the reward model: every tensor (trunk and score head) equals the exported reward model's,
    # which differ from the policy's (the reward model trained for 3 steps)
    fresh = PPOModule(reward_model_name_or_path=str(in_tmp / "rm_export"), export_dir=None)
    fresh.configure_model()
    rm_state = fresh.reward_model.hf_model.state_dict()
    critic_state = fresh.critic.hf_model.state_dict()
    assert critic_state.keys() == rm_state.keys()
    assert all(torch.equal(critic_state[k], rm_state[k]) for k in rm_state)
    policy_embed = fresh.policy.get_input_embeddings().weight
    assert not torch.equal(critic_state["model.embed_tokens.weight"], policy_embed)
    assert torch.isfinite(torch.tensor(float(ppo.trainer.callback_metrics["score/mean"])))
    assert (in_tmp / "ppo_export" / "config.json").exists()


DDP_SCRIPT = r'''
import json, sys
import lightning as L
import torch
from callbacks.adaptive_kl import AdaptiveKLController
from lightning_rlhf.data import MultiStreamDataModule, PromptDataModule
from lightning_rlhf.methods.ppo import PPOModule

L.seed_everything(0)
module = PPOModule(
    model_name_or_path="builtin:tiny-llama", critic=sys.argv[2], critic_warmup_iters=1, lr=1e-2, critic_lr=1e-3,
    reward_fn={"class_path": "lightning_rlhf.rewards.TokenCountReward", "init_args": {"token": "e"}},
    ppo_epochs=2, mini_batch_size=2, micro_batch_size=1, max_new_tokens=6, max_iterations=2, log_samples_every_n=0,
    export_dir=None,
)
data = PromptDataModule(train_path="builtin:hh-rlhf", batch_size=4, max_prompt_length=48, skip_invalid_rows=True,
                        max_train_rows=32, max_val_rows=4)
ctl = AdaptiveKLController(target=0.5, horizon=100)
trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=-1, logger=False, limit_val_batches=0,
                    enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[ctl])
trainer.fit(module, data)
flat = torch.cat([p.detach().flatten() for p in module.parameters() if p.requires_grad])
spread = (trainer.strategy.all_gather(flat).std(0).max()).item()
betas = trainer.strategy.all_gather(torch.tensor([module.kl_coef]))
if trainer.is_global_zero:
    json.dump({"iteration": module.iteration, "param_spread": spread, "betas": betas.flatten().tolist(),
               "updates": ctl.total_sequences}, open(sys.argv[1], "w"))
'''


@pytest.mark.parametrize("critic", ["separate", pytest.param("shared", marks=pytest.mark.slow)])
def test_ddp_two_cpu_ranks_stay_in_sync(tmp_path, critic):
    """2 gloo ranks, critic warm-up then PPO: parameters and the adaptive kl_coef are identical on both ranks."""
    import json
    import os
    import sys

    from tests.distributed import run_distributed

    script = tmp_path / "ppo_ddp.py"
    script.write_text(DDP_SCRIPT)
    out = tmp_path / "result.json"
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    # 600 s like the other 2-process tests (300 s was within reach on a busy 2-core machine); a fresh port per run
    proc = run_distributed([sys.executable, str(script), str(out), critic], cwd=tmp_path, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["iteration"] == 2 and result["param_spread"] == 0.0
    assert result["betas"][0] == result["betas"][1] != 0.05
    assert result["updates"] == 2 * 8  # num_sequences summed over both ranks (4 prompts each)
