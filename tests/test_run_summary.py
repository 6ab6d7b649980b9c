"""callbacks/run_summary.py: the end-of-fit summary line and JSON, added from the command line like a user would."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from callbacks.run_summary import RunSummary, peak_memory_gib
from lightning_rlhf.cli import main

REPO = Path(__file__).resolve().parent.parent


def test_summary_from_the_cli(in_tmp, capsys):
    path = Path("summary.json").resolve()
    callback = json.dumps({"class_path": "callbacks.run_summary.RunSummary",
                           "init_args": {"path": str(path), "warmup_steps": 1}})
    cli = main(["fit", "-c", str(REPO / "configs" / "dpo" / "tiny.yaml"), "--trainer.max_steps=3",
                "--trainer.limit_val_batches=0", "--model.init_args.export_dir=null", f"--trainer.callbacks+={callback}"])
    cb = next(c for c in cli.trainer.callbacks if isinstance(c, RunSummary))
    summary = json.loads(path.read_text())
    assert summary == cb.summary
    assert summary["steps"] == 3 == summary["global_step"] and len(cb.step_times) == 3
    assert summary["model"] == "DPOModule" and summary["device"] == "cpu" and summary["world_size"] == 1
    assert summary["median_step_s"] == pytest.approx(sorted(cb.step_times[1:])[0] / 2 + sorted(cb.step_times[1:])[1] / 2,
                                                     abs=1e-4)
    assert summary["peak_mem_gib"] > 0.05  # resident set of a process that imported torch
    assert "train/loss" in summary["first_metrics"] and "train/loss" in summary["metrics"]
    assert summary["first_metrics"]["train/loss"] == pytest.approx(0.693147, abs=1e-3)  # policy == reference: log 2
    assert "perf/step_time_s" in summary["metrics"] and "perf/peak_mem_gib" in summary["metrics"]
    assert "run_summary {" in capsys.readouterr().out


def test_bad_warmup_and_cpu_memory():
    with pytest.raises(ValueError, match="warmup_steps"):
        RunSummary(warmup_steps=-1)
    import torch

    assert peak_memory_gib(torch.device("cpu")) > 0
