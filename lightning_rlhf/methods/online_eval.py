"""Held-out evaluation of online methods (PPO and every module built on it): what the policy does on fixed prompts.

Lightning's validation loop runs every ``trainer.val_check_interval`` training steps (one PPO iteration each) over
the prompt data module's validation split (``data.val_path``, the built-in test split, or ``data.val_fraction`` of
the training prompts; ``data.max_val_rows`` caps it). Each validation batch is

1. sampled with seeds that depend only on ``val_seed`` and the prompt ids (:func:`validation_seed`): the same weights
   give the same responses whatever the iteration, the training seed or the rank (``val_greedy`` decodes greedily);
2. scored with the training reward source and with every judge of ``eval_rewards`` (reward sources that training
   never sees: a reward model path or a ``{class_path, init_args}`` reward function);
3. scored by the policy and the frozen reference for the per-sequence KL (the training ``kl_estimator``, summed over
   response tokens).

Sums and counts (never per-rank means) are all-reduced over ranks at the end of the pass; logged:
``val/score`` (mean training reward), ``val/score/<domain>``, ``val/kl``, ``val/response_length``,
``val/no_eos_frac``, ``val/judge/<name>`` and ``val/judge/<name>/<domain>``.
``ModelCheckpoint(monitor="val/score", mode="max")`` selects by it; with ``val_check_interval: 1`` also set its
``save_on_train_epoch_end: false`` (Lightning reads an interval of 1 as "once per epoch" and would otherwise save only
at the end of the training epoch, with the last pass's value).

Under DDP, Lightning's distributed sampler pads the validation split to a multiple of the world size by repeating
a few prompts; those repeats are counted (at most ``world_size - 1`` rows).

:class:`OnlineEvaluator` holds the state; a module calls :meth:`OnlineEvaluator.validation_step` from its
``validation_step`` and logs :meth:`OnlineEvaluator.compute_and_reset` in ``on_validation_epoch_end``. The module
provides ``policy``, ``reference``, ``reward_source``, ``tokenizer``, ``generator``, ``kl_estimator``,
``temperature`` and ``domain_names()`` (see :class:`~lightning_rlhf.methods.ppo.PPOModule`).
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Mapping, Optional, Union

import torch

from lightning_rlhf.contrastive import prompt_seed, sample_seed
from lightning_rlhf.data.batches import PromptBatch
from lightning_rlhf.losses.ppo import kl_penalty
from lightning_rlhf.rewards import RewardSource, build_reward_source
from lightning_rlhf.rollout.maker import response_logits, reward_input, wrap_generation
from lightning_rlhf.rollout.scoring import token_logprobs

log = logging.getLogger(__name__)

#: a judge: a reward-model folder / hub id, or ``{class_path, init_args}`` of a reward function
RewardSpec = Union[str, dict[str, Any]]
ReduceFn = Callable[[torch.Tensor], torch.Tensor]


def check_eval_rewards(eval_rewards: Optional[Mapping[str, RewardSpec]]) -> dict[str, RewardSpec]:
    """Validate ``model.eval_rewards`` (``{name: reward model path | {class_path, init_args}}``); returns a copy."""
    if eval_rewards is None:
        return {}
    if not isinstance(eval_rewards, Mapping):
        raise ValueError(f"model.eval_rewards must map judge names to reward sources, got {type(eval_rewards).__name__}")
    out: dict[str, RewardSpec] = {}
    for name, spec in eval_rewards.items():
        if not isinstance(name, str) or not name or "/" in name:
            raise ValueError(f"model.eval_rewards: judge names must be non-empty strings without '/', got {name!r}")
        if isinstance(spec, Mapping):
            if "class_path" not in spec:
                raise ValueError(f"model.eval_rewards.{name}: a reward function needs 'class_path' (and optional "
                                 f"'init_args'), got keys {sorted(spec)}")
            out[name] = dict(spec)
        elif isinstance(spec, str) and spec:
            out[name] = spec
        else:
            raise ValueError(f"model.eval_rewards.{name}: expected a reward model path or {{class_path, init_args}}, "
                             f"got {spec!r}")
    return out


def validation_seed(seed: int, prompt_ids: list[str]) -> int:
    """Sampling seed of one validation batch (``model.generate`` draws from one RNG per call): a hash of the base
    seed and the batch's prompt ids, so it depends on which prompts are sampled, never on when."""
    return prompt_seed(seed, "\x1f".join(prompt_ids))


def row_seeds(seed: int, prompt_ids: list[str]) -> torch.Tensor:
    """``(B,)`` per-prompt seeds for the static engine's counter RNG (independent of batch composition too)."""
    return torch.tensor([sample_seed(seed, pid, 0) for pid in prompt_ids], dtype=torch.long)


