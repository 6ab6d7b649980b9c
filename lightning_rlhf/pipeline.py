"""The main job: chain the stages of RLHF through exported Hugging Face folders, one LightningCLI run per stage.

    python -m lightning_rlhf.pipeline                       # sft -> rm -> dpo -> ppo on the tiny configs, CPU
    python -m lightning_rlhf.pipeline --stages sft,dpo --root runs/my_pipeline
    python -m lightning_rlhf.pipeline --set dpo:model.init_args.beta=0.2
    python -m lightning_rlhf.pipeline --stages sft,rm,ppo,samples,meta_rm,ppo,samples,meta_rm,ppo   # MetaRM rounds

Each stage is exactly ``python cli.py fit -c configs/<stage>/<config>.yaml`` with the previous stages' export
folders filled in (policy = SFT export; PPO's reward model = RM export), logging to ``<root>/<stage>/`` and
exporting to ``<root>/<stage>/export``. Nothing here is hidden orchestration: the commands it runs are printed,
and can be run by hand.

Iterative MetaRM rounds (spec 3, the paper's order): ``samples`` is ``python cli.py predict -c
configs/policy_samples/<config>.yaml`` with the latest policy (the last PPO export, else the SFT export), writing
``<root>/<stage>/samples.jsonl``; ``meta_rm`` trains ``configs/meta_rm/<config>.yaml`` from the latest reward model
(the last RM or MetaRM export, else the SFT export) on those samples (the config's sample-stream ``train_path`` is
replaced in a copy, ``<root>/<stage>/config.yaml``, that the printed command names); ``ppo`` then continues from the
latest policy with the latest reward model. A stage named twice runs in ``<root>/<stage>_2/`` and so on.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

#: stage -> (config folder, function(previous exports) -> extra CLI overrides)
Linker = Callable[[dict[str, str]], list[str]]


def _policy_from_sft(exports: dict[str, str]) -> list[str]:
    return [f"--model.init_args.model_name_or_path={exports['sft']}"] if "sft" in exports else []


def _ppo_links(exports: dict[str, str]) -> list[str]:
    policy = exports.get("policy")  # the last PPO export (rounds continue from pi_{t-1}), else the SFT export
    out = [f"--model.init_args.model_name_or_path={policy}"] if policy else []
    if "reward" in exports:  # the trained reward model (RM or MetaRM) replaces the config's rule-based reward
        out += [f"--model.init_args.reward_model_name_or_path={exports['reward']}", "--model.init_args.reward_fn=null"]
    return out


def _samples_links(exports: dict[str, str]) -> list[str]:
    policy = exports.get("policy")
    return [f"--model.init_args.model_name_or_path={policy}"] if policy else []


def _meta_rm_links(exports: dict[str, str]) -> list[str]:
    start = exports.get("reward") or exports.get("sft")  # MetaRM_t starts from RM_{t-1}
    return [f"--model.init_args.model_name_or_path={start}"] if start else []


STAGES: dict[str, Linker] = {
    "sft": lambda exports: [],
    "rm": _policy_from_sft,
    "dpo": _policy_from_sft,
    "ppo": _ppo_links,
    "samples": _samples_links,
    "meta_rm": _meta_rm_links,
}
#: which role a stage's export takes for the stages after it
ROLES = {"sft": "policy", "ppo": "policy", "rm": "reward", "meta_rm": "reward", "samples": "samples"}
#: stages that are a ``predict`` pass writing a file rather than a ``fit`` exporting a folder
PREDICT_STAGES = {"samples": "policy_samples"}


def _meta_rm_config(config: str, target: Path, exports: dict[str, str]) -> str:
    """A copy of a MetaRM config whose sample stream reads the latest ``samples`` stage's file."""
    import yaml

    cfg = yaml.safe_load(Path(config).read_text())
    if "samples" in exports:
        stream = cfg["data"]["init_args"]["streams"]["samples"]
        stream.setdefault("init_args", {})["train_path"] = exports["samples"]
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return str(target)


