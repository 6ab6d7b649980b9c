"""The main job: chain the stages of RLHF through exported Hugging Face folders, one LightningCLI run per stage.

    python -m lightning_rlhf.pipeline                       # sft -> rm -> dpo -> ppo on the tiny configs, CPU
    python -m lightning_rlhf.pipeline --stages sft,dpo --root runs/my_pipeline
    python -m lightning_rlhf.pipeline --set dpo:model.init_args.beta=0.2

Each stage is exactly ``python cli.py fit -c configs/<stage>/<config>.yaml`` with the previous stages' export
folders filled in (policy = SFT export; PPO's reward model = RM export), logging to ``<root>/<stage>/`` and
exporting to ``<root>/<stage>/export``. Nothing here is hidden orchestration: the commands it runs are printed,
and can be run by hand.
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
    out = _policy_from_sft(exports)
    if "rm" in exports:  # the trained reward model replaces the config's rule-based reward
        out += [f"--model.init_args.reward_model_name_or_path={exports['rm']}", "--model.init_args.reward_fn=null"]
    return out


STAGES: dict[str, Linker] = {
    "sft": lambda exports: [],
    "rm": _policy_from_sft,
    "dpo": _policy_from_sft,
    "ppo": _ppo_links,
}


@dataclass
class StageResult:
    stage: str
    command: list[str]
    seconds: float
    log_dir: str
    export_dir: str | None
    metrics: dict[str, float] = field(default_factory=dict)


def run_stage(stage: str, config: str, root: Path, exports: dict[str, str], extra: list[str]) -> StageResult:
    """Run one stage through the CLI in this process and return where its logs and export went."""
    from lightning_rlhf.cli import main

    export_dir = root / stage / "export"
    args = [
        "fit",
        "-c",
        config,
        f"--trainer.logger.init_args.save_dir={root}",
        f"--trainer.logger.init_args.name={stage}",
        f"--model.init_args.export_dir={export_dir}",
        *STAGES[stage](exports),
        *extra,
    ]
    print(f"\n=== {stage}: python cli.py {' '.join(args)}\n", flush=True)
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
    for stage in stages:
        config = Path(args.configs) / stage / f"{args.config_name}.yaml"
        if not config.exists():
            parser.error(f"no config {config} for stage {stage!r}")
        result = run_stage(stage, str(config), root, exports, overrides[stage])
        exports[stage] = result.export_dir
        results.append(result)
    print("\n=== pipeline summary")
    for r in results:
        shown = {k: round(v, 4) for k, v in sorted(r.metrics.items()) if not k.endswith(("grad_norm", "/lr", "nonfinite_steps"))}
        print(f"{r.stage:>4}: {r.seconds:6.1f} s  logs {r.log_dir}  export {r.export_dir}")
        print(f"      {json.dumps(shown)}")
    print(f"TensorBoard: tensorboard --logdir {root}")
    return results


if __name__ == "__main__":
    main()
