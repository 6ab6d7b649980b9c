"""The main job: chain the stages of RLHF through exported Hugging Face folders, one LightningCLI run per stage.

    python -m lightning_rlhf.pipeline                       # sft -> rm -> dpo -> ppo on the tiny configs, CPU
    python -m lightning_rlhf.pipeline --stages sft,dpo --root runs/my_pipeline
    python -m lightning_rlhf.pipeline --set dpo:model.init_args.beta=0.2

Each stage is exactly ``python -m lightning_rlhf.cli fit -c configs/<stage>/<config>.yaml`` with the previous
stages' export folders filled in (policy = SFT export; PPO's reward model = RM export). A pipeline run reserves one
version number ``N`` free in every stage folder (an atomic ``mkdir``, so pipelines started together with the same
``--root`` get different numbers), and each stage logs, checkpoints and exports in ``<root>/<stage>/version_N/``
(export: ``<root>/<stage>/version_N/export``). Later stages are given the exact folders this run's stages wrote,
never another run's; re-runs never overwrite earlier exports. The run's stages, folders and final metrics are written
to ``<root>/pipeline_version_N.json``. Nothing here is hidden orchestration: the commands it runs are printed, and can
be run by hand, from any folder (the default configs are the package's ``configs/``).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

#: the ``configs/`` folder of this checkout (the default of ``--configs``, whatever the working directory)
CONFIGS = Path(__file__).resolve().parent.parent / "configs"

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


def reserve_version(root: Path, stages: list[str]) -> int:
    """The smallest ``N`` such that ``<root>/<stage>/version_N`` is new for every stage, created now (``mkdir`` is
    atomic: of two pipelines racing for the same ``N`` one wins, the other moves on)."""
    n = 0
    for stage in stages:
        (root / stage).mkdir(parents=True, exist_ok=True)
        taken = [p.name[len("version_"):] for p in (root / stage).glob("version_*")]
        n = max([n, *(int(t) + 1 for t in taken if t.isdigit())])
    while True:
        made: list[Path] = []
        try:
            for stage in stages:
                folder = root / stage / f"version_{n}"
                folder.mkdir()
                made.append(folder)
            return n
        except FileExistsError:
            for folder in made:
                os.rmdir(folder)
            n += 1


def run_stage(stage: str, config: str, root: Path, exports: dict[str, str], extra: list[str],
              version: int | None = None) -> StageResult:
    """Run one stage through the CLI in this process and return where its logs and export went.

    Args:
        stage: ``sft``, ``rm``, ``dpo`` or ``ppo``.
        config: The stage's config file.
        root: Logs go to ``<root>/<stage>/version_<version>``.
        exports: Export folders of the earlier stages of this pipeline run.
        extra: More CLI overrides.
        version: The logger version (the folder's number); ``None``: the next free one.
    """
    from lightning_rlhf.cli import main, quiet_libraries

    args = [
        "fit",
        "-c",
        config,
        f"--trainer.logger.init_args.save_dir={root}",
        f"--trainer.logger.init_args.name={stage}",
        *([f"--trainer.logger.init_args.version={version}"] if version is not None else []),
        "--model.init_args.export_dir=auto",  # <log dir>/export: the run's own folder
        "--trainer.enable_model_summary=false",
        *STAGES[stage](exports),
        *extra,
    ]
    print(f"\n=== {stage}: python -m lightning_rlhf.cli {' '.join(args)}", flush=True)
    start = time.time()
    quiet_libraries(lightning_info=False)
    cli = main(args)
    metrics = {
        k: float(v)
        for k, v in cli.trainer.callback_metrics.items()
        if v.numel() == 1 and "/" in k and not k.startswith(("time/", "tokens_per_s/"))
    }
    export_dir = cli.model.resolved_export_dir()
    result = StageResult(stage, args, time.time() - start, str(cli.trainer.log_dir), export_dir, metrics)
    print(f"=== {stage} done in {result.seconds:.0f} s: logs {result.log_dir}, export {export_dir}", flush=True)
    return result


def main(argv: list[str] | None = None) -> list[StageResult]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stages", default="sft,rm,dpo,ppo", help="comma-separated stages, in order")
    parser.add_argument("--config-name", default="tiny", help="config file name in each configs/<stage>/ folder")
    parser.add_argument("--configs", default=str(CONFIGS), help="folder holding <stage>/<name>.yaml (default: the "
                        "checkout's configs/, from any working directory)")
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
    configs = {stage: Path(args.configs) / stage / f"{args.config_name}.yaml" for stage in stages}
    for stage, config in configs.items():
        if not config.exists():
            parser.error(f"no config {config} for stage {stage!r}")
    version = reserve_version(root, stages)
    print(f"=== pipeline run version_{version}: stages {', '.join(stages)} under {root}", flush=True)
    exports: dict[str, str] = {}
    results = []
    for stage in stages:
        result = run_stage(stage, str(configs[stage]), root, exports, overrides[stage], version=version)
        if result.export_dir is None:
            raise RuntimeError(f"stage {stage} exported nothing (model.export_dir: null?): the next stages need it")
        exports[stage] = result.export_dir
        results.append(result)
    summary = root / f"pipeline_version_{version}.json"
    summary.write_text(json.dumps([vars(r) for r in results], indent=1))
    print("\n=== pipeline summary")
    for r in results:
        shown = {k: round(v, 4) for k, v in sorted(r.metrics.items()) if not k.endswith(("grad_norm", "/lr", "nonfinite_steps"))}
        print(f"{r.stage:>4}: {r.seconds:6.1f} s  logs {r.log_dir}  export {r.export_dir}")
        print(f"      {json.dumps(shown)}")
    print(f"TensorBoard: tensorboard --logdir {root}   (this run: version_{version}; summary {summary})")
    return results


if __name__ == "__main__":
    main()
