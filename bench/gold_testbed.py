"""Gold-judge testbed (the small-scale protocol of Gao et al. 2022, "Scaling laws for reward model over-optimization").

    OMP_NUM_THREADS=1 python bench/gold_testbed.py --smoke          # CPU smoke: tiny model, 1 seed, ~3 min
    OMP_NUM_THREADS=1 python bench/gold_testbed.py                  # tiny model, 2 arms x 3 seeds, CPU
    python bench/gold_testbed.py --model models/smollm2-135m-instruct --device cuda --precision bf16-mixed \\
        --pair-prompts 2048 --rm-steps 600 --rm-lr 1e-5 --iterations 200 --batch-size 64 --val-every 20 \\
        --val-prompts 256 --max-new-tokens 48 --lr 1e-6 --critic-lr 5e-6 --kl-coef 0.05 --ppo-epochs 1  # GPU

The task is sentiment continuation in the style of Ziegler et al. 2019: a prompt is the first ``--prompt-words``
words of a human turn of the embedded HH-RLHF prompts (``builtin:hh-rlhf``; train split for training, test split
for evaluation, its four domains kept as labels), and the policy continues it with ``--max-new-tokens`` tokens.

* **Gold judge:** the VADER sentiment analyser (``vaderSentiment``, Hutto & Gilbert 2014: a lexicon and rules
  validated against human sentiment ratings; deterministic, offline, no model weights), compound score of the
  response text in ``[-1, 1]``. No method trains on it: it only labels the proxy's preference pairs and judges.
* **Proxy reward model:** ``RewardModelModule`` on the policy's own backbone, trained on preference pairs the gold
  judge labelled: ``--samples-per-prompt`` samples of the *starting* policy per prompt, the gold-best as chosen and
  the gold-worst as rejected (prompts whose samples tie are dropped), each label flipped with probability
  ``--label-noise``. Its agreement with the gold judge on held-out clean pairs is printed.
* **Arms:** ``ppo`` (``PPOModule`` against the proxy) and ``contrastive`` (``ContrastivePPOModule`` against the
  proxy, ``b(x)`` = mean proxy score of ``--baseline-samples`` starting-policy samples per RL prompt, from a
  ``BaselineSamplerModule`` pass), same settings otherwise, for every ``--seeds``.
* **Measurement:** the modules' own validation pass (:mod:`lightning_rlhf.methods.online_eval`) on ``--val-prompts``
  fixed held-out prompts every ``--val-every`` iterations and before training: ``val/score`` (proxy),
  ``val/judge/gold`` (and per domain) and ``val/kl`` (per-sequence KL to the starting policy), sampled with seeds
  fixed per prompt batch (the same for every arm and seed: common random numbers).

Outputs: a table (method x seed x iteration: gold, proxy, KL), a summary at the last iteration (mean and 95%
t-interval over seeds, per domain too), and ``gold_vs_kl.png`` (gold and proxy score against KL, mean over seeds with
95% intervals, each seed faint) in ``--out``; ``--json`` saves every number.
"""

from __future__ import annotations

import argparse
import datetime
import gzip
import json
import math
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))  # the gold judge is given to the modules by class path: gold_testbed.VaderGold
GOLD = {"class_path": "gold_testbed.VaderGold"}
ARMS = ("ppo", "contrastive")

# two-sided 95% Student t quantiles by degrees of freedom (1..30); larger df use 1.96
T95 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
       2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


# ------------------------------------------------------------------------------------------------------------ gold
class VaderGold:
    """Gold judge: VADER compound sentiment of each response text, in ``[-1, 1]`` (a ``RewardFunction``)."""

    def __init__(self) -> None:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        self.analyzer = SentimentIntensityAnalyzer()

    def __call__(self, prompts: Sequence[str], responses: Sequence[str], **extras: Any) -> list[float]:
        return [float(self.analyzer.polarity_scores(text)["compound"]) for text in responses]


