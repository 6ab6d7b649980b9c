"""GIL vs PPO on two prompt domains of different difficulty (tiny CPU setup), same settings and seeds; and the cost of
a GIL iteration against a PPO iteration.

Setup: built-in tiny Llama, the embedded HH-RLHF prompts of two domains (``hh_helpful_base``, ``hh_harmless_base``),
a rule-based reward that depends on the domain (:class:`DomainTokenReward`): on helpful prompts the count of ``e``
in the 16-token response (a frequent letter: easy to raise), on harmless prompts the count of ``k`` (rare: hard).
16 prompts per iteration, 2 PPO epochs x 2 minibatches, running reward normalisation ``norm_clip``, adaptive KL.

Arms (``--arms``):

- ``ppo``: ``GILModule`` with ``beta_policy: 0`` and no ``AdaptiveExploration``: every loss weight is exactly 1, so
  the update is PPO's (a separate ``GroupInference`` head only observes, for the per-group logs and the ARI);
- ``gil``: ``GILModule`` (``invariance: variance``, ``beta_policy``), ``GroupInference`` (``placement: separate``,
  on the critic's last-token hidden state, 4 Adam steps per iteration) and ``AdaptiveExploration`` (``form: paper``),
  otherwise identical;
- ``gil_critic``: as ``gil`` with the paper's placement, the group head inside the critic (``placement: critic``,
  trained by the critic's optimizer with ``L_value + L_group`` on the critic's non-detached hidden state);
- ``gil_policy``: as ``gil`` with the separate head on the POLICY's last-token hidden state
  (``model.feature_source: policy``): does a trained trunk's state carry the domain better than the critic's?
- ``gil_oracle`` (a diagnostic, NOT label-free): as ``gil`` with a one-hot of the data's domain appended to the
  critic features the head sees (:class:`OracleFeaturesGIL`): what GIL's objective and exploration do when the
  features carry the group, i.e. when group inference can succeed.
- ablations of ``gil``: ``gil_no_explore`` (the variance penalty, no ``AdaptiveExploration``) and ``explore_only``
  (``AdaptiveExploration``, ``beta_policy: 0``): which part moves the scores.

Per run: the mean raw score and the worst-domain score (the lower of the two domains' means; the hard domain) of the
rollouts, averaged over the last ``--window`` iterations, the gap between the domains, the summed KL per sequence at
the end, the adjusted Rand index of the inferred groups against the domains, and how well the head's features carry
the domain at all: the leave-one-out accuracy of a nearest-class-mean classifier of the domain on the standardised
features of the last ``--window`` rollouts (a supervised probe; 0.5 = chance). The score at equal KL: each run's
per-iteration (KL, score) trajectory, smoothed over 3 iterations, is read where its KL first reaches a level
(linear interpolation between iterations); levels are fractions of the largest KL that every run reached. Printed:
mean over seeds with a 95% t-interval; ``--plot`` writes a PNG (scores per domain, worst-domain score and domain gap
over training, score against KL). Cost: wall time per iteration (rollout, hooks and update; from
``on_train_batch_start`` to ``on_train_batch_end``) of a plain ``PPOModule`` run and of the ``gil`` and ``gil_critic``
runs at the same settings, and the peak RSS of a separate process per method (``--cost``).

    OMP_NUM_THREADS=1 python bench/gil_evidence.py --iterations 20 --seeds 0 1 2 3 4 --cost \
        --plot bench/figures/gil_vs_ppo.png

Reads nothing outside the package (built-in model and data); writes only to a temporary folder (and the PNG).
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


ARMS = ("ppo", "gil", "gil_critic", "gil_policy", "gil_oracle", "gil_no_explore", "explore_only")


class OracleFeaturesGIL(GILModule):
    """Diagnostic (not label-free): the rollout features shown to the group head get a one-hot of the data's domain
    appended, so a head on them CAN recover the domains; everything else is ``GILModule``."""

    def annotate_experience(self, exp):
        features = exp.extras.get("features")
        if features is not None:
            ids = exp.extras["domain_ids"].to(features.device).long()
            onehot = torch.nn.functional.one_hot(ids, max(len(self.domain_names()), int(ids.max()) + 1, 2))
            exp.extras["features"] = torch.cat([features, onehot.to(features.dtype)], dim=-1)
        super().annotate_experience(exp)


class IterationTimer(L.Callback):
    """Wall time of every training step (= PPO iteration), the per-iteration logged metrics, and the rollout view's
    features and domains (for the domain probe)."""

    def __init__(self, keys: Sequence[str], keep_features: bool = False) -> None:
        self.keys, self.times, self.records = list(keys), [], []
        self.cpu_times: list[float] = []  # process CPU time per iteration (1 thread: robust to other processes' load)
        self.update_cpu_times: list[float] = []
        self.keep_features = keep_features
        self.features: list[tuple[torch.Tensor, torch.Tensor]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._t0, self._c0 = time.perf_counter(), time.process_time()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.times.append(time.perf_counter() - self._t0)
        self.cpu_times.append(time.process_time() - self._c0)
        m = trainer.callback_metrics
        self.records.append({k: float(m[k]) for k in self.keys if k in m})
        view = pl_module.rollout_view()
        if self.keep_features and "features" in view:
            self.features.append((view["features"].detach().cpu().clone(), view["domain_ids"].detach().cpu().clone()))


def run(method: str, seed: int, iterations: int, beta: float) -> IterationTimer:
    """One training run of an arm (or ``plain_ppo``: ``PPOModule`` itself, for the cost); returns the timer."""
    L.seed_everything(seed, verbose=False)
    keys = ["score/mean", "kl", "time/update", *(f"score/domain_{d}" for d in DOMAINS), "score/worst_domain",
            "group/ari_domain"]
    timer = IterationTimer(keys, keep_features=method != "plain_ppo")
    callbacks: list[L.Callback] = [AdaptiveKLController(target=2.0, horizon=1000)]
    if method == "plain_ppo":
        module = PPOModule(**COMMON, seed=seed, max_iterations=iterations)
    else:
        placement = "critic" if method == "gil_critic" else "separate"
        callbacks.append(GroupInference(num_groups=2, group_steps=4, lr=5e-2, seed=seed, placement=placement))
        if method not in ("ppo", "gil_no_explore"):
            callbacks.append(AdaptiveExploration(form="paper"))
        cls = OracleFeaturesGIL if method == "gil_oracle" else GILModule
        extra = {"surrogate_prepass": "never"} if method == "gil_no_prepass" else {}
        module = cls(**COMMON, **extra, seed=seed, max_iterations=iterations,
                           beta_policy=0.0 if method in ("ppo", "explore_only") else beta,
                           feature_source="policy" if method == "gil_policy" else "critic")
    data = PromptDataModule(train_path="builtin:hh-rlhf", domains=DOMAINS, batch_size=16, max_prompt_length=64,
                            skip_invalid_rows=True, max_train_rows=512, max_val_rows=4, seed=seed)
    original_update = module.ppo_update

    def timed_update(exp):  # the update phase's CPU time
        c0 = time.process_time()
        out = original_update(exp)
        timer.update_cpu_times.append(time.process_time() - c0)
        return out

    module.ppo_update = timed_update  # type: ignore[method-assign]
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
    # two-sided 97.5% quantiles of Student's t with n - 1 degrees of freedom
    t = {2: 12.706, 3: 4.303, 4: 3.182, 5: 2.776, 6: 2.571, 7: 2.447, 8: 2.365, 9: 2.306, 10: 2.262, 11: 2.228,
         12: 2.201, 13: 2.179, 14: 2.160, 15: 2.145, 16: 2.131}.get(n, 1.96)
    return mean, t * statistics.stdev(values) / math.sqrt(n)


def domain_probe_accuracy(samples: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Leave-one-out accuracy of a nearest-class-mean classifier of the domain on standardised features.

    Args:
        samples: ``(features (n, H), domain_ids (n,))`` of some iterations (pooled).

    Returns:
        The accuracy (0.5 = chance with balanced domains); NaN with fewer than 2 rows per domain.
    """
    x = torch.cat([f for f, _ in samples]).double()
    y = torch.cat([d for _, d in samples])
    x = (x - x.mean(0)) / x.std(0).clamp_min(1e-6)
    classes = sorted(set(y.tolist()))
    if len(classes) < 2 or min(int((y == c).sum()) for c in classes) < 2:
        return float("nan")
    sums = {c: x[y == c].sum(0) for c in classes}
    counts = {c: int((y == c).sum()) for c in classes}
    correct = 0
    for i in range(len(y)):
        dists = []
        for c in classes:
            own = int(y[i]) == c
            centre = (sums[c] - (x[i] if own else 0)) / (counts[c] - (1 if own else 0))
            dists.append(float(((x[i] - centre) ** 2).sum()))
        correct += int(classes[dists.index(min(dists))] == int(y[i]))
    return correct / len(y)


