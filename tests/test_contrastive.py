"""Contrastive rewards (spec 4): the offline baseline pass (aggregates, resume, ranks, file format) and PPO on
``r - b`` (the score used, the missing-baseline fallback / error, metrics), on the built-in tiny Llama (CPU)."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch

from lightning_rlhf.contrastive import (
    BaselineFileError,
    aggregate_scores,
    append_records,
    prompt_seed,
    sample_seed,
    read_baselines,
    read_part_file,
    write_baseline_file,
)
from lightning_rlhf.data import PromptDataModule
from lightning_rlhf.data.batches import PromptBatch
from lightning_rlhf.data.sources import prompt_id
from lightning_rlhf.methods.contrastive import BaselineSamplerModule, ContrastivePPOModule
from lightning_rlhf.models.factory import load_tokenizer
from lightning_rlhf.rewards import TokenCountReward
from lightning_rlhf.rollout.engine import StaticCacheGenerator
from lightning_rlhf.rollout.generation import HFGenerator, response_lengths

REPO = Path(__file__).resolve().parent.parent
TOKEN_REWARD = {"class_path": "lightning_rlhf.rewards.TokenCountReward", "init_args": {"token": "e"}}


pytestmark = pytest.mark.usefixtures("single_thread")


def _sampler(output: Path, **overrides: Any) -> BaselineSamplerModule:
    kwargs: dict[str, Any] = dict(
        model_name_or_path="builtin:tiny-llama", reward_fn=TOKEN_REWARD, output_path=str(output), num_samples=4,
        max_new_tokens=8, seed=0,
    )
    kwargs.update(overrides)
    return BaselineSamplerModule(**kwargs)


def _data(batch_size: int = 4, rows: int = 12) -> PromptDataModule:
    return PromptDataModule(train_path="builtin:hh-rlhf", batch_size=batch_size, max_prompt_length=48,
                            skip_invalid_rows=True, max_train_rows=rows, max_val_rows=4)


def _trainer(tmp_path: Path, **kwargs: Any) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, default_root_dir=tmp_path, **kwargs)


def _predict(module: BaselineSamplerModule, dm: PromptDataModule, tmp_path: Path, **kwargs: Any) -> None:
    _trainer(tmp_path, **kwargs).predict(module, datamodule=dm, return_predictions=False)


def _records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ---------------------------------------------------------------------------------------------------- aggregation
@pytest.mark.parametrize(
    "scores", [[3.0], [1.0, 5.0], [4.0, -1.0, 2.5], [0.1, 0.7, 0.2, 0.9, 0.3], [2.0, 2.0, 7.0, 1.0]]
)
def test_aggregations_match_numpy(scores):
    a = np.asarray(scores)
    assert aggregate_scores(scores, "mean") == pytest.approx(a.mean(), abs=1e-12)
    assert aggregate_scores(scores, "median") == pytest.approx(np.median(a), abs=1e-12)
    assert aggregate_scores(scores, "max") == a.max()
    for q in (0.0, 0.25, 0.5, 0.9, 1.0):
        assert aggregate_scores(scores, "quantile", q) == pytest.approx(np.quantile(a, q), abs=1e-12)


# ---------------------------------------------------------------------------------------------------- offline pass
def test_stored_baselines_are_the_aggregates_of_independently_recomputed_scores(tmp_path):
    out = tmp_path / "baseline.jsonl"
    dm = _data(batch_size=4, rows=8)
    first = _sampler(out)
    _predict(first, dm, tmp_path)
    records = _records(out)
    assert first.num_sampled == len(records) > 0
    assert [r["prompt_id"] for r in records] == sorted(r["prompt_id"] for r in records)

    # the k scores: regenerate two prompts outside the module with the documented seed and score them by hand
    rows = {r["prompt_id"]: r for r in records}
    policy, tok = first.policy, first.tokenizer
    gen = HFGenerator(max_new_tokens=8, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    checked = 0
    for item in dm.train_dataset:
        pid = prompt_id(item["prompt"])
        if pid not in rows or checked == 2:
            continue
        ids = torch.tensor([item["input_ids"]] * 4)
        out_gen = gen.generate(policy, ids, torch.ones_like(ids), seed=prompt_seed(0, pid))
        lengths = response_lengths(out_gen.action_mask).tolist()
        texts = tok.batch_decode([r[:n] for r, n in zip(out_gen.sequences[:, ids.shape[1]:].tolist(), lengths)],
                                 skip_special_tokens=True)
        assert rows[pid]["scores"] == TokenCountReward("e")([item["prompt"]] * 4, texts)
        checked += 1
    assert checked == 2

    # every aggregation: a re-run re-merges the stored scores (nothing is sampled again)
    for agg, q, ref in [("mean", 0.5, np.mean), ("median", 0.5, np.median), ("max", 0.5, np.max),
                        ("quantile", 0.25, lambda a: np.quantile(a, 0.25))]:
        module = _sampler(out, agg=agg, quantile_q=q)
        _predict(module, dm, tmp_path)
        assert module.num_sampled == 0 and module.num_skipped == len(records)
        for r in _records(out):
            assert r["count"] == len(r["scores"]) == 4 and r["agg"] == agg
            assert r["baseline"] == pytest.approx(float(ref(np.asarray(r["scores"]))), abs=1e-12), (agg, r)
        assert read_baselines(out) == {r["prompt_id"]: r["baseline"] for r in _records(out)}

    # parquet by extension: the same baselines
    pq_path = tmp_path / "baseline.parquet"
    records = _records(out)
    write_baseline_file(pq_path, records)
    assert read_baselines(pq_path) == read_baselines(out)


class _Crash(L.Callback):
    """Simulates a kill after the first batch was written (and a second write cut short)."""

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        with open(pl_module.part_file(), "a") as f:
            f.write('{"prompt_id": "half-writ')  # a line cut by the kill
        raise RuntimeError("simulated crash")


def test_stopped_and_resumed_pass_writes_the_same_file_as_an_uninterrupted_one(tmp_path):
    whole = tmp_path / "whole" / "baseline.jsonl"
    _predict(_sampler(whole), _data(batch_size=4, rows=12), tmp_path)

    resumed = tmp_path / "resumed" / "baseline.jsonl"
    with pytest.raises(RuntimeError, match="simulated crash"):
        _predict(_sampler(resumed), _data(batch_size=4, rows=12), tmp_path, callbacks=[_Crash()])
    assert not resumed.exists()  # nothing merged: the run did not finish
    first_batch = read_part_file(resumed.with_name("baseline.jsonl.parts") / "rank00000.jsonl")
    assert len(first_batch) == 4

    # resume with another batch size: finished prompts are skipped, the rest sampled exactly as before
    module = _sampler(resumed)
    _predict(module, _data(batch_size=3, rows=12), tmp_path)
    n = len(_records(whole))
    assert module.num_skipped == 4 and module.num_sampled == n - 4
    assert resumed.read_bytes() == whole.read_bytes()

    # the same parts with other sampling settings are refused, naming the setting and the way out
    with pytest.raises(ValueError, match="seed.*overwrite"):
        _predict(_sampler(resumed, seed=1), _data(batch_size=4, rows=12), tmp_path)


def test_static_engine_batches_prompts_and_each_prompt_still_samples_from_its_own_seed(tmp_path):
    """rollout_engine: static samples all prompts of a batch in one padded call; a prompt's scores equal those of
    that prompt sampled alone from its per-sample seeds, and a crashed pass resumed with another batch size writes the
    same file."""
    whole = tmp_path / "whole" / "baseline.jsonl"
    dm = _data(batch_size=4, rows=12)
    first = _sampler(whole, rollout_engine="static")
    _predict(first, dm, tmp_path)
    rows = {r["prompt_id"]: r for r in _records(whole)}
    assert first.num_sampled == len(rows) > 4

    tok = first.tokenizer
    alone = StaticCacheGenerator(max_new_tokens=8, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    lengths_seen = set()
    for item in dm.train_dataset:
        pid = prompt_id(item["prompt"])
        if pid not in rows:
            continue
        ids = torch.tensor([item["input_ids"]] * 4)
        seeds = torch.tensor([sample_seed(0, pid, j) for j in range(4)])
        gen = alone.generate(first.policy, ids, torch.ones_like(ids), row_seeds=seeds)
        n = response_lengths(gen.action_mask).tolist()
        texts = tok.batch_decode([r[:m] for r, m in zip(gen.sequences[:, ids.shape[1]:].tolist(), n)],
                                 skip_special_tokens=True)
        assert rows[pid]["scores"] == TokenCountReward("e")([item["prompt"]] * 4, texts), pid
        lengths_seen.add(len(item["input_ids"]))
    assert len(lengths_seen) > 1  # prompts of different lengths were padded together in the module

    resumed = tmp_path / "resumed" / "baseline.jsonl"
    with pytest.raises(RuntimeError, match="simulated crash"):
        _predict(_sampler(resumed, rollout_engine="static"), _data(batch_size=4, rows=12), tmp_path,
                 callbacks=[_Crash()])
    module = _sampler(resumed, rollout_engine="static")
    _predict(module, _data(batch_size=5, rows=12), tmp_path)
    assert module.num_skipped == 4
    assert resumed.read_bytes() == whole.read_bytes()
    # the engines draw different samples: finishing the pass with the other engine is refused
    with pytest.raises(ValueError, match="rollout_engine.*overwrite"):
        _predict(_sampler(resumed), _data(batch_size=4, rows=12), tmp_path)


# ---------------------------------------------------------------------------------------------------- PPO side
def _ppo(**overrides: Any) -> ContrastivePPOModule:
    kwargs: dict[str, Any] = dict(
        model_name_or_path="builtin:tiny-llama", reward_fn=TOKEN_REWARD, lr=1e-2, critic_lr=1e-3, kl_coef=0.01,
        ppo_epochs=1, mini_batch_size=4, micro_batch_size=4, max_new_tokens=8, log_samples_every_n=0,
        export_dir=None, seed=0,
    )
    kwargs.update(overrides)
    module = ContrastivePPOModule(**kwargs)
    module.configure_model()
    return module


def _prompt_batch(module: ContrastivePPOModule, texts: list[str], ids: list[str]) -> PromptBatch:
    toks = [module.tokenizer(t)["input_ids"] for t in texts]
    P = max(map(len, toks))
    input_ids = torch.tensor([[module.tokenizer.pad_token_id] * (P - len(r)) + r for r in toks])
    mask = torch.tensor([[0] * (P - len(r)) + [1] * len(r) for r in toks])
    return PromptBatch(input_ids, mask, torch.zeros(len(texts), dtype=torch.long), ids, texts, ["d"] * len(texts))


TEXTS = ["\n\nHuman: hi there\n\nAssistant:", "\n\nHuman: why?\n\nAssistant:", "\n\nHuman: tell me more\n\nAssistant:",
         "\n\nHuman: and then?\n\nAssistant:"]


def _write_jsonl(path: Path, baselines: dict[str, float]) -> Path:
    write_baseline_file(path, [{"prompt_id": k, "baseline": v, "count": 1, "scores": [v], "agg": "mean"}
                               for k, v in baselines.items()])
    return path


@pytest.mark.parametrize("reward_norm", ["none", "norm_clip"])
def test_ppo_score_is_raw_score_minus_the_stored_baseline(tmp_path, reward_norm):
    stored = {"p0": 1.5, "p1": -2.0, "p2": 7.25, "p3": 0.0}
    module = _ppo(baseline_path=str(_write_jsonl(tmp_path / "b.jsonl", stored)), reward_norm=reward_norm)
    exp = module.make_experience(_prompt_batch(module, TEXTS, list(stored)))
    module.compute_advantages(exp)
    expected = exp.scores - torch.tensor([stored[p] for p in exp.extras["prompt_ids"]])
    torch.testing.assert_close(exp.extras["contrastive_scores"], expected, rtol=0, atol=0)
    assert not exp.extras["missing_baseline"].any() and float(module.missing_baseline_total) == 0
    if reward_norm == "none":
        torch.testing.assert_close(exp.shaped_scores, expected, rtol=0, atol=0)
    else:  # normalisation comes after the transform: its running moments are those of s_cr
        assert float(module.reward_mean) == pytest.approx(float(expected.double().mean()), abs=1e-9)
        std = math.sqrt(float(module.reward_var) + 1e-8)
        torch.testing.assert_close(exp.shaped_scores, ((expected - float(module.reward_mean)) / std).clamp(-5, 5))


def test_missing_baseline_falls_back_to_the_running_mean_and_is_counted(tmp_path):
    path = _write_jsonl(tmp_path / "b.jsonl", {"p0": 3.0, "p1": 4.0, "p2": 5.0})  # no "p3"
    module = _ppo(baseline_path=str(path), reward_norm="none")
    batch = _prompt_batch(module, TEXTS, ["p0", "p1", "p2", "p3"])
    raw: list[torch.Tensor] = []
    for it in range(2):
        module.iteration = it
        exp = module.make_experience(batch)
        module.compute_advantages(exp)
        raw.append(exp.scores)
        running_mean = float(torch.cat(raw).double().mean())  # this batch included
        assert exp.extras["missing_baseline"].tolist() == [False, False, False, True]
        assert float(exp.extras["baseline"][3]) == pytest.approx(running_mean, abs=1e-6)
        assert float(exp.shaped_scores[3]) == pytest.approx(float(exp.scores[3]) - running_mean, abs=1e-6)
        assert float(exp.shaped_scores[0]) == float(exp.scores[0]) - 3.0
        assert float(module.missing_baseline_total) == it + 1
    state = module.state_dict()  # the running mean and the counter are checkpointed
    assert float(state["missing_baseline_total"]) == 2 and float(state["raw_score_count"]) == 8

    strict = _ppo(baseline_path=str(path), on_missing_baseline="error")
    with pytest.raises(KeyError, match=f"'p3'.*{path.name}"):
        strict.compute_advantages(strict.make_experience(batch))
    with pytest.raises(FileNotFoundError, match="nope.jsonl.*on_missing_baseline"):
        _ppo(baseline_path=str(tmp_path / "nope.jsonl"), on_missing_baseline="error").load_baselines()
    with pytest.warns(UserWarning, match="does not exist"):
        assert _ppo(baseline_path=str(tmp_path / "nope.jsonl")).load_baselines() == {}


GOOD = '{"prompt_id": "a", "baseline": 1.0}\n'


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json}\n", "invalid JSON"),
        ('{"baseline": 1.0}\n', "prompt_id"),
        ('{"prompt_id": "b"}\n', "missing 'baseline'"),
        ('{"prompt_id": "b", "baseline": NaN}\n', "invalid JSON"),
        ('{"prompt_id": "b", "baseline": 1e999}\n', "not finite"),
        ('{"prompt_id": "b", "baseline": "2.0"}\n', "not a number"),
        ('{"prompt_id": "b", "baseline": true}\n', "not a number"),
        ('{"prompt_id": "a", "baseline": 2.0}\n', "'a' has baseline 2.0"),
        ('[1, 2]\n', "JSON object"),
    ],
)
def test_malformed_baseline_file_names_file_and_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(GOOD + "\n" + line)  # the bad record is on line 3
    with pytest.raises(BaselineFileError, match=message) as err:
        read_baselines(path)
    assert f"{path}, line 3" in str(err.value)
    with pytest.raises(BaselineFileError, match="line 3"):  # the module reads it in setup, with the same check
        _ppo(baseline_path=str(path)).load_baselines()


def test_bad_part_file_line_names_file_and_line(tmp_path):
    part = tmp_path / "rank00000.jsonl"
    append_records(part, [{"prompt_id": "a", "scores": [1.0]}])
    with open(part, "a") as f:
        f.write('{"prompt_id": "b", "scores": ["x"]}\n')
    append_records(part, [{"prompt_id": "c", "scores": [2.0]}])
    with pytest.raises(BaselineFileError, match=f"{part.name}, line 2"):
        read_part_file(part)


class _Recording(ContrastivePPOModule):
    """Keeps each iteration's experience, to recompute the logged metrics."""

    def compute_advantages(self, exp):
        self.seen = getattr(self, "seen", []) + [exp]
        return super().compute_advantages(exp)


