"""The main job: stages chained through exported folders."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from lightning_rlhf.pipeline import main

REPO = Path(__file__).resolve().parent.parent


def test_pipeline_chains_exports(in_tmp):
    results = main([
        "--configs", str(REPO / "configs"), "--root", "runs/pipe",
        "--set", "sft:trainer.max_steps=2", "--set", "rm:trainer.max_steps=2", "--set", "dpo:trainer.max_steps=2",
        "--set", "ppo:model.init_args.max_iterations=1",
    ])
    by_stage = {r.stage: r for r in results}
    assert list(by_stage) == ["sft", "rm", "dpo", "ppo"]
    for r in results:
        assert (Path(r.export_dir) / "config.json").exists(), r.stage
        assert list(Path(r.log_dir).glob("events.out.tfevents.*")), r.stage

    def model_args(stage):
        return yaml.safe_load((Path(by_stage[stage].log_dir) / "config.yaml").read_text())["model"]["init_args"]

    sft_export = by_stage["sft"].export_dir
    assert model_args("rm")["model_name_or_path"] == sft_export
    assert model_args("dpo")["model_name_or_path"] == sft_export
    ppo = model_args("ppo")
    assert ppo["model_name_or_path"] == sft_export
    assert ppo["reward_model_name_or_path"] == by_stage["rm"].export_dir and ppo["reward_fn"] is None


def test_exports_live_in_the_runs_version_folder_and_reruns_do_not_overwrite(in_tmp):
    args = ["--stages", "sft", "--root", "runs/p", "--set", "sft:trainer.max_steps=1",
            "--set", "sft:trainer.limit_val_batches=0"]
    first, second = main(args)[0], main(args)[0]
    assert Path(first.export_dir) == Path("runs/p/sft/version_0/export")  # default --configs: from any folder
    assert Path(second.export_dir) == Path("runs/p/sft/version_1/export")
    assert (Path(first.export_dir) / "config.json").exists() and (Path(second.export_dir) / "config.json").exists()
    summary = json.loads(Path("runs/p/pipeline_version_1.json").read_text())
    assert summary[0]["export_dir"] == second.export_dir


def test_two_pipelines_started_together_with_one_root_chain_their_own_exports(in_tmp):
    """Two processes, same --root, started at once: each gets its own version number, and each one's DPO starts from
    its own SFT export (different SFT learning rates make them distinguishable by content as well)."""
    procs = []
    for lr in ("1e-3", "3e-3"):
        cmd = [sys.executable, "-m", "lightning_rlhf.pipeline", "--stages", "sft,dpo", "--root", "runs/shared",
               "--set", f"sft:model.init_args.lr={lr}", "--set", "sft:trainer.max_steps=1",
               "--set", "sft:trainer.limit_val_batches=0", "--set", "sft:data.init_args.max_train_rows=8",
               "--set", "dpo:trainer.max_steps=1", "--set", "dpo:trainer.limit_val_batches=0",
               "--set", "dpo:data.init_args.max_train_rows=8", "--set", "dpo:trainer.enable_progress_bar=false",
               "--set", "sft:trainer.enable_progress_bar=false"]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
               "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen(cmd, cwd=in_tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-3000:]
    summaries = sorted(Path("runs/shared").glob("pipeline_version_*.json"))
    assert [s.name for s in summaries] == ["pipeline_version_0.json", "pipeline_version_1.json"]
    sft_exports = []
    for s in summaries:
        stages = {r["stage"]: r for r in json.loads(s.read_text())}
        version = s.stem.rpartition("_")[2]
        assert Path(stages["sft"]["log_dir"]).name == Path(stages["dpo"]["log_dir"]).name == f"version_{version}"
        dpo_config = yaml.safe_load((Path(stages["dpo"]["log_dir"]) / "config.yaml").read_text())
        assert dpo_config["model"]["init_args"]["model_name_or_path"] == stages["sft"]["export_dir"]
        assert Path(stages["sft"]["export_dir"]).parent == Path(stages["sft"]["log_dir"])
        sft_exports.append(stages["sft"]["export_dir"])
    assert sft_exports[0] != sft_exports[1]
    a, b = (load_file(str(Path(e) / "model.safetensors")) for e in sft_exports)
    assert any(not torch.equal(a[k], b[k]) for k in a)  # two different SFT models, each chained into its own DPO


@pytest.mark.slow  # 4 CLI runs: ~1 min of CPU, several minutes on a busy machine
def test_pipeline_runs_a_metarm_round(in_tmp):
    """rm -> samples (policy-samples pass) -> meta_rm (from the RM export, on those samples) -> ppo (with MetaRM)."""
    results = main([
        "--configs", str(REPO / "configs"), "--root", "runs/round", "--stages", "rm,samples,meta_rm,ppo",
        "--set", "rm:trainer.max_steps=2", "--set", "samples:data.init_args.max_train_rows=8",
        "--set", "meta_rm:trainer.max_steps=2", "--set", "meta_rm:trainer.val_check_interval=2",
        "--set", "ppo:model.init_args.max_iterations=1",
    ])
    by_stage = {r.stage: r for r in results}
    assert list(by_stage) == ["rm", "samples", "meta_rm", "ppo"]
    samples = Path(by_stage["samples"].export_dir)
    assert samples == Path("runs/round/samples/version_0/samples.jsonl") and len(samples.read_text().splitlines()) == 8
    meta_dir = Path(by_stage["meta_rm"].log_dir)
    assert meta_dir == Path("runs/round/meta_rm/version_0")
    cfg = yaml.safe_load((meta_dir / "config.yaml").read_text())  # the config the CLI ran with
    assert cfg["model"]["init_args"]["model_name_or_path"] == by_stage["rm"].export_dir  # MetaRM_t from RM_{t-1}
    assert cfg["data"]["init_args"]["streams"]["samples"]["init_args"]["train_path"] == str(samples)
    assert by_stage["meta_rm"].metrics["train/meta_steps"] == 2
    ppo = yaml.safe_load((Path(by_stage["ppo"].log_dir) / "config.yaml").read_text())["model"]["init_args"]
    assert ppo["reward_model_name_or_path"] == by_stage["meta_rm"].export_dir and ppo["reward_fn"] is None


def test_pipeline_runs_aihf_as_one_stage(in_tmp):
    """``--stages aihf``: Self-Play AIHF in place of SFT -> RM -> PPO, in the run's version folder, exporting a policy."""
    results = main(["--stages", "aihf", "--root", "runs/aihf", "--set", "aihf:trainer.max_steps=2",
                    "--set", "aihf:trainer.limit_val_batches=0", "--set", "aihf:trainer.enable_progress_bar=false"])
    assert [r.stage for r in results] == ["aihf"]
    assert Path(results[0].export_dir) == Path("runs/aihf/aihf/version_0/export")
    assert (Path(results[0].export_dir) / "model.safetensors").exists()
    cfg = yaml.safe_load((Path(results[0].log_dir) / "config.yaml").read_text())
    assert cfg["model"]["class_path"].endswith("AIHFDPOModule") and cfg["model"]["init_args"]["demo_term"] == "spin"

