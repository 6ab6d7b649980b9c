"""GILModule end to end: the tiny config logs per-group metrics, the per-sample KL coefficient is kl_coef * scale_i with
the adaptive-KL controller, Group-DRO weights follow the EG rule, the invariance penalty with micro-batches and 2 DDP
ranks equals the whole-batch penalty in one process, and kill + resume reproduces the uninterrupted run."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from callbacks.adaptive_exploration import AdaptiveExploration
from callbacks.adaptive_kl import AdaptiveKLController
from callbacks.group_inference import GroupInference
from lightning_rlhf.cli import main
from lightning_rlhf.data import PromptDataModule
from lightning_rlhf.methods.gil import GILModule
from lightning_rlhf.rollout.experience import Experience

REPO = Path(__file__).resolve().parent.parent
CONFIG = str(REPO / "configs" / "gil" / "tiny.yaml")
TOKEN_REWARD = {"class_path": "lightning_rlhf.rewards.TokenCountReward", "init_args": {"token": "e"}}

pytestmark = pytest.mark.usefixtures("single_thread")


def _data(batch_size: int) -> PromptDataModule:
    return PromptDataModule(train_path="builtin:hh-rlhf", batch_size=batch_size, max_prompt_length=48,
                            skip_invalid_rows=True, max_train_rows=32, max_val_rows=4,
                            domains=["hh_helpful_base", "hh_harmless_base"])


def _trainer(callbacks: list, devices: int = 1) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto", max_steps=-1,
                     logger=False, limit_val_batches=0, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, callbacks=callbacks)


def test_tiny_config_trains_offline_and_logs_per_group_metrics_to_tensorboard(in_tmp):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cli = main(["fit", "-c", CONFIG, "--model.max_iterations=3", "--model.max_new_tokens=8",
                "--data.batch_size=8", "--model.mini_batch_size=4", "--model.micro_batch_size=4"])
    assert cli.model.iteration == 3
    (run,) = (in_tmp / "runs" / "gil_tiny").iterdir()
    events = EventAccumulator(str(run))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for tag in ("group/mass_g0", "group/mass_g1", "group/return_g0", "group/return_gap", "group/g_high_flips",
                "group/ari_domain", "explore/eta_g0", "explore/kl_g1", "gil/var_J", "gil/J_g0", "gil/score_g1",
                "gil/score_gap", "score/domain_hh_helpful_base", "score/domain_hh_harmless_base",
                "score/worst_domain"):
        assert tag in tags, tag
        assert len(events.Scalars(tag)) == 3, tag
    masses = [events.Scalars(f"group/mass_g{g}")[-1].value for g in (0, 1)]
    assert sum(masses) == pytest.approx(1.0, abs=1e-5)
    # the variance penalty moved the loss weights off 1 (ppo_epochs 2 x 2 minibatches: 3 of 4 steps used the pre-pass)
    assert events.Scalars("gil/weight_max")[-1].value > 1.0 > events.Scalars("gil/weight_min")[-1].value


def _gil(**overrides) -> GILModule:
    kwargs = dict(model_name_or_path="builtin:tiny-llama", reward_fn=TOKEN_REWARD, lr=1e-2, critic_lr=1e-3,
                  kl_coef=0.05, ppo_epochs=1, mini_batch_size=None, micro_batch_size=4, max_new_tokens=8,
                  log_samples_every_n=0, export_dir=None, seed=0, reward_norm="none", max_iterations=3)
    kwargs.update(overrides)
    return GILModule(**kwargs)


@pytest.mark.parametrize("form", ["paper", "mean_preserving"])
def test_per_sample_kl_coefficient_is_the_controllers_kl_coef_times_the_scale(form):
    module = _gil()
    captured: list[tuple[float, Experience]] = []
    original = module.compute_advantages

    def capture(exp: Experience) -> Experience:
        coef = module.kl_coef  # what the controller set for this rollout
        captured.append((coef, original(exp)))
        return exp

    module.compute_advantages = capture  # type: ignore[method-assign]
    ctl = AdaptiveKLController(target=0.01, horizon=20)  # moves kl_coef every iteration
    _trainer([ctl, GroupInference(seed=1, group_steps=3, lr=0.1),
              AdaptiveExploration(form=form, eta_min=0.3, eta_max=1.7)]).fit(module, _data(6))
    assert len(captured) == 3
    coefs = [c for c, _ in captured]
    assert coefs[0] == 0.05 and len(set(coefs)) == 3  # the controller adapted kl_coef between the rollouts
    for coef, exp in captured:
        q, g_high = exp.extras["group_posterior"], int(exp.extras["group_high"][0])
        for i in range(len(exp)):
            q_high = float(q[i, g_high])
            scale = q_high if form == "paper" else 0.3 + (1.7 - 0.3) * q_high
            assert float(exp.kl_coef[i]) == pytest.approx(coef * scale, rel=1e-6, abs=1e-12)
            # and the token rewards used it: r_t = -eta_i kl_t off the last token
            n = int(exp.action_mask[i].sum())
            if n > 1:
                assert float(exp.rewards[i, 0]) == pytest.approx(-coef * scale * float(exp.kl[i, 0]), abs=1e-6)


def test_worst_group_weights_follow_the_exponentiated_gradient_rule():
    module = _gil(invariance="worst_group", dro_step_size=0.5, max_iterations=2)
    steps: list[tuple[torch.Tensor, torch.Tensor]] = []  # (weights before, J_g) per optimizer step
    original = module.global_group_statistics

    def spy(j, q, mask):
        stats, tokens = original(j, q, mask)
        steps.append((module.dro_weights.clone(), stats[0] / stats[1]))
        return stats, tokens

    module.global_group_statistics = spy  # type: ignore[method-assign]
    _trainer([GroupInference(seed=0)]).fit(module, _data(6))
    assert len(steps) == 2
    w = torch.tensor([0.5, 0.5], dtype=torch.float64)
    for before, j_g in steps:
        torch.testing.assert_close(before, w)
        unnorm = [float(w[g]) * math.exp(0.5 * -float(j_g[g])) for g in range(2)]
        w = torch.tensor([u / sum(unnorm) for u in unnorm], dtype=torch.float64)
    torch.testing.assert_close(module.dro_weights, w, atol=1e-12, rtol=0)
    assert not torch.allclose(w, torch.tensor([0.5, 0.5], dtype=torch.float64))


def test_gil_without_group_inference_says_what_is_missing():
    with pytest.raises(RuntimeError, match="GroupInference"):
        _trainer([]).fit(_gil(max_iterations=1), _data(4))
    with pytest.raises(ValueError, match="model.invariance"):
        _gil(invariance="mean")


# ---------------------------------------------------------------------------------------------- DDP
class SGDGIL(GILModule):
    """GIL with plain SGD: parameters then move linearly with the gradient, so two ranks and one process can be
    compared to 1e-6 (Adam's first step is sign-like and amplifies float rounding on near-zero gradients)."""

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.param_groups(), lr=self.lr)
        return [opt], [torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)]


