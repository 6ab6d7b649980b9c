"""Exact resume: a run killed mid-training (SIGKILL, or SIGTERM through ``CheckpointOnSigterm``) and resumed from its
last checkpoint continues with the same batches, losses, learning rates, random numbers, ``iteration`` counter and
final parameters as a run that was never interrupted.

The interrupted runs are CLI subprocesses; the uninterrupted and resumed runs use the CLI in this process (same thread
count, so the CPU arithmetic is bit-identical). A :class:`StepRecorder` callback appends one JSON line per training
step: the step, the module's ``iteration``, ``train/loss``, ``train/lr``, the rows of the batch, and a draw from
torch's and Python's global RNGs (restored by ``callbacks/rng_state.py``).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import yaml
from safetensors.torch import load_file

from lightning_rlhf.cli import main
from lightning_rlhf.data.resumable import ResumableSampler
from tests.distributed import run_distributed

REPO = Path(__file__).resolve().parent.parent


class StepRecorder(L.Callback):
    """Test helper: records every training step (rank 0) to a JSON-lines file; optionally signals its process.

    Args:
        path: JSON-lines file (appended to).
        signal_at_iteration: Before the training step that follows ``pl_module.iteration == signal_at_iteration``,
            send ``signal_name`` to this process (on global rank 0 only); ``-1`` never.
        signal_name: ``SIGKILL`` (a crash) or ``SIGTERM`` (a preemption notice).
        metrics: Logged metrics to record.
        attributes: Module attributes to record (numbers or 0-d tensors).
        signal_marker: When set, signal only if this file does not exist yet, and create it first: the resumed run
            can then be started with exactly the interrupted run's command line.
    """

    def __init__(self, path: str, signal_at_iteration: int = -1, signal_name: str = "SIGKILL",
                 metrics: list[str] | None = None, attributes: list[str] | None = None,
                 signal_marker: str | None = None) -> None:
        self.path = path
        self.signal_at_iteration = signal_at_iteration
        self.signal_name = signal_name
        self.metrics = metrics or ["train/loss", "train/lr"]
        self.attributes = attributes or ["iteration"]
        self.signal_marker = signal_marker
        self._signalled = False

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int):
        if pl_module.iteration == self.signal_at_iteration and not self._signalled and trainer.is_global_zero:
            self._signalled = True
            if self.signal_marker is not None:
                if os.path.exists(self.signal_marker):
                    return
                open(self.signal_marker, "w").close()
            os.kill(os.getpid(), getattr(signal, self.signal_name))

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not trainer.is_global_zero:
            return
        index = getattr(batch, "index", None)
        if index is not None:
            rows = index.tolist()
        elif hasattr(batch, "prompt_ids"):
            rows = list(batch.prompt_ids)
        else:
            rows = batch.input_ids.sum(1).tolist()
        record = {
            "step": trainer.global_step,
            "epoch": trainer.current_epoch,
            "rows": rows,
            "metrics": [float(trainer.callback_metrics[k]) for k in self.metrics],
            "attributes": [float(getattr(pl_module, k)) for k in self.attributes],
            "torch_rand": torch.rand(()).item(),
            "py_rand": random.random(),
        }
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()


def _read(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _overlay(tmp: Path, name: str, steps: int, signal_at: int = -1, signal_name: str = "SIGKILL",
             every_step_ckpt: bool = True, recorder: dict[str, Any] | None = None,
             extra_callbacks: list[dict[str, Any]] | None = None) -> list[str]:
    """CLI arguments of one run: recorder (and checkpoint every step) into ``tmp/name*``."""
    callbacks: list[dict[str, Any]] = [
        {"class_path": "tests.test_resume.StepRecorder",
         "init_args": {"path": str(tmp / f"{name}.jsonl"), "signal_at_iteration": signal_at,
                       "signal_name": signal_name, **(recorder or {})}},
        *(extra_callbacks or []),
    ]
    ckpt_args = {"dirpath": str(tmp / f"{name}_ckpt")}
    ckpt_args.update({"every_n_train_steps": 1, "save_last": True, "save_top_k": 0} if every_step_ckpt else {})
    callbacks.append({"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": ckpt_args})
    cfg = {
        "trainer": {
            "max_steps": steps, "limit_val_batches": 0, "logger": False, "enable_progress_bar": False,
            "log_every_n_steps": 1,  # the recorder reads every step's metrics (logged on logging steps only)
            "enable_model_summary": False, "callbacks": callbacks,
        },
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return ["-c", str(path), f"--model.export_dir={tmp / (name + '_export')}"]


def _cli_subprocess(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = str(torch.get_num_threads())  # same CPU arithmetic as this process
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return run_distributed([sys.executable, str(REPO / "cli.py"), *args], cwd=cwd, env=env, timeout=600)


def _assert_same_run(resumed: list[dict[str, Any]], reference: list[dict[str, Any]]) -> None:
    assert [r["step"] for r in resumed] == [r["step"] for r in reference]
    for got, want in zip(resumed, reference):
        for key in ("epoch", "rows"):
            assert got[key] == want[key], (key, got, want)
        for key in ("metrics", "attributes", "torch_rand", "py_rand"):
            assert got[key] == pytest.approx(want[key], abs=1e-6, rel=0), (key, got, want)


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-6, rtol=0, msg=lambda m: f"{k}: {m}")


# (method, data overrides, total steps, killed after step): DPO resumes inside its second epoch, SFT inside its first
CASES = {
    "dpo": (["--data.max_train_rows=24", "--model.lr_schedule=cosine", "--model.warmup_steps=2"], 9, 7),
    "sft": (["--data.max_train_rows=16"], 6, 2),
}
DATA = ["--data.batch_size=4", "--data.max_length=128", "--data.max_prompt_length=96", "--data.skip_invalid_rows=true"]


def _base(method: str) -> list[str]:
    extra, _, _ = CASES[method]
    return ["fit", "-c", str(REPO / "configs" / method / "tiny.yaml"), *DATA, *extra]


@pytest.fixture(scope="module")
def reference_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One uninterrupted run per method (shared by the SIGKILL and SIGTERM tests)."""
    out = {}
    cwd = os.getcwd()
    for method in ("dpo", "sft"):
        tmp = tmp_path_factory.mktemp(f"ref_{method}")
        os.chdir(tmp)
        try:
            main([*_base(method), *_overlay(tmp, "ref", CASES[method][1])])
        finally:
            os.chdir(cwd)
        out[method] = tmp
    return out