@dataclass
class StageResult:
    stage: str
    command: list[str]
    seconds: float
    log_dir: str
    export_dir: str | None
    metrics: dict[str, float] = field(default_factory=dict)


def run_stage(stage: str, config: str, root: Path, exports: dict[str, str], extra: list[str],
              name: str | None = None) -> StageResult:
    """Run one stage through the CLI in this process and return where its logs and export went (``name``: the
    stage's folder under ``root``, default the stage)."""
    from lightning_rlhf.cli import main

    name = name or stage
    if stage in PREDICT_STAGES:
        output = root / name / "samples.jsonl"
        args = ["predict", "-c", config, f"--model.init_args.output_path={output}", *STAGES[stage](exports), *extra]
        print(f"\n=== {name}: python cli.py {' '.join(args)}\n", flush=True)
        start = time.time()
        main(args)
        return StageResult(stage, args, time.time() - start, str(root / name), str(output))
    if stage == "meta_rm":
        config = _meta_rm_config(config, root / name / "config.yaml", exports)
    export_dir = root / name / "export"
    args = [
        "fit",
        "-c",
        config,
        f"--trainer.logger.init_args.save_dir={root}",
        f"--trainer.logger.init_args.name={name}",
        f"--model.init_args.export_dir={export_dir}",
        *STAGES[stage](exports),
        *extra,
    ]
    print(f"\n=== {name}: python cli.py {' '.join(args)}\n", flush=True)
    start = time.time()
    cli = main(args)
    metrics = {
        k: float(v)
        for k, v in cli.trainer.callback_metrics.items()
        if v.numel() == 1 and "/" in k and not k.startswith(("time/", "tokens_per_s/"))
    }
    return StageResult(stage, args, time.time() - start, str(cli.trainer.log_dir), str(export_dir), metrics)


def main(argv: list[str] | None = None) -> list[StageResult]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stages", default="sft,rm,dpo,ppo", help="comma-separated stages, in order")
    parser.add_argument("--config-name", default="tiny", help="config file name in each configs/<stage>/ folder")
    parser.add_argument("--configs", default="configs", help="folder holding configs/<stage>/<name>.yaml")
    parser.add_argument("--root", default="runs/pipeline", help="where logs and exports go")
    parser.add_argument(
        "--set", action="append", default=[], metavar="STAGE:KEY=VALUE",
        help="extra CLI override for one stage, e.g. dpo:model.init_args.beta=0.2 (repeatable)",
    )
    args = parser.parse_args(argv)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        parser.error(f"unknown stage(s) {unknown}; choose from {list(STAGES)}")
    overrides: dict[str, list[str]] = {s: [] for s in stages}
    for item in args.set:
        stage, _, kv = item.partition(":")
        if stage not in overrides or "=" not in kv:
            parser.error(f"--set {item!r}: expected STAGE:KEY=VALUE with STAGE in {stages}")
        overrides[stage].append(f"--{kv}")
    root = Path(args.root)
    exports: dict[str, str] = {}
    results = []
    runs: dict[str, int] = {}
    for stage in stages:
        config = Path(args.configs) / PREDICT_STAGES.get(stage, stage) / f"{args.config_name}.yaml"
        if not config.exists():
            parser.error(f"no config {config} for stage {stage!r}")
        runs[stage] = runs.get(stage, 0) + 1
        name = stage if runs[stage] == 1 else f"{stage}_{runs[stage]}"
        result = run_stage(stage, str(config), root, exports, overrides[stage], name)
        exports[stage] = result.export_dir
        if stage in ROLES:
            exports[ROLES[stage]] = result.export_dir
        results.append(result)
    print("\n=== pipeline summary")
    for r in results:
        shown = {k: round(v, 4) for k, v in sorted(r.metrics.items()) if not k.endswith(("grad_norm", "/lr", "nonfinite_steps"))}
        print(f"{r.stage:>7}: {r.seconds:6.1f} s  logs {r.log_dir}  export {r.export_dir}")
        print(f"      {json.dumps(shown)}")
    print(f"TensorBoard: tensorboard --logdir {root}")
    return results


if __name__ == "__main__":
    main()