def smooth(values: list[float], width: int = 3) -> list[float]:
    """Trailing moving average over ``width`` iterations (fewer at the start)."""
    return [statistics.fmean(values[max(0, i - width + 1): i + 1]) for i in range(len(values))]


def score_at_kl(kl: list[float], score: list[float], level: float) -> float:
    """``score`` where the (smoothed) ``kl`` trajectory first reaches ``level``, linearly interpolated between the two
    iterations around the crossing; NaN if it never does (the first iteration's value if it starts above)."""
    if kl[0] >= level:
        return score[0]
    for i in range(1, len(kl)):
        if kl[i] >= level:
            w = (level - kl[i - 1]) / (kl[i] - kl[i - 1])
            return score[i - 1] + w * (score[i] - score[i - 1])
    return float("nan")


def summarise(timer: IterationTimer, window: int) -> dict[str, float]:
    tail = timer.records[-window:]

    def avg(key: str) -> float:
        return statistics.fmean(r[key] for r in tail)

    return {
        "mean": avg("score/mean"), "worst": avg("score/worst_domain"),
        "gap": avg(f"score/domain_{DOMAINS[1]}") - avg(f"score/domain_{DOMAINS[0]}"),
        "kl_end": timer.records[-1]["kl"],
        "ari": avg("group/ari_domain") if "group/ari_domain" in tail[-1] else float("nan"),
        "probe": domain_probe_accuracy(timer.features[-window:]) if timer.features else float("nan"),
    }