def run_fixed_experience_gil(out: str, devices: int, batch_size: int, beta_policy: float = 2.0,
                             placement: str = "separate") -> None:
    """One GIL iteration on fixed responses (per-rank batch ``batch_size``): whole-batch minibatches, 2 epochs (the
    second step uses the no-grad pre-pass), micro-batches of 2; saves the trainable parameters and the head."""
    from tests.test_ddp import FixedResponses

    L.seed_everything(0)
    module = SGDGIL(model_name_or_path="builtin:tiny-llama", critic="separate", lr=1e-3, critic_lr=1e-3,
                    kl_coef=0.05, reward_fn=TOKEN_REWARD, ppo_epochs=2, mini_batch_size=None, micro_batch_size=2,
                    max_new_tokens=8, reward_norm="norm", max_iterations=1, log_samples_every_n=0, export_dir=None,
                    beta_policy=beta_policy, max_grad_norm=None)
    module.generator = FixedResponses(module.tokenizer.eos_token_id, module.tokenizer.pad_token_id)
    gi = GroupInference(seed=0, group_steps=3, lr=0.1, placement=placement)
    trainer = _trainer([gi, AdaptiveExploration()], devices=devices)
    trainer.fit(module, _data(batch_size))
    if trainer.is_global_zero:
        params = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
        head = gi.head if placement == "separate" else module.group_head
        torch.save({"params": params, "head": head.state_dict(), "world_size": trainer.world_size}, out)


