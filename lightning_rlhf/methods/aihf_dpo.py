"""AIHF-DPO and Self-Play AIHF (spec 5, variant B): preferences and demonstrations in one stage, implicit reward.

Li et al., "Joint Reward and Policy Learning with Demonstrations and Human Feedback Improves Alignment" (arXiv
2406.06874). With the implicit reward ``r = beta log(pi / pi_ref)`` the joint objective is

``L = w_P * mean_P l_DPO(y_w, y_l) + w_D * mean_D l_demo(y_E)``

over a preference stream ``P`` and a demonstration stream ``D`` read together. ``demo_term``:

* ``spin`` (Self-Play AIHF):
  ``l_demo = -log sigmoid(beta [(log pi(y_E) - log pi_t(y_E)) - (log pi(y~) - log pi_t(y~))])``
  with ``y~ ~ pi_t`` sampled on the demonstration's prompt. The opponent ``pi_t`` is a snapshot of the policy
  (``lightning_rlhf/models/roles.py``) refreshed at the start of every round of ``round_steps`` training steps; it is
  saved in checkpoints, so a resumed run continues with the same opponent.
* ``nll``: ``l_demo = -log pi(y_E)`` (the summed log-likelihood of the demonstration).

``w_D = 0`` is DPO (the same loss and gradients as :class:`~lightning_rlhf.methods.dpo.DPOModule` on the same batch);
``w_P = 0`` with ``spin`` is SPIN.

One training step: (1) refresh the opponent when a round starts; (2) sample ``y~`` from the opponent for the
demonstration prompts (one batched call of the rollout engine); (3) the DPO term on the preference pairs, exactly as
``DPOModule`` computes it, scaled by ``w_P``; (4) the demonstration term over its micro-batches, scaled by ``w_D``;
(5) one optimizer step.
"""

from __future__ import annotations

import time
from typing import Any, Literal, Optional, Union

import torch

from lightning_rlhf.data.batches import PreferenceBatch, TokenBatch
from lightning_rlhf.losses.aihf import DemoTerm, nll_demo_loss, spin_loss
from lightning_rlhf.methods.dpo import DPOModule
from lightning_rlhf.methods.base import check_choice
from lightning_rlhf.rollout.engine import StaticCacheGenerator, build_generator
from lightning_rlhf.rollout.generation import GenerationOutput, HFGenerator

RolloutEngine = Literal["hf", "static"]


def demonstration_pairs(demos: TokenBatch, samples: GenerationOutput, pad_token_id: int) -> PreferenceBatch:
    """The demonstrations and the samples drawn on their prompts as ``N`` pairs (``y_E`` chosen, ``y~`` rejected).

    The two kinds of rows keep their own padding (positions are derived from the attention mask, so the side does not
    matter); both are right-padded to one width.

    Args:
        demos: ``N`` demonstrations (prompt + ``y_E``; ``loss_mask`` on the response).
        samples: one sampled response per demonstration prompt (left-padded prompt + response).
        pad_token_id: Fill id for the extra columns.

    Returns:
        :class:`PreferenceBatch` with ``2N`` rows: ``0..N-1`` the demonstrations, ``N..2N-1`` the samples.
    """
    P = samples.prompt_length
    sample_loss = torch.zeros_like(samples.attention_mask)
    sample_loss[:, P:] = samples.action_mask
    width = max(demos.input_ids.shape[1], samples.sequences.shape[1])

    def widen(t: torch.Tensor, value: int) -> torch.Tensor:
        return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value)

    return PreferenceBatch(
        input_ids=torch.cat([widen(demos.input_ids, pad_token_id), widen(samples.sequences, pad_token_id)]),
        attention_mask=torch.cat([widen(demos.attention_mask.long(), 0), widen(samples.attention_mask.long(), 0)]),
        loss_mask=torch.cat([widen(demos.loss_mask.long(), 0), widen(sample_loss.long(), 0)]),
        domain_ids=demos.domain_ids,
    )


