"""The main job: stages chained through exported folders."""

from __future__ import annotations

from pathlib import Path

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