def _subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = str(torch.get_num_threads())
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env["TOKENIZERS_PARALLELISM"] = "false"
    return env


def test_variance_penalty_with_micro_batches_and_two_ranks_equals_one_process(in_tmp):
    run_fixed_experience_gil(str(in_tmp / "single.pt"), devices=1, batch_size=8)
    run_fixed_experience_gil(str(in_tmp / "no_penalty.pt"), devices=1, batch_size=8, beta_policy=0.0)
    proc = subprocess.run([sys.executable, "-m", "tests.test_gil_module", str(in_tmp / "ddp.pt"), "2", "4"],
                          cwd=in_tmp, env=_subprocess_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    single, ddp, plain = (torch.load(in_tmp / f"{n}.pt") for n in ("single", "ddp", "no_penalty"))
    assert ddp["world_size"] == 2
    for k in single["head"]:  # every rank made the same head update on the same global view
        torch.testing.assert_close(ddp["head"][k], single["head"][k], atol=1e-6, rtol=0)
    penalty_effect = 0.0
    for k in single["params"]:
        torch.testing.assert_close(ddp["params"][k], single["params"][k], atol=1e-6, rtol=0, msg=lambda m: f"{k}: {m}")
        penalty_effect = max(penalty_effect, (single["params"][k] - plain["params"][k]).abs().max().item())
    assert penalty_effect > 1e-4  # the penalty changed the update far beyond the tolerance


# ---------------------------------------------------------------------------------------------- resume
GIL_ARGS = [
    "fit", "-c", CONFIG, "--data.batch_size=4", "--data.max_train_rows=16", "--model.max_iterations=4",
    "--model.ppo_epochs=2", "--model.mini_batch_size=4", "--model.micro_batch_size=2", "--model.max_new_tokens=8",
    "--model.log_samples_every_n=0", "--trainer.logger=false", "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false", "--trainer.max_steps=-1",
]
RECORD = {
    "metrics": ["score/mean", "kl", "policy/loss", "gil/var_J", "gil/J_g0", "gil/score_g0", "group/return_g0",
                "group/mass_g1", "group/g_high_flips", "explore/eta_g0", "kl_ctl/next_kl_coef"],
    "attributes": ["iteration", "kl_coef", "global_step"],
}


def _gil_overlay(tmp: Path, name: str, signal_at: int = -1, placement: str = "separate",
                 record: dict | None = None) -> list[str]:
    """The tiny config's callbacks (they log before the recorder reads), the recorder, a checkpoint every step."""
    with open(CONFIG) as f:
        gil_callbacks = yaml.safe_load(f)["trainer"]["callbacks"]
    if placement == "critic":
        gil_callbacks = [CRITIC_GI if c["class_path"].endswith("GroupInference") else c for c in gil_callbacks]
    callbacks = [
        *gil_callbacks,
        {"class_path": "tests.test_resume.StepRecorder",
         "init_args": {"path": str(tmp / f"{name}.jsonl"), "signal_at_iteration": signal_at, **(record or RECORD)}},
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
         "init_args": {"dirpath": str(tmp / f"{name}_ckpt"), "every_n_train_steps": 1, "save_last": True,
                       "save_top_k": 0}},
    ]
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"trainer": {"callbacks": callbacks}}))
    return ["-c", str(path), f"--model.export_dir={tmp / (name + '_export')}"]