class _Outputs(L.Callback):
    def __init__(self) -> None:
        self.outputs: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.outputs.append({k: float(v) for k, v in outputs.items()})


def test_logged_metrics_are_the_statistics_of_the_rollout_batch(tmp_path):
    dm = _data(batch_size=4, rows=12)
    dm.set_tokenizer(load_tokenizer("builtin:tiny-llama"))
    dm.setup("fit")
    ids = sorted({prompt_id(p) for p in dm.train_dataset["prompt"]})
    stored = {pid: float(i % 5) for i, pid in enumerate(ids) if i % 2 == 0}  # half of the prompts have a baseline
    path = _write_jsonl(tmp_path / "b.jsonl", stored)
    module = _Recording(model_name_or_path="builtin:tiny-llama", reward_fn=TOKEN_REWARD, lr=1e-2, critic_lr=1e-3,
                        ppo_epochs=1, mini_batch_size=4, max_new_tokens=8, log_samples_every_n=0, export_dir=None,
                        baseline_path=str(path), max_iterations=2)
    outputs = _Outputs()
    _trainer(tmp_path, max_steps=-1, limit_val_batches=0, callbacks=[outputs]).fit(module, datamodule=dm)
    assert len(outputs.outputs) == len(module.seen) == 2
    total = 0
    for out, exp in zip(outputs.outputs, module.seen):
        missing = [pid not in stored for pid in exp.extras["prompt_ids"]]
        total += sum(missing)
        b, s_cr = exp.extras["baseline"].double(), exp.extras["contrastive_scores"].double()
        assert out["contrastive/missing_baseline"] == sum(missing)
        assert out["contrastive/missing_baseline_total"] == total
        assert out["contrastive/baseline_mean"] == pytest.approx(float(b.mean()), abs=1e-6)
        assert out["contrastive/beat_baseline_frac"] == pytest.approx(float((exp.scores.double() > b).double().mean()))
        assert out["contrastive/shaped_var"] == pytest.approx(float(s_cr.var()), abs=1e-5)
    assert 0 < total < 8


