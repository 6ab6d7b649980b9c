"""The callback contract of methods that act mid-iteration (callbacks/protocols.py ExperienceAnnotatable): a hook
annotates the experience between rollout and advantages, its KL scale composes with the adaptive-KL coefficient,
every callback reads the same iteration's statistics, and n_samples_per_prompt keeps a prompt's rows together."""

from __future__ import annotations

import ast
from pathlib import Path

import lightning as L
import pytest
import torch

from callbacks.adaptive_kl import AdaptiveKLController
from callbacks.protocols import ExperienceAnnotatable, KLControlled
from lightning_rlhf.data import PromptDataModule
from lightning_rlhf.methods.ppo import PPOModule
from lightning_rlhf.rollout.experience import Experience
from tests.kl_scale_callback import ScaleKLByRank

TOKEN_REWARD = {"class_path": "lightning_rlhf.rewards.TokenCountReward", "init_args": {"token": "e"}}

pytestmark = pytest.mark.usefixtures("single_thread")


def _module(**overrides) -> PPOModule:
    kwargs = dict(model_name_or_path="builtin:tiny-llama", reward_fn=TOKEN_REWARD, lr=1e-2, critic_lr=1e-3,
                  kl_coef=0.05, ppo_epochs=1, mini_batch_size=None, micro_batch_size=4, max_new_tokens=8,
                  log_samples_every_n=0, export_dir=None, seed=0, reward_norm="none")
    kwargs.update(overrides)
    return PPOModule(**kwargs)


def _fit(tmp_path: Path, module: PPOModule, callbacks: list, batch_size: int = 6) -> None:
    dm = PromptDataModule(train_path="builtin:hh-rlhf", batch_size=batch_size, max_prompt_length=48,
                          skip_invalid_rows=True, max_train_rows=64, max_val_rows=8)
    L.Trainer(accelerator="cpu", devices=1, max_steps=-1, logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path,
              callbacks=callbacks).fit(module, dm)


def _capture(module: PPOModule) -> list[Experience]:
    captured: list[Experience] = []
    original = module.compute_advantages

    def capture(exp: Experience) -> Experience:
        captured.append(original(exp))
        return captured[-1]

    module.compute_advantages = capture  # type: ignore[method-assign]
    return captured


def test_test_callback_imports_only_lightning_and_torch():
    tree = ast.parse((Path(__file__).parent / "kl_scale_callback.py").read_text())
    roots = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    roots |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert roots <= {"__future__", "typing", "lightning", "torch"}, roots