def mean_ci(values: Sequence[float]) -> tuple[float, float]:
    """Mean and the half-width of its two-sided 95% Student-t interval (0 for one value)."""
    n = len(values)
    m = sum(values) / n
    if n < 2:
        return m, 0.0
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1))
    t = T95[n - 2] if n - 2 < len(T95) else 1.96
    return m, t * sd / math.sqrt(n)


# ------------------------------------------------------------------------------------------------------------ data
def continuation_prompts(split: str, words: int) -> list[dict[str, str]]:
    """``{"prompt", "domain"}`` rows: the first ``words`` words of the first human turn of each HH prompt (deduped)."""
    from lightning_rlhf.data.sources import resolve_builtin

    rows, seen = [], set()
    with gzip.open(resolve_builtin("builtin:hh-rlhf", "prompts", split), "rt", encoding="utf-8") as f:
        for line in f:
            rec = json.loads(line)
            text = rec["prompt"].split("Human:", 1)[-1].split("Assistant:", 1)[0]
            toks = text.split()
            if len(toks) < words:
                continue
            prompt = " ".join(toks[:words])
            if prompt not in seen:
                seen.add(prompt)
                rows.append({"prompt": prompt, "domain": rec.get("domain", "default")})
    return rows


def write_jsonl(path: Path, rows: Sequence[dict[str, Any]]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def gold_pairs(args: argparse.Namespace, prompts: list[dict[str, str]], gold: VaderGold) -> tuple[list, dict]:
    """Preference pairs of the starting policy's samples, labelled by the gold judge (with label noise).

    Returns ``(pairs, stats)``; each pair is ``{prompt, chosen, rejected, domain, clean}`` (``clean``: the label
    before noise agrees with gold, always true; kept for the held-out split which uses clean labels).
    """
    import torch

    from lightning_rlhf.data.batches import pad_sequences
    from lightning_rlhf.models.factory import load_causal_lm, load_tokenizer
    from lightning_rlhf.rollout.generation import HFGenerator, response_lengths

    tok = load_tokenizer(args.model)
    policy = load_causal_lm(args.model, dtype="float32").to(args.device)
    gen = HFGenerator(max_new_tokens=args.max_new_tokens, temperature=1.0, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    k = args.samples_per_prompt
    rng = random.Random(args.data_seed)
    pairs, ties, flipped = [], 0, 0
    per_call = max(1, args.gen_batch // k)
    for s in range(0, len(prompts), per_call):
        chunk = prompts[s : s + per_call]
        ids = [tok(r["prompt"])["input_ids"] for r in chunk for _ in range(k)]
        input_ids = pad_sequences(ids, tok.pad_token_id, "left").to(args.device)
        mask = pad_sequences([[1] * len(x) for x in ids], 0, "left").to(args.device)
        out = gen.generate(policy, input_ids, mask, seed=args.data_seed * 1_000_003 + s)
        lengths = response_lengths(out.action_mask).tolist()
        rows = [r[:n] for r, n in zip(out.sequences[:, out.prompt_length :].tolist(), lengths)]
        texts = tok.batch_decode(rows, skip_special_tokens=True)
        scores = gold([], texts)
        for i, r in enumerate(chunk):
            sc, tx = scores[i * k : (i + 1) * k], texts[i * k : (i + 1) * k]
            hi, lo = max(range(k), key=sc.__getitem__), min(range(k), key=sc.__getitem__)
            if sc[hi] == sc[lo]:
                ties += 1
                continue
            chosen, rejected = tx[hi], tx[lo]
            if rng.random() < args.label_noise:
                chosen, rejected = rejected, chosen
                flipped += 1
            pairs.append({"prompt": r["prompt"], "chosen": chosen, "rejected": rejected, "domain": r["domain"],
                          "clean_chosen": tx[hi], "clean_rejected": tx[lo]})
    return pairs, {"prompts": len(prompts), "pairs": len(pairs), "ties_dropped": ties, "flipped": flipped}


# ------------------------------------------------------------------------------------------------------------ runs
def make_trainer(root: Path, args: argparse.Namespace, **kwargs: Any) -> Any:
    import lightning as L

    return L.Trainer(accelerator=args.device, devices=1, precision=args.precision, logger=False,
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     num_sanity_val_steps=0, default_root_dir=str(root), **kwargs)


def train_proxy(args: argparse.Namespace, root: Path, train_file: str, val_file: str) -> tuple[str, float, float]:
    """Train the proxy reward model on the gold-labelled pairs; returns (export folder, held-out accuracy vs gold on
    clean labels, seconds)."""
    import lightning as L

    from lightning_rlhf.data import PreferenceDataModule
    from lightning_rlhf.methods import RewardModelModule

    L.seed_everything(args.data_seed, verbose=False)
    export = root / "proxy_rm"
    module = RewardModelModule(model_name_or_path=args.model, lr=args.rm_lr, warmup_steps=10, lr_schedule="linear",
                               export_dir=str(export))
    dm = PreferenceDataModule(train_path=train_file, val_path=val_file, apply_chat_template=False,
                              max_length=args.max_new_tokens + 64, max_prompt_length=63, batch_size=args.rm_batch_size,
                              skip_invalid_rows=True, seed=args.data_seed)
    t0 = time.perf_counter()
    make_trainer(root, args, max_steps=args.rm_steps, limit_val_batches=0).fit(module, datamodule=dm)
    seconds = time.perf_counter() - t0
    acc = make_trainer(root, args).validate(module, datamodule=dm, verbose=False)[0]["val/accuracy"]
    return str(export), float(acc), seconds


def baseline_pass(args: argparse.Namespace, root: Path, proxy: str, rl_file: str, seed: int) -> str:
    """``b(x)`` of every RL prompt: mean proxy score of ``--baseline-samples`` starting-policy samples."""
    from lightning_rlhf.methods.contrastive import BaselineSamplerModule

    out = root / f"baseline_seed{seed}.jsonl"
    module = BaselineSamplerModule(model_name_or_path=args.model, reward_model_name_or_path=proxy,
                                   output_path=str(out), num_samples=args.baseline_samples, agg="mean",
                                   max_new_tokens=args.max_new_tokens, seed=seed, rollout_engine="static",
                                   overwrite=True)
    make_trainer(root, args).predict(module, datamodule=prompt_data(args, rl_file, None, seed), return_predictions=False)
    return str(out)


def prompt_data(args: argparse.Namespace, rl_file: str, val_file: str | None, seed: int) -> Any:
    from lightning_rlhf.data import PromptDataModule

    return PromptDataModule(train_path=rl_file, val_path=val_file, val_fraction=0.0, apply_chat_template=False,
                            batch_size=args.batch_size, val_batch_size=args.val_batch_size, max_prompt_length=64,
                            skip_invalid_rows=True, max_train_rows=args.iterations * args.batch_size, seed=seed)


def run_arm(args: argparse.Namespace, root: Path, arm: str, seed: int, proxy: str, rl_file: str,
            val_file: str) -> dict[str, Any]:
    """One policy trained against the proxy; every validation pass recorded as
    ``{iteration, gold, proxy, kl, length, gold_domains}``."""
    import lightning as L

    from lightning_rlhf.methods import PPOModule
    from lightning_rlhf.methods.contrastive import ContrastivePPOModule

    points: list[dict[str, Any]] = []

    class Record(L.Callback):
        def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
            m = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
            if points and points[-1]["iteration"] == pl_module.iteration:
                return
            points.append({"iteration": pl_module.iteration, "gold": m["val/judge/gold"], "proxy": m["val/score"],
                           "kl": m["val/kl"], "length": m["val/response_length"],
                           "gold_domains": {k.rsplit("/", 1)[1]: v for k, v in m.items()
                                            if k.startswith("val/judge/gold/")}})

    t0 = time.perf_counter()
    extra: dict[str, Any] = {}
    if arm == "contrastive":
        extra = dict(baseline_path=baseline_pass(args, root, proxy, rl_file, seed), on_missing_baseline="error")
    cls = ContrastivePPOModule if arm == "contrastive" else PPOModule
    L.seed_everything(seed, verbose=False)
    module = cls(model_name_or_path=args.model, reward_model_name_or_path=proxy, critic="separate", lr=args.lr,
                 critic_lr=args.critic_lr, kl_coef=args.kl_coef, ppo_epochs=args.ppo_epochs,
                 mini_batch_size=args.batch_size // 2, micro_batch_size=args.batch_size // 2,
                 max_new_tokens=args.max_new_tokens, reward_norm="norm_clip", max_iterations=args.iterations,
                 log_samples_every_n=0, seed=seed, export_dir=None, eval_rewards={"gold": GOLD}, val_seed=0,
                 dtype="float32", **extra)
    dm = prompt_data(args, rl_file, val_file, seed)
    record = Record()
    make_trainer(root, args, callbacks=[record]).validate(module, datamodule=dm, verbose=False)  # iteration 0
    make_trainer(root, args, max_steps=-1, val_check_interval=args.val_every, check_val_every_n_epoch=None,
                 callbacks=[record]).fit(module, datamodule=dm)
    if points[-1]["iteration"] != module.iteration:
        make_trainer(root, args, callbacks=[record]).validate(module, datamodule=dm, verbose=False)
    return {"arm": arm, "seed": seed, "points": points, "seconds": time.perf_counter() - t0}


# ------------------------------------------------------------------------------------------------------------ output
def format_tables(head: dict[str, Any], runs: list[dict[str, Any]]) -> str:
    lines = [f"# {head['date']} | {head['machine']} | device {head['device']} | git {head['git']}",
             f"# {head['settings_line']}",
             f"# proxy RM: {head['pairs']['pairs']} gold-labelled pairs from {head['pairs']['prompts']} prompts "
             f"({head['pairs']['ties_dropped']} tied prompts dropped, {head['pairs']['flipped']} labels flipped = "
             f"noise {head['label_noise']}), trained {head['rm_seconds']:.0f} s | agreement with gold on "
             f"{head['heldout_pairs']} held-out clean pairs: {head['proxy_accuracy']:.3f}",
             f"# evaluation: {head['val_prompts']} fixed held-out prompts, every {head['val_every']} iterations; "
             "gold = VADER compound in [-1, 1]; proxy = the proxy RM's score; KL = per-sequence KL to the start",
             f"# time: total {head['wall_s']:.0f} s; " + ", ".join(f"{r['arm']} seed {r['seed']} {r['seconds']:.0f} s"
                                                                 for r in runs)]
    table = [["method", "seed", "iteration", "gold", "proxy", "KL", "length"]]
    for r in runs:
        for p in r["points"]:
            table.append([r["arm"], str(r["seed"]), str(p["iteration"]), f"{p['gold']:+.4f}", f"{p['proxy']:+.4f}",
                          f"{p['kl']:.3f}", f"{p['length']:.1f}"])
    lines += _align(table, left={0})
    lines.append("")
    lines.append("# last iteration, mean over seeds +- 95% t-interval (gold change = last - iteration 0, per seed)")
    summary = [["method", "seeds", "gold", "gold change", "proxy", "proxy change", "KL"]]
    for arm in sorted({r["arm"] for r in runs}, key=ARMS.index):
        rs = [r for r in runs if r["arm"] == arm]
        last = [r["points"][-1] for r in rs]
        first = [r["points"][0] for r in rs]
        cells = []
        for vals in ([p["gold"] for p in last], [b["gold"] - a["gold"] for a, b in zip(first, last)],
                     [p["proxy"] for p in last], [b["proxy"] - a["proxy"] for a, b in zip(first, last)],
                     [p["kl"] for p in last]):
            m, h = mean_ci(vals)
            cells.append(f"{m:+.4f} +- {h:.4f}")
        summary.append([arm, str(len(rs)), *cells])
    lines += _align(summary, left={0})
    lines.append("")
    lines.append("# gold per domain at the last iteration (mean over seeds; iteration 0 in brackets)")
    domains = sorted({d for r in runs for d in r["points"][-1]["gold_domains"]})
    dom = [["method", *domains]]
    for arm in sorted({r["arm"] for r in runs}, key=ARMS.index):
        rs = [r for r in runs if r["arm"] == arm]
        row = [arm]
        for d in domains:
            last = [r["points"][-1]["gold_domains"].get(d, float("nan")) for r in rs]
            first = [r["points"][0]["gold_domains"].get(d, float("nan")) for r in rs]
            row.append(f"{sum(last) / len(last):+.3f} ({sum(first) / len(first):+.3f})")
        dom.append(row)
    lines += _align(dom, left={0})
    return "\n".join(lines)


def _align(table: list[list[str]], left: set[int]) -> list[str]:
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    return ["  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()
            for row in table]


def plot(runs: list[dict[str, Any]], path: Path, title: str) -> None:
    """Gold (left) and proxy (right) score against KL: per seed faint, mean over seeds with 95% intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"ppo": "#4c72b0", "contrastive": "#dd8452"}
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), dpi=80)
    for ax, key, label in ((axes[0], "gold", "gold score (VADER compound)"), (axes[1], "proxy", "proxy RM score")):
        for arm in ARMS:
            rs = [r for r in runs if r["arm"] == arm]
            if not rs:
                continue
            for r in rs:
                ax.plot([p["kl"] for p in r["points"]], [p[key] for p in r["points"]], color=colors[arm], alpha=0.25,
                        linewidth=0.8)
            n = min(len(r["points"]) for r in rs)
            xs = [sum(r["points"][i]["kl"] for r in rs) / len(rs) for i in range(n)]
            stats = [mean_ci([r["points"][i][key] for r in rs]) for i in range(n)]
            ax.errorbar(xs, [m for m, _ in stats], yerr=[h for _, h in stats], color=colors[arm], marker="o",
                        markersize=3, capsize=2, label=f"{arm} (mean of {len(rs)} seeds, 95% CI)")
        ax.set_xlabel("KL(policy || start), per sequence, held-out prompts", fontsize=8)
        ax.set_ylabel(label, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------------------ main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="builtin:tiny-llama", help="starting policy (and proxy backbone)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--precision", choices=("32-true", "bf16-mixed"), default="32-true")
    p.add_argument("--smoke", action="store_true", help="CI-sized: 1 seed, few pairs and iterations")
    p.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--data-seed", type=int, default=0, help="seed of the proxy's pairs and training")
    p.add_argument("--prompt-words", type=int, default=8)
    p.add_argument("--pair-prompts", type=int, default=768, help="prompts sampled for the proxy's pairs")
    p.add_argument("--samples-per-prompt", type=int, default=4)
    p.add_argument("--label-noise", type=float, default=0.1, help="probability of flipping a gold label")
    p.add_argument("--heldout-pair-frac", type=float, default=0.1, help="pairs kept out to measure proxy vs gold")
    p.add_argument("--gen-batch", type=int, default=64, help="rows per generate call when sampling pairs")
    p.add_argument("--rm-steps", type=int, default=300)
    p.add_argument("--rm-lr", type=float, default=1e-3)
    p.add_argument("--rm-batch-size", type=int, default=16)
    p.add_argument("--iterations", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=16, help="prompts per PPO iteration (even)")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--critic-lr", type=float, default=1e-3)
    p.add_argument("--kl-coef", type=float, default=0.01)
    p.add_argument("--ppo-epochs", type=int, default=4)
    p.add_argument("--baseline-samples", type=int, default=4, help="k of the contrastive baseline")
    p.add_argument("--val-prompts", type=int, default=64, help="fixed held-out evaluation prompts")
    p.add_argument("--val-batch-size", type=int, default=32)
    p.add_argument("--val-every", type=int, default=5, help="iterations between validation passes")
    p.add_argument("--out", default=str(BENCH / "figures"))
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.smoke:
        args.seeds, args.pair_prompts, args.rm_steps, args.iterations = args.seeds[:1], 192, 60, 6
        args.val_prompts, args.val_every = 32, 3
    if args.batch_size < 2 or args.batch_size % 2:
        p.error("--batch-size must be even (two PPO minibatches per iteration)")
    if not 0.0 <= args.label_noise <= 0.5:
        p.error("--label-noise must be in [0, 0.5]")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import datasets
    import torch

    from train_throughput import git_state, machine

    datasets.disable_progress_bars()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    start = time.perf_counter()
    gold = VaderGold()
    head: dict[str, Any] = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                            "git": git_state(), "machine": machine(args.device), "device": args.device,
                            "label_noise": args.label_noise, "val_every": args.val_every,
                            "settings": vars(args)}
    head["settings_line"] = (
        f"model {args.model} | {args.precision} | {args.prompt_words}-word prompts, {args.max_new_tokens} new tokens | "
        f"{args.iterations} iterations x {args.batch_size} prompts, ppo_epochs {args.ppo_epochs}, lr {args.lr}, "
        f"critic_lr {args.critic_lr}, kl_coef {args.kl_coef} | contrastive k={args.baseline_samples} | "
        f"proxy: {args.rm_steps} steps, lr {args.rm_lr} | seeds {args.seeds}")
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="gold_testbed_") as tmp:
        root = Path(tmp)
        train_prompts = continuation_prompts("train", args.prompt_words)
        eval_prompts = continuation_prompts("test", args.prompt_words)
        rng = random.Random(args.data_seed)
        rng.shuffle(train_prompts)
        pair_prompts = train_prompts[: args.pair_prompts]
        rng.shuffle(eval_prompts)
        eval_prompts = eval_prompts[: args.val_prompts]  # one fixed held-out set for every arm and seed
        rl_file = write_jsonl(root / "rl_prompts.jsonl", train_prompts)
        val_file = write_jsonl(root / "eval_prompts.jsonl", eval_prompts)
        pairs, head["pairs"] = gold_pairs(args, pair_prompts, gold)
        n_held = max(1, int(len(pairs) * args.heldout_pair_frac))
        held = [{**p, "chosen": p["clean_chosen"], "rejected": p["clean_rejected"]} for p in pairs[:n_held]]
        train_file = write_jsonl(root / "pairs_train.jsonl", pairs[n_held:])
        held_file = write_jsonl(root / "pairs_heldout.jsonl", held)
        print(f"pairs: {head['pairs']} ({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
        proxy, head["proxy_accuracy"], head["rm_seconds"] = train_proxy(args, root, train_file, held_file)
        head["heldout_pairs"] = len(held)
        print(f"proxy: accuracy vs gold {head['proxy_accuracy']:.3f} ({time.perf_counter() - start:.0f} s)",
              file=sys.stderr, flush=True)
        for seed in args.seeds:
            for arm in args.arms:
                run = run_arm(args, root, arm, seed, proxy, rl_file, val_file)
                runs.append(run)
                last = run["points"][-1]
                print(f"{arm} seed {seed}: gold {run['points'][0]['gold']:+.4f} -> {last['gold']:+.4f}, proxy "
                      f"{run['points'][0]['proxy']:+.4f} -> {last['proxy']:+.4f}, KL {last['kl']:.2f} "
                      f"({run['seconds']:.0f} s)", file=sys.stderr, flush=True)
        head["val_prompts"] = len(eval_prompts)
    head["wall_s"] = time.perf_counter() - start
    print(format_tables(head, runs), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    png = out / "gold_vs_kl.png"
    model = args.model if args.model.startswith("builtin:") else Path(args.model).name
    plot(runs, png, f"Gold (VADER) vs proxy RM under optimisation, {model}, label noise {args.label_noise}")
    print(f"# figure: {png} ({png.stat().st_size // 1024} KB)", flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"header": head, "runs": runs}, indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()
