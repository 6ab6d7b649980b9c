"""MetaRM under DDP on CPU: 2 processes (gloo) with half of each stream's batch give the parameters of 1 process with the
whole batches. The meta gradient is taken with ``torch.autograd.grad`` (DDP's hooks stay silent) and averaged across
ranks by the module, the outer gradient by DDP; SGD (not AdamW, whose ``g / sqrt(v)`` turns rounding noise on
near-zero gradients into visible updates) makes "within 1e-6" a meaningful bound on the update."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from tests.test_ddp import subprocess_env

REPO = Path(__file__).resolve().parent.parent
LR, META_LR, STEPS = 0.1, 1.0, 3


def write_samples(path: Path, n: int = 16) -> None:
    """A sample-set file with k = 3 responses per prompt, from the built-in HH pairs (chosen, rejected, a cut)."""
    from lightning_rlhf.data.sources import prompt_id
    from lightning_rlhf.sample_sets import sample_set_record, write_sample_set_file

    records = []
    with gzip.open(REPO / "lightning_rlhf" / "assets" / "data" / "hh_preferences_train.jsonl.gz", "rt") as f:
        for line in f:
            row = json.loads(line)
            if len(row["prompt"]) > 300:
                continue
            responses = [row["chosen"], row["rejected"], row["chosen"][: max(1, len(row["chosen"]) // 2)]]
            records.append(sample_set_record(prompt_id(row["prompt"]), row["prompt"], responses,
                                             domain=row.get("domain", "default")))
            if len(records) == n:
                break
    write_sample_set_file(path, records)


def run(out: str, devices: int, pairs: int, prompts: int, samples_path: str, meta_order: str = "first") -> None:
    from callbacks.meta_step import MetaStepSchedule
    from lightning_rlhf.data import MultiStreamDataModule, PreferenceDataModule, SampleSetDataModule
    from lightning_rlhf.methods import MetaRewardModelModule

    L.seed_everything(0)
    module = MetaRewardModelModule(lr=LR, meta_lr=META_LR, meta_order=meta_order, max_grad_norm=None,
                                   micro_batch_size=2, export_dir=None)
    module.configure_optimizers = lambda: torch.optim.SGD(module.parameters(), lr=LR)  # type: ignore[method-assign]
    module.configure_model()
    if meta_order == "second":
        # float64: the double backward at a large meta step (eta = 1) amplifies float32 rounding of the all-reduced
        # gradients to ~3e-5 relative after 3 steps (measured); in float64 the runs agree to ~1e-15
        module.double()
    init = {n: p.detach().clone() for n, p in module.named_parameters()}
    data = MultiStreamDataModule(streams={
        "preferences": PreferenceDataModule(train_path="builtin:hh-rlhf", batch_size=pairs, max_length=128,
                                           max_prompt_length=96, max_train_rows=32, skip_invalid_rows=True),
        "samples": SampleSetDataModule(train_path=samples_path, batch_size=prompts, max_length=128,
                                       max_prompt_length=96, skip_invalid_rows=True, seed=1),
    })
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto",
                        max_steps=STEPS, logger=False, limit_val_batches=0, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[MetaStepSchedule()])
    trainer.fit(module, data)
    if trainer.is_global_zero:
        params = {n: p.detach().clone() for n, p in module.named_parameters()}
        torch.save({"params": params, "init": init, "meta_steps": module.meta_steps,
                    "world_size": trainer.world_size}, out)


@pytest.mark.slow  # ~2 min (first), ~3 min (second) on a busy 2-core machine
@pytest.mark.parametrize("meta_order", ["first", "second"])
def test_two_ddp_processes_match_one_process_with_the_whole_batches(tmp_path, monkeypatch, meta_order):
    monkeypatch.chdir(tmp_path)
    samples = tmp_path / "samples.jsonl"
    write_samples(samples)
    run(str(tmp_path / "single.pt"), 1, 4, 2, str(samples), meta_order)
    proc = subprocess.run(
        [sys.executable, "-m", "tests.test_meta_rm_ddp", str(tmp_path / "ddp.pt"), "2", "2", "1", str(samples),
         meta_order],
        cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    single, ddp = torch.load(tmp_path / "single.pt"), torch.load(tmp_path / "ddp.pt")
    assert single["world_size"] == 1 and ddp["world_size"] == 2
    assert single["meta_steps"] == ddp["meta_steps"] == STEPS
    moved = 0
    for n, p in single["params"].items():
        assert torch.equal(single["init"][n], ddp["init"][n]), n
        torch.testing.assert_close(ddp["params"][n], p, atol=1e-6, rtol=0, msg=lambda m: f"{n}: {m}")
        moved += int((p - single["init"][n]).abs().max() > 1e-4)
    assert moved > 5  # the updates are far larger than the tolerance


if __name__ == "__main__":  # the 2-process half (Lightning relaunches this module for rank 1)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    run(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], sys.argv[6])