def response_logprobs(model: torch.nn.Module, sequences: torch.Tensor, attention_mask: torch.Tensor,
                      prompt_length: int, temperature: float = 1.0) -> torch.Tensor:
    """``(B, R)`` log-probs of the response tokens ``sequences[:, P:]`` under ``softmax(logits / temperature)``.

    Args:
        model: a causal LM.
        sequences: ``(B, P+R)`` left-padded prompts and responses.
        attention_mask: ``(B, P+R)``.
        prompt_length: ``P``.
        temperature: the sampling temperature the training log-probs use.
    """
    logits, _ = response_logits(model, sequences, attention_mask, prompt_length, temperature)  # (B, R, V)
    return token_logprobs(logits, sequences[:, prompt_length:])


def summarize(sums: Mapping[str, torch.Tensor], domain_names: list[str], judge_names: list[str],
              reduce_fn: Optional[ReduceFn] = None) -> dict[str, float]:
    """Metrics from per-rank sums, summed over ranks in one all-reduce first (means of the pooled rows).

    Args:
        sums: float64 tensors: ``count``, ``score``, ``kl``, ``length``, ``no_eos`` (scalars), ``domain_count`` and
            ``domain_score`` ``(D,)``, ``judges`` ``(J,)``, ``domain_judges`` ``(J, D)``.
        domain_names: the ``D`` domain labels.
        judge_names: the ``J`` judge names.
        reduce_fn: sum over ranks (``None``: one process).

    Returns:
        ``{"val/score", "val/kl", "val/response_length", "val/no_eos_frac", "val/score/<domain>",
        "val/judge/<name>", "val/judge/<name>/<domain>"}``; empty when no row was evaluated on any rank.
    """
    D, J = len(domain_names), len(judge_names)
    flat = torch.cat([sums["count"].reshape(1), sums["score"].reshape(1), sums["kl"].reshape(1),
                      sums["length"].reshape(1), sums["no_eos"].reshape(1), sums["domain_count"].reshape(D),
                      sums["domain_score"].reshape(D), sums["judges"].reshape(J), sums["domain_judges"].reshape(J * D)])
    if reduce_fn is not None:
        flat = reduce_fn(flat)
    vals = flat.tolist()
    n, score, kl, length, no_eos = vals[:5]
    d_count, d_score, judges = vals[5 : 5 + D], vals[5 + D : 5 + 2 * D], vals[5 + 2 * D : 5 + 2 * D + J]
    d_judges = vals[5 + 2 * D + J :]  # (J, D) row-major
    if n <= 0:
        return {}
    out = {"val/score": score / n, "val/kl": kl / n, "val/response_length": length / n, "val/no_eos_frac": no_eos / n}
    out.update({f"val/score/{d}": s / c for d, c, s in zip(domain_names, d_count, d_score) if c > 0})
    out.update({f"val/judge/{name}": s / n for name, s in zip(judge_names, judges)})
    for j, name in enumerate(judge_names):
        out.update({f"val/judge/{name}/{d}": d_judges[j * D + k] / c
                    for k, (d, c) in enumerate(zip(domain_names, d_count)) if c > 0})
    return out