def test_gil_sigkill_then_resume_reproduces_the_uninterrupted_run(tmp_path, monkeypatch):
    from tests.test_resume import _assert_same_run, _assert_same_weights, _cli_subprocess, _read

    monkeypatch.chdir(tmp_path)
    main([*GIL_ARGS, *_gil_overlay(tmp_path, "ref")])
    proc = _cli_subprocess([*GIL_ARGS, *_gil_overlay(tmp_path, "run", signal_at=2)], tmp_path)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    state = torch.load(tmp_path / "run_ckpt" / "last.ckpt", weights_only=True, map_location="cpu")
    assert state["iteration"] == 2
    (head_state,) = [v for k, v in state["callbacks"].items() if k.startswith("GroupInference")]
    assert head_state["num_updates"] == 2 and "head" in head_state and head_state["optimizer"]["state"]

    cli = main([*GIL_ARGS, *_gil_overlay(tmp_path, "run"), "--ckpt_path=last"])
    assert cli.model.iteration == 4
    records = _read(tmp_path / "run.jsonl")
    assert [r["attributes"][0] for r in records] == [1, 2, 3, 4]
    _assert_same_run(records, _read(tmp_path / "ref.jsonl"))
    _assert_same_weights(tmp_path / "run_export", tmp_path / "ref_export")


@pytest.mark.slow
def test_critic_placement_with_micro_batches_and_two_ranks_equals_one_process(in_tmp):
    """placement: critic: the group term of the critic loss (global L_group, world-size factor) and the hosted head's
    update with 2 DDP ranks x micro-batches equal one process on the whole batch."""
    run_fixed_experience_gil(str(in_tmp / "single.pt"), devices=1, batch_size=8, placement="critic")
    proc = subprocess.run([sys.executable, "-m", "tests.test_gil_module", str(in_tmp / "ddp.pt"), "2", "4", "critic"],
                          cwd=in_tmp, env=_subprocess_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    single, ddp = (torch.load(in_tmp / f"{n}.pt") for n in ("single", "ddp"))
    assert ddp["world_size"] == 2 and any(k.startswith("group_head.") for k in single["params"])
    for k in single["params"]:
        torch.testing.assert_close(ddp["params"][k], single["params"][k], atol=1e-6, rtol=0, msg=lambda m: f"{k}: {m}")
    for k in single["head"]:
        torch.testing.assert_close(ddp["head"][k], single["head"][k], atol=1e-6, rtol=0)


if __name__ == "__main__":  # the 2-process half of the DDP tests (Lightning relaunches this module for rank 1)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    run_fixed_experience_gil(sys.argv[1], devices=int(sys.argv[2]), batch_size=int(sys.argv[3]),
                             placement=sys.argv[4] if len(sys.argv) > 4 else "separate")


# ---------------------------------------------------------------------------------------------- placement: critic
CRITIC_GI = {"class_path": "callbacks.group_inference.GroupInference",
             "init_args": {"num_groups": 2, "entropy_coef": 0.01, "lr": 5.0e-2, "seed": 0, "placement": "critic",
                           "critic_loss_weight": 1.0}}


def _critic_placement_overlay(tmp: Path, extra: list | None = None) -> list[str]:
    """The tiny config's callbacks with GroupInference(placement: critic) in place of the separate head."""
    with open(CONFIG) as f:
        callbacks = yaml.safe_load(f)["trainer"]["callbacks"]
    callbacks = [CRITIC_GI if c["class_path"].endswith("GroupInference") else c for c in callbacks]
    path = tmp / "critic_placement.yaml"
    path.write_text(yaml.safe_dump({"trainer": {"callbacks": [*callbacks, *(extra or [])]}}))
    return ["-c", str(path)]


