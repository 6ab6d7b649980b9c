"""GIL vs PPO on two prompt domains of different difficulty (tiny CPU setup), same settings and seeds; and the cost of
a GIL iteration against a PPO iteration.

Setup: built-in tiny Llama, the embedded HH-RLHF prompts of two domains (``hh_helpful_base``, ``hh_harmless_base``),
a rule-based reward that depends on the domain (:class:`DomainTokenReward`): on helpful prompts the count of ``e``
in the 16-token response (a frequent letter: easy to raise), on harmless prompts the count of ``k`` (rare: hard).
16 prompts per iteration, 2 PPO epochs x 2 minibatches, running reward normalisation ``norm_clip``, adaptive KL.

- ``ppo``: ``GILModule`` with ``beta_policy: 0`` and no ``AdaptiveExploration``: every loss weight is exactly 1, so
  the update is PPO's (the ``GroupInference`` callback only observes, for the per-group logs);
- ``gil``: ``GILModule`` (``invariance: variance``, ``beta_policy``), ``GroupInference`` and ``AdaptiveExploration``
  (``form: paper``), otherwise identical.

Per run: the mean raw score and the worst-domain score (the lower of the two domains' means; the hard domain) of the
rollouts, averaged over the last ``--window`` iterations, the gap between the domains, the summed KL per sequence at
the end. Printed: mean over seeds with a 95% t-interval. Cost: wall time per iteration (rollout, hooks and update;
from ``on_train_batch_start`` to ``on_train_batch_end``) of a plain ``PPOModule`` run and of the ``gil`` run at the
same settings, and the peak RSS of a separate process per method (``--cost``).

    OMP_NUM_THREADS=1 python bench/gil_evidence.py --iterations 20 --seeds 0 1 2 --cost

Reads nothing outside the package (built-in model and data); writes only to a temporary folder.
"""

from __future__ import annotations

import argparse
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Sequence

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import lightning as L  # noqa: E402
import torch  # noqa: E402

from callbacks.adaptive_exploration import AdaptiveExploration  # noqa: E402
from callbacks.adaptive_kl import AdaptiveKLController  # noqa: E402
from callbacks.group_inference import GroupInference  # noqa: E402
from lightning_rlhf.data import PromptDataModule  # noqa: E402
from lightning_rlhf.methods import GILModule, PPOModule  # noqa: E402

DOMAINS = ["hh_harmless_base", "hh_helpful_base"]


class DomainTokenReward:
    """Count of a domain-dependent letter in the response: ``easy_token`` on most domains, ``hard_token`` on
    ``hard_domain`` (a toy reward with one easy and one hard group of prompts).

    Args:
        easy_token: letter counted on the easy domains.
        hard_token: letter counted on ``hard_domain``.
        hard_domain: the domain whose prompts are scored with ``hard_token``.
    """

    def __init__(self, easy_token: str = "e", hard_token: str = "k", hard_domain: str = "hh_harmless_base") -> None:
        self.easy_token, self.hard_token, self.hard_domain = easy_token, hard_token, hard_domain

    def __call__(self, prompts: Sequence[str], responses: Sequence[str], domains: Sequence[str] = (),
                 **extras: Any) -> list[float]:
        domains = list(domains) or [""] * len(responses)
        return [float(r.count(self.hard_token if d == self.hard_domain else self.easy_token))
                for r, d in zip(responses, domains)]


REWARD = {"class_path": "bench.gil_evidence.DomainTokenReward", "init_args": {}}
COMMON = dict(model_name_or_path="builtin:tiny-llama", reward_fn=REWARD, critic="separate", lr=1e-2, critic_lr=1e-3,
              kl_coef=0.01, ppo_epochs=2, mini_batch_size=8, micro_batch_size=8, max_new_tokens=16,
              reward_norm="norm_clip", log_samples_every_n=0, export_dir=None)


