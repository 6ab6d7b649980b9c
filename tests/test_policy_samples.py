"""The policy-samples pass (configs/policy_samples/tiny.yaml, built-in tiny Llama, CPU): k samples per prompt equal to
an independent regeneration from the documented seed, the same file after a SIGKILL + resume and on 2 DDP ranks, and
the file read back as SampleSetBatch rows that share their prompt and differ in their samples."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch

from lightning_rlhf.cli import main
from lightning_rlhf.data import SampleSetDataModule
from lightning_rlhf.data.sources import prompt_id
from lightning_rlhf.models.factory import load_causal_lm, load_tokenizer
from lightning_rlhf.rewards import TokenCountReward
from lightning_rlhf.rollout.generation import HFGenerator, response_lengths
from lightning_rlhf.sample_sets import prompt_seed, read_part_file

REPO = Path(__file__).resolve().parent.parent
CONFIG = str(REPO / "configs/policy_samples/tiny.yaml")
SMALL = ["--data.init_args.max_train_rows=12", "--data.init_args.batch_size=4", "--model.init_args.max_new_tokens=8",
         "--trainer.enable_progress_bar=false"]

pytestmark = pytest.mark.usefixtures("single_thread")


class KillAfterFirstBatch(L.Callback):
    """Test helper: after the first predict batch was written, leave a half-written line and SIGKILL the process."""

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        with open(pl_module.part_file(), "a") as f:
            f.write('{"prompt_id": "half-wri')
        os.kill(os.getpid(), signal.SIGKILL)


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
            "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


def _records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One uninterrupted single-process pass (12 prompts, k=4)."""
    out = tmp_path_factory.mktemp("ps_ref") / "samples.jsonl"
    cwd = os.getcwd()
    os.chdir(out.parent)  # the CLI saves its config.yaml in the working folder
    try:
        main(["predict", "-c", CONFIG, *SMALL, f"--model.init_args.output_path={out}"])
    finally:
        os.chdir(cwd)
    return out