# ---------------------------------------------------------------------------------------------------- CLI, ranks
def test_cli_baseline_pass_then_contrastive_ppo_finds_every_prompt(in_tmp):
    """The two shipped tiny configs agree (same prompts, same ids): PPO finds a baseline for every rollout."""
    from lightning_rlhf.cli import main

    small = ["--data.init_args.max_train_rows=24", "--trainer.enable_progress_bar=false"]
    main(["predict", "-c", str(REPO / "configs/contrastive/baseline.yaml"), *small])
    path = in_tmp / "runs/contrastive_baseline_tiny/baseline.jsonl"
    assert len(read_baselines(path)) > 0

    cli = main(["fit", "-c", str(REPO / "configs/contrastive/tiny.yaml"), *small, "--model.init_args.max_iterations=2",
                "--model.init_args.export_dir=null", "--model.init_args.on_missing_baseline=error",
                "--trainer.logger=false"])
    assert cli.model.iteration == 2 and float(cli.model.missing_baseline_total) == 0


def test_two_ranks_write_one_file_equal_to_one_rank(in_tmp):
    """2 processes (DDP, gloo): each rank samples its share into its own part file; rank 0 merges one file that is
    byte-identical to the single-process pass."""
    from lightning_rlhf.cli import main
    from tests.distributed import run_distributed

    config = str(REPO / "configs/contrastive/baseline.yaml")
    common = ["--data.init_args.max_train_rows=16", "--trainer.enable_progress_bar=false", "--trainer.logger=false"]
    main(["predict", "-c", config, *common, f"--model.init_args.output_path={in_tmp / 'one.jsonl'}"])
    cmd = [sys.executable, str(REPO / "cli.py"), "predict", "-c", config, *common, "--trainer.strategy=ddp",
           "--trainer.devices=2", f"--model.init_args.output_path={in_tmp / 'two.jsonl'}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = run_distributed(cmd, cwd=in_tmp, env=env, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    parts = sorted((in_tmp / "two.jsonl.parts").glob("rank*.jsonl"))
    assert [p.name for p in parts] == ["rank00000.jsonl", "rank00001.jsonl"] and all(read_part_file(p) for p in parts)
    assert (in_tmp / "two.jsonl").read_bytes() == (in_tmp / "one.jsonl").read_bytes()
