"""Contrastive rewards (spec 4, Shen et al., arXiv 2403.07708): an offline baseline pass, then PPO on ``r - b``.

1. :class:`BaselineSamplerModule`, run with ``python cli.py predict -c configs/contrastive/baseline.yaml``: for
   every RL prompt ``x`` it samples ``k`` responses from the SFT policy (a PPO rollout sampler, ``HFGenerator`` or
   the static-cache engine, with the same sampling settings), scores them with the PPO reward source (reward model or rule-based function)
   and stores ``b(x) = agg_j r(x, y_j)`` keyed by the stable prompt id in one file (jsonl, or parquet by extension).
2. :class:`ContrastivePPOModule`: PPO whose sequence score becomes ``s_cr = r(x, y) - b(x)`` before the running
   reward normalisation (the ``transform_scores`` hook of :class:`~lightning_rlhf.methods.ppo.PPOModule`).

How the offline pass survives stops and several ranks: each rank appends one fsynced JSON line per finished prompt
(after every batch) to its own part file ``<output>.parts/rank<r>.jsonl``; on start every rank reads all part files
and skips the prompt ids already there; at the end, after a barrier, rank 0 merges the part files into the one
output file, sorted by prompt id, written atomically. With ``rollout_engine: hf`` each prompt's ``k`` samples are
generated together (``k`` copies of the prompt, no padding) from a seed hashed from ``(seed, prompt_id)``; with
``rollout_engine: static`` all unfinished prompts of a batch are generated in one call, every row drawing from a
counter-based RNG keyed by ``(seed, prompt_id, j)``. Either way a prompt's record does not depend on batch
composition, the number of ranks, or on where a previous run stopped (with ``static``: up to the float rounding of
a padded batch): an interrupted-and-resumed pass writes the same bytes as an uninterrupted one. The aggregation is applied at merge
time from the stored raw scores, so re-running with another ``agg`` only re-merges.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import warnings
from pathlib import Path
from typing import Any, Literal, Optional, Union

import torch
from torch import nn

from lightning_rlhf.contrastive import (
    AGGREGATIONS,
    Aggregation,
    BaselineFileError,
    append_records,
    baseline_record,
    prompt_seed,
    sample_seed,
    read_baselines,
    read_part_file,
    repair_part_file,
    write_baseline_file,
)
from lightning_rlhf.data.batches import PromptBatch, pad_sequences
from lightning_rlhf.methods.base import RLHFModule
from lightning_rlhf.methods.ppo import PPOModule
from lightning_rlhf.models.factory import load_causal_lm
from lightning_rlhf.rewards import RewardInput, RewardSource, build_reward_source
from lightning_rlhf.rollout.experience import Experience
from lightning_rlhf.rollout.engine import StaticCacheGenerator, build_generator
from lightning_rlhf.rollout.generation import GenerationOutput, HFGenerator, response_lengths

log = logging.getLogger(__name__)

MissingBaseline = Literal["fallback", "error"]


class BaselineSamplerModule(RLHFModule):
    """Offline step of contrastive rewards: ``k`` SFT samples per prompt, scored, aggregated into ``b(x)``.

    Run it with ``trainer.predict`` (``python cli.py predict -c configs/contrastive/baseline.yaml``); the prompts are
    the data module's training prompts (``PromptDataModule.predict_dataloader``), i.e. the RL prompts of the PPO run.
    Nothing is trained. Output: one record per prompt, sorted by ``prompt_id``
    (``{"prompt_id", "baseline", "count", "scores", "agg"}``, plus ``quantile_q`` for ``agg: quantile``).

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
        rollout_engine: ``hf``: each prompt's ``k`` copies are one ``model.generate`` call (no padding). ``static``:
            all unfinished prompts of a data batch are sampled in one call of the static-cache engine
            (``lightning_rlhf.rollout.engine``), ``k`` left-padded rows each, every row drawing from a counter-based
            RNG keyed by its own seed (``(seed, prompt_id, j)``), so a prompt's samples still do not depend on the
            other prompts of the batch (up to the float rounding of a padded batch); much faster with large batches.
            The two engines draw different samples, so a pass must be finished with the engine it started with.
        overwrite: Delete the part files of an earlier pass and start over (otherwise finished prompts are skipped;
            the earlier pass must have used the same model, reward and sampling settings, or the start fails).
    """

    frozen_modules = ("policy", "reward_model")

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
        kwargs.setdefault("export_dir", None)
        super().__init__(**kwargs)
        if (reward_model_name_or_path is None) == (reward_fn is None):
            raise ValueError("The baseline pass needs exactly one reward source: set model.reward_model_name_or_path "
                             "OR model.reward_fn (the same as the PPO run's)")
        if num_samples < 1:
            raise ValueError(f"model.num_samples must be >= 1, got {num_samples}")
        if agg not in AGGREGATIONS:
            raise ValueError(f"model.agg must be one of {'|'.join(AGGREGATIONS)}, got {agg!r}")
        if not 0.0 <= quantile_q <= 1.0:
            raise ValueError(f"model.quantile_q must be in [0, 1], got {quantile_q}")
        if rollout_engine not in ("hf", "static"):
            raise ValueError(f"model.rollout_engine must be 'hf' or 'static', got {rollout_engine!r}")
        if temperature <= 0:
            raise ValueError(f"model.temperature must be > 0 (the baseline pass samples), got {temperature}")
        self.output_path = output_path
        self.num_samples = num_samples
        self.agg: Aggregation = agg
        self.quantile_q = quantile_q
        self.reward_model_name_or_path = reward_model_name_or_path
        self.reward_fn_spec = reward_fn
        self.seed = seed
        self.overwrite = overwrite
        self.sampling = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k)
        self.save_hyperparameters()
        self.rollout_engine = rollout_engine
        self.generator: Union[HFGenerator, StaticCacheGenerator] = build_generator(
            rollout_engine, **self.sampling, do_sample=True,
            eos_token_id=self.tokenizer.eos_token_id, pad_token_id=self.tokenizer.pad_token_id,
        )
        self.reward_source: Optional[RewardSource] = None
        self._done: set[str] = set()
        #: prompts sampled / skipped (already in a part file) by this process in this run
        self.num_sampled = 0
        self.num_skipped = 0

    # ------------------------------------------------------------------ models
    def build_models(self) -> None:
        """The SFT policy to sample from and the reward source (both frozen)."""
        self.policy = load_causal_lm(
            self.model_name_or_path, dtype=self.dtype_name, trust_remote_code=self.trust_remote_code,
            attn_implementation=self.attn_implementation,
        )
        self.policy.requires_grad_(False).eval()
        self.reward_source, self.reward_model = build_reward_source(
            self.tokenizer, self.reward_model_name_or_path, self.reward_fn_spec, dtype=self.dtype_name,
            trust_remote_code=self.trust_remote_code, micro_batch_size=self.micro_batch_size,
        )

    def export_model(self) -> nn.Module:
        return self.policy

    def configure_optimizers(self) -> Any:
        raise RuntimeError("BaselineSamplerModule is an offline pass: run it with `predict`, not `fit`.")

    # ------------------------------------------------------------------ files
    @property
    def parts_dir(self) -> Path:
        """Folder of the per-rank part files: ``<output_path>.parts``."""
        out = Path(self.output_path)
        return out.with_name(out.name + ".parts")

    def part_file(self, rank: Optional[int] = None) -> Path:
        rank = self._rank() if rank is None else rank
        return self.parts_dir / f"rank{rank:05d}.jsonl"

    def fingerprint(self) -> dict[str, Any]:
        """Settings that decide the raw scores; a resumed pass must match them (``agg`` may change). Not covered:
        the data module's tokenization (chat template, truncation), which must stay the same too."""
        reward = self.reward_model_name_or_path if self.reward_model_name_or_path is not None else self.reward_fn_spec
        precision = str(self.trainer.precision) if self._trainer is not None else None
        found = {"model": self.model_name_or_path, "reward": reward, "num_samples": self.num_samples,
                 "seed": self.seed, "dtype": self.dtype_name, "precision": precision, **self.sampling}
        if self.rollout_engine != "hf":  # (passes from before the engine option used hf and have no key)
            found["rollout_engine"] = self.rollout_engine
        return found

    def _rank(self) -> int:
        return self.trainer.global_rank if self._trainer is not None else 0

    def _barrier(self, name: str) -> None:
        if self._trainer is not None:
            self.trainer.strategy.barrier(name)

    def finished_prompt_ids(self) -> set[str]:
        """Prompt ids already in any part file (of any rank of any earlier run)."""
        done: set[str] = set()
        for part in sorted(self.parts_dir.glob("rank*.jsonl")):
            done.update(r["prompt_id"] for r in read_part_file(part))
        return done

    # ------------------------------------------------------------------ the pass
    def on_predict_start(self) -> None:
        """Prepare the part folder (all ranks): optional wipe, settings check, repair, read what is finished."""
        rank0 = self._rank() == 0
        if self.overwrite and rank0 and self.parts_dir.exists():
            shutil.rmtree(self.parts_dir)
        self._barrier("contrastive-baseline-clean")
        meta_path = self.parts_dir / "meta.json"
        expected = json.loads(json.dumps(self.fingerprint()))  # normalised as it is stored
        if meta_path.exists():
            found = json.loads(meta_path.read_text(encoding="utf-8"))
            if found != expected:
                diff = sorted(k for k in set(found) | set(expected) if found.get(k) != expected.get(k))
                raise ValueError(
                    f"{self.parts_dir} holds samples of a pass with other settings ({', '.join(diff)}: "
                    f"{ {k: found.get(k) for k in diff} } vs now { {k: expected.get(k) for k in diff} }); "
                    "set model.overwrite: true to start over, or another model.output_path"
                )
        self._barrier("contrastive-baseline-meta-read")
        if rank0:
            self.parts_dir.mkdir(parents=True, exist_ok=True)
            if not meta_path.exists():
                meta_path.write_text(json.dumps(expected, indent=1) + "\n", encoding="utf-8")
        self._barrier("contrastive-baseline-meta")
        removed = repair_part_file(self.part_file())
        if removed:
            log.warning("%s: dropped an incomplete last line (%d bytes) left by an interrupted run",
                        self.part_file(), removed)
        self._done = self.finished_prompt_ids()
        self.num_sampled = self.num_skipped = 0
        if self._done and rank0:
            log.warning("Resuming the baseline pass: %d prompts already sampled in %s are skipped",
                        len(self._done), self.parts_dir)
        self._barrier("contrastive-baseline-start")

    @torch.no_grad()
    def sample_prompt(self, input_ids: torch.Tensor, prompt: str, prompt_id: str, domain: str = "") -> list[float]:
        """The ``k`` raw scores of one prompt: ``k`` copies sampled together with the prompt's own seed.

        Args:
            input_ids: ``(P,)`` the prompt's token ids without padding.
            prompt: the prompt text (for text-based rewards).
            prompt_id: its stable id (seeds the sampling).
            domain: its domain label (passed to reward functions that take it).
        """
        k = self.num_samples
        ids = input_ids.reshape(1, -1).expand(k, -1).contiguous()  # (k, P)
        mask = torch.ones_like(ids)
        gen = self.generator.generate(self.policy, ids, mask, seed=prompt_seed(self.seed, prompt_id))
        return self._score_rows(gen, [prompt] * k, [prompt_id] * k, [domain] * k)

    @torch.no_grad()
    def sample_prompts(self, items: list[tuple[torch.Tensor, str, str, str]]) -> list[list[float]]:
        """The ``k`` raw scores of each of several prompts, sampled in one call of the static-cache engine.

        Row ``i * k + j`` holds sample ``j`` of prompt ``i``, left-padded, with its own counter-based seed
        :func:`~lightning_rlhf.contrastive.sample_seed` ``(seed, prompt_id, j)``.

        Args:
            items: ``(input_ids (P_i,) without padding, prompt text, prompt id, domain)`` per prompt.
        """
        assert isinstance(self.generator, StaticCacheGenerator), "sample_prompts needs model.rollout_engine: static"
        k = self.num_samples
        rows = [ids.tolist() for ids, _, _, _ in items for _ in range(k)]
        device = items[0][0].device
        input_ids = pad_sequences(rows, self.tokenizer.pad_token_id, side="left").to(device)
        mask = pad_sequences([[1] * len(r) for r in rows], 0, side="left").to(device)
        seeds = torch.tensor([sample_seed(self.seed, pid, j) for _, _, pid, _ in items for j in range(k)],
                             dtype=torch.long)
        gen = self.generator.generate(self.policy, input_ids, mask, row_seeds=seeds)
        scores = self._score_rows(gen, [p for _, p, _, _ in items for _ in range(k)],
                                  [pid for _, _, pid, _ in items for _ in range(k)],
                                  [d for _, _, _, d in items for _ in range(k)])
        return [scores[i * k : (i + 1) * k] for i in range(len(items))]

    def _score_rows(self, gen: GenerationOutput, prompts: list[str], prompt_ids: list[str],
                    domains: list[str]) -> list[float]:
        """Raw reward of every generated row; a non-finite score stops the pass naming the prompt id."""
        assert self.reward_source is not None, "build_models() was not called"
        texts: list[str] = []
        if self.reward_source.needs_text:
            lengths = response_lengths(gen.action_mask).tolist()
            rows = [r[:n] for r, n in zip(gen.sequences[:, gen.prompt_length :].tolist(), lengths)]
            texts = self.tokenizer.batch_decode(rows, skip_special_tokens=True)
        inp = RewardInput(
            sequences=gen.sequences, attention_mask=gen.attention_mask, prompt_length=gen.prompt_length,
            action_mask=gen.action_mask, prompts=prompts, responses=texts,
            extras={"prompt_ids": prompt_ids, "prompts": prompts, "domains": domains,
                    "stopped_by_eos": gen.stopped_by_eos},
        )
        scores = self.reward_source(inp).float().cpu().tolist()
        for score, pid in zip(scores, prompt_ids):
            if not math.isfinite(score):
                raise ValueError(f"The reward source returned a non-finite score ({score}) for prompt_id {pid!r}")
        return scores

    def predict_step(self, batch: PromptBatch, batch_idx: int, dataloader_idx: int = 0) -> dict[str, int]:
        """Sample and score the batch's unfinished prompts; append their records to this rank's part file.

        Returns:
            ``{"sampled": n, "skipped": m}`` prompts of this batch (the records themselves go to the part file).
        """
        skipped = 0
        items: list[tuple[torch.Tensor, str, str, str]] = []
        pending: set[str] = set()
        for i, pid in enumerate(batch.prompt_ids):
            if pid in self._done or pid in pending:
                skipped += 1
                continue
            pending.add(pid)
            ids = batch.input_ids[i][batch.attention_mask[i].bool()]  # (P_i,) left padding removed
            items.append((ids, batch.prompts[i], pid, batch.domains[i] if i < len(batch.domains) else ""))
        if self.rollout_engine == "static" and items:
            all_scores = self.sample_prompts(items)
        else:
            all_scores = [self.sample_prompt(*item) for item in items]
        records = [{"prompt_id": item[2], "scores": scores} for item, scores in zip(items, all_scores)]
        self._done.update(item[2] for item in items)
        if records:
            self.part_file().parent.mkdir(parents=True, exist_ok=True)
            append_records(self.part_file(), records)
        self.num_sampled += len(records)
        self.num_skipped += skipped
        return {"sampled": len(records), "skipped": skipped}

    def on_predict_end(self) -> None:
        """After a barrier, rank 0 merges every part file into ``output_path`` (sorted by prompt id, atomic)."""
        self._barrier("contrastive-baseline-done")
        if self._rank() == 0:
            path = self.merge()
            log.warning("Baseline file %s written (%d prompts sampled now, %d already done)",
                        path, self.num_sampled, self.num_skipped)
        self._barrier("contrastive-baseline-merged")

    def merge(self) -> Path:
        """Merge the part files into the baseline file, aggregating each prompt's scores with ``agg``."""
        scores: dict[str, list[float]] = {}
        for part in sorted(self.parts_dir.glob("rank*.jsonl")):
            for r in read_part_file(part):
                pid, values = r["prompt_id"], [float(s) for s in r["scores"]]
                if len(values) != self.num_samples:
                    raise BaselineFileError(f"{part}: prompt_id {pid!r} has {len(values)} scores, expected "
                                            f"model.num_samples={self.num_samples}")
                if pid in scores and scores[pid] != values:
                    warnings.warn(f"prompt_id {pid!r} was sampled twice with different scores (non-deterministic "
                                  f"kernels?); keeping the first", stacklevel=2)
                    continue
                scores.setdefault(pid, values)
        records = [baseline_record(pid, s, self.agg, self.quantile_q) for pid, s in scores.items()]
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
        if on_missing_baseline not in ("fallback", "error"):
            raise ValueError(f"model.on_missing_baseline must be 'fallback' or 'error', got {on_missing_baseline!r}")
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