def test_critic_placement_critic_loss_is_value_loss_plus_weight_times_group_loss():
    """One SGD iteration, micro-batches of 2: the separate critic's and the hosted head's parameter changes are
    -lr * grad of vf_coef * L_value + w * L_group, computed by hand on the whole batch at the rollout's parameters."""
    import copy

    from callbacks.group_inference import group_inference_loss
    from lightning_rlhf.losses.ppo import value_loss
    from lightning_rlhf.rollout.scoring import last_token_index

    L.seed_everything(0)
    module = SGDGIL(model_name_or_path="builtin:tiny-llama", critic="separate", lr=1e-3, critic_lr=1e-2,
                    kl_coef=0.05, reward_fn=TOKEN_REWARD, ppo_epochs=1, mini_batch_size=None, micro_batch_size=2,
                    max_new_tokens=8, reward_norm="norm", max_iterations=1, log_samples_every_n=0, export_dir=None,
                    beta_policy=1.0, max_grad_norm=None, vf_coef=0.5)
    gi = GroupInference(placement="critic", seed=0, lr=0.05, critic_loss_weight=0.7, entropy_coef=0.02)
    seen = {}
    original = module.ppo_update

    def spy(exp):
        seen["exp"] = exp
        seen["critic"] = copy.deepcopy(module.critic)
        seen["head"] = copy.deepcopy(module.group_head)
        seen["kl_coef"] = module.kl_coef
        return original(exp)

    module.ppo_update = spy  # type: ignore[method-assign]
    _trainer([gi]).fit(module, _data(6))
    exp, critic, head = seen["exp"], seen["critic"], seen["head"]
    critic.train()
    mask = exp.action_mask
    token_values, hidden = critic.token_values(exp.sequences, exp.attention_mask, return_hidden=True)
    values = token_values[:, exp.prompt_length - 1:-1]
    v_loss, _ = value_loss(values, exp.values, exp.returns, mask, module.value_clip, mask.sum())
    last = hidden[torch.arange(len(exp)), last_token_index(exp.attention_mask)].float()
    returns = exp.shaped_scores.double() - seen["kl_coef"] * exp.kl.sum(-1).double()
    l_group = group_inference_loss(returns.float(), torch.softmax(head(last), -1), entropy_coef=0.02)
    critic_params, head_params = list(critic.parameters()), list(head.parameters())
    grads = torch.autograd.grad(0.5 * v_loss + 0.7 * l_group, critic_params + head_params, allow_unused=True,
                                retain_graph=True)
    value_grads = torch.autograd.grad(0.5 * v_loss, critic_params, allow_unused=True)
    after = dict(module.critic.named_parameters())
    group_effect = 0.0
    for (name, before), grad in zip(critic.named_parameters(), grads[:len(critic_params)]):
        want = before.detach() - 1e-2 * (grad if grad is not None else torch.zeros_like(before))
        torch.testing.assert_close(after[name].detach(), want, atol=2e-6, rtol=0, msg=lambda m: f"{name}: {m}")
    for before, got, grad in zip(head_params, module.group_head.parameters(), grads[len(critic_params):]):
        torch.testing.assert_close(got.detach(), before.detach() - 0.05 * grad, atol=2e-6, rtol=0)
        group_effect = max(group_effect, float(grad.abs().max()))
    # the group term reached the critic's trunk (not only the head): without it the trunk would have moved
    # differently, by far more than the tolerance
    trunk_effect = max(float((g - (gv if gv is not None else 0)).abs().max()) * 1e-2
                       for (n, _), g, gv in zip(critic.named_parameters(), grads, value_grads)
                       if g is not None and "score" not in n)
    assert trunk_effect > 5e-5 and group_effect > 1e-3, (trunk_effect, group_effect)


