"""MetaRM end to end on CPU, offline: the policy-samples pass writes the meta set, ``configs/meta_rm/tiny.yaml`` trains on
it (every step a meta step, as in the paper), validation reports per-domain accuracy or the discrimination metrics on
held-out policy samples, and a run killed with SIGKILL and resumed takes its meta steps on exactly the steps of the
uninterrupted run, with the same losses and final weights."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import lightning as L
import pytest

from lightning_rlhf.cli import main
from tests.test_resume import StepRecorder, _assert_same_run, _assert_same_weights, _cli_subprocess, _overlay, _read

REPO = Path(__file__).resolve().parent.parent
CONFIG = str(REPO / "configs" / "meta_rm" / "tiny.yaml")
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


class MetaStepRecorder(StepRecorder):
    """StepRecorder for multi-stream batches: records the preference stream's rows."""

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch["preferences"], batch_idx)


@pytest.fixture(scope="module")
def samples_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding runs/policy_samples_tiny/samples.jsonl, written by the policy-samples pass (32 prompts x 4)."""
    root = tmp_path_factory.mktemp("meta_samples")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        main(["predict", "-c", str(REPO / "configs" / "policy_samples" / "tiny.yaml"), "--data.max_train_rows=32",
              *QUIET])
    finally:
        os.chdir(cwd)
    assert (root / "runs" / "policy_samples_tiny" / "samples.jsonl").exists()
    return root


def test_tiny_config_trains_end_to_end_with_a_meta_step_on_every_step(samples_dir, monkeypatch):
    monkeypatch.chdir(samples_dir)
    cli = main(["fit", "-c", CONFIG, *QUIET, "--trainer.max_steps=6", "--trainer.val_check_interval=6",
                "--model.init_args.export_dir=runs/meta_export"])
    m = cli.trainer.callback_metrics
    assert cli.model.meta_steps == 6 and cli.trainer.global_step == 6
    assert float(m["train/meta_steps"]) == 6 and float(m["train/meta_step"]) == 1
    assert 0.5 * 3 / 4 <= float(m["train/meta_objective"]) < 3 / 4  # (2/k^2) sum_{i<j} sigmoid(|d|), k = 4
    assert float(m["train/meta_grad_norm"]) > 0 and float(m["train/meta_score_std"]) >= 0
    assert "val/accuracy" in m and any(k.startswith("val/accuracy/hh_") for k in m)
    assert (samples_dir / "runs" / "meta_export" / "model.safetensors").exists()


def test_validation_on_held_out_policy_samples(samples_dir, monkeypatch):
    monkeypatch.chdir(samples_dir)
    cli = main(["fit", "-c", CONFIG, *QUIET, "--trainer.max_steps=2", "--trainer.val_check_interval=2",
                "--data.init_args.val_stream=samples", "--model.init_args.export_dir=null"])
    m = cli.trainer.callback_metrics
    hist = [float(v) for k, v in m.items() if k.startswith("val/samples/norm_abs_delta_hist/")]
    assert len(hist) == 5 and sum(hist) == pytest.approx(1.0) and max(hist) > 0
    assert 0 < float(m["val/samples/norm_abs_delta_mean"]) <= 1
    assert float(m["val/samples/score_std"]) > 0 and float(m["val/samples/num_pairs"]) > 0
    assert "val/accuracy" not in m  # no preference batches in this validation: no (NaN) accuracy logged


SCHEDULE = [{"class_path": "callbacks.meta_step.MetaStepSchedule", "init_args": {"every_n_steps": 2,
                                                                                 "warmup_steps": 1}}]
RECORD = {"metrics": ["train/loss", "train/meta_step", "meta/scheduled"], "attributes": ["iteration", "meta_steps"]}
STEPS, KILL_AFTER = 7, 4


def _args(tmp: Path, name: str, signal_at: int = -1) -> list[str]:
    overlay = _overlay(tmp, name, STEPS, signal_at=signal_at, recorder=RECORD, extra_callbacks=SCHEDULE)
    overlay = [a.replace("tests.test_resume.StepRecorder", "tests.test_meta_rm_e2e.MetaStepRecorder") for a in overlay]
    cfg = Path(overlay[1])
    cfg.write_text(cfg.read_text().replace("tests.test_resume.StepRecorder", "tests.test_meta_rm_e2e.MetaStepRecorder"))
    return ["fit", "-c", CONFIG, *overlay]


@pytest.mark.slow  # ~2 min on a busy 2-core machine: 3 CLI runs (the stand-in test in test_meta_step.py is quick)
def test_sigkill_then_resume_takes_meta_steps_on_exactly_the_scheduled_steps(samples_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(samples_dir)
    main(_args(tmp_path, "ref"))
    ref = _read(tmp_path / "ref.jsonl")
    scheduled = [r["step"] - 1 for r in ref if r["metrics"][2] == 1.0]  # record["step"] is after the step
    assert scheduled == [1, 3, 5] and [r["metrics"][1] for r in ref] == [0, 1, 0, 1, 0, 1, 0]
    assert ref[-1]["attributes"] == [STEPS, 3]

    proc = _cli_subprocess(_args(tmp_path, "run", signal_at=KILL_AFTER), samples_dir)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert len(_read(tmp_path / "run.jsonl")) == KILL_AFTER
    cli = main([*_args(tmp_path, "run"), "--ckpt_path=last"])
    assert cli.trainer.global_step == STEPS and cli.model.meta_steps == 3
    assert _read(tmp_path / "run.jsonl")[KILL_AFTER]["step"] == KILL_AFTER + 1  # resumed, not restarted
    _assert_same_run(_read(tmp_path / "run.jsonl"), ref)
    _assert_same_weights(tmp_path / "run_export", tmp_path / "ref_export")