class OnlineEvaluator:
    """Validation state of an online method: seeds, judges, per-pass sums.

    Args:
        eval_rewards: ``{name: reward source}`` judges scored beside the training reward (``val/judge/<name>``).
        greedy: decode validation responses greedily instead of sampling with the training settings.
        seed: base seed of validation sampling (fixed: independent of ``model.seed`` and of training progress).
    """

    def __init__(self, eval_rewards: Optional[Mapping[str, RewardSpec]] = None, greedy: bool = False,
                 seed: int = 0) -> None:
        self.specs = check_eval_rewards(eval_rewards)
        self.greedy = greedy
        self.seed = int(seed)
        self.judges: Optional[dict[str, RewardSource]] = None  # built on first use (reward models are loaded then)
        self._greedy_generator: Any = None
        self._sums: Optional[dict[str, torch.Tensor]] = None

    # ------------------------------------------------------------------ building
    def _build_judges(self, module: Any) -> dict[str, RewardSource]:
        judges: dict[str, RewardSource] = {}
        for name, spec in self.specs.items():
            is_fn = isinstance(spec, dict)
            source, model = build_reward_source(
                module.tokenizer, None if is_fn else spec, spec if is_fn else None, dtype=module.dtype_name,
                trust_remote_code=module.trust_remote_code, micro_batch_size=self._micro(module),
            )
            if model is not None:
                model.to(module.device)  # frozen and not a submodule: never in checkpoints or the optimizer
            judges[name] = source
        return judges

    def _generator(self, module: Any) -> Any:
        if not self.greedy:
            return module.generator
        if self._greedy_generator is None:
            from lightning_rlhf.rollout.engine import StaticCacheGenerator, build_generator

            g = module.generator
            engine = "static" if isinstance(g, StaticCacheGenerator) else "hf"
            self._greedy_generator = build_generator(
                engine, max_new_tokens=g.max_new_tokens, do_sample=False, eos_token_id=g.eos_token_id,
                pad_token_id=g.pad_token_id, synced_gpus=g.synced_gpus, compile=getattr(g, "compile", False),
            )
        return self._greedy_generator

    @staticmethod
    def _micro(module: Any) -> Optional[int]:
        return getattr(module, "rollout_micro_batch_size", None) or getattr(module, "micro_batch_size", None)

    def _zero_sums(self, device: torch.device, num_domains: int) -> dict[str, torch.Tensor]:
        z = lambda *shape: torch.zeros(*shape, dtype=torch.float64, device=device)  # noqa: E731
        return {"count": z(()), "score": z(()), "kl": z(()), "length": z(()), "no_eos": z(()),
                "domain_count": z(num_domains), "domain_score": z(num_domains), "judges": z(len(self.specs)),
                "domain_judges": z(len(self.specs), num_domains)}

    # ------------------------------------------------------------------ the pass
    @torch.no_grad()
    def validation_step(self, module: Any, batch: PromptBatch) -> dict[str, torch.Tensor]:
        """Sample, score, judge and accumulate one validation batch. Returns its per-row ``scores``, ``kl`` and
        ``judge/<name>`` (``(B,)``) for inspection."""
        from lightning_rlhf.rollout.engine import StaticCacheGenerator

        if self.judges is None:
            self.judges = self._build_judges(module)
        domain_names = module.domain_names()
        if self._sums is None:
            self._sums = self._zero_sums(module.device, len(domain_names))
        prompt_ids = list(batch.prompt_ids)
        gen_engine = self._generator(module)
        if isinstance(gen_engine, StaticCacheGenerator):
            gen = gen_engine.generate(module.policy, batch.input_ids, batch.attention_mask,
                                      row_seeds=row_seeds(self.seed, prompt_ids))
        else:
            gen = gen_engine.generate(module.policy, batch.input_ids, batch.attention_mask,
                                      seed=validation_seed(self.seed, prompt_ids))
        P = gen.prompt_length
        mask = gen.action_mask.float()  # (B, R)
        # per-sequence KL to the reference on the sampled tokens (the training estimator), micro-batched
        B = gen.sequences.shape[0]
        size = self._micro(module) or B
        was_training = module.policy.training
        module.policy.eval()
        try:
            kl_rows = []
            for s in range(0, B, size):
                seq, am = gen.sequences[s : s + size], gen.attention_mask[s : s + size]
                lp = response_logprobs(module.policy, seq, am, P, module.temperature)
                ref = response_logprobs(module.reference, seq, am, P, module.temperature)
                kl_rows.append((kl_penalty(lp, ref, module.kl_estimator) * mask[s : s + size]).sum(-1))
        finally:
            module.policy.train(was_training)
        kl = torch.cat(kl_rows).double()  # (B,)
        sources: list[RewardSource] = [module.reward_source, *self.judges.values()]
        exp = wrap_generation(gen, prompt_ids, list(batch.prompts), list(batch.domains), batch.domain_ids)
        if any(src.needs_text for src in sources):
            exp.extras["responses"] = module.experience_maker.decode_responses(exp)
        inp = reward_input(exp)
        scores = module.reward_source(inp).to(module.device).double().reshape(-1)  # (B,)
        judged = {name: src(inp).to(module.device).double().reshape(-1) for name, src in self.judges.items()}
        sums = self._sums
        sums["count"] += B
        sums["score"] += scores.sum()
        sums["kl"] += kl.sum()
        sums["length"] += mask.sum().double()
        sums["no_eos"] += (~gen.stopped_by_eos.bool()).sum().double().to(module.device)
        domain_ids = batch.domain_ids.to(module.device)
        sums["domain_count"].index_add_(0, domain_ids, torch.ones_like(scores))
        sums["domain_score"].index_add_(0, domain_ids, scores)
        for j, name in enumerate(judged):
            sums["judges"][j] += judged[name].sum()
            sums["domain_judges"][j].index_add_(0, domain_ids, judged[name])
        return {"scores": scores, "kl": kl, **{f"judge/{k}": v for k, v in judged.items()}}

    def compute_and_reset(self, module: Any) -> dict[str, float]:
        """Metrics of the pass (summed over ranks); every rank must call it. Empty when no batch was seen anywhere."""
        domain_names = module.domain_names()
        sums = self._sums if self._sums is not None else self._zero_sums(module.device, len(domain_names))
        self._sums = None
        reduce_fn = None
        trainer = getattr(module, "_trainer", None)
        if trainer is not None and trainer.world_size > 1:
            strategy = trainer.strategy
            reduce_fn = lambda t: strategy.reduce(t, reduce_op="sum")  # noqa: E731
        return summarize(sums, domain_names, list(self.specs), reduce_fn)

    def log(self, module: Any) -> dict[str, float]:
        """:meth:`compute_and_reset` and ``module.log`` the result (``val/score`` in the progress bar)."""
        metrics = self.compute_and_reset(module)
        if metrics:
            # already summed over ranks: every rank logs the same values (no sync_dist needed)
            module.log("val/score", metrics["val/score"], prog_bar=True)
            module.log_dict({k: v for k, v in metrics.items() if k != "val/score"})
        return metrics


__all__ = ["OnlineEvaluator", "check_eval_rewards", "response_logprobs", "row_seeds", "summarize",
           "validation_seed"]
