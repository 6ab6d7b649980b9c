"""The main job: stages chained through exported folders."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

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
    assert samples == Path("runs/round/samples/samples.jsonl") and len(samples.read_text().splitlines()) == 8
    meta_dir = Path(by_stage["meta_rm"].log_dir)
    cfg = yaml.safe_load((meta_dir / "config.yaml").read_text())
    assert cfg["model"]["init_args"]["model_name_or_path"] == by_stage["rm"].export_dir  # MetaRM_t from RM_{t-1}
    assert cfg["data"]["init_args"]["streams"]["samples"]["init_args"]["train_path"] == str(samples)
    assert by_stage["meta_rm"].metrics["train/meta_steps"] == 2
    ppo = yaml.safe_load((Path(by_stage["ppo"].log_dir) / "config.yaml").read_text())["model"]["init_args"]
    assert ppo["reward_model_name_or_path"] == by_stage["meta_rm"].export_dir and ppo["reward_fn"] is None