@pytest.mark.parametrize("critic", ["separate", "shared"])
def test_tiny_config_with_critic_placement_trains_end_to_end(in_tmp, critic):
    """configs/gil/tiny.yaml with the group head inside the critic: trains, logs the critic's group loss, the head
    is in the module's state and moved, the posterior annotations come from it."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    args = ["fit", "-c", CONFIG, *_critic_placement_overlay(in_tmp), f"--model.critic={critic}",
            "--model.max_iterations=3", "--model.max_new_tokens=8", "--data.batch_size=8", "--model.mini_batch_size=4",
            "--model.micro_batch_size=2", "--trainer.enable_progress_bar=false"]
    L.seed_everything(0)
    cli = main(args)
    module = cli.model
    assert module.iteration == 3 and module.group_head is not None
    assert any(k.startswith("group_head.") for k in module.state_dict())
    head_ids = {id(p) for p in module.group_head.parameters()}
    groups = [g for g in cli.trainer.optimizers[0].param_groups if {id(p) for p in g["params"]} & head_ids]
    assert groups and all(g["lr"] == pytest.approx(5e-2) for g in groups)  # the critic's optimizer, its own lr
    fresh = GroupInference(seed=0).new_head(module.group_head[0].in_features)
    assert not torch.allclose(fresh[0].weight, module.group_head[0].weight.detach().cpu())  # trained
    (run,) = (in_tmp / "runs" / "gil_tiny").iterdir()
    events = EventAccumulator(str(run))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for tag in ("gil/critic_group_loss", "group/mass_g0", "group/ari_domain", "explore/eta_g0", "gil/var_J",
                "value/loss"):
        assert tag in tags and len(events.Scalars(tag)) == 3, tag
    assert all(math.isfinite(e.value) for e in events.Scalars("gil/critic_group_loss"))


def test_critic_placement_refuses_a_module_without_critic_features():
    with pytest.raises(ValueError, match="model.critic: none"):
        GroupInference(placement="critic").setup(
            None, _gil(critic="none", advantage="grpo", n_samples_per_prompt=2), "fit")
    with pytest.raises(ValueError, match="model.feature_source"):
        GroupInference(placement="critic").setup(None, _gil(feature_source="policy"), "fit")


@pytest.mark.slow
def test_gil_critic_placement_sigkill_then_resume_reproduces_the_uninterrupted_run(tmp_path, monkeypatch):
    """placement: critic: the head is in the module's state and the critic's optimizer state (its own parameter
    group); a SIGKILL + resume reproduces the uninterrupted run's metrics and weights."""
    from tests.test_resume import _assert_same_run, _assert_same_weights, _cli_subprocess, _read

    monkeypatch.chdir(tmp_path)
    rec = {**RECORD, "metrics": [*RECORD["metrics"], "gil/critic_group_loss"]}
    main([*GIL_ARGS, *_gil_overlay(tmp_path, "ref", placement="critic", record=rec)])
    proc = _cli_subprocess([*GIL_ARGS, *_gil_overlay(tmp_path, "run", signal_at=2, placement="critic", record=rec)],
                           tmp_path)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    state = torch.load(tmp_path / "run_ckpt" / "last.ckpt", weights_only=True, map_location="cpu")
    assert state["iteration"] == 2
    head_keys = [k for k in state["state_dict"] if k.startswith("group_head.")]
    assert head_keys
    opt = state["optimizer_states"][0]
    assert len(opt["param_groups"]) >= 3 and len(opt["state"]) == sum(len(g["params"]) for g in opt["param_groups"])
    (cb_state,) = [v for k, v in state["callbacks"].items() if k.startswith("GroupInference")]
    assert cb_state["num_updates"] == 2 and "head" not in cb_state

    cli = main([*GIL_ARGS, *_gil_overlay(tmp_path, "run", placement="critic", record=rec), "--ckpt_path=last"])
    assert cli.model.iteration == 4
    records = _read(tmp_path / "run.jsonl")
    assert [r["attributes"][0] for r in records] == [1, 2, 3, 4]
    _assert_same_run(records, _read(tmp_path / "ref.jsonl"))
    _assert_same_weights(tmp_path / "run_export", tmp_path / "ref_export")
    # and the hosted head itself continued exactly (it is not in the exported policy)
    ref = torch.load(tmp_path / "ref_ckpt" / "last.ckpt", weights_only=True, map_location="cpu")["state_dict"]
    end = torch.load(tmp_path / "run_ckpt" / "last.ckpt", weights_only=True, map_location="cpu")["state_dict"]
    for k in head_keys:
        torch.testing.assert_close(end[k], ref[k], atol=0, rtol=0)