@pytest.mark.parametrize("method", ["dpo", "sft"])
def test_sigkill_then_resume_from_last_matches_the_uninterrupted_run(method, reference_runs, in_tmp):
    _, steps, kill_after = CASES[method]
    ref = reference_runs[method]
    proc = _cli_subprocess([*_base(method), *_overlay(in_tmp, "run", steps, signal_at=kill_after)], in_tmp)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert len(_read(in_tmp / "run.jsonl")) == kill_after
    assert (in_tmp / "run_ckpt" / "last.ckpt").exists() and not (in_tmp / "run_export").exists()

    # resume: same command line plus --ckpt_path last (found in the ModelCheckpoint folder); records append
    cli = main([*_base(method), *_overlay(in_tmp, "run", steps), "--ckpt_path=last"])
    assert cli.trainer.global_step == steps and cli.model.iteration == steps
    assert _read(in_tmp / "run.jsonl")[kill_after]["step"] == kill_after + 1  # it resumed, it did not restart
    _assert_same_run(_read(in_tmp / "run.jsonl"), _read(ref / "ref.jsonl"))
    _assert_same_weights(in_tmp / "run_export", ref / "ref_export")


def test_sigterm_saves_last_checkpoint_exits_cleanly_and_resumes_exactly(reference_runs, in_tmp):
    _, steps, signal_after = CASES["dpo"]
    ref = reference_runs["dpo"]
    args = [*_base("dpo"), *_overlay(in_tmp, "run", steps, signal_at=signal_after, signal_name="SIGTERM",
                                     every_step_ckpt=False)]
    proc = _cli_subprocess(args, in_tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # the step running when the signal came finishes, is checkpointed, and the run stops without exporting
    assert [r["step"] for r in _read(in_tmp / "run.jsonl")][-1] == signal_after + 1
    ckpt = in_tmp / "run_ckpt" / "last.ckpt"
    state = torch.load(ckpt, weights_only=True, map_location="cpu")
    assert state["global_step"] == signal_after + 1 and state["iteration"] == signal_after + 1
    assert not (in_tmp / "run_export").exists()

    cli = main([*_base("dpo"), *_overlay(in_tmp, "run", steps, every_step_ckpt=False), "--ckpt_path=last"])
    assert cli.trainer.global_step == steps
    _assert_same_run(_read(in_tmp / "run.jsonl"), _read(ref / "ref.jsonl"))
    _assert_same_weights(in_tmp / "run_export", ref / "ref_export")


def test_sampler_resumes_after_the_consumed_samples_of_its_epoch():
    full = ResumableSampler(range(20), num_replicas=2, rank=1, seed=3)
    full.set_epoch(2)
    order = list(full)
    resumed = ResumableSampler(range(20), num_replicas=2, rank=1, seed=3)
    resumed.load_state_dict(full.state_dict(samples_consumed=8))  # 2 steps of 2 ranks x batch 2
    assert list(resumed) == order[4:]
    assert list(resumed) == order  # only the first pass after the restore is shortened
    other = ResumableSampler(range(20), num_replicas=2, rank=1, seed=3)
    other.load_state_dict({**full.state_dict(samples_consumed=8), "dataset_len": 21})  # another dataset: ignored
    other.set_epoch(2)
    assert list(other) == order


DDP = ["--trainer.strategy=ddp", "--trainer.devices=2", "--trainer.accelerator=cpu"]


@pytest.mark.slow
def test_sigterm_to_rank_zero_stops_all_ddp_ranks_and_resumes_exactly(tmp_path):
    """SIGTERM reaches rank 0 only: both ranks checkpoint together and stop; the 2-rank resume (per-rank RNG states,
    per-rank data positions) continues like an uninterrupted 2-rank run. Three 2-process runs: about 2 minutes."""
    _, steps, signal_after = CASES["dpo"]
    ref = _cli_subprocess([*_base("dpo"), *DDP, *_overlay(tmp_path, "ref", steps, every_step_ckpt=False)], tmp_path)
    assert ref.returncode == 0, ref.stderr[-3000:]
    run_args = [*_base("dpo"), *DDP]
    first = _cli_subprocess([*run_args, *_overlay(tmp_path, "run", steps, signal_at=signal_after,
                                                  signal_name="SIGTERM", every_step_ckpt=False)], tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    state = torch.load(tmp_path / "run_ckpt" / "last.ckpt", weights_only=True, map_location="cpu")
    assert state["global_step"] == signal_after + 1
    assert len(state["callbacks"]["RNGStateCallback"]["ranks"]) == 2
    second = _cli_subprocess([*run_args, *_overlay(tmp_path, "run", steps, every_step_ckpt=False), "--ckpt_path=last"],
                             tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    _assert_same_run(_read(tmp_path / "run.jsonl"), _read(tmp_path / "ref.jsonl"))
    _assert_same_weights(tmp_path / "run_export", tmp_path / "ref_export")


# PPO: 4 iterations of 4 prompts (2 optimizer steps each), killed after iteration 2, with the adaptive KL controller
PPO_ARGS = [
    "fit", "-c", str(REPO / "configs" / "ppo" / "tiny.yaml"), "--data.batch_size=4", "--data.max_train_rows=16",
    "--model.max_iterations=4", "--model.ppo_epochs=2", "--model.mini_batch_size=4", "--model.micro_batch_size=2",
    "--model.max_new_tokens=8", "--model.log_samples_every_n=0",
]
PPO_RECORD = {
    "metrics": ["score/mean", "score/shaped_mean", "kl", "policy/loss", "value/loss", "lr"],
    "attributes": ["iteration", "kl_coef", "reward_mean", "reward_var", "reward_count", "global_step"],
}
ADAPTIVE_KL = [{"class_path": "callbacks.adaptive_kl.AdaptiveKLController",
                "init_args": {"target": 0.5, "horizon": 100}}]


def _ppo_overlay(tmp: Path, name: str, signal_at: int = -1) -> list[str]:
    args = _overlay(tmp, name, -1, signal_at=signal_at, recorder=PPO_RECORD, extra_callbacks=ADAPTIVE_KL)
    return [*args, "--trainer.max_steps=-1"]


def test_ppo_sigkill_then_resume_restores_moments_iteration_and_adaptive_kl(tmp_path, monkeypatch):
    """Reward moments, ``iteration``, the controller's ``kl_coef`` and the data position survive a SIGKILL: the
    resumed PPO run logs the same scores, KL and losses and ends with the same weights."""
    monkeypatch.chdir(tmp_path)
    main([*PPO_ARGS, *_ppo_overlay(tmp_path, "ref")])
    proc = _cli_subprocess([*PPO_ARGS, *_ppo_overlay(tmp_path, "run", signal_at=2)], tmp_path)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    state = torch.load(tmp_path / "run_ckpt" / "last.ckpt", weights_only=True, map_location="cpu")
    assert state["iteration"] == 2 and float(state["state_dict"]["reward_count"]) == 8
    (ctl_state,) = [v for k, v in state["callbacks"].items() if k.startswith("AdaptiveKLController")]
    assert ctl_state["num_updates"] == 2 and ctl_state["kl_coef"] != 0.01

    cli = main([*PPO_ARGS, *_ppo_overlay(tmp_path, "run"), "--ckpt_path=last"])
    assert cli.model.iteration == 4
    records = _read(tmp_path / "run.jsonl")
    assert [r["attributes"][0] for r in records] == [1, 2, 3, 4]  # iterations 3 and 4 came from the resumed run
    _assert_same_run(records, _read(tmp_path / "ref.jsonl"))
    _assert_same_weights(tmp_path / "run_export", tmp_path / "ref_export")


# ------------------------------------------------------------------ --ckpt_path last with the default logger
def _default_logger_args(tmp: Path, steps: int, signal_at: int) -> list[str]:
    """One command line for the killed and the resumed run: the config's TensorBoard logger (runs/sft_tiny/version_N),
    Lightning's default checkpoint folder (<log dir>/checkpoints) with a checkpoint every step, the export in the log
    folder (export_dir: auto), and a recorder that kills its process once (a marker file)."""
    callbacks = [
        {"class_path": "tests.test_resume.StepRecorder",
         "init_args": {"path": str(tmp / "run.jsonl"), "signal_at_iteration": signal_at,
                       "signal_marker": str(tmp / "killed")}},
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
         "init_args": {"every_n_train_steps": 1, "save_last": True, "save_top_k": 0}},
    ]
    cfg = {"trainer": {"max_steps": steps, "limit_val_batches": 0, "enable_progress_bar": False,
                       "log_every_n_steps": 1, "enable_model_summary": False, "callbacks": callbacks}}
    path = tmp / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return [*_base("sft"), "-c", str(path)]


def test_ckpt_path_last_finds_the_runs_last_checkpoint_and_continues_in_its_folder(reference_runs, in_tmp, capsys):
    _, steps, kill_after = CASES["sft"]
    runs = in_tmp / "runs"
    (runs / "sft_tiny" / "version_0").mkdir(parents=True)  # an earlier run of the same name without checkpoints
    other = runs / "other_run" / "version_7" / "checkpoints"  # another run's (newer, broken) last.ckpt: not picked
    args = _default_logger_args(in_tmp, steps, kill_after)
    proc = _cli_subprocess(args, in_tmp)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    run_dir = runs / "sft_tiny" / "version_1"
    assert (run_dir / "checkpoints" / "last.ckpt").exists() and len(_read(in_tmp / "run.jsonl")) == kill_after
    other.mkdir(parents=True)
    (other / "last.ckpt").write_bytes(b"not a checkpoint")

    capsys.readouterr()
    cli = main([*args, "--ckpt_path", "last"])  # exactly the same command plus --ckpt_path last
    out = capsys.readouterr().out
    resumed_from = run_dir / "checkpoints" / "last.ckpt"
    assert [line for line in out.splitlines() if line.startswith("Resuming from")] == [
        f"Resuming from {Path('runs/sft_tiny/version_1/checkpoints/last.ckpt')} (global step {kill_after}); "
        f"logging into {Path('runs/sft_tiny/version_1')}"]
    assert Path(cli.trainer.log_dir).resolve() == run_dir.resolve()  # the same run folder, no version_2
    assert sorted(p.name for p in (runs / "sft_tiny").iterdir()) == ["version_0", "version_1"]
    assert len(list(run_dir.glob("events.out.tfevents.*"))) == 2  # both processes logged into it
    assert resumed_from.exists() and cli.trainer.global_step == steps
    records = _read(in_tmp / "run.jsonl")
    assert records[kill_after]["step"] == kill_after + 1  # it resumed, it did not restart
    _assert_same_run(records, _read(reference_runs["sft"] / "ref.jsonl"))
    _assert_same_weights(run_dir / "export", reference_runs["sft"] / "ref_export")


def test_ckpt_path_last_without_a_checkpoint_refuses_unless_asked_to_start_fresh(in_tmp, capsys):
    from lightning_rlhf.cli import NothingToResumeError

    args = [*_base("sft"), "--trainer.max_steps=1", "--trainer.limit_val_batches=0", "--model.export_dir=null",
            "--trainer.logger.init_args.name=nothing_here"]
    with pytest.raises(NothingToResumeError, match="no last.ckpt in .*nothing_here.*last_or_fresh"):
        main([*args, "--ckpt_path=last"])
    assert not (in_tmp / "runs" / "nothing_here").exists()  # failed before anything was created
    capsys.readouterr()
    cli = main([*args, "--ckpt_path=last_or_fresh"])
    assert "nothing to resume. Starting a new run" in capsys.readouterr().out
    assert cli.trainer.global_step == 1 and Path(cli.trainer.log_dir).name == "version_0"