def trajectories(timer: IterationTimer) -> dict[str, list[float]]:
    """Per-iteration curves of one run."""
    rec = timer.records
    easy, hard = (f"score/domain_{DOMAINS[1]}", f"score/domain_{DOMAINS[0]}")
    return {"mean": [r["score/mean"] for r in rec], "worst": [r["score/worst_domain"] for r in rec],
            "easy": [r[easy] for r in rec], "hard": [r[hard] for r in rec],
            "gap": [r[easy] - r[hard] for r in rec], "kl": [r["kl"] for r in rec]}


def plot(curves: dict[str, list[dict[str, list[float]]]], levels: list[float], path: str, title: str) -> None:
    """Scores per domain, worst-domain score and domain gap over training, and score against KL (means over seeds,
    95% t-bands on the worst-domain score and the gap; faint per-seed trajectories in the KL panel)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"ppo": "tab:blue", "gil": "tab:red", "gil_critic": "tab:green", "gil_policy": "tab:purple",
               "gil_oracle": "tab:orange", "gil_no_explore": "tab:brown", "explore_only": "tab:gray"}
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), dpi=80)
    for arm, runs in curves.items():
        c = colours.get(arm, "black")
        n_it = min(len(r["mean"]) for r in runs)
        its = list(range(1, n_it + 1))

        def band(key: str) -> tuple[list[float], list[float], list[float]]:
            cols = [[r[key][i] for r in runs] for i in range(n_it)]
            stats = [ci95(col) for col in cols]
            return ([m for m, _ in stats], [m - (h if h == h else 0) for m, h in stats],
                    [m + (h if h == h else 0) for m, h in stats])

        for key, style in (("easy", "-"), ("hard", "--")):
            label = f"{arm} {'easy (e)' if key == 'easy' else 'hard (k)'}"
            axes[0, 0].plot(its, band(key)[0], style, color=c, label=label)
        for ax, key in ((axes[0, 1], "worst"), (axes[1, 0], "gap")):
            m, lo, hi = band(key)
            ax.plot(its, m, color=c, label=arm)
            ax.fill_between(its, lo, hi, color=c, alpha=0.15)
        for r in runs:
            axes[1, 1].plot(smooth(r["kl"]), smooth(r["worst"]), color=c, alpha=0.2, lw=0.8)
        mean_kl = [statistics.fmean(smooth(r["kl"])[i] for r in runs) for i in range(n_it)]
        axes[1, 1].plot(mean_kl, [statistics.fmean(smooth(r["worst"])[i] for r in runs) for i in range(n_it)],
                        color=c, lw=2, label=f"{arm} worst-domain")
        axes[1, 1].plot(mean_kl, [statistics.fmean(smooth(r["mean"])[i] for r in runs) for i in range(n_it)],
                        ":", color=c, lw=2, label=f"{arm} mean")
    for level in levels:
        axes[1, 1].axvline(level, color="grey", lw=0.8, ls="--")
    axes[0, 0].set(title="score per domain (mean over seeds)", xlabel="iteration", ylabel="raw score")
    axes[0, 1].set(title="worst-domain score (95% band)", xlabel="iteration", ylabel="raw score")
    axes[1, 0].set(title="easy - hard domain gap (95% band)", xlabel="iteration", ylabel="score gap")
    axes[1, 1].set(title="score vs KL (3-iteration smoothing; faint: seeds)", xlabel="KL (nats / sequence)",
                   ylabel="raw score")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def cost_worker(method: str, iterations: int) -> None:
    """Child process: one run, prints the median iteration and update wall times and CPU times (after the first
    iteration) and the peak RSS."""
    timer = run(method, 0, iterations, beta=1.0)
    steady = statistics.median(timer.times[1:])
    update = statistics.median(r["time/update"] for r in timer.records[1:])
    cpu, update_cpu = statistics.median(timer.cpu_times[1:]), statistics.median(timer.update_cpu_times[1:])
    print(f"COST {method} {steady:.4f} {update:.4f} {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.1f} "
          f"{cpu:.4f} {update_cpu:.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--arms", nargs="+", default=list(ARMS[:5]), choices=ARMS)
    parser.add_argument("--window", type=int, default=5, help="last iterations averaged per run")
    parser.add_argument("--beta", type=float, default=1.0, help="beta_policy of the gil arms")
    parser.add_argument("--kl-fractions", type=float, nargs="+", default=[0.5, 1.0],
                        help="KL levels of the score-at-equal-KL table, as fractions of the largest KL every run "
                        "reached")
    parser.add_argument("--plot", default=None, help="write the PNG here")
    parser.add_argument("--cost", action="store_true", help="also measure time and memory per iteration")
    parser.add_argument("--cost-only", action="store_true", help="only the cost measurement")
    parser.add_argument("--cost-methods", nargs="+", default=["plain_ppo", "gil", "gil_critic"],
                        help="plain_ppo (PPOModule; first, the reference) and arms; gil_no_prepass = gil with "
                        "surrogate_prepass: never")
    parser.add_argument("--cost-iterations", type=int, default=8)
    parser.add_argument("--cost-repeats", type=int, default=2)
    parser.add_argument("--cost-worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.cost_worker:
        cost_worker(args.cost_worker, args.iterations)
        return

    if args.cost_only:
        measure_cost(args)
        return
    t_start = time.perf_counter()
    arms = list(args.arms)
    results: dict[str, list[dict[str, float]]] = {a: [] for a in arms}
    curves: dict[str, list[dict[str, list[float]]]] = {a: [] for a in arms}
    for seed in args.seeds:
        for method in arms:
            timer = run(method, seed, args.iterations, args.beta)
            results[method].append(summarise(timer, args.window))
            curves[method].append(trajectories(timer))
            s = results[method][-1]
            print(f"seed {seed} {method}: mean {s['mean']:.3f} worst {s['worst']:.3f} gap {s['gap']:.3f} "
                  f"kl_end {s['kl_end']:.3f} ari {s['ari']:.3f} probe {s['probe']:.3f}", flush=True)

    def cell(values: list[float], digits: int = 3) -> str:
        m, h = ci95(values)
        return f"{m:.{digits}f} +- {h:.{digits}f}"

    print(f"\nGIL vs PPO, tiny Llama, domains {DOMAINS[1]} (easy: 'e') / {DOMAINS[0]} (hard: 'k'), "
          f"{args.iterations} iterations x 16 prompts, seeds {args.seeds}, last {args.window} iterations averaged; "
          f"mean +- 95% t-interval over seeds")
    print("| arm | mean score | worst-domain score | easy - hard gap | KL at end (nats/seq) | ARI groups vs domains | "
          "domain probe acc. |")
    print("|---|---|---|---|---|---|---|")
    for method in arms:
        print(f"| {method} | " + " | ".join(cell([r[k] for r in results[method]])
                                           for k in ("mean", "worst", "gap", "kl_end", "ari", "probe")) + " |")
    if "ppo" in arms:
        for method in arms:
            if method == "ppo":
                continue
            diffs = {k: [g[k] - p[k] for g, p in zip(results[method], results["ppo"])]
                     for k in ("mean", "worst", "gap")}
            print(f"paired difference {method} - ppo (same seed): " + ", ".join(
                f"{k} {ci95(v)[0]:+.3f} +- {ci95(v)[1]:.3f}" for k, v in diffs.items()))

    # the score at equal KL: levels every run reached (smoothed trajectories)
    reach = min(max(smooth(c["kl"])) for runs in curves.values() for c in runs)
    levels = [f * reach for f in args.kl_fractions]
    print(f"\nscore at equal KL (each run's 3-iteration-smoothed trajectory read where its KL first reaches the level; "
          f"levels = {args.kl_fractions} x {reach:.2f}, the largest smoothed KL every run reached):")
    print("| arm | " + " | ".join(f"mean score @ KL {lv:.2f} | worst-domain @ KL {lv:.2f}" for lv in levels)
          + " | iteration reaching the top level |")
    print("|---|" + "---|---|" * len(levels) + "---|")
    at_kl: dict[str, dict[str, list[float]]] = {}
    for method in arms:
        row, at_kl[method] = [], {}
        for lv in levels:
            for key in ("mean", "worst"):
                vals = [score_at_kl(smooth(c["kl"]), smooth(c[key]), lv) for c in curves[method]]
                at_kl[method][f"{key}@{lv:.2f}"] = vals
                row.append(cell(vals))
        first = [next(i + 1 for i, v in enumerate(smooth(c["kl"])) if v >= levels[-1]) for c in curves[method]]
        row.append(cell([float(f) for f in first], 1))
        print(f"| {method} | " + " | ".join(row) + " |")
    if "ppo" in arms:
        for method in arms:
            if method != "ppo":
                print(f"paired difference {method} - ppo at equal KL: " + ", ".join(
                    f"{k} {ci95([a - b for a, b in zip(v, at_kl['ppo'][k])])[0]:+.3f} +- "
                    f"{ci95([a - b for a, b in zip(v, at_kl['ppo'][k])])[1]:.3f}" for k, v in at_kl[method].items()))
    print("\nworst-domain score per iteration (mean over seeds):")
    for method in arms:
        per_it = [statistics.fmean(c["worst"][i] for c in curves[method]) for i in range(args.iterations)]
        print(f"  {method}: " + " ".join(f"{v:.2f}" for v in per_it))
    print("easy - hard gap per iteration (mean over seeds):")
    for method in arms:
        per_it = [statistics.fmean(c["gap"][i] for c in curves[method]) for i in range(args.iterations)]
        print(f"  {method}: " + " ".join(f"{v:.2f}" for v in per_it))
    print(f"evidence wall time {time.perf_counter() - t_start:.0f} s; load average {os.getloadavg()}")
    if args.plot:
        plot(curves, levels, args.plot, f"GIL vs PPO, tiny Llama, 2 domains (easy 'e' / hard 'k'), "
             f"{args.iterations} iterations, seeds {args.seeds}")
        print(f"wrote {args.plot}")

    if args.cost:
        measure_cost(args)


def measure_cost(args: argparse.Namespace) -> None:
    """Time and peak RSS per iteration of PPOModule (``plain_ppo``, the reference) and the arms of
    ``--cost-methods``, each in its own process."""
    # alternate the methods and keep each method's best median: the machine is shared
    methods = list(args.cost_methods)
    costs: dict[str, list[tuple[float, float, float]]] = {m: [] for m in methods}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.environ.get("PYTHONPATH", "")])}
    for _ in range(args.cost_repeats):
        for method in methods:
            proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--cost-worker", method,
                                   "--iterations", str(args.cost_iterations)],
                                  capture_output=True, text=True, env=env)
            line = [ln for ln in proc.stdout.splitlines() if ln.startswith("COST")]
            if not line:
                raise RuntimeError(proc.stderr[-3000:])
            costs[method].append(tuple(float(x) for x in line[0].split()[2:]))
    best = {m: min(c[:3] for c in costs[m]) for m in methods}
    tp, up, mp = best["plain_ppo"]
    for method in methods[1:]:
        tg, ug, mg = best[method]
        print(f"cost {method} (seed 0, median over iterations 2..{args.cost_iterations}, best of "
              f"{args.cost_repeats} alternating processes): iteration PPOModule {tp:.3f} s, {method} {tg:.3f} s "
              f"({tg / tp:.2f}x); update phase {up:.3f} s vs {ug:.3f} s ({ug / up:.2f}x); peak RSS {mp:.0f} MiB "
              f"vs {mg:.0f} MiB ({mg / mp:.2f}x)")
    med = {m: (statistics.median(c[0] for c in costs[m]), statistics.median(c[1] for c in costs[m])) for m in methods}
    print("wall time, median over the repeats (iteration s, update s): " + ", ".join(
        f"{m} {t:.3f} / {u:.3f} ({t / med['plain_ppo'][0]:.2f}x / {u / med['plain_ppo'][1]:.2f}x)"
        for m, (t, u) in med.items()))
    cpu = {m: (statistics.median(c[3] for c in costs[m]), statistics.median(c[4] for c in costs[m])) for m in methods}
    print("CPU time (1 thread, less sensitive to other processes), median over the repeats (iteration s, update s): "
          + ", ".join(f"{m} {t:.3f} / {u:.3f} ({t / cpu['plain_ppo'][0]:.2f}x / {u / cpu['plain_ppo'][1]:.2f}x)"
                      for m, (t, u) in cpu.items()))
    print("all cost runs (iteration s, update s, RSS MiB):", {k: v for k, v in costs.items()})
    print(f"load average after the cost runs {os.getloadavg()}")


if __name__ == "__main__":
    main()
