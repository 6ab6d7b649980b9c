"""Training quality of our reward model, DPO and PPO modules on real preference data: one command, one table, PNGs.

    OMP_NUM_THREADS=1 python bench/quality.py                       # built-in tiny Llama, CPU, ~10 min on 2 cores
    python bench/quality.py --model models/smollm2-135m-instruct --device cuda --rm-lr 1e-5 --dpo-lr 1e-6 \
        --ppo-lr 1e-6 --ppo-critic-lr 5e-6                          # a pretrained model (not measured yet)

What it runs, each as a ``lightning.Trainer`` on our LightningModules (no CLI, no logger, no checkpoints):

1. **Reward model.** ``RewardModelModule`` from ``--model`` for ``--rm-steps`` steps on a seeded subset
   (``--max-train-rows``) of ``--train`` (default: the shared bundle's ``preferences_train.jsonl.gz``), then one
   validation pass over ``--test`` (the bundle's test split). The accuracy per domain is what the module logs
   (``val/accuracy/<domain>``, torchmetrics ``GroupedMean``), read from ``trainer.callback_metrics``: the share of
   test pairs with ``r(chosen) > r(rejected)``.
2. **DPO.** ``DPOModule`` from the same ``--model`` (reference = a frozen copy of it) on the same training rows, then
   the same validation pass: the share of pairs whose implicit reward margin
   ``beta * (log pi(y_w) - log pi_ref(y_w)) - beta * (log pi(y_l) - log pi_ref(y_l))`` is positive (``val/accuracy``
   of the module; before training the margin is exactly 0, i.e. accuracy 0).
3. **PPO.** ``PPOModule`` from ``--model`` on prompts of ``--prompts`` (the domains of the preference data), scored
   by the reward model exported in step 1 (``--ppo-reward rm``, default) or by the rule-based
   ``TokenCountReward`` ("e" count, as in ``configs/ppo/tiny.yaml``; ``--ppo-reward rule``). Per iteration it keeps
   the mean raw score (``score/mean``) and the per-sequence KL to the reference (``kl``) that the module logs.
   The PPO settings are those of ``configs/ppo/tiny.yaml``: a separate critic (initialised from the reward model
   when there is one), 4 PPO epochs over 2 minibatches per iteration, ``norm_clip`` reward normalisation.
   Each iteration's ``score/mean`` is over *new* prompts, so it mixes policy change with prompt difficulty; the
   policy itself is measured by the module's validation pass (:mod:`lightning_rlhf.methods.online_eval`) on a fixed
   set of ``--ppo-val-rows`` held-out prompts of ``--ppo-val-prompts`` (same domains), before the first and after
   the last iteration, sampled with seeds fixed per prompt batch (``val/score``, ``val/kl``).

Also printed, as context for the accuracies: ``longer wins``, the accuracy of preferring the longer response
(response tokens as the models see them after truncation; ties count 1/2). It needs no model.

Outputs: the table on stdout; ``rm_accuracy.png``, ``dpo_accuracy.png`` (accuracy per domain, with the
``longer wins`` accuracy marked) and ``reward_kl.png`` (score and KL per PPO iteration) in ``--out``; ``--json PATH``
saves the header and all numbers. Test pairs whose prompt has more than ``--max-prompt-length`` tokens are dropped by
the data module (counted in the header); the table's ``n`` is the number of pairs actually scored.

If the shared bundle (``../shared/data``) is absent, the defaults fall back to ``builtin:hh-rlhf`` (the HH-RLHF
subset shipped in the package) and the header says so. Everything except the PNGs and ``--json`` is written to a
temporary folder.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import fnmatch
import importlib.metadata
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared" / "data"
BUILTIN_DATA = "builtin:hh-rlhf"
RULE_REWARD = {"class_path": "lightning_rlhf.rewards.TokenCountReward", "init_args": {"token": "e"}}


# ------------------------------------------------------------------------------------------------------------ results
@dataclass
class PairwiseResult:
    """Held-out pairwise accuracy of one method: overall and per domain, with the number of pairs scored."""

    method: str
    overall: float
    n: int
    per_domain: dict[str, float] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    train_seconds: float = 0.0
    eval_seconds: float = 0.0


@dataclass
class PPOResult:
    """Per-iteration statistics of a PPO run, as logged by ``PPOModule`` (rank-reduced)."""

    reward: str
    prompts_per_iteration: int
    score: list[float] = field(default_factory=list)
    kl: list[float] = field(default_factory=list)
    kl_token: list[float] = field(default_factory=list)
    response_length: list[float] = field(default_factory=list)
    seconds: float = 0.0
    #: held-out validation passes: ``(iteration, val/score, val/kl)`` before training and after the last iteration
    val: list[tuple[int, float, float]] = field(default_factory=list)
    val_prompts: int = 0


# ------------------------------------------------------------------------------------------------------------ helpers
def import_header_helpers() -> tuple[Any, Any]:
    """``machine`` and ``git_state`` of ``bench/train_throughput.py`` (same header format as the throughput bench)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    try:
        from train_throughput import git_state, machine
    finally:
        sys.path.pop(0)
    return machine, git_state


