"""PPO with and without the contrastive reward (spec 4) on the tiny CPU setup, same seeds, same iterations.

Setup = configs/ppo/tiny.yaml / configs/contrastive/tiny.yaml: built-in tiny Llama, rule-based reward (count of "e"
in a 16-token response), the embedded HH-RLHF prompts (128-row subset, prompts <= 64 tokens), 16 prompts per
iteration, running reward normalisation ``norm_clip``. The contrastive run first needs the offline baseline pass
(k samples per prompt from the initial policy, ``b(x)`` = their mean), which this script runs once into a temporary
folder. Per iteration it prints, averaged over the seeds:

* ``raw``: the mean raw score ``r(x, y)`` of the rollouts (the quantity both runs try to raise);
* ``var``: the variance over the rollout batch of the score after the method's transform and before the running
  normalisation: ``r`` for PPO, ``r - b(x)`` for contrastive PPO.

    OMP_NUM_THREADS=1 python bench/contrastive_compare.py --iterations 20 --seeds 0 1 2

Reads nothing outside the package (built-in model and data); writes only to a temporary folder.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import lightning as L  # noqa: E402
import torch  # noqa: E402

from lightning_rlhf.data import PromptDataModule  # noqa: E402
from lightning_rlhf.methods import BaselineSamplerModule, ContrastivePPOModule, PPOModule  # noqa: E402

REWARD = {"class_path": "lightning_rlhf.rewards.TokenCountReward", "init_args": {"token": "e"}}
SAMPLING = dict(max_new_tokens=16, temperature=1.0, top_p=1.0, top_k=0)
PPO_ARGS = dict(model_name_or_path="builtin:tiny-llama", reward_fn=REWARD, critic="separate", lr=1e-2, critic_lr=1e-3,
                kl_coef=0.01, ppo_epochs=4, mini_batch_size=8, micro_batch_size=8, reward_norm="norm_clip",
                log_samples_every_n=0, export_dir=None, **SAMPLING)


def data() -> PromptDataModule:
    """The prompts of both runs and of the baseline pass (data seed fixed: the same prompt subset everywhere)."""
    return PromptDataModule(train_path="builtin:hh-rlhf", batch_size=16, max_prompt_length=64, max_train_rows=128,
                            skip_invalid_rows=True, seed=0)


def trainer(root: Path, **kwargs: Any) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, default_root_dir=root, max_steps=-1, limit_val_batches=0, **kwargs)


class Record(L.Callback):
    """Per-iteration statistics from the dict ``training_step`` returns (already rank-reduced)."""

    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        out = {k: float(v) for k, v in outputs.items()}
        # PPO: the shaped score before normalisation is the raw score (unbiased variance in both cases)
        var = out["contrastive/shaped_var"] if "contrastive/shaped_var" in out else out["score/std"] ** 2
        beat = out.get("contrastive/beat_baseline_frac", float("nan"))
        self.rows.append({"raw": out["score/mean"], "var": var, "beat": beat,
                          "missing": out.get("contrastive/missing_baseline", 0.0)})


def run(cls: type, seed: int, iterations: int, root: Path, **extra: Any) -> list[dict[str, float]]:
    L.seed_everything(seed, verbose=False)
    module = cls(**PPO_ARGS, seed=seed, max_iterations=iterations, **extra)
    rec = Record()
    trainer(root, callbacks=[rec]).fit(module, datamodule=data())
    return rec.rows


def mean(xs: list[float]) -> float:
    return statistics.fmean(xs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--num-samples", type=int, default=4, help="k of the baseline pass")
    parser.add_argument("--agg", default="mean", choices=["mean", "median", "max", "quantile"])
    args = parser.parse_args()
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        baseline = root / "baseline.jsonl"
        t0 = time.perf_counter()
        L.seed_everything(0, verbose=False)
        sampler = BaselineSamplerModule(model_name_or_path="builtin:tiny-llama", reward_fn=REWARD,
                                        output_path=str(baseline), num_samples=args.num_samples, agg=args.agg,
                                        seed=0, **SAMPLING)
        trainer(root).predict(sampler, datamodule=data(), return_predictions=False)
        t_base = time.perf_counter() - t0
        runs: dict[str, list[list[dict[str, float]]]] = {"ppo": [], "cr": []}
        t_runs = {"ppo": 0.0, "cr": 0.0}
        for seed in args.seeds:
            t0 = time.perf_counter()
            runs["ppo"].append(run(PPOModule, seed, args.iterations, root))
            t_runs["ppo"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            runs["cr"].append(run(ContrastivePPOModule, seed, args.iterations, root, baseline_path=str(baseline),
                                  on_missing_baseline="error"))
            t_runs["cr"] += time.perf_counter() - t0

    n_prompts = sampler.num_sampled
    print(f"\nbaseline pass: {n_prompts} prompts x k={args.num_samples}, agg={args.agg}, {t_base:.1f} s; "
          f"PPO {t_runs['ppo']:.0f} s, contrastive PPO {t_runs['cr']:.0f} s for {len(args.seeds)} seed(s)")
    print(f"per iteration, mean over seeds {args.seeds} (raw = mean raw score r; var = variance of the shaped score "
          "before normalisation: r for PPO, r - b(x) for contrastive; beat = share of rollouts with r > b)\n")
    print(f"{'iter':>4} | {'PPO raw':>8} {'PPO var':>8} | {'CR raw':>8} {'CR var':>8} {'CR beat':>8}")
    print("-" * 54)
    for i in range(args.iterations):
        p = [r[i] for r in runs["ppo"]]
        c = [r[i] for r in runs["cr"]]
        cells = [mean([x[k] for x in rows]) for rows, k in ((p, "raw"), (p, "var"), (c, "raw"), (c, "var"), (c, "beat"))]
        print(f"{i:>4} | {cells[0]:8.2f} {cells[1]:8.2f} | {cells[2]:8.2f} {cells[3]:8.2f} {cells[4]:8.2f}")
    print("-" * 54)
    last = max(1, min(5, args.iterations))
    for name, key in (("PPO", "ppo"), ("contrastive PPO", "cr")):
        per_seed_last = [mean([row["raw"] for row in r[-last:]]) for r in runs[key]]
        per_seed_var = [mean([row["var"] for row in r]) for r in runs[key]]
        print(f"{name:>16}: raw mean of the last {last} iterations per seed "
              f"{[round(x, 2) for x in per_seed_last]} (mean {mean(per_seed_last):.2f}); "
              f"shaped-score variance averaged over iterations {mean(per_seed_var):.2f}")
    missing = sum(row["missing"] for r in runs["cr"] for row in r)
    print(f"contrastive rollouts without a stored baseline: {int(missing)}")


if __name__ == "__main__":
    main()