def test_k_samples_per_prompt_equal_an_independent_regeneration(reference, tmp_path):
    records = _records(reference)
    assert len(records) == 12 and [r["prompt_id"] for r in records] == sorted(r["prompt_id"] for r in records)
    for r in records:
        assert r["prompt_id"] == prompt_id(r["prompt"]) and r["domain"]
        assert len(r["responses"]) == len(r["scores"]) == 4
        assert len(set(r["responses"])) == 4  # the k samples of one prompt differ

    # regenerate two prompts outside the module: k copies, seed hashed from (seed, prompt_id), decoded, scored by hand
    tok = load_tokenizer("builtin:tiny-llama")
    policy = load_causal_lm("builtin:tiny-llama").eval()
    gen = HFGenerator(max_new_tokens=8, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    for r in records[:2]:
        ids = torch.tensor([tok(r["prompt"])["input_ids"]] * 4)
        out = gen.generate(policy, ids, torch.ones_like(ids), seed=prompt_seed(0, r["prompt_id"]))
        n = response_lengths(out.action_mask).tolist()
        texts = tok.batch_decode([row[:m] for row, m in zip(out.sequences[:, ids.shape[1]:].tolist(), n)],
                                 skip_special_tokens=True)
        assert r["responses"] == texts
        assert r["scores"] == TokenCountReward("e")([r["prompt"]] * 4, texts)

    # read back as SampleSetBatch: rows b*k..b*k+k-1 share the prompt's tokens and differ in their samples
    dm = SampleSetDataModule(train_path=str(reference), val_fraction=0.0, batch_size=3, max_length=128,
                             max_prompt_length=96)
    dm.set_tokenizer(tok)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch.num_samples == 4 and batch.input_ids.shape[0] == 12
    by_id = {r["prompt_id"]: r for r in records}
    for b, pid in enumerate(batch.prompt_ids):
        p = tok(by_id[pid]["prompt"])["input_ids"]
        rows = [batch.input_ids[b * 4 + j, : int(batch.attention_mask[b * 4 + j].sum())].tolist() for j in range(4)]
        assert all(row[: len(p)] == p for row in rows) and len({tuple(row) for row in rows}) == 4
        assert batch.scores[b * 4 : b * 4 + 4].tolist() == by_id[pid]["scores"]


def test_without_a_reward_the_same_samples_and_no_scores(reference, in_tmp):
    out = in_tmp / "plain.jsonl"
    main(["predict", "-c", CONFIG, *SMALL, "--model.init_args.reward_fn=null", f"--model.init_args.output_path={out}"])
    plain = _records(out)
    assert all("scores" not in r for r in plain)
    assert [{k: v for k, v in r.items() if k != "scores"} for r in _records(reference)] == plain


def test_sigkill_then_resume_writes_the_same_file(reference, in_tmp):
    out = in_tmp / "samples.jsonl"
    cb = json.dumps([{"class_path": "tests.test_policy_samples.KillAfterFirstBatch"}])
    proc = subprocess.run([sys.executable, str(REPO / "cli.py"), "predict", "-c", CONFIG, *SMALL,
                           f"--trainer.callbacks={cb}", f"--model.init_args.output_path={out}"],
                          cwd=in_tmp, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, (proc.stdout + proc.stderr)[-3000:]
    assert not out.exists()
    assert len(read_part_file(out.with_name("samples.jsonl.parts") / "rank00000.jsonl")) == 4  # the first batch

    # resume with another batch size: the 4 finished prompts are skipped, the rest sampled as in the reference
    cli = main(["predict", "-c", CONFIG, *SMALL, "--data.init_args.batch_size=5", f"--model.init_args.output_path={out}"])
    assert cli.model.num_skipped == 4 and cli.model.num_sampled == 8
    assert out.read_bytes() == reference.read_bytes()
    # other sampling settings on the same parts are refused, naming the setting and the way out
    with pytest.raises(ValueError, match="temperature.*overwrite"):
        main(["predict", "-c", CONFIG, *SMALL, "--model.init_args.temperature=0.5",
              f"--model.init_args.output_path={out}"])


@pytest.mark.slow
def test_two_ddp_ranks_write_the_same_file_as_one(reference, in_tmp):
    """Two gloo ranks on the CPU: about 80 s on a busy 2-core machine (the shared machinery is also covered, unmarked,
    by tests/test_contrastive.py::test_two_ranks_write_one_file_equal_to_one_rank)."""
    out = in_tmp / "two.jsonl"
    proc = subprocess.run([sys.executable, str(REPO / "cli.py"), "predict", "-c", CONFIG, *SMALL,
                           "--trainer.strategy=ddp", "--trainer.devices=2", f"--model.init_args.output_path={out}"],
                          cwd=in_tmp, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    parts = sorted((in_tmp / "two.jsonl.parts").glob("rank*.jsonl"))
    assert [p.name for p in parts] == ["rank00000.jsonl", "rank00001.jsonl"] and all(read_part_file(p) for p in parts)
    assert out.read_bytes() == reference.read_bytes()


def test_parquet_output_and_bad_settings(reference, in_tmp):
    from lightning_rlhf.methods import PolicySamplesModule
    from lightning_rlhf.sample_sets import read_sample_sets

    out = in_tmp / "samples.parquet"
    main(["predict", "-c", CONFIG, *SMALL, f"--model.init_args.output_path={out}"])
    rows, _ = read_sample_sets(out)
    assert [r.record for r in rows] == _records(reference)
    with pytest.raises(ValueError, match="at most one reward source"):
        PolicySamplesModule(reward_fn={"class_path": "x"}, reward_model_name_or_path="y")
    with pytest.raises(ValueError, match="model.num_samples"):
        PolicySamplesModule(num_samples=0)