class IterationTimer(L.Callback):
    """Wall time of every training step (= PPO iteration) and the per-iteration logged metrics."""

    def __init__(self, keys: Sequence[str]) -> None:
        self.keys, self.times, self.records = list(keys), [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.times.append(time.perf_counter() - self._t0)
        m = trainer.callback_metrics
        self.records.append({k: float(m[k]) for k in self.keys if k in m})


def run(method: str, seed: int, iterations: int, beta: float) -> IterationTimer:
    """One training run; returns the timer with per-iteration metrics."""
    L.seed_everything(seed, verbose=False)
    keys = ["score/mean", "kl", "time/update", *(f"score/domain_{d}" for d in DOMAINS), "score/worst_domain", "group/ari_domain"]
    timer = IterationTimer(keys)
    callbacks: list[L.Callback] = [AdaptiveKLController(target=2.0, horizon=1000)]
    if method == "plain_ppo":
        module = PPOModule(**COMMON, seed=seed, max_iterations=iterations)
    else:
        callbacks.append(GroupInference(num_groups=2, group_steps=4, lr=5e-2, seed=seed))
        if method == "gil":
            callbacks.append(AdaptiveExploration(form="paper"))
        module = GILModule(**COMMON, seed=seed, max_iterations=iterations,
                           beta_policy=beta if method == "gil" else 0.0)
    data = PromptDataModule(train_path="builtin:hh-rlhf", domains=DOMAINS, batch_size=16, max_prompt_length=64,
                            skip_invalid_rows=True, max_train_rows=512, max_val_rows=4, seed=seed)
    with tempfile.TemporaryDirectory() as tmp:
        L.Trainer(accelerator="cpu", devices=1, max_steps=-1, logger=False, limit_val_batches=0,
                  enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                  default_root_dir=tmp, callbacks=[*callbacks, timer]).fit(module, data)
    return timer


def ci95(values: list[float]) -> tuple[float, float]:
    """Mean and half-width of the 95% t-interval."""
    n = len(values)
    mean = statistics.fmean(values)
    if n < 2:
        return mean, float("nan")
    t = {2: 12.706, 3: 4.303, 4: 3.182, 5: 2.776}.get(n, 1.96)
    return mean, t * statistics.stdev(values) / math.sqrt(n)


def summarise(timer: IterationTimer, window: int) -> dict[str, float]:
    tail = timer.records[-window:]

    def avg(key: str) -> float:
        return statistics.fmean(r[key] for r in tail)

    return {
        "mean": avg("score/mean"), "worst": avg("score/worst_domain"),
        "gap": avg(f"score/domain_{DOMAINS[1]}") - avg(f"score/domain_{DOMAINS[0]}"),
        "kl_end": timer.records[-1]["kl"], "ari": avg("group/ari_domain") if "group/ari_domain" in tail[-1] else float("nan"),
    }


def cost_worker(method: str, iterations: int) -> None:
    """Child process: one run, prints the median iteration time (after the first) and the peak RSS."""
    timer = run(method, 0, iterations, beta=1.0)
    steady = statistics.median(timer.times[1:])
    update = statistics.median(r["time/update"] for r in timer.records[1:])
    print(f"COST {method} {steady:.4f} {update:.4f} {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--window", type=int, default=5, help="last iterations averaged per run")
    parser.add_argument("--beta", type=float, default=1.0, help="beta_policy of the gil arm")
    parser.add_argument("--cost", action="store_true", help="also measure time and memory per iteration")
    parser.add_argument("--cost-iterations", type=int, default=8)
    parser.add_argument("--cost-repeats", type=int, default=2)
    parser.add_argument("--cost-worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.cost_worker:
        cost_worker(args.cost_worker, args.iterations)
        return

    t_start = time.perf_counter()
    results: dict[str, list[dict[str, float]]] = {"ppo": [], "gil": []}
    curves: dict[str, list[list[float]]] = {"ppo": [], "gil": []}
    for seed in args.seeds:
        for method in ("ppo", "gil"):
            timer = run(method, seed, args.iterations, args.beta)
            results[method].append(summarise(timer, args.window))
            curves[method].append([r["score/worst_domain"] for r in timer.records])
            s = results[method][-1]
            print(f"seed {seed} {method}: mean {s['mean']:.3f} worst {s['worst']:.3f} gap {s['gap']:.3f} "
                  f"kl_end {s['kl_end']:.3f} ari {s['ari']:.3f}", flush=True)

    print(f"\nGIL vs PPO, tiny Llama, domains {DOMAINS[1]} (easy: 'e') / {DOMAINS[0]} (hard: 'k'), "
          f"{args.iterations} iterations x 16 prompts, seeds {args.seeds}, last {args.window} iterations averaged; "
          f"mean +- 95% t-interval over seeds")
    print(f"| method | mean score | worst-domain score | easy - hard gap | KL at end (nats/seq) | ARI groups vs domains |")
    print("|---|---|---|---|---|---|")
    for method in ("ppo", "gil"):
        cells = []
        for key in ("mean", "worst", "gap", "kl_end", "ari"):
            m, h = ci95([r[key] for r in results[method]])
            cells.append(f"{m:.3f} +- {h:.3f}")
        print(f"| {method} | " + " | ".join(cells) + " |")
    diffs = {k: [g[k] - p[k] for g, p in zip(results["gil"], results["ppo"])] for k in ("mean", "worst", "gap")}
    print("paired difference gil - ppo (same seed): " + ", ".join(
        f"{k} {ci95(v)[0]:+.3f} +- {ci95(v)[1]:.3f}" for k, v in diffs.items()))
    print("worst-domain score per iteration (mean over seeds):")
    for method in ("ppo", "gil"):
        per_it = [statistics.fmean(c[i] for c in curves[method]) for i in range(args.iterations)]
        print(f"  {method}: " + " ".join(f"{v:.2f}" for v in per_it))
    print(f"evidence wall time {time.perf_counter() - t_start:.0f} s")

    if args.cost:
        # alternate the methods (ppo, gil, ppo, gil) and keep each method's best median: the machine is shared
        costs: dict[str, list[tuple[float, float, float]]] = {"plain_ppo": [], "gil": []}
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.environ.get("PYTHONPATH", "")])}
        for _ in range(args.cost_repeats):
            for method in ("plain_ppo", "gil"):
                proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--cost-worker", method,
                                       "--iterations", str(args.cost_iterations)], capture_output=True, text=True, env=env)
                line = [ln for ln in proc.stdout.splitlines() if ln.startswith("COST")]
                if not line:
                    raise RuntimeError(proc.stderr[-3000:])
                costs[method].append(tuple(float(x) for x in line[0].split()[2:]))
        (tp, up, mp), (tg, ug, mg) = (min(costs[m]) for m in ("plain_ppo", "gil"))
        print(f"cost (seed 0, median over iterations 2..{args.cost_iterations}, best of {args.cost_repeats} "
              f"alternating processes): iteration PPOModule {tp:.3f} s, GIL {tg:.3f} s ({tg / tp:.2f}x); update phase "
              f"{up:.3f} s vs {ug:.3f} s ({ug / up:.2f}x); peak RSS {mp:.0f} MiB vs {mg:.0f} MiB ({mg / mp:.2f}x)")
        print("all cost runs (iteration s, update s, RSS MiB):", {k: v for k, v in costs.items()})


if __name__ == "__main__":
    main()
