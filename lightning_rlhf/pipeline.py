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

Iterative MetaRM rounds (spec 3, the paper's order): ``samples`` is ``python -m lightning_rlhf.cli predict -c
configs/policy_samples/<config>.yaml`` with the latest policy (the last PPO export, else the SFT export), writing
``<root>/samples/version_N/samples.jsonl``; ``meta_rm`` trains ``configs/meta_rm/<config>.yaml`` from the latest
reward model (the last RM or MetaRM export, else the SFT export) on those samples (the config's sample-stream
``train_path`` is replaced in a copy, ``<root>/meta_rm/version_N/input_config.yaml``, that the printed command names);
``ppo`` then continues from the latest policy with the latest reward model. A stage named twice runs in
``<root>/<stage>_2/`` and so on.

AIHF in one stage, in place of SFT -> RM -> PPO: ``--stages aihf`` (Self-Play AIHF, ``configs/aihf/tiny.yaml``), with
``--config-name tiny_nll`` (AIHF-DPO) or ``tiny_rlhf`` (explicit reward model + PPO); after an ``sft`` stage it
starts from the SFT export.
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
    "aihf": _policy_from_sft,  # one stage in place of sft -> rm -> ppo (configs/aihf/<config>.yaml)
}
#: which role a stage's export takes for the stages after it
ROLES = {"sft": "policy", "ppo": "policy", "aihf": "policy", "rm": "reward", "meta_rm": "reward", "samples": "samples"}
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
              version: int | None = None, name: str | None = None) -> StageResult:
    """Run one stage through the CLI in this process and return where its logs and export went.

    Args:
        stage: ``sft``, ``rm``, ``dpo``, ``ppo``, ``samples`` or ``meta_rm``.
        config: The stage's config file.
        root: Logs go to ``<root>/<name>/version_<version>``.
        exports: Export folders (and roles: ``policy``, ``reward``, ``samples``) of the earlier stages of this run.
        extra: More CLI overrides.
        version: The logger version (the folder's number); ``None``: the next free one.
        name: The stage's folder under ``root`` (default: the stage; ``<stage>_2`` for a stage's second run).
    """
    from lightning_rlhf.cli import main, quiet_libraries

    name = name or stage
    logger = [f"--trainer.logger.init_args.save_dir={root}", f"--trainer.logger.init_args.name={name}",
              *([f"--trainer.logger.init_args.version={version}"] if version is not None else [])]
    run_dir = root / name / (f"version_{version}" if version is not None else "")
    quiet_libraries(lightning_info=False)
    if stage in PREDICT_STAGES:
        output = run_dir / "samples.jsonl"
        args = ["predict", "-c", config, f"--model.init_args.output_path={output}",  # (the pass logs nothing)
                *STAGES[stage](exports), *extra]
        print(f"\n=== {name}: python -m lightning_rlhf.cli {' '.join(args)}", flush=True)
        start = time.time()
        main(args)
        result = StageResult(stage, args, time.time() - start, str(run_dir), str(output))
        print(f"=== {name} done in {result.seconds:.0f} s: samples {output}", flush=True)
        return result
    if stage == "meta_rm":
        config = _meta_rm_config(config, run_dir / "input_config.yaml", exports)
    args = [
        "fit",
        "-c",
        config,
        *logger,
        "--model.init_args.export_dir=auto",  # <log dir>/export: the run's own folder
        "--trainer.enable_model_summary=false",
        *STAGES[stage](exports),
        *extra,
    ]
    print(f"\n=== {name}: python -m lightning_rlhf.cli {' '.join(args)}", flush=True)
    start = time.time()
    cli = main(args)
    metrics = {
        k: float(v)
        for k, v in cli.trainer.callback_metrics.items()
        if v.numel() == 1 and "/" in k and not k.startswith(("time/", "tokens_per_s/"))
    }
    export_dir = cli.model.resolved_export_dir()
    result = StageResult(stage, args, time.time() - start, str(cli.trainer.log_dir), export_dir, metrics)
    print(f"=== {name} done in {result.seconds:.0f} s: logs {result.log_dir}, export {export_dir}", flush=True)
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
    runs: dict[str, int] = {}
    names = []  # the stages' folders: a stage named twice runs in <stage>_2, and so on
    for stage in stages:
        runs[stage] = runs.get(stage, 0) + 1
        names.append(stage if runs[stage] == 1 else f"{stage}_{runs[stage]}")
    configs = [Path(args.configs) / PREDICT_STAGES.get(stage, stage) / f"{args.config_name}.yaml" for stage in stages]
    for stage, config in zip(stages, configs):
        if not config.exists():
            parser.error(f"no config {config} for stage {stage!r}")
    version = reserve_version(root, names)
    print(f"=== pipeline run version_{version}: stages {', '.join(names)} under {root}", flush=True)
    exports: dict[str, str] = {}
    results = []
    for stage, name, config in zip(stages, names, configs):
        result = run_stage(stage, str(config), root, exports, overrides[stage], version=version, name=name)
        if result.export_dir is None:
            raise RuntimeError(f"stage {name} exported nothing (model.export_dir: null?): the next stages need it")
        exports[stage] = result.export_dir
        if stage in ROLES:
            exports[ROLES[stage]] = result.export_dir
        results.append(result)
    summary = root / f"pipeline_version_{version}.json"
    summary.write_text(json.dumps([vars(r) for r in results], indent=1))
    print("\n=== pipeline summary")
    for r in results:
        shown = {k: round(v, 4) for k, v in sorted(r.metrics.items()) if not k.endswith(("grad_norm", "/lr", "nonfinite_steps"))}
        print(f"{r.stage:>7}: {r.seconds:6.1f} s  logs {r.log_dir}  export {r.export_dir}")
        print(f"      {json.dumps(shown)}")
    print(f"TensorBoard: tensorboard --logdir {root}   (this run: version_{version}; summary {summary})")
    return results


if __name__ == "__main__":
    main()
