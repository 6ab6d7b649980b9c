"""Evidence for AIHF's claim at toy scale: with few preference pairs, adding demonstrations beats DPO.

Li et al. (arXiv 2406.06874) report that one stage on demonstrations + preferences (AIHF-DPO, Self-Play AIHF) beats
DPO when preference pairs are scarce, and that the gap narrows with more pairs. This script checks it on the real
data bundle (``/work/shared/data``, not shipped) at the scale a shared CPU allows:

* two domains that have both preference pairs and demonstrations (``alpacaeval_selfinstruct``, ``alpacaeval_oasst``);
  a pool of ``--pairs`` training pairs per domain and ``--demos`` demonstrations per domain;
* 10%, 25% and 100% of the pool (a seeded subset per seed), plus all the demonstrations for the AIHF variants;
* DPO (pairs only), AIHF-DPO (``demo_term: nll``) and Self-Play AIHF (``demo_term: spin``), the same number of steps,
  batch, learning rate and ``beta``; 3 seeds;
* measured on the held-out test split of the same domains: preference accuracy of the implicit reward
  ``beta log(pi / pi_ref)`` per domain (``val/accuracy/<domain>``), and the per-token log-likelihood of held-out
  demonstrations.

The policy is the built-in tiny Llama (random initialisation, 0.4M parameters): what this can show is whether the
demonstration term changes held-out preference accuracy at this scale, not whether the paper's numbers reproduce.
Not measured: the policy's score under a reward model none of them trained on (no independent reward model is
available offline at this scale).

    python bench/aihf_evidence.py                         # 27 runs: 22 min on a shared 2-core CPU (1 thread)
    python bench/aihf_evidence.py --seeds 0 --fractions 0.1 --steps 8   # a quick look
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore")

import lightning as L  # noqa: E402
import torch  # noqa: E402

from lightning_rlhf.data import DemonstrationDataModule, MultiStreamDataModule, PreferenceDataModule  # noqa: E402
from lightning_rlhf.losses.sft import masked_nll_sum  # noqa: E402
from lightning_rlhf.methods import AIHFDPOModule, DPOModule  # noqa: E402

DATA = Path("/work/shared/data")
DOMAINS = ("alpacaeval_selfinstruct", "alpacaeval_oasst")


def subset(src: Path, dst: Path, per_domain: int) -> int:
    """The first ``per_domain`` rows of each of ``DOMAINS`` (rows are in prompt-hash order within a domain)."""
    counts = {d: 0 for d in DOMAINS}
    with gzip.open(src, "rt") as f, open(dst, "w") as out:
        for line in f:
            d = json.loads(line)["domain"]
            if d in counts and counts[d] < per_domain:
                counts[d] += 1
                out.write(line)
    return sum(counts.values())


def stream(cls, train: Path, val: Path, batch: int, rows: int | None, seed: int, args) -> dict:
    return {"class_path": f"lightning_rlhf.data.{cls}",
            "init_args": {"train_path": str(train), "val_path": str(val), "batch_size": batch, "max_train_rows": rows,
                          "max_length": args.max_length, "max_prompt_length": args.max_prompt_length,
                          "skip_invalid_rows": True, "seed": seed}}


@torch.no_grad()
def demo_loglik(module, dm: DemonstrationDataModule) -> float:
    """Per-token log-likelihood of the held-out demonstrations under the policy."""
    module.policy.eval()
    nll, n = 0.0, 0.0
    for batch in dm.val_dataloader():
        logits = module.lm_forward(module.policy, batch.input_ids, batch.attention_mask)
        s, c = masked_nll_sum(logits, batch.input_ids, batch.loss_mask)
        nll, n = nll + float(s), n + float(c)
    return -nll / max(n, 1.0)


def length_baseline(files: dict, args) -> dict:
    """Share of held-out pairs (as tokenised and truncated for training) whose chosen response has more tokens (ties,
    e.g. both truncated, count 1/2): the accuracy of "the longer response wins", a confounder of implicit-reward
    accuracy (a summed log-ratio grows with length when the policy learns generic text)."""
    from lightning_rlhf.models.factory import load_tokenizer

    dm = PreferenceDataModule(train_path=str(files["pref_train"]), val_path=str(files["pref_test"]),
                              max_length=args.max_length, max_prompt_length=args.max_prompt_length,
                              skip_invalid_rows=True)
    dm.set_tokenizer(load_tokenizer("builtin:tiny-llama"))
    dm.setup("fit")
    wins: dict[str, list[float]] = {}
    for batch in dm.val_dataloader():
        lengths = batch.loss_mask.sum(-1)
        B = batch.num_pairs
        for i in range(B):
            win = 1.0 if lengths[i] > lengths[B + i] else 0.5 if lengths[i] == lengths[B + i] else 0.0  # tie: a coin
            wins.setdefault(dm.domain_names[int(batch.domain_ids[i])], []).append(win)
    out = {d: statistics.mean(v) for d, v in wins.items()}
    out["all"] = statistics.mean(x for v in wins.values() for x in v)
    return out


def run_one(method: str, fraction: float, seed: int, files: dict, args) -> dict:
    L.seed_everything(seed, verbose=False)
    pairs = max(int(round(fraction * args.pairs * len(DOMAINS))), args.batch)
    common = dict(model_name_or_path="builtin:tiny-llama", export_dir=None, lr=args.lr, beta=args.beta)
    prefs = stream("PreferenceDataModule", files["pref_train"], files["pref_test"], args.batch, pairs, seed, args)
    demos = stream("DemonstrationDataModule", files["demo_train"], files["demo_test"], args.batch, None, seed + 100,
                   args)
    if method == "DPO":
        module = DPOModule(**common)
        dm = PreferenceDataModule(**prefs["init_args"])
    else:
        module = AIHFDPOModule(demo_term="spin" if method == "Self-Play AIHF" else "nll", w_P=1.0, w_D=args.w_D,
                               round_steps=args.round_steps, max_new_tokens=args.max_new_tokens, seed=seed, **common)
        dm = MultiStreamDataModule(streams={"preferences": prefs, "demonstrations": demos}, primary="preferences",
                                   val_stream="preferences")
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=args.steps, max_epochs=-1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=dm)
    val = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                    enable_model_summary=False).validate(module, datamodule=dm, verbose=False)[0]
    held_demos = DemonstrationDataModule(**demos["init_args"])
    held_demos.set_tokenizer(module.tokenizer)
    held_demos.setup("fit")
    out = {"method": method, "fraction": fraction, "seed": seed, "pairs": pairs,
           "acc": float(val["val/accuracy"]), "demo_loglik": demo_loglik(module, held_demos)}
    for d in DOMAINS:
        out[d] = float(val.get(f"val/accuracy/{d}", float("nan")))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", type=int, default=80, help="training pairs per domain in the 100%% pool")
    ap.add_argument("--demos", type=int, default=60, help="demonstrations per domain")
    ap.add_argument("--val", type=int, default=60, help="held-out pairs (and demonstrations) per domain")
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.25, 1.0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+", default=["DPO", "AIHF-DPO (nll)", "Self-Play AIHF"])
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--w-D", dest="w_D", type=float, default=1.0)
    ap.add_argument("--round-steps", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--max-length", type=int, default=160)
    ap.add_argument("--max-prompt-length", type=int, default=96)
    ap.add_argument("--out", default=None, help="write the per-run rows as JSON lines here")
    args = ap.parse_args()
    if not DATA.exists():
        sys.exit(f"{DATA} not found: this bench needs the offline data bundle")
    torch.set_num_threads(1)
    for name in ("lightning", "lightning.pytorch", "lightning_rlhf", "datasets", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    import datasets

    datasets.disable_progress_bars()
    tmp = Path(tempfile.mkdtemp(prefix="aihf_evidence_"))
    files = {"pref_train": tmp / "pref_train.jsonl", "pref_test": tmp / "pref_test.jsonl",
             "demo_train": tmp / "demo_train.jsonl", "demo_test": tmp / "demo_test.jsonl"}
    sizes = {
        "pref_train": subset(DATA / "preferences_train.jsonl.gz", files["pref_train"], args.pairs),
        "pref_test": subset(DATA / "preferences_test.jsonl.gz", files["pref_test"], args.val),
        "demo_train": subset(DATA / "demonstrations_train.jsonl.gz", files["demo_train"], args.demos),
        "demo_test": subset(DATA / "demonstrations_test.jsonl.gz", files["demo_test"], args.val),
    }
    print(f"domains {', '.join(DOMAINS)}; rows (before length filtering): {sizes}; {args.steps} steps of batch "
          f"{args.batch}, lr {args.lr}, beta {args.beta}, w_D {args.w_D}; builtin:tiny-llama; seeds {args.seeds}",
          flush=True)
    base = length_baseline(files, args)
    print("length baseline (chosen response has more tokens) on the held-out pairs: "
          + ", ".join(f"{k} {v:.3f}" for k, v in base.items()), flush=True)
    rows = []
    t0 = time.time()
    for fraction in args.fractions:
        for method in args.methods:
            for seed in args.seeds:
                r = run_one(method, fraction, seed, files, args)
                rows.append(r)
                print(f"  {method:<16} {fraction:>5.0%} seed {seed}: acc {r['acc']:.3f} "
                      + " ".join(f"{d.split('_')[-1]} {r[d]:.3f}" for d in DOMAINS)
                      + f"  demo loglik/token {r['demo_loglik']:.3f}  ({time.time() - t0:.0f} s)", flush=True)
    if args.out:
        Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in rows))
    print("\nheld-out preference accuracy (mean +- sd over seeds) and demonstration log-likelihood per token")
    head = f"{'pairs':>6} {'method':<16} {'accuracy':>14} " + " ".join(f"{d.split('_')[-1]:>14}" for d in DOMAINS)
    print(head + f" {'demo loglik':>12}")

    def ms(vals: list[float]) -> str:
        sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
        return f"{statistics.mean(vals):.3f} +- {sd:.3f}"

    for fraction in args.fractions:
        for method in args.methods:
            sel = [r for r in rows if r["fraction"] == fraction and r["method"] == method]
            print(f"{fraction:>6.0%} {method:<16} {ms([r['acc'] for r in sel]):>14} "
                  + " ".join(f"{ms([r[d] for r in sel]):>14}" for d in DOMAINS)
                  + f" {statistics.mean(r['demo_loglik'] for r in sel):>12.3f}")
    print(f"total {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