class AIHFDPOModule(DPOModule):
    """AIHF-DPO / Self-Play AIHF: DPO on preference pairs plus a demonstration term, in one stage (spec 5, B).

    Reads a preference stream and a demonstration stream in one run (``MultiStreamDataModule``; the train batch is a
    ``dict`` keyed by stream name). With ``w_D = 0`` a plain preference batch is accepted and the module is DPO.

    Logged (besides DPO's): ``train/preference_loss``, ``train/demo_loss``, ``train/demo_accuracy`` (``spin``: share
    of demonstrations the policy prefers to the opponent's sample, relative to the opponent), ``train/demo_margin``,
    ``train/sample_length``, ``train/opponent_taken_at``, and the phase times ``time/sample``, ``time/policy_step``.

    Args:
        w_P: Weight of the preference (DPO) term.
        w_D: Weight of the demonstration term; 0 turns the module into DPO.
        demo_term: ``spin`` (self-play against the opponent snapshot; Self-Play AIHF) or ``nll`` (``-log pi(y_E)``).
        round_steps: ``spin``: refresh the opponent with the policy's weights every this many training steps (before
            steps ``0, round_steps, 2 * round_steps, ...``).
        preference_stream: Name of the preference stream in the train batch.
        demonstration_stream: Name of the demonstration stream in the train batch.
        max_new_tokens: ``spin``: length cap of the opponent's samples.
        temperature: ``spin``: sampling temperature of the opponent.
        top_p: ``spin``: nucleus sampling of the opponent (1.0: the full distribution).
        top_k: ``spin``: top-k sampling of the opponent (0: off).
        rollout_engine: ``static`` (``lightning_rlhf.rollout.engine``; own decode loop, the fast path) or ``hf``
            (``model.generate``).
        seed: Base seed of the opponent's sampling (per rank and step: a resumed run draws the same samples).
        demo_micro_batch_size: Demonstrations per micro-batch of the demonstration term (each is 2 sequences for
            ``spin``); ``null``: ``model.micro_batch_size``.
        beta, ref_model_name_or_path, loss_type, label_smoothing, padding_free, lr, micro_batch_size: as in
            :class:`~lightning_rlhf.methods.dpo.DPOModule` (``beta`` is shared by both terms).
    """

    def __init__(
        self,
        w_P: float = 1.0,
        w_D: float = 1.0,
        demo_term: DemoTerm = "spin",
        round_steps: int = 50,
        preference_stream: str = "preferences",
        demonstration_stream: str = "demonstrations",
        max_new_tokens: int = 64,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        rollout_engine: RolloutEngine = "static",
        seed: int = 0,
        demo_micro_batch_size: Optional[int] = None,
        **kwargs: Any,
    ) -> None:
        if kwargs.get("precompute_ref_logprobs"):
            raise ValueError("model.precompute_ref_logprobs is not supported by AIHFDPOModule (it caches one "
                             "preference data module's pairs); set it to false.")
        super().__init__(**kwargs)
        if w_P < 0 or w_D < 0 or w_P + w_D == 0:
            raise ValueError(f"model.w_P and model.w_D must be >= 0 and not both 0, got w_P={w_P}, w_D={w_D}")
        check_choice("demo_term", demo_term, ("spin", "nll"))
        if round_steps < 1:
            raise ValueError(f"model.round_steps must be >= 1, got {round_steps}")
        if demo_micro_batch_size is not None and demo_micro_batch_size < 1:
            raise ValueError(f"model.demo_micro_batch_size must be >= 1 or null, got {demo_micro_batch_size}")
        check_choice("rollout_engine", rollout_engine, ("hf", "static"))
        self.w_P = float(w_P)
        self.w_D = float(w_D)
        self.demo_term: DemoTerm = demo_term
        self.round_steps = round_steps
        self.preference_stream = preference_stream
        self.demonstration_stream = demonstration_stream
        self.seed = seed
        self.demo_micro_batch_size = demo_micro_batch_size
        self.rollout_engine = rollout_engine
        self.save_hyperparameters()
        self.uses_opponent = self.w_D > 0 and demo_term == "spin"
        #: the opponent pi_t: a snapshot of the policy (models/roles.py), saved in checkpoints
        self.snapshot_roles = {"opponent": "policy"} if self.uses_opponent else {}
        self.generator: Optional[Union[HFGenerator, StaticCacheGenerator]] = None
        if self.uses_opponent:
            self.generator = build_generator(
                rollout_engine, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                do_sample=True, eos_token_id=self.tokenizer.eos_token_id, pad_token_id=self.tokenizer.pad_token_id,
            )
        self.last_demo_pairs: Optional[PreferenceBatch] = None  # the latest step's (y_E, y~) pairs, for inspection

    # ------------------------------------------------------------------ start-time checks
    @property
    def required_streams(self) -> tuple[str, ...]:
        """The data streams the weighted terms read (``MultiStreamDataModule`` checks that they are declared)."""
        return tuple(name for name, w in ((self.preference_stream, self.w_P), (self.demonstration_stream, self.w_D))
                     if w > 0)

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage == "fit" and self._trainer is not None:
            self.check_streams(self.trainer.datamodule)

    def check_streams(self, dm: Any) -> None:
        """Fail, naming the flag, when a term with a positive weight has no stream in the data module (without a data
        module, e.g. loaders passed to ``fit``, the first train batch is checked instead)."""
        if self.w_D == 0 or dm is None:
            return
        names = _stream_names(dm)
        if self.demonstration_stream not in names:
            have = f"streams {', '.join(names)} ({type(dm).__name__})" if names else f"a {type(dm).__name__}"
            raise ValueError(
                f"model.w_D={self.w_D} needs a demonstration stream named {self.demonstration_stream!r} in the data "
                f"(data: MultiStreamDataModule with streams {self.preference_stream} and {self.demonstration_stream}); "
                f"the data has {have}. Add the stream, or set model.w_D: 0 (plain DPO)."
            )
        if self.w_P > 0 and self.preference_stream not in names:
            raise ValueError(
                f"model.w_P={self.w_P} needs a preference stream named {self.preference_stream!r} in the data "
                f"(streams: {', '.join(names)}); add it or set model.w_P: 0 (demonstrations only)."
            )

    # ------------------------------------------------------------------ the opponent
    def rollout_seed(self) -> int:
        """Seed of this step's sampling on this rank (same on resume)."""
        rank = self.global_rank if self._trainer is not None else 0
        return (self.seed * 1_000_003 + self.iteration * 7_919 + rank * 104_729) % (2**62)

    def maybe_refresh_opponent(self) -> bool:
        """Copy the policy into the opponent when a round starts (``iteration % round_steps == 0``)."""
        if not self.uses_opponent or self.iteration % self.round_steps:
            return False
        self.opponent.refresh(self.policy, self.iteration)
        return True

    @torch.no_grad()
    def sample_from_opponent(self, demos: TokenBatch) -> GenerationOutput:
        """One response ``y~ ~ pi_t`` per demonstration prompt: one batched call of the rollout engine."""
        if demos.prompt_input_ids is None or demos.prompt_attention_mask is None:
            raise ValueError("model.demo_term: spin samples on the demonstrations' prompts, but the demonstration "
                             "batch has no prompt_input_ids (use DemonstrationDataModule)")
        return self.generator.generate(self.opponent.model, demos.prompt_input_ids, demos.prompt_attention_mask,
                                       seed=self.rollout_seed())

    # ------------------------------------------------------------------ the two terms
    def split_batch(self, batch: Union[PreferenceBatch, dict[str, Any]]) -> tuple[Optional[PreferenceBatch],
                                                                                   Optional[TokenBatch]]:
        """``(preference batch, demonstration batch)`` of a train batch; a term whose weight is 0 gets ``None``."""
        if isinstance(batch, PreferenceBatch):
            if self.w_D > 0:
                raise ValueError(f"model.w_D={self.w_D} needs a demonstration stream, but the train batch is a single "
                                 "PreferenceBatch; use MultiStreamDataModule or set model.w_D: 0.")
            return batch, None
        prefs = batch.get(self.preference_stream) if self.w_P > 0 else None
        demos = batch.get(self.demonstration_stream) if self.w_D > 0 else None
        if self.w_P > 0 and prefs is None:
            raise ValueError(f"the train batch has no {self.preference_stream!r} stream (model.preference_stream); "
                             f"streams: {sorted(batch)}")
        if self.w_D > 0 and demos is None:
            raise ValueError(f"the train batch has no {self.demonstration_stream!r} stream "
                             f"(model.demonstration_stream); streams: {sorted(batch)}")
        return prefs, demos

    def preference_backward(self, prefs: PreferenceBatch, last: bool) -> dict[str, torch.Tensor]:
        """``w_P *`` the DPO term, backpropagated micro-batch by micro-batch exactly as ``DPOModule.training_step``."""
        B = prefs.num_pairs
        chunks = self.micro_batches(B)
        total = torch.zeros((), device=self.device)
        hs, chosen, rejected = [], [], []
        for i, (s, e) in enumerate(chunks):
            out = self.dpo_outputs(prefs.slice(s, e), "train")
            loss = out.losses.sum() / B
            self.backward_micro(self.w_P * loss if self.w_P != 1.0 else loss, sync=last and i == len(chunks) - 1)
            total += loss.detach()
            hs.append(out.logits.detach())
            chosen.append(out.chosen_rewards)
            rejected.append(out.rejected_rewards)
        return {"loss": total, "logits": torch.cat(hs), "chosen": torch.cat(chosen), "rejected": torch.cat(rejected)}

    def demo_backward(self, demos: TokenBatch, samples: Optional[GenerationOutput],
                      last: bool) -> dict[str, torch.Tensor]:
        """``w_D *`` the demonstration term (mean over the ``N`` demonstrations), backpropagated by micro-batch."""
        N = len(demos)
        size = self.demo_micro_batch_size or self.micro_batch_size or N
        chunks = [(s, min(s + size, N)) for s in range(0, N, size)]
        total = torch.zeros((), device=self.device)
        logits = []
        pairs = None
        if samples is not None:
            pairs = demonstration_pairs(demos, samples, int(self.tokenizer.pad_token_id))
            self.last_demo_pairs = pairs
        for i, (s, e) in enumerate(chunks):
            if pairs is not None:
                mb = pairs.slice(s, e)
                n = mb.num_pairs
                logps = self.sequence_logps(self.policy, mb)  # (2n,)
                with torch.no_grad():
                    opp = self.sequence_logps(self.opponent, mb)  # (2n,)
                out = spin_loss(logps[:n], logps[n:], opp[:n], opp[n:], beta=self.beta)
                losses = out.losses
                logits.append(out.logits.detach())
            else:
                losses = nll_demo_loss(self.sequence_logps(self.policy, demos.slice(s, e)))
            loss = losses.sum() / N
            self.backward_micro(self.w_D * loss, sync=last and i == len(chunks) - 1)
            total += loss.detach()
        out = {"loss": total}
        if logits:
            out["logits"] = torch.cat(logits)
        return out

    # ------------------------------------------------------------------ the step
    def training_step(self, batch: Union[PreferenceBatch, dict[str, Any]], batch_idx: int) -> torch.Tensor:
        self.policy.train()
        prefs, demos = self.split_batch(batch)
        refreshed = self.maybe_refresh_opponent()
        t0 = time.perf_counter()
        samples = self.sample_from_opponent(demos) if demos is not None and self.uses_opponent else None
        t1 = time.perf_counter()
        total = torch.zeros((), device=self.device)
        pref = demo = None
        if prefs is not None:
            pref = self.preference_backward(prefs, last=demos is None)
            total = total + (self.w_P * pref["loss"] if self.w_P != 1.0 else pref["loss"])
        if demos is not None:
            demo = self.demo_backward(demos, samples, last=True)
            total = total + self.w_D * demo["loss"]
        grad_norm = self.optimizer_update(total)  # skips (or stops on) a non-finite loss / gradient
        t2 = time.perf_counter()
        self.iteration += 1
        if self.is_logging_step():
            metrics: dict[str, Any] = {"train/loss": total, "train/grad_norm": grad_norm, "train/lr": self.current_lr(),
                                       "time/sample": t1 - t0, "time/policy_step": t2 - t1}
            progress: dict[str, Any] = {"loss": total}
            if pref is not None:
                h, cr, rr = pref["logits"], pref["chosen"], pref["rejected"]
                acc = (h > 0).float().mean()
                metrics.update({"train/preference_loss": pref["loss"], "train/reward_accuracy": acc,
                                "train/chosen_reward": cr.mean(), "train/rejected_reward": rr.mean(),
                                "train/margin": (cr - rr).mean()})
                progress["acc"] = acc
            if demo is not None:
                metrics["train/demo_loss"] = demo["loss"]
                if "logits" in demo:
                    metrics["train/demo_accuracy"] = (demo["logits"] > 0).float().mean()
                    metrics["train/demo_margin"] = demo["logits"].mean()
            if samples is not None:
                metrics["train/sample_length"] = samples.action_mask.sum(-1).float().mean()
            if self.uses_opponent:
                metrics["train/opponent_taken_at"] = float(self.opponent.taken_at)
                metrics["train/opponent_refreshed"] = float(refreshed)
            batch_size = prefs.num_pairs if prefs is not None else len(demos)
            self.log_train_step(metrics, progress, batch_size=batch_size)
        return total

    def validation_step(self, batch: Union[PreferenceBatch, dict[str, Any]], batch_idx: int) -> None:
        if isinstance(batch, dict):
            batch = batch[self.preference_stream]
        super().validation_step(batch, batch_idx)


def _stream_names(dm: Any) -> list[str]:
    """Names of the train streams of a data module: a multi-stream module's names, or its one ``kind``."""
    if dm is None:
        return []
    for attr in ("stream_names", "streams"):
        value = getattr(dm, attr, None)
        if value:
            return list(value.keys()) if isinstance(value, dict) else list(value)
    kind = getattr(dm, "kind", None)
    return [kind] if kind else []


__all__ = ["AIHFDPOModule", "demonstration_pairs"]
