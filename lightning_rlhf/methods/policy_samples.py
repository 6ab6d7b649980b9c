"""The policy-samples pass: ``k`` responses per prompt from any policy, optionally scored, written to one sample-set
file (:mod:`lightning_rlhf.sample_sets`). Run it with ``python cli.py predict -c configs/policy_samples/tiny.yaml``.

Output: one record per prompt, sorted by ``prompt_id``::

    {"prompt_id": "0a1b...", "prompt": "...", "responses": [k strings], "scores": [k floats], "domain": "..."}

(``scores`` only with a reward source). :class:`~lightning_rlhf.data.modules.SampleSetDataModule` reads it back as
``SampleSetBatch`` (e.g. MetaRM's meta batches); the contrastive baseline pass
(:class:`~lightning_rlhf.methods.contrastive.BaselineSamplerModule`) is this pass with a reward and a merge that
aggregates each prompt's scores into ``b(x)``.

How the pass survives stops and several ranks: each rank appends one fsynced JSON line per finished prompt (after
every batch) to its own part file ``<output>.parts/rank<r>.jsonl``; on start every rank reads all part files and
skips the prompt ids already there (the settings that decide the samples are stored in ``<output>.parts/meta.json``
and must match); at the end, after a barrier, rank 0 merges the part files into the one output file, sorted by
prompt id, written atomically. With ``rollout_engine: hf`` each prompt's ``k`` samples are generated together
(``k`` copies of the prompt, no padding) from a seed hashed from ``(seed, prompt_id)``; with ``rollout_engine:
static`` all unfinished prompts of a batch are generated in one call, every row drawing from a counter-based RNG
keyed by ``(seed, prompt_id, j)``. Either way a prompt's record does not depend on batch composition, the number of
ranks, or on where a previous run stopped (with ``static``: up to the float rounding of a padded batch): an
interrupted-and-resumed pass writes the same bytes as an uninterrupted one.
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

from lightning_rlhf.data.batches import PromptBatch, pad_sequences
from lightning_rlhf.methods.base import RLHFModule, check_choice
from lightning_rlhf.models.factory import load_causal_lm
from lightning_rlhf.rewards import RewardSource, build_reward_source
from lightning_rlhf.rollout.engine import StaticCacheGenerator, build_generator
from lightning_rlhf.rollout.generation import GenerationOutput, HFGenerator
from lightning_rlhf.rollout.maker import ExperienceMaker, wrap_generation
from lightning_rlhf.sample_sets import (
    SampleSetFileError,
    append_records,
    prompt_seed,
    read_part_file,
    repair_part_file,
    sample_seed,
    sample_set_record,
    write_sample_set_file,
)

log = logging.getLogger(__name__)

#: ``(input_ids (P,) without padding, prompt text, prompt id, domain)`` of one prompt to sample
PromptItem = tuple[torch.Tensor, str, str, str]
#: the ``k`` decoded responses of one prompt and their raw scores (``None`` without a reward source)
Samples = tuple[list[str], Optional[list[float]]]


class PolicySamplesModule(RLHFModule):
    """Offline pass: ``k`` samples per prompt from a policy, optionally scored, into one sample-set file.

    Run it with ``trainer.predict`` (``python cli.py predict -c configs/policy_samples/tiny.yaml``); the prompts are
    the data module's training prompts (``PromptDataModule.predict_dataloader``, in order). Nothing is trained.

    Args:
        output_path: The sample-set file (``.jsonl``; ``.parquet`` writes parquet). Part files of the resumable pass
            go to ``<output_path>.parts/`` and are kept, so a re-run only re-merges.
        num_samples: ``k``, responses sampled per prompt.
        reward_model_name_or_path: Reward model folder, as in PPO; with it (or ``reward_fn``) every response is
            scored and the file has ``scores``. At most one of the two.
        reward_fn: Rule-based reward ``{class_path, init_args}``, as in PPO.
        max_new_tokens: Response length cap.
        temperature: Sampling temperature.
        top_p: Nucleus sampling.
        top_k: Top-k sampling, 0 = off.
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
    #: a subclass that needs scores (e.g. the contrastive baseline pass) sets this
    requires_reward: bool = False
    #: name of the pass in messages and barriers
    pass_name: str = "policy-samples"

    def __init__(
        self,
        output_path: str = "runs/policy_samples/samples.jsonl",
        num_samples: int = 4,
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
        if reward_model_name_or_path is not None and reward_fn is not None:
            raise ValueError("Set at most one reward source: model.reward_model_name_or_path OR model.reward_fn")
        if self.requires_reward and reward_model_name_or_path is None and reward_fn is None:
            raise ValueError(f"The {self.pass_name} pass needs exactly one reward source: set "
                             "model.reward_model_name_or_path OR model.reward_fn (the same as the PPO run's)")
        if num_samples < 1:
            raise ValueError(f"model.num_samples must be >= 1, got {num_samples}")
        check_choice("rollout_engine", rollout_engine, ("hf", "static"))
        self.output_path = output_path
        self.num_samples = num_samples
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
        self.experience_maker: Optional[ExperienceMaker] = None
        self._done: set[str] = set()
        #: prompts sampled / skipped (already in a part file) by this process in this run
        self.num_sampled = 0
        self.num_skipped = 0

    @property
    def scored(self) -> bool:
        """Whether responses are scored (a reward source is configured)."""
        return self.reward_model_name_or_path is not None or self.reward_fn_spec is not None

    # ------------------------------------------------------------------ models
    def build_models(self) -> None:
        """The policy to sample from and the reward source, if any (all frozen)."""
        self.policy = load_causal_lm(
            self.model_name_or_path, dtype=self.dtype_name, trust_remote_code=self.trust_remote_code,
            attn_implementation=self.attn_implementation,
        )
        self.policy.requires_grad_(False).eval()
        self.reward_model = None
        if self.scored:
            self.reward_source, self.reward_model = build_reward_source(
                self.tokenizer, self.reward_model_name_or_path, self.reward_fn_spec, dtype=self.dtype_name,
                trust_remote_code=self.trust_remote_code, micro_batch_size=self.micro_batch_size,
            )
        # decoding and scoring as every rollout is decoded and scored (the sampling here is seeded per prompt)
        self.experience_maker = ExperienceMaker(self.generator, self.tokenizer, self.reward_source)

    def export_model(self) -> nn.Module:
        return self.policy

    def configure_optimizers(self) -> Any:
        raise RuntimeError(f"{type(self).__name__} is an offline pass: run it with `predict`, not `fit`.")

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
        """Settings that decide the samples and scores; a resumed pass must match them. Not covered: the data
        module's tokenization (chat template, truncation), which must stay the same too."""
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
            self.trainer.strategy.barrier(f"{self.pass_name}-{name}")

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
        self._barrier("clean")
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
        self._barrier("meta-read")
        if rank0:
            self.parts_dir.mkdir(parents=True, exist_ok=True)
            if not meta_path.exists():
                meta_path.write_text(json.dumps(expected, indent=1) + "\n", encoding="utf-8")
        self._barrier("meta")
        removed = repair_part_file(self.part_file())
        if removed:
            log.warning("%s: dropped an incomplete last line (%d bytes) left by an interrupted run",
                        self.part_file(), removed)
        self._done = self.finished_prompt_ids()
        self.num_sampled = self.num_skipped = 0
        if self._done and rank0:
            log.warning("Resuming the %s pass: %d prompts already sampled in %s are skipped",
                        self.pass_name, len(self._done), self.parts_dir)
        self._barrier("start")

    @torch.no_grad()
    def sample_prompt(self, input_ids: torch.Tensor, prompt: str, prompt_id: str, domain: str = "") -> Samples:
        """The ``k`` responses (and raw scores) of one prompt: ``k`` copies sampled together with its own seed.

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
        return self._finish_rows(gen, [(input_ids, prompt, prompt_id, domain)])[0]

    @torch.no_grad()
    def sample_prompts(self, items: list[PromptItem]) -> list[Samples]:
        """The ``k`` responses (and raw scores) of each of several prompts, in one call of the static-cache engine.

        Row ``i * k + j`` holds sample ``j`` of prompt ``i``, left-padded, with its own counter-based seed
        :func:`~lightning_rlhf.sample_sets.sample_seed` ``(seed, prompt_id, j)``.
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
        return self._finish_rows(gen, items)

    def _finish_rows(self, gen: GenerationOutput, items: list[PromptItem]) -> list[Samples]:
        """Decode the ``len(items) * k`` generated rows (prompt-major) and score them; per prompt
        ``(responses, scores or None)``. A non-finite score stops the pass naming the prompt id."""
        k = self.num_samples
        prompt_ids = [pid for _, _, pid, _ in items for _ in range(k)]
        exp = wrap_generation(gen, prompt_ids, [p for _, p, _, _ in items for _ in range(k)],
                              [d for _, _, _, d in items for _ in range(k)])
        texts = self.experience_maker.decode_responses(exp)
        exp.extras["responses"] = texts
        scores: Optional[list[float]] = None
        if self.reward_source is not None:
            scores = self.experience_maker.score(exp).cpu().tolist()
            for score, pid in zip(scores, prompt_ids):
                if not math.isfinite(score):
                    raise ValueError(f"The reward source returned a non-finite score ({score}) for prompt_id {pid!r}")
        return [(texts[i * k : (i + 1) * k], None if scores is None else scores[i * k : (i + 1) * k])
                for i in range(len(items))]

    def predict_step(self, batch: PromptBatch, batch_idx: int, dataloader_idx: int = 0) -> dict[str, int]:
        """Sample (and score) the batch's unfinished prompts; append their records to this rank's part file.

        Returns:
            ``{"sampled": n, "skipped": m}`` prompts of this batch (the records themselves go to the part file).
        """
        skipped = 0
        items: list[PromptItem] = []
        pending: set[str] = set()
        for i, pid in enumerate(batch.prompt_ids):
            if pid in self._done or pid in pending:
                skipped += 1
                continue
            pending.add(pid)
            ids = batch.input_ids[i][batch.attention_mask[i].bool()]  # (P_i,) left padding removed
            items.append((ids, batch.prompts[i], pid, batch.domains[i] if i < len(batch.domains) else ""))
        if self.rollout_engine == "static" and items:
            samples = self.sample_prompts(items)
        else:
            samples = [self.sample_prompt(*item) for item in items]
        records = [sample_set_record(pid, prompt, responses, scores, domain or "default")
                   for (_, prompt, pid, domain), (responses, scores) in zip(items, samples)]
        self._done.update(item[2] for item in items)
        if records:
            self.part_file().parent.mkdir(parents=True, exist_ok=True)
            append_records(self.part_file(), records)
        self.num_sampled += len(records)
        self.num_skipped += skipped
        return {"sampled": len(records), "skipped": skipped}

    def on_predict_end(self) -> None:
        """After a barrier, rank 0 merges every part file into ``output_path`` (sorted by prompt id, atomic)."""
        self._barrier("done")
        if self._rank() == 0:
            path = self.merge()
            log.warning("%s file %s written (%d prompts sampled now, %d already done)",
                        self.pass_name, path, self.num_sampled, self.num_skipped)
        self._barrier("merged")

    def part_records(self, need: tuple[str, ...]) -> dict[str, dict[str, Any]]:
        """``{prompt_id: record}`` from every part file, each record checked to have ``k`` entries in every field of
        ``need`` (``responses`` and/or ``scores``). A prompt sampled twice with other results keeps the first (with a
        warning)."""
        out: dict[str, dict[str, Any]] = {}
        for part in sorted(self.parts_dir.glob("rank*.jsonl")):
            for r in read_part_file(part):
                pid = r["prompt_id"]
                for field in need:
                    values = r.get(field)
                    if values is None or len(values) != self.num_samples:
                        n = "no" if values is None else len(values)
                        raise SampleSetFileError(f"{part}: prompt_id {pid!r} has {n} {field}, expected "
                                                 f"model.num_samples={self.num_samples}")
                if pid in out and any(out[pid].get(f) != r.get(f) for f in need):
                    warnings.warn(f"prompt_id {pid!r} was sampled twice with different results (non-deterministic "
                                  f"kernels?); keeping the first", stacklevel=2)
                    continue
                out.setdefault(pid, r)
        return out

    def merge(self) -> Path:
        """Merge the part files into the sample-set file."""
        need = ("responses", "scores") if self.scored else ("responses",)
        records = [sample_set_record(pid, r.get("prompt", ""), r["responses"], r.get("scores") if self.scored else None,
                                     r.get("domain") or "default")
                   for pid, r in self.part_records(need).items()]
        return write_sample_set_file(self.output_path, records)