def test_hook_kl_scale_composes_with_the_adaptive_kl_coefficient(tmp_path):
    module = _module(max_iterations=3)
    assert isinstance(module, ExperienceAnnotatable) and isinstance(module, KLControlled)
    captured = _capture(module)
    coefs_used: list[float] = []
    original = module.annotate_experience

    def record(exp: Experience) -> None:
        coefs_used.append(module.kl_coef)  # the adaptive coefficient this iteration's rewards use
        original(exp)

    module.annotate_experience = record  # type: ignore[method-assign]

    class PerturbReference(L.Callback):
        def on_train_start(self, trainer, pl_module):
            with torch.no_grad():
                for p in pl_module.reference.parameters():
                    p.add_(0.05 * torch.randn_like(p))

    ctl = AdaptiveKLController(target=0.1, horizon=10)
    cb = ScaleKLByRank()
    _fit(tmp_path, module, [PerturbReference(), cb, ctl])
    assert len(captured) == 3 and len(cb.views) == 3
    assert len(set(coefs_used)) == 3  # the controller moved the coefficient every iteration
    for it, (exp, view) in enumerate(zip(captured, cb.views)):
        B = len(exp)
        scale = 1.0 + (torch.arange(B) % 3).float()
        # hand-computed token rewards: -kl_coef * scale_i * kl_t, plus the score at the last response token
        expected = -(coefs_used[it] * scale)[:, None] * exp.kl
        last = exp.action_mask.sum(-1) - 1
        expected[torch.arange(B), last] += exp.shaped_scores
        assert exp.kl.abs().sum() > 0
        torch.testing.assert_close(exp.rewards, expected * exp.action_mask, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(exp.kl_coef, coefs_used[it] * scale, rtol=1e-6, atol=0)
        # the view the hook saw: this iteration, this experience's per-sample values
        assert int(view["iteration"]) == it
        torch.testing.assert_close(view["scores"], exp.scores)
        torch.testing.assert_close(view["kl"], exp.kl.sum(-1))
        torch.testing.assert_close(view["returns"], exp.shaped_scores - coefs_used[it] * exp.kl.sum(-1))
        assert "features" not in view  # not asked for
        # an annotation the module does not act on is kept in the extras
        torch.testing.assert_close(exp.extras["note"], exp.scores * 2)
    # both callbacks read the same iteration's statistics (reading does not consume them)
    assert [s["iteration"] for s in cb.stats_read] == [0.0, 1.0, 2.0]
    assert ctl.num_updates == 3 and ctl.last_iteration == 2.0
    assert [s["kl_seq_sum"] for s in cb.stats_read][-1] == ctl.last_kl
    assert dict(module.last_rollout_stats()) == dict(module.last_rollout_stats())
    torch.testing.assert_close(module.rollout_view()["kl_coef"], captured[-1].kl_coef)


def test_hook_asking_for_features_gets_the_critics_last_token_state(tmp_path):
    seen: list[torch.Tensor] = []
    module = _module(max_iterations=1)
    module.register_experience_hook("feat", lambda view: seen.append(view["features"]) or {}, needs_features=True)
    hiddens: list[torch.Tensor] = []
    original = module.compute_advantages

    def capture(exp: Experience) -> Experience:
        # independently, before the update changes the critic: its trunk's last hidden states on the sequences
        with torch.no_grad():
            hiddens.append(module.critic.token_values(exp.sequences, exp.attention_mask, return_hidden=True)[1])
        captured.append(original(exp))
        return captured[-1]

    captured: list[Experience] = []
    module.compute_advantages = capture  # type: ignore[method-assign]
    _fit(tmp_path, module, [])
    exp, hidden = captured[0], hiddens[0]
    assert seen[0].shape == (len(exp), module.critic.config.hidden_size)
    # the hidden state at each row's last real token
    last = exp.attention_mask.shape[1] - 1 - exp.attention_mask.flip(-1).argmax(-1)
    torch.testing.assert_close(seen[0], hidden[torch.arange(len(exp)), last], rtol=1e-5, atol=1e-5)


def test_a_hook_returning_the_wrong_shape_is_named(tmp_path):
    module = _module(max_iterations=1)
    module.register_experience_hook("bad_hook", lambda view: {"kl_scale": torch.ones(3)})
    with pytest.raises(ValueError, match="bad_hook.*kl_scale"):
        _fit(tmp_path, module, [])


def test_n_samples_per_prompt_keeps_a_prompts_rows_adjacent_and_distinct():
    module = _module(n_samples_per_prompt=3, max_new_tokens=12)
    module.configure_model()
    dm = PromptDataModule(train_path="builtin:hh-rlhf", batch_size=4, max_prompt_length=48, skip_invalid_rows=True,
                          max_train_rows=16)
    dm.set_tokenizer(module.tokenizer)
    dm.setup("fit")
    batch = dm.collate([dm.train_dataset[i] for i in range(4)])
    exp = module.make_experience(batch)
    assert len(exp) == 12
    P = exp.prompt_length
    for b in range(4):
        rows = range(3 * b, 3 * b + 3)
        assert {exp.extras["prompt_ids"][r] for r in rows} == {batch.prompt_ids[b]}
        assert all(torch.equal(exp.sequences[r, :P], exp.sequences[3 * b, :P]) for r in rows)
        responses = {tuple(exp.responses[r][exp.action_mask[r].bool()].tolist()) for r in rows}
        assert len(responses) == 3, f"prompt {b}: the 3 samples are not all different"
    assert exp.scores.shape == (12,) and exp.values.shape == exp.action_mask.shape