def versions() -> dict[str, str]:
    """Versions of the libraries that do the work."""
    out = {}
    for pkg in ("torch", "transformers", "lightning", "datasets", "torchmetrics"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = "absent"
    return out


def make_trainer(root: Path, args: argparse.Namespace, **kwargs: Any) -> Any:
    """A quiet ``lightning.Trainer`` writing nothing outside ``root`` (no logger, no checkpoints)."""
    import lightning as L

    return L.Trainer(accelerator=args.device, devices=1, precision=args.precision, logger=False,
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     num_sanity_val_steps=0, default_root_dir=str(root), **kwargs)


def preference_data(args: argparse.Namespace, tokenizer: Any) -> Any:
    """The tokenized preference data shared by the RM and DPO runs (same tokenizer: both start from ``--model``).

    Training rows: a seeded subset of ``--max-train-rows`` valid rows of ``--train``; validation: every valid row of
    ``--test`` (or the built-in test split), length-bucketed training batches as in the real-data configs.
    """
    import datasets

    from lightning_rlhf.data import PreferenceDataModule
    from lightning_rlhf.data.sources import resolve_builtin

    datasets.disable_progress_bars()
    test = resolve_builtin(BUILTIN_DATA, "preferences", "test") if args.test == BUILTIN_DATA else args.test
    dm = PreferenceDataModule(
        train_path=args.train, val_path=test, domains=args.domains,
        max_length=args.max_length, max_prompt_length=args.max_prompt_length, batch_size=args.batch_size,
        val_batch_size=args.val_batch_size, max_train_rows=args.max_train_rows, max_val_rows=args.max_test_rows,
        skip_invalid_rows=True, length_bucketing=True, seed=args.seed,
    )
    dm.set_tokenizer(tokenizer)
    dm.setup("fit")
    return dm


def test_rows_in_file(args: argparse.Namespace, dm: Any) -> int:
    """Valid rows of the test file that match ``--domains`` (before the data module drops over-long prompts)."""
    from lightning_rlhf.data.sources import expand_paths, read_rows, resolve_builtin

    paths = [resolve_builtin(args.test, "preferences", "test")] if args.test == BUILTIN_DATA else expand_paths(args.test)
    rows = read_rows(paths, dm.columns(), dm.domain_column, skip_invalid_rows=True).rows
    return sum(1 for r in rows if not args.domains or any(fnmatch.fnmatchcase(r.domain, p) for p in args.domains))


def test_counts(dm: Any) -> dict[str, int]:
    """Pairs per domain in the validation set as tokenized (what the validation pass scores)."""
    return dict(sorted(collections.Counter(dm.val_dataset["domain"]).items()))


def longer_wins(dm: Any) -> PairwiseResult:
    """Accuracy of the no-model rule "the longer response is the chosen one" on the validation set.

    Lengths are response tokens after truncation (what the models see); a tie counts 1/2.
    """
    cols = dm.val_dataset.select_columns(["domain", "chosen_ids", "rejected_ids", "chosen_prompt_len",
                                          "rejected_prompt_len"]).to_list()
    hits: dict[str, list[float]] = collections.defaultdict(list)
    for r in cols:
        lc = len(r["chosen_ids"]) - r["chosen_prompt_len"]
        lr = len(r["rejected_ids"]) - r["rejected_prompt_len"]
        hits[r["domain"]].append(1.0 if lc > lr else 0.5 if lc == lr else 0.0)
    allhits = [h for v in hits.values() for h in v]
    return PairwiseResult(
        method="longer wins", overall=sum(allhits) / len(allhits), n=len(allhits),
        per_domain={d: sum(v) / len(v) for d, v in sorted(hits.items())},
        counts={d: len(v) for d, v in sorted(hits.items())},
    )


def validate_pairwise(module: Any, dm: Any, root: Path, args: argparse.Namespace, method: str) -> PairwiseResult:
    """One validation pass over the test pairs; accuracies are the ``val/accuracy[/<domain>]`` the module logs."""
    trainer = make_trainer(root, args)
    t0 = time.perf_counter()
    trainer.validate(module, datamodule=dm, verbose=False)
    seconds = time.perf_counter() - t0
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/accuracy")}
    prefix = "val/accuracy/"
    counts = test_counts(dm)
    per_domain = {k[len(prefix):]: v for k, v in sorted(metrics.items()) if k.startswith(prefix)}
    missing = sorted(set(counts) - set(per_domain))
    if missing:
        raise RuntimeError(f"{method}: the module logged no accuracy for domains {missing}")
    return PairwiseResult(method=method, overall=metrics["val/accuracy"], n=sum(counts.values()),
                          per_domain=per_domain, counts=counts, eval_seconds=seconds)


# ------------------------------------------------------------------------------------------------------------ runs
def run_reward_model(args: argparse.Namespace, dm: Any, root: Path) -> tuple[PairwiseResult, str]:
    """Train ``RewardModelModule``, export it into ``root``, and score the test pairs; returns the export folder."""
    import lightning as L

    from lightning_rlhf.methods import RewardModelModule

    L.seed_everything(args.seed, verbose=False)
    export = root / "rm_export"
    module = RewardModelModule(model_name_or_path=args.model, lr=args.rm_lr, warmup_steps=args.warmup_steps,
                               lr_schedule="linear", micro_batch_size=args.micro_batch_size, export_dir=str(export))
    t0 = time.perf_counter()
    make_trainer(root, args, max_steps=args.rm_steps, limit_val_batches=0).fit(module, datamodule=dm)
    train_s = time.perf_counter() - t0
    result = validate_pairwise(module, dm, root, args, "rm")
    result.train_seconds = train_s
    return result, str(export)


def run_dpo(args: argparse.Namespace, dm: Any, root: Path) -> PairwiseResult:
    """Train ``DPOModule`` against a frozen copy of ``--model`` and score the test pairs (implicit-reward accuracy)."""
    import lightning as L

    from lightning_rlhf.methods import DPOModule

    L.seed_everything(args.seed, verbose=False)
    module = DPOModule(model_name_or_path=args.model, beta=args.dpo_beta, loss_type="sigmoid", lr=args.dpo_lr,
                       warmup_steps=args.warmup_steps, lr_schedule="linear", micro_batch_size=args.micro_batch_size,
                       export_dir=None)
    t0 = time.perf_counter()
    make_trainer(root, args, max_steps=args.dpo_steps, limit_val_batches=0).fit(module, datamodule=dm)
    train_s = time.perf_counter() - t0
    result = validate_pairwise(module, dm, root, args, "dpo")
    result.train_seconds = train_s
    return result


def run_ppo(args: argparse.Namespace, root: Path, reward_model: str | None, domains: list[str] | None) -> PPOResult:
    """PPO from ``--model`` on prompts of the preference domains; records score and KL per iteration."""
    import datasets
    import lightning as L

    from lightning_rlhf.data import PromptDataModule
    from lightning_rlhf.methods import PPOModule

    class Record(L.Callback):
        """Keeps the per-iteration statistics that ``PPOModule.training_step`` logs and returns."""

        def __init__(self, result: PPOResult) -> None:
            self.result = result

        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            self.result.score.append(float(outputs["score/mean"]))
            self.result.kl.append(float(outputs["kl"]))
            self.result.kl_token.append(float(outputs["kl/token_mean"]))
            self.result.response_length.append(float(outputs["response/length"]))

    datasets.disable_progress_bars()
    L.seed_everything(args.seed, verbose=False)
    reward = ({"reward_model_name_or_path": reward_model} if reward_model is not None else {"reward_fn": RULE_REWARD})
    module = PPOModule(model_name_or_path=args.model, critic="separate", lr=args.ppo_lr, critic_lr=args.ppo_critic_lr,
                       kl_coef=args.ppo_kl_coef, ppo_epochs=4, mini_batch_size=args.ppo_batch_size // 2,
                       micro_batch_size=args.ppo_batch_size // 2, max_new_tokens=args.ppo_max_new_tokens,
                       reward_norm="norm_clip", max_iterations=args.ppo_iterations, log_samples_every_n=0,
                       seed=args.seed, export_dir=None, **reward)
    val_path = args.ppo_val_prompts
    if val_path == BUILTIN_DATA:
        from lightning_rlhf.data.sources import resolve_builtin

        val_path = resolve_builtin(BUILTIN_DATA, "prompts", "test")
    dm = PromptDataModule(train_path=args.prompts, val_path=val_path, val_fraction=0.0, domains=domains,
                          batch_size=args.ppo_batch_size, val_batch_size=args.ppo_batch_size,
                          max_prompt_length=args.ppo_max_prompt_length, skip_invalid_rows=True,
                          max_train_rows=args.ppo_iterations * args.ppo_batch_size, max_val_rows=args.ppo_val_rows,
                          seed=args.seed)
    result = PPOResult(reward="reward model (RM export)" if reward_model else 'rule: count of "e" (TokenCountReward)',
                       prompts_per_iteration=args.ppo_batch_size)

    def validate() -> None:
        trainer = make_trainer(root, args)
        metrics = trainer.validate(module, datamodule=dm, verbose=False)[0]
        result.val.append((module.iteration, float(metrics["val/score"]), float(metrics["val/kl"])))
        result.val_prompts = len(dm.val_dataset)

    if args.ppo_val_rows:
        validate()
    t0 = time.perf_counter()
    make_trainer(root, args, max_steps=-1, limit_val_batches=0, callbacks=[Record(result)]).fit(module, datamodule=dm)
    result.seconds = time.perf_counter() - t0
    if args.ppo_val_rows:
        validate()
    return result


# ------------------------------------------------------------------------------------------------------------ output
def format_table(head: dict[str, Any], pairwise: list[PairwiseResult], ppo: PPOResult | None) -> str:
    """Header lines, then one table: method | domain | n | accuracy | PPO score first -> last | PPO last KL."""
    v = head["versions"]
    s = head["settings"]
    lines = [
        f"# {head['date']} | {head['machine']} | device {s['device']}, {head['torch_threads']} torch threads | "
        + ", ".join(f"{k} {val}" for k, val in v.items()),
        f"# code: git {head['git']}",
        *([f"# WARNING: the code changed during the run (now git {head['git_at_end']})"] if "git_at_end" in head
          else []),
        f"# data: {head['data_note']}",
        f"# train: {s['train']} | {head['train_rows']} rows used (seeded subset) | domains "
        f"{s['domains'] or 'all'}",
        f"# test: {s['test']} | {head['test_rows_used']} of {head['test_rows_in_file']} pairs scored "
        + (f"({head['test_rows_in_file'] - head['test_rows_used']} dropped: prompt > {s['max_prompt_length']} tokens)"
           if s["max_test_rows"] is None else
           f"(pairs with prompt > {s['max_prompt_length']} tokens dropped, then a seeded subset of "
           f"{s['max_test_rows']})"),
        f"# model {s['model']} | {s['precision']} | max_length {s['max_length']} | batch {s['batch_size']} pairs | "
        f"RM: {s['rm_steps']} steps, lr {s['rm_lr']} | DPO: {s['dpo_steps']} steps, lr {s['dpo_lr']}, beta "
        f"{s['dpo_beta']} | linear decay after {s['warmup_steps']} warm-up steps | seed {s['seed']}",
    ]
    if ppo is not None:
        lines.append(
            f"# PPO: reward = {ppo.reward} | prompts {s['prompts']} (same domains, <= {s['ppo_max_prompt_length']} "
            f"tokens) | {len(ppo.score)} iterations x {ppo.prompts_per_iteration} prompts | {s['ppo_max_new_tokens']} "
            f"new tokens | lr {s['ppo_lr']}, kl_coef {s['ppo_kl_coef']}")
    timing = [f"{r.method} train {r.train_seconds:.0f} s + test {r.eval_seconds:.0f} s" for r in pairwise
              if r.method != "longer wins"]
    timing += [f"PPO {ppo.seconds:.0f} s"] if ppo is not None else []
    lines.append("# time: " + " | ".join(timing + [f"total {head['wall_s']:.0f} s"]))
    lines.append("# accuracy = share of test pairs where the method prefers the chosen response; "
                 "'longer wins' = prefer the longer response (no model; ties 1/2)")
    cols = ["method", "domain", "n", "accuracy", "score first -> last", "KL last"]
    table = [cols]
    for r in pairwise:
        table.append([r.method, "ALL", str(r.n), f"{r.overall:.3f}", "", ""])
        for d, acc in r.per_domain.items():
            table.append([r.method, d, str(r.counts[d]), f"{acc:.3f}", "", ""])
    if ppo is not None and ppo.score:
        table.append([f"ppo ({'RM' if ppo.reward.startswith('reward model') else 'rule'} reward)", "prompts: same domains",
                      str(len(ppo.score) * ppo.prompts_per_iteration), "",
                      f"{ppo.score[0]:.3f} -> {ppo.score[-1]:.3f}", f"{ppo.kl[-1]:.3f}"])
    if ppo is not None and len(ppo.val) == 2:
        (_, before, _), (_, after, kl_after) = ppo.val
        table.append([f"ppo ({'RM' if ppo.reward.startswith('reward model') else 'rule'} reward)",
                      "fixed held-out prompts", str(ppo.val_prompts), "", f"{before:.3f} -> {after:.3f}",
                      f"{kl_after:.3f}"])
    widths = [max(len(row[i]) for row in table) for i in range(len(cols))]
    left = {0, 1}
    for row in table:
        lines.append("  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
                     .rstrip())
    return "\n".join(lines)


def plot_accuracy(result: PairwiseResult, baseline: PairwiseResult, path: Path, title: str) -> None:
    """Horizontal bars of accuracy per domain (and overall), the ``longer wins`` accuracy as a tick, 0.5 dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    names = ["ALL"] + list(result.per_domain)
    accs = [result.overall] + [result.per_domain[d] for d in names[1:]]
    base = [baseline.overall] + [baseline.per_domain.get(d, float("nan")) for d in names[1:]]
    counts = [result.n] + [result.counts[d] for d in names[1:]]
    fig, ax = plt.subplots(figsize=(6.4, 0.26 * len(names) + 1.5), dpi=80, layout="constrained")
    ys = list(range(len(names)))[::-1]
    ax.barh(ys, accs, color=["#444444"] + ["#4c72b0"] * (len(names) - 1), height=0.7)
    ax.scatter(base, ys, marker="|", s=120, color="#dd8452", zorder=3)
    ax.axvline(0.5, color="grey", linestyle="--", linewidth=0.8)
    ax.set_yticks(ys)
    ax.set_yticklabels([f"{n} (n={c})" for n, c in zip(names, counts)], fontsize=7)
    ax.set_xlim(0, 1)
    ax.set_xlabel("held-out pairwise accuracy", fontsize=8)
    ax.tick_params(axis="x", labelsize=7)
    ax.set_title(title, fontsize=9)
    handles = [Patch(color="#4c72b0", label="accuracy (ALL: dark)"),
               Line2D([], [], marker="|", linestyle="", markersize=10, color="#dd8452", label="longer wins (no model)"),
               Line2D([], [], linestyle="--", color="grey", label="0.5")]
    fig.legend(handles=handles, fontsize=7, loc="outside lower center", ncol=3, frameon=False)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_reward_kl(ppo: PPOResult, path: Path, title: str) -> None:
    """Two panels: mean raw score vs iteration, per-sequence KL to the reference vs iteration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    its = list(range(1, len(ppo.score) + 1))
    fig, (a, b) = plt.subplots(1, 2, figsize=(8, 3), dpi=80)
    a.plot(its, ppo.score, marker="o", markersize=3)
    a.set_xlabel("PPO iteration", fontsize=8)
    a.set_ylabel(f"mean score ({'RM' if ppo.reward.startswith('reward model') else 'rule'})", fontsize=8)
    b.plot(its, ppo.kl, marker="o", markersize=3, color="#c44e52")
    b.set_xlabel("PPO iteration", fontsize=8)
    b.set_ylabel("KL(policy || ref), per sequence", fontsize=8)
    for ax in (a, b):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------------------ main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; the defaults finish in about 10 minutes on a 2-core CPU with the tiny model."""
    shared = SHARED.is_dir() and (SHARED / "preferences_train.jsonl.gz").exists()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="builtin:tiny-llama",
                   help="base model of all three methods: builtin:tiny-llama or a HF folder "
                        "(e.g. models/smollm2-135m-instruct; lower the learning rates for a pretrained model)")
    p.add_argument("--train", default=str(SHARED / "preferences_train.jsonl.gz") if shared else BUILTIN_DATA,
                   help="training preference file(s) (prompt, chosen, rejected, domain)")
    p.add_argument("--test", default=str(SHARED / "preferences_test.jsonl.gz") if shared else BUILTIN_DATA,
                   help="held-out preference file (builtin:hh-rlhf: its test split)")
    p.add_argument("--prompts", default=str(SHARED / "prompts_train.jsonl.gz") if shared else BUILTIN_DATA,
                   help="PPO prompt file (filtered to the domains of the preference data)")
    p.add_argument("--domains", nargs="+", default=None, help="keep only these domains (globs, e.g. 'hh_*')")
    p.add_argument("--max-train-rows", type=int, default=4096, help="seeded subset of the training pairs")
    p.add_argument("--max-test-rows", type=int, default=None, help="seeded subset of the test pairs (default: all)")
    p.add_argument("--max-length", type=int, default=256, help="prompt + response tokens (longer: truncated)")
    p.add_argument("--max-prompt-length", type=int, default=192, help="pairs with longer prompts are dropped")
    p.add_argument("--batch-size", type=int, default=16, help="pairs per optimizer step (RM and DPO)")
    p.add_argument("--val-batch-size", type=int, default=16, help="pairs per validation batch")
    p.add_argument("--micro-batch-size", type=int, default=None, help="pairs per micro-batch (default: whole batch)")
    p.add_argument("--warmup-steps", type=int, default=10, help="linear LR warm-up steps (RM and DPO)")
    p.add_argument("--rm-steps", type=int, default=256)
    p.add_argument("--rm-lr", type=float, default=1e-3)
    p.add_argument("--dpo-steps", type=int, default=96)
    p.add_argument("--dpo-lr", type=float, default=1e-3)
    p.add_argument("--dpo-beta", type=float, default=0.1)
    p.add_argument("--ppo-reward", choices=("rm", "rule"), default="rm",
                   help="rm: the reward model trained in step 1; rule: TokenCountReward ('e' count)")
    p.add_argument("--ppo-iterations", type=int, default=20)
    p.add_argument("--ppo-batch-size", type=int, default=16, help="prompts per PPO iteration")
    p.add_argument("--ppo-max-prompt-length", type=int, default=128, help="longer prompts are skipped")
    p.add_argument("--ppo-max-new-tokens", type=int, default=16)
    p.add_argument("--ppo-lr", type=float, default=1e-2)
    p.add_argument("--ppo-critic-lr", type=float, default=1e-3)
    p.add_argument("--ppo-kl-coef", type=float, default=0.01)
    p.add_argument("--ppo-val-prompts", default=str(SHARED / "prompts_test.jsonl.gz") if shared else BUILTIN_DATA,
                   help="held-out prompt file of PPO's validation passes (builtin:hh-rlhf: its test split)")
    p.add_argument("--ppo-val-rows", type=int, default=128,
                   help="fixed held-out prompts scored before and after PPO (0: no validation pass)")
    p.add_argument("--skip", nargs="+", choices=("rm", "dpo", "ppo"), default=[], help="methods not to run")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--precision", choices=("32-true", "bf16-mixed"), default="32-true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(REPO / "bench" / "figures"), help="folder of the PNGs")
    p.add_argument("--json", default=None, help="also save the header and every number to this file")
    args = p.parse_args(argv)
    if min(args.rm_steps, args.dpo_steps, args.ppo_iterations, args.batch_size, args.max_train_rows) < 1:
        p.error("--rm-steps, --dpo-steps, --ppo-iterations, --batch-size and --max-train-rows must be >= 1")
    if args.ppo_batch_size < 2 or args.ppo_batch_size % 2:
        p.error("--ppo-batch-size must be even (two PPO minibatches per iteration)")
    if args.max_prompt_length >= args.max_length:
        p.error("--max-prompt-length must be smaller than --max-length")
    args.shared_data = shared
    return args


def main(argv: list[str] | None = None) -> None:
    """Run RM, DPO and PPO, print the header and the table, write the PNGs (and ``--json``)."""
    args = parse_args(argv)
    import torch

    from lightning_rlhf.models.factory import load_tokenizer

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    machine, git_state = import_header_helpers()
    start = time.perf_counter()
    uses_builtin = BUILTIN_DATA in (args.train, args.test)
    data_note = (f"shared bundle {SHARED}" if args.shared_data and not uses_builtin else
                 f"{BUILTIN_DATA} (embedded HH-RLHF subset)"
                 + ("" if args.shared_data else f": {SHARED} is absent, so the shared bundle was NOT used"))
    head: dict[str, Any] = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "git": git_state(), "machine": machine(args.device), "torch_threads": torch.get_num_threads(),
        "versions": versions(), "data_note": data_note,
        "settings": {k: v for k, v in vars(args).items() if k not in ("json", "shared_data")},
    }
    run = [m for m in ("rm", "dpo", "ppo") if m not in args.skip]
    pairwise: list[PairwiseResult] = []
    ppo: PPOResult | None = None
    out = Path(args.out)
    with tempfile.TemporaryDirectory(prefix="bench_quality_") as tmp:
        root = Path(tmp)
        dm = preference_data(args, load_tokenizer(args.model))
        head["train_rows"] = len(dm.train_dataset)
        head["test_rows_used"] = len(dm.val_dataset)
        head["test_rows_in_file"] = test_rows_in_file(args, dm)
        baseline = longer_wins(dm)
        pairwise.append(baseline)
        print(f"data ready: {len(dm.train_dataset)} train / {len(dm.val_dataset)} test pairs, "
              f"{time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
        rm_export: str | None = None
        if "rm" in run:
            rm, rm_export = run_reward_model(args, dm, root)
            pairwise.append(rm)
            print(f"rm: accuracy {rm.overall:.3f} ({rm.train_seconds:.0f} s + {rm.eval_seconds:.0f} s)",
                  file=sys.stderr, flush=True)
        if "dpo" in run:
            dpo = run_dpo(args, dm, root)
            pairwise.append(dpo)
            print(f"dpo: accuracy {dpo.overall:.3f} ({dpo.train_seconds:.0f} s + {dpo.eval_seconds:.0f} s)",
                  file=sys.stderr, flush=True)
        if "ppo" in run:
            if args.ppo_reward == "rm" and rm_export is None:
                raise SystemExit("--ppo-reward rm needs the reward model run (do not --skip rm), or use --ppo-reward rule")
            domains = args.domains if args.domains else (None if args.prompts == BUILTIN_DATA else dm.domain_names)
            ppo = run_ppo(args, root, rm_export if args.ppo_reward == "rm" else None, domains)
            print(f"ppo: score {ppo.score[0]:.3f} -> {ppo.score[-1]:.3f}, held-out {ppo.val} ({ppo.seconds:.0f} s)",
                  file=sys.stderr, flush=True)
    head["wall_s"] = time.perf_counter() - start
    end_state = git_state()
    if end_state != head["git"]:
        head["git_at_end"] = end_state
    print(format_table(head, pairwise, ppo), flush=True)

    out.mkdir(parents=True, exist_ok=True)
    written = []
    model_name = Path(args.model).name if not args.model.startswith("builtin:") else args.model
    for r in pairwise:
        if r.method in ("rm", "dpo"):
            what = "reward model: r(chosen) > r(rejected)" if r.method == "rm" else \
                f"DPO implicit reward (beta {args.dpo_beta}): margin > 0"
            path = out / f"{r.method}_accuracy.png"
            plot_accuracy(r, baseline, path, f"{what}\n{model_name}, {r.n} held-out pairs")
            written.append(path)
    if ppo is not None:
        path = out / "reward_kl.png"
        plot_reward_kl(ppo, path, f"PPO from {model_name}, {ppo.prompts_per_iteration} prompts per iteration\n"
                                  f"reward = {ppo.reward}")
        written.append(path)
    print("# figures: " + ", ".join(f"{p} ({p.stat().st_size // 1024} KB)" for p in written), flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        record = {"header": head, "pairwise": [asdict(r) for r in pairwise], "ppo": asdict(ppo) if ppo else None}
        Path(args.json).write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
