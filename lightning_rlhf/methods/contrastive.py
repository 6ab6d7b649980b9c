"""Contrastive rewards (spec 4, Shen et al., arXiv 2403.07708): an offline baseline pass, then PPO on ``r - b``.

1. :class:`BaselineSamplerModule`, run with ``python cli.py predict -c configs/contrastive/baseline.yaml``: for
   every RL prompt ``x`` it samples ``k`` responses from the SFT policy (a PPO rollout sampler, ``HFGenerator`` or
   the static-cache engine, with the same sampling settings), scores them with the PPO reward source (reward model or rule-based function)
   and stores ``b(x) = agg_j r(x, y_j)`` keyed by the stable prompt id in one file (jsonl, or parquet by extension).
2. :class:`ContrastivePPOModule`: PPO whose sequence score becomes ``s_cr = r(x, y) - b(x)`` before the running
   reward normalisation (the ``transform_scores`` hook of :class:`~lightning_rlhf.methods.ppo.PPOModule`).

The offline pass is the policy-samples pass (:mod:`lightning_rlhf.methods.policy_samples`: per-prompt seeds, part
files per rank, resume, ranks; an interrupted-and-resumed pass writes the same bytes as an uninterrupted one) whose
merge aggregates each prompt's stored raw scores, so re-running with another ``agg`` only re-merges.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any, Literal, Optional

import torch

from lightning_rlhf.contrastive import AGGREGATIONS, Aggregation, baseline_record, read_baselines, write_baseline_file
from lightning_rlhf.methods.base import check_choice
from lightning_rlhf.methods.policy_samples import PolicySamplesModule
from lightning_rlhf.methods.ppo import PPOModule
from lightning_rlhf.rollout.experience import Experience

log = logging.getLogger(__name__)

MissingBaseline = Literal["fallback", "error"]


class BaselineSamplerModule(PolicySamplesModule):
    """Offline step of contrastive rewards: ``k`` SFT samples per prompt, scored, aggregated into ``b(x)``.

    The policy-samples pass (:class:`~lightning_rlhf.methods.policy_samples.PolicySamplesModule`: sampling, seeds,
    part files, resume, ranks) with a reward source required and a merge that writes the baseline file instead of the
    sample set. Run it with ``trainer.predict`` (``python cli.py predict -c configs/contrastive/baseline.yaml``); the
    prompts are the data module's training prompts (``PromptDataModule.predict_dataloader``), i.e. the RL prompts of
    the PPO run. Nothing is trained. Output: one record per prompt, sorted by ``prompt_id``
    (``{"prompt_id", "baseline", "count", "scores", "agg"}``, plus ``quantile_q`` for ``agg: quantile``). The part
    files hold the sampled responses too, so they also merge into a sample-set file.

    Args:
        output_path: The baseline file (``.jsonl``; ``.parquet`` writes parquet). Part files of the resumable pass go
            to ``<output_path>.parts/`` and are kept, so a re-run only re-merges (e.g. with another ``agg``).
        num_samples: ``k``, responses sampled per prompt.
        agg: Aggregation of the ``k`` scores: ``mean``, ``median``, ``max`` or ``quantile`` (with ``quantile_q``).
        quantile_q: The quantile for ``agg: quantile``, in ``[0, 1]``.
        reward_model_name_or_path: Reward model folder, as in PPO (exactly one of this and ``reward_fn``).
        reward_fn: Rule-based reward ``{class_path, init_args}``, as in PPO.
        max_new_tokens: Response length cap (use the PPO run's value).
        temperature: Sampling temperature (use the PPO run's value).
        top_p: Nucleus sampling (use the PPO run's value).
        top_k: Top-k sampling, 0 = off (use the PPO run's value).
        seed: Base seed; the samples of a prompt are drawn with a seed hashed from ``(seed, prompt_id)``.
        rollout_engine: ``hf`` or ``static``, as in the policy-samples pass (the two draw different samples, so a
            pass must be finished with the engine it started with).
        overwrite: Delete the part files of an earlier pass and start over (otherwise finished prompts are skipped;
            the earlier pass must have used the same model, reward and sampling settings, or the start fails).
    """

    requires_reward = True
    pass_name = "contrastive-baseline"

    def __init__(
        self,
        output_path: str = "runs/contrastive/baseline.jsonl",
        num_samples: int = 4,
        agg: Aggregation = "mean",
        quantile_q: float = 0.5,
        reward_model_name_or_path: Optional[str] = None,
        reward_fn: Optional[dict[str, Any]] = None,
        max_new_tokens: int = 64,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int = 0,
        rollout_engine: Literal["hf", "static"] = "hf",
        overwrite: bool = False,
        **kwargs: Any,
    ) -> None:
        if agg not in AGGREGATIONS:
            raise ValueError(f"model.agg must be one of {'|'.join(AGGREGATIONS)}, got {agg!r}")
        if not 0.0 <= quantile_q <= 1.0:
            raise ValueError(f"model.quantile_q must be in [0, 1], got {quantile_q}")
        super().__init__(
            output_path=output_path, num_samples=num_samples, reward_model_name_or_path=reward_model_name_or_path,
            reward_fn=reward_fn, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
            seed=seed, rollout_engine=rollout_engine, overwrite=overwrite, **kwargs,
        )
        self.agg: Aggregation = agg
        self.quantile_q = quantile_q

    def merge(self) -> Path:
        """Merge the part files into the baseline file, aggregating each prompt's scores with ``agg``."""
        records = [baseline_record(pid, [float(s) for s in r["scores"]], self.agg, self.quantile_q)
                   for pid, r in self.part_records(("scores",)).items()]
        return write_baseline_file(self.output_path, records)


class ContrastivePPOModule(PPOModule):
    """PPO with contrastive rewards: the sequence score is ``s_cr = r(x, y) - b(x)`` before reward normalisation.

    ``b(x)`` is read once (in ``setup``) from the file of :class:`BaselineSamplerModule`, keyed by the stable prompt
    id. A prompt without a stored baseline uses the running mean of all raw scores so far (this batch included,
    global over ranks, saved in checkpoints) and is counted; ``on_missing_baseline: error`` raises instead.

    Logged every iteration (rank-reduced), besides PPO's: ``contrastive/baseline_mean`` (mean ``b`` subtracted,
    stored or fallback), ``contrastive/beat_baseline_frac`` (share of rollouts with ``r > b``),
    ``contrastive/shaped_var`` (variance of ``s_cr``, before normalisation), ``contrastive/missing_baseline``
    (rollouts without a stored baseline this iteration) and ``contrastive/missing_baseline_total`` (cumulative).

    Args:
        baseline_path: The baseline file (``.jsonl`` or ``.parquet``). ``null`` or a file that does not exist: every
            prompt falls back to the running mean (with a warning), or the start fails with
            ``on_missing_baseline: error``.
        on_missing_baseline: ``fallback`` (running mean raw score, counted) or ``error`` (raise, naming the prompt
            id and the file).
    """

    def __init__(
        self,
        baseline_path: Optional[str] = None,
        on_missing_baseline: MissingBaseline = "fallback",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        check_choice("on_missing_baseline", on_missing_baseline, ("fallback", "error"))
        self.baseline_path = baseline_path
        self.on_missing_baseline: MissingBaseline = on_missing_baseline
        self._baselines: Optional[dict[str, float]] = None
        # running sums of the raw scores (all ranks) for the fallback baseline, and the cumulative missing count
        self.register_buffer("raw_score_sum", torch.zeros((), dtype=torch.float64))
        self.register_buffer("raw_score_count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("missing_baseline_total", torch.zeros((), dtype=torch.float64))

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage == "fit":
            self.load_baselines()

    def load_baselines(self) -> dict[str, float]:
        """``{prompt_id: b(x)}`` from ``baseline_path`` (read once; validated, errors name the file and line)."""
        if self._baselines is not None:
            return self._baselines
        path = self.baseline_path
        if path is None or not Path(path).exists():
            what = "model.baseline_path is not set" if path is None else f"baseline file {path} does not exist"
            if self.on_missing_baseline == "error":
                raise FileNotFoundError(
                    f"{what}: run the baseline pass first (python cli.py predict -c configs/contrastive/baseline.yaml)"
                    " or set model.on_missing_baseline: fallback"
                )
            warnings.warn(f"{what}: every prompt falls back to the running mean score (plain mean-centred PPO, "
                          "not contrastive); run the baseline pass first", stacklevel=2)
            self._baselines = {}
        else:
            self._baselines = read_baselines(path)
            log.info("Loaded %d contrastive baselines from %s", len(self._baselines), path)
        return self._baselines

    def transform_scores(self, scores: torch.Tensor, experience: Experience) -> torch.Tensor:
        """``s_cr = scores - b(prompt_id)`` ``(B,)``; fills ``experience.extras`` with ``baseline`` ``(B,)``,
        ``missing_baseline`` ``(B,)`` bool and ``contrastive_scores`` ``(B,)``."""
        baselines = self.load_baselines()
        prompt_ids = list(experience.extras["prompt_ids"])
        if len(prompt_ids) != scores.shape[0]:
            raise ValueError(f"{len(prompt_ids)} prompt ids for {scores.shape[0]} scores")
        missing = torch.tensor([pid not in baselines for pid in prompt_ids], device=scores.device)  # (B,)
        n, s, n_missing = self._global_sums([scores.new_tensor(float(scores.numel())), scores.sum(), missing.sum()])
        if n_missing > 0 and self.on_missing_baseline == "error":  # every rank raises together
            local = [pid for pid in prompt_ids if pid not in baselines]
            first = f"prompt id {local[0]!r}" if local else "a prompt id on another rank"
            raise KeyError(
                f"No contrastive baseline for {first} ({int(n_missing)} of {int(n)} rollouts this iteration) in "
                f"{self.baseline_path}; re-run the baseline pass on these prompts or set model.on_missing_baseline: "
                "fallback"
            )
        self.raw_score_sum += s
        self.raw_score_count += n
        self.missing_baseline_total += n_missing
        fallback = float(self.raw_score_sum / self.raw_score_count.clamp_min(1.0))
        baseline = torch.tensor([baselines.get(pid, fallback) for pid in prompt_ids], dtype=scores.dtype,
                                device=scores.device)  # (B,)
        shaped = scores - baseline  # (B,)
        experience.extras["baseline"] = baseline
        experience.extras["missing_baseline"] = missing
        experience.extras["contrastive_scores"] = shaped
        return shaped

    def contrastive_statistics(self, exp: Experience) -> dict[str, float]:
        """The contrastive metrics of a rollout batch, reduced across ranks in one all-reduce."""
        baseline, shaped = exp.extras["baseline"], exp.extras["contrastive_scores"]
        n, b_sum, beat, s_sum, s_sq, missing = self._global_sums([
            baseline.new_tensor(float(len(exp))), baseline.sum(), (exp.scores > baseline).sum(), shaped.sum(),
            (shaped.double() ** 2).sum(), exp.extras["missing_baseline"].sum(),
        ])
        n = max(n, 1.0)
        mean = s_sum / n
        return {
            "contrastive/baseline_mean": b_sum / n,
            "contrastive/beat_baseline_frac": beat / n,
            "contrastive/shaped_var": max(s_sq / n - mean**2, 0.0) * n / max(n - 1, 1),
            "contrastive/missing_baseline": missing,
            "contrastive/missing_baseline_total": float(self.missing_baseline_total),
        }

    def rollout_statistics(self, exp: Experience, upd: dict[str, float], t_update: float) -> dict[str, float]:
        """PPO's statistics plus the contrastive ones."""
        stats = super().rollout_statistics(exp, upd, t_update)
        stats.update(self.contrastive_statistics(exp))
        return stats
