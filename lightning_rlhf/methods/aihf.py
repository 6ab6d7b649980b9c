"""AIHF with an explicit reward model (spec 5, variant A): PPO against a reward model trained in the same loop.

Li et al., "Joint Reward and Policy Learning with Demonstrations and Human Feedback Improves Alignment" (arXiv
2406.06874). One training step (three data streams: ``prompts``, ``preferences``, ``demonstrations``):

1. **Policy**: one PPO iteration (``PPOModule.training_step``) on the prompts, scored by the current reward model.
2. Every ``policy_iterations_per_reward_step`` iterations, **reward phase**: sample ``y~ ~ pi(.|x)`` on the
   demonstration prompts (one batched call of the rollout engine), then ``reward_steps_per_iteration`` optimizer steps
   of the reward model (its own optimizer and LR schedule: ``models/roles.py``) on
   ``L_R = w_D * BT(y_E > y~) + w_P * BT(y_w > y_l)`` (``losses/aihf.py``: ``demo_term`` bt | linear, ``term_norm``
   per_term | pooled).
3. The reward changed, so the running score moments that PPO normalises with are restarted
   (``reward_moments: reset``): the next iteration normalises with its own batch's moments first, never with moments
   of an older reward.

``w_D = 0`` is RLHF with an online-trained reward model (the reward step is plain Bradley-Terry training);
``w_P = 0`` is reward learning from demonstrations. The reward model is saved in checkpoints (it is trained) and
exported beside the policy (``<export_dir>/reward_model``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal, Optional

import torch

from lightning_rlhf.data.batches import PreferenceBatch, PromptBatch, TokenBatch
from lightning_rlhf.losses.aihf import RewardDemoTerm, TermNorm, aihf_reward_loss
from lightning_rlhf.methods.aihf_dpo import _stream_names, demonstration_pairs
from lightning_rlhf.methods.base import check_choice
from lightning_rlhf.methods.ppo import PPOModule
from lightning_rlhf.models.roles import OptimizerRole, named_trainable
from lightning_rlhf.packing import packed_sequences_supported

log = logging.getLogger(__name__)

RewardMoments = Literal["reset", "keep"]


class AIHFModule(PPOModule):
    """AIHF (explicit reward + RL): PPO iterations alternating with reward-model steps on demonstrations and
    preferences (spec 5, A). All of :class:`~lightning_rlhf.methods.ppo.PPOModule`'s arguments apply; the reward model
    (``reward_model_name_or_path``, required) is trained, not frozen, and must share the policy's vocabulary.

    Logged (besides PPO's): ``reward/loss``, ``reward/demo_term``, ``reward/preference_term`` (each term's mean over
    its own pairs), ``reward/demo_accuracy`` (share of ``r(y_E) > r(y~)``), ``reward/preference_accuracy``,
    ``reward/grad_norm``, ``reward/lr``, ``time/reward_sample``, ``time/reward_step``.

    Args:
        reward_lr: Learning rate of the reward model's optimizer.
        w_D: Weight of the demonstration pairs ``(y_E > y~)`` in the reward step.
        w_P: Weight of the preference pairs ``(y_w > y_l)``.
        demo_term: ``bt`` (``-log sigmoid(r(y_E) - r(y~))``) or ``linear`` (``-(r(y_E) - r(y~)) / kl_coef``).
        term_norm: ``per_term`` (each term averaged over its own pairs) or ``pooled`` (one mean over both kinds of
            pairs, as the authors' code).
        reward_steps_per_iteration: Reward optimizer steps per reward phase (on the same pairs).
        policy_iterations_per_reward_step: PPO iterations between reward phases.
        reward_moments: ``reset`` (restart PPO's running score moments after every reward phase) or ``keep``.
        prompt_stream: Name of the prompt stream.
        preference_stream: Name of the preference stream.
        demonstration_stream: Name of the demonstration stream.
        reward_padding_free: Score the reward step's pairs without padding, as ``RewardModelModule``'s
            ``padding_free`` does (packed rows no longer than the micro-batch's longest sequence; same loss and
            gradients up to float rounding). The rollout's scoring is unchanged.
    """

    optimizer_role_names = ("policy", "reward")
    frozen_modules = ("reference",)

    def __init__(
        self,
        reward_lr: float = 1e-5,
        w_D: float = 1.0,
        w_P: float = 1.0,
        demo_term: RewardDemoTerm = "bt",
        term_norm: TermNorm = "per_term",
        reward_steps_per_iteration: int = 1,
        policy_iterations_per_reward_step: int = 1,
        reward_moments: RewardMoments = "reset",
        prompt_stream: str = "prompts",
        preference_stream: str = "preferences",
        demonstration_stream: str = "demonstrations",
        reward_padding_free: bool = False,
        **kwargs: Any,
    ) -> None:
        if kwargs.get("reward_model_name_or_path") is None or kwargs.get("reward_fn") is not None:
            raise ValueError("AIHFModule trains its reward model: set model.reward_model_name_or_path (its "
                             "initialisation, e.g. a RewardModelModule export or the SFT model) and no model.reward_fn")
        super().__init__(**kwargs)
        if w_D < 0 or w_P < 0 or w_D + w_P == 0:
            raise ValueError(f"model.w_D and model.w_P must be >= 0 and not both 0, got w_D={w_D}, w_P={w_P}")
        check_choice("demo_term", demo_term, ("bt", "linear"))
        check_choice("term_norm", term_norm, ("per_term", "pooled"))
        if reward_steps_per_iteration < 1:
            raise ValueError(f"model.reward_steps_per_iteration must be >= 1, got {reward_steps_per_iteration}")
        if policy_iterations_per_reward_step < 1:
            raise ValueError("model.policy_iterations_per_reward_step must be >= 1, got "
                             f"{policy_iterations_per_reward_step}")
        check_choice("reward_moments", reward_moments, ("reset", "keep"))
        if reward_lr <= 0:
            raise ValueError(f"model.reward_lr must be positive, got {reward_lr}")
        if reward_padding_free and not packed_sequences_supported():
            raise ValueError("model.reward_padding_free needs a transformers version with packed-sequence attention "
                             "masks (transformers.masking_utils.find_packed_sequence_indices); upgrade transformers or "
                             "set model.reward_padding_free: false")
        self.reward_padding_free = reward_padding_free
        self.reward_lr = reward_lr
        self.w_D = float(w_D)
        self.w_P = float(w_P)
        self.demo_term: RewardDemoTerm = demo_term
        self.term_norm: TermNorm = term_norm
        self.reward_steps_per_iteration = reward_steps_per_iteration
        self.policy_iterations_per_reward_step = policy_iterations_per_reward_step
        self.reward_moments: RewardMoments = reward_moments
        self.prompt_stream = prompt_stream
        self.preference_stream = preference_stream
        self.demonstration_stream = demonstration_stream
        self.save_hyperparameters()
        self.reward_steps_done = 0  # saved in checkpoints
        self.last_demo_pairs: Optional[PreferenceBatch] = None  # the latest reward phase's (y_E, y~), for inspection

    # ------------------------------------------------------------------ models and optimizers
    def build_models(self) -> None:
        """PPO's models; the reward model is then made trainable (its own optimizer role)."""
        super().build_models()
        if getattr(self.reward_source, "needs_text", False):
            raise ValueError("model.reward_model_name_or_path: AIHFModule's reward model must share the policy's "
                             "vocabulary (it scores the preference and demonstration token ids directly)")
        if self.reward_padding_free and not self.reward_model.per_token:
            raise ValueError("model.reward_padding_free needs a decoder reward model with a per-token score head; "
                             f"{type(self.reward_model.hf_model).__name__} pools internally. Set "
                             "model.reward_padding_free: false.")
        self.reward_model.requires_grad_(True)

    @property
    def required_streams(self) -> tuple[str, ...]:
        """The streams this module reads (``MultiStreamDataModule`` checks that they are declared): prompts, ``ptx``
        when ``ptx_coef > 0``, preferences when ``w_P > 0``, demonstrations when ``w_D > 0``."""
        weights = ((self.prompt_stream, 1.0), ("ptx", self.ptx_coef), (self.preference_stream, self.w_P),
                   (self.demonstration_stream, self.w_D))
        return tuple(name for name, w in weights if w > 0)

    def reward_phases(self) -> int:
        """Reward phases of the run (for the reward optimizer's LR schedule)."""
        iterations = self.max_iterations
        if iterations is None:
            iterations = int(self.trainer.estimated_stepping_batches) if self._trainer is not None else 1
        return max(iterations // self.policy_iterations_per_reward_step, 1)

    def optimizer_roles(self) -> list[OptimizerRole]:
        """``policy`` (PPO's groups: policy at ``lr``, critic at ``critic_lr``) and ``reward`` (at ``reward_lr``)."""
        return [
            OptimizerRole("policy", self.param_groups(), self.lr, total_steps=self.total_optimizer_steps()),
            OptimizerRole("reward", self.decay_groups(iter(named_trainable(self.reward_model)), self.reward_lr),
                          self.reward_lr, total_steps=self.reward_phases() * self.reward_steps_per_iteration),
        ]

    def check_strategy(self, strategy: Any = None, batch_size: Optional[int] = None) -> None:
        """PPO's checks (DeepSpeed refuses two optimizers there), and: no FSDP (the reward model's export is not
        gathered), DDP only with ``find_unused_parameters`` (each phase's backward leaves the other model's
        parameters without gradients)."""
        super().check_strategy(strategy, batch_size)
        from lightning.pytorch.strategies import DDPStrategy

        from lightning_rlhf.methods.base import _strategy_kind

        strategy = strategy if strategy is not None else self.trainer.strategy
        if _strategy_kind(strategy) == "fsdp":
            raise ValueError("AIHFModule has not been verified under FSDP (its trained reward model is exported "
                             "unsharded); use trainer.strategy: ddp.")
        if isinstance(strategy, DDPStrategy) and not (getattr(strategy, "_ddp_kwargs", {}) or {}).get(
                "find_unused_parameters", False):
            raise ValueError("AIHFModule under DDP needs find_unused_parameters (the PPO phase gives the reward model "
                             "no gradients and the reward phase the policy none): trainer.strategy: {class_path: "
                             "lightning.pytorch.strategies.DDPStrategy, init_args: {find_unused_parameters: true}}")

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage == "fit" and self._trainer is not None and self.trainer.datamodule is not None:
            names = _stream_names(self.trainer.datamodule)
            for stream, weight, flag in ((self.demonstration_stream, self.w_D, "w_D"),
                                         (self.preference_stream, self.w_P, "w_P")):
                if weight > 0 and stream not in names:
                    raise ValueError(f"model.{flag}={weight} needs a data stream named {stream!r} (data: "
                                     f"MultiStreamDataModule); the data has {names or type(self.trainer.datamodule)}. "
                                     f"Add it or set model.{flag}: 0.")

    # ------------------------------------------------------------------ the reward phase
    @torch.no_grad()
    def sample_on_demonstrations(self, demos: TokenBatch) -> Any:
        """``y~ ~ pi(.|x)`` on the demonstration prompts: one batched call of the rollout engine, with its own seed
        (per rank and iteration: a resumed run draws the same)."""
        seed = (self.rollout_seed() + 2**61) % (2**62)
        return self.generator.generate(self.policy, demos.prompt_input_ids, demos.prompt_attention_mask, seed=seed)

    def reward_step(self, prefs: Optional[PreferenceBatch], demos: Optional[TokenBatch]) -> dict[str, float]:
        """``reward_steps_per_iteration`` optimizer steps of the reward model on ``L_R`` (micro-batched; each term
        divided by its own pair count over the whole batch, so the micro-batches add up to the batch's loss)."""
        t0 = self._sync_time()
        pairs = None
        if demos is not None:
            samples = self.sample_on_demonstrations(demos)
            pairs = demonstration_pairs(demos, samples, int(self.tokenizer.pad_token_id))
            self.last_demo_pairs = pairs
        t1 = self._sync_time()
        N = pairs.num_pairs if pairs is not None else 0
        B = prefs.num_pairs if prefs is not None else 0
        kw = dict(w_D=self.w_D, w_P=self.w_P, demo_term=self.demo_term, term_norm=self.term_norm,
                  beta=self.kl_coef, num_demo_pairs=N, num_pref_pairs=B)
        empty = torch.zeros(0, device=self.device)
        self.reward_model.train()
        stats: dict[str, float] = {}
        for _ in range(self.reward_steps_per_iteration):
            total = torch.zeros((), device=self.device)
            terms = {"demo": 0.0, "pref": 0.0}
            correct = {"demo": 0.0, "pref": 0.0}
            chunks = [("demo", pairs, s, e) for s, e in self.micro_batches(N)] if pairs is not None else []
            chunks += [("pref", prefs, s, e) for s, e in self.micro_batches(B)] if prefs is not None else []
            for i, (kind, batch, s, e) in enumerate(chunks):
                mb = batch.slice(s, e)
                n = mb.num_pairs
                scores = self.reward_model(mb.input_ids, mb.attention_mask,
                                           padding_free=self.reward_padding_free)  # (2n,)
                if kind == "demo":
                    out = aihf_reward_loss(scores[:n], scores[n:], empty, empty, **kw)
                else:
                    out = aihf_reward_loss(empty, empty, scores[:n], scores[n:], **kw)
                self.backward_micro(out.total, sync=i == len(chunks) - 1)
                total += out.total.detach()
                terms[kind] += float(out.demonstration if kind == "demo" else out.preference)
                correct[kind] += float((scores[:n] > scores[n:]).float().sum())
            grad_norm = self.optimizer_update(total, role="reward")
            self.reward_steps_done += 1
            stats = {"reward/loss": float(total), "reward/demo_term": terms["demo"],
                     "reward/preference_term": terms["pref"], "reward/grad_norm": float(grad_norm)}
            if N:
                stats["reward/demo_accuracy"] = correct["demo"] / N
            if B:
                stats["reward/preference_accuracy"] = correct["pref"] / B
        self.reward_model.eval()
        if self.reward_moments == "reset":  # the next iteration must not normalise with an older reward's moments
            self.reward_count.zero_()
            self.reward_mean.zero_()
            self.reward_var.fill_(1.0)
        stats.update({"reward/lr": self.current_lr("reward"), "time/reward_sample": t1 - t0,
                      "time/reward_step": self._sync_time() - t1})
        return stats

    # ------------------------------------------------------------------ the step
    def training_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
        if not isinstance(batch, dict):
            raise ValueError("AIHFModule reads several data streams (prompts, preferences, demonstrations): use "
                             "data: MultiStreamDataModule")
        prompts: PromptBatch = batch[self.prompt_stream]
        # one PPO iteration (with its ptx stream, if any); iteration += 1
        out = super().training_step({"prompts": prompts, "ptx": batch.get("ptx")}, batch_idx)
        if self.iteration % self.policy_iterations_per_reward_step == 0:
            prefs = batch.get(self.preference_stream) if self.w_P > 0 else None
            demos = batch.get(self.demonstration_stream) if self.w_D > 0 else None
            stats = self.reward_step(prefs, demos)
            self.log_dict(stats, on_step=True, on_epoch=False, batch_size=len(prompts))
            out.update({k: torch.tensor(float(v)) for k, v in stats.items()})
        return out

    # ------------------------------------------------------------------ checkpoints and export
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["reward_steps_done"] = self.reward_steps_done

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        self.reward_steps_done = int(checkpoint.get("reward_steps_done", 0))

    def on_fit_end(self) -> None:
        """Export the policy (``export_dir``) and the trained reward model (``export_dir/reward_model``)."""
        super().on_fit_end()
        directory = self.resolved_export_dir()
        if directory is None or any(getattr(cb, "preempted", False) for cb in self.trainer.callbacks):
            return
        if self.trainer.is_global_zero:
            target = str(Path(directory) / "reward_model")
            self.reward_model.save_pretrained(target)
            self.tokenizer.save_pretrained(target)
            log.warning("Exported the reward model to %s", target)
        self.trainer.strategy.barrier("export_reward_model")


__all__ = ["AIHFModule"]
