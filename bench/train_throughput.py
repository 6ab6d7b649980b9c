"""Training throughput of lightning_rlhf against TRL 1.16, side by side: DPO, reward model (RM) and SFT.

One command measures every (method, data, side) in a fresh subprocess (the script re-invokes itself with a hidden
``--worker`` flag and reads back one JSON line), so each side's peak memory is its own, then prints one table:

    OMP_NUM_THREADS=1 python bench/train_throughput.py                  # CPU, built-in tiny Llama, fp32
    python bench/train_throughput.py --model /tmp/smollm2-135m-random --device cuda --precision bf16 \\
        --batch-size 8 --prompt-len 256 --completion-len 256 --max-length 1024 --warmup 5 --steps 20

Data kinds:

* ``fixed``: random token ids (special tokens excluded); every prompt is ``--prompt-len`` and every completion
  ``--completion-len`` tokens, so no padding at all.
* ``real``: preference rows of ``--data`` (default ``builtin:hh-rlhf``, the HH-RLHF subset shipped in the package; any
  prompt/chosen/rejected file works, e.g. ``../shared/data/preferences_train.jsonl.gz --domains 'hh_*'``), tokenized
  once by our ``PreferenceDataModule``; only rows whose prompt + chosen and prompt + rejected both fit in
  ``--max-length`` are kept (a seeded sample of them), so neither side truncates or drops anything. SFT trains on
  prompt + chosen.

Equal work: the token ids are made once, here, and both sides train on exactly these ids in the same order. Ours
builds its batches with our data modules' ``collate`` and runs the method's LightningModule under a
``lightning.Trainer``; TRL gets a pre-tokenized ``datasets.Dataset`` with sequential sampling (``DPOTrainer`` 1.16
always re-tokenizes text columns, so a subclass passes the pre-tokenized rows through unchanged). Same model folder,
batch size, precision (fp32, or bf16 autocast over fp32 weights: ``bf16-mixed`` / ``bf16=True``), AdamW with the same
lr, betas, eps, no weight decay, constant schedule, clipping at 1.0, no gradient checkpointing, no evaluation, no
checkpoints, no logging except into a temporary folder. DPO: sigmoid loss, the same beta, the reference scored in
every step on both sides (TRL ``precompute_ref_log_probs=False``).

Measured per (method, data, side), after ``--warmup`` steps, over ``--steps`` timed optimizer steps:

* ``s/step``: median wall time of a step (ours: ``callbacks/run_summary.py``'s ``RunSummary.step_times``, batch start
  to batch end; TRL: a ``TrainerCallback`` from ``on_step_begin`` to ``on_step_end``; CUDA synchronised at both ends).
  Batch collation happens before the timed region on both sides.
* ``tokens/step``: non-pad tokens of every sequence of the batch (prompt + completion; chosen and rejected both count
  for DPO and RM), mean over the timed steps; ours counted from our batches, TRL's from the batches its collator
  returned. The script fails if the two sides differ by more than 1% in any step.
* ``tokens/s``: median over the timed steps of ``tokens / seconds`` of each step.
* ``CPU s/step`` and ``tokens/CPU-s``: the same over the process's CPU time (``time.process_time``) between the same
  hooks: on a CPU shared with other jobs, the time the worker was not scheduled does not count (one torch thread, no
  data-loader workers, so CPU time ~ the step's compute). Wall time is the headline figure on a quiet machine.
* ``peak mem``: GPU: ``torch.cuda.max_memory_allocated`` since training started (ours: reset by ``RunSummary`` at
  ``on_fit_start``; TRL: reset at ``on_train_begin``); CPU: peak resident set size (``VmHWM``) of the whole worker
  process, which includes the imported libraries: with a tiny model it is mostly the Python process itself.

``--json PATH`` saves the header and the records (with every step's time and token count).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import importlib.metadata
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

METHODS = ("dpo", "rm", "sft")
DATA_KINDS = ("fixed", "real")
SIDES = ("ours", "trl")
PACKINGS = ("none", "padding_free", "greedy")


def runs_of(method: str, args: argparse.Namespace) -> list[tuple[str, str]]:
    """The (side, packing) rows measured for ``method``: both sides unpacked; with packing rows (default), ours
    padding-free for the RM and SFT (DPO: with ``--padding-free``), ours greedy-packed for SFT, and TRL's own
    padding-free SFT (``SFTConfig(padding_free=True)``; TRL 1.16's ``RewardTrainer`` has none; its ``DPOConfig`` has
    ``padding_free``, not measured here)."""
    out = [("ours", "none")]
    if method == "dpo" and args.padding_free:
        out.append(("ours", "padding_free"))
    if method in ("rm", "sft") and args.packing_rows:
        out.append(("ours", "padding_free"))
        if method == "sft":
            out.append(("ours", "greedy"))
    out.append(("trl", "none"))
    if method == "sft" and args.packing_rows:
        out.append(("trl", "padding_free"))
    return out
RESULT_PREFIX = "BENCH_RESULT "
TOKEN_TOLERANCE = 0.01  # largest allowed relative difference of per-step token counts between the sides

# optimizer and loss settings shared by both sides (ours: RLHFModule defaults; TRL: set to the same)
ADAM_BETAS = (0.9, 0.95)
ADAM_EPS = 1e-8
MAX_GRAD_NORM = 1.0
DPO_BETA = 0.1

#: one training example as token ids: ``prompt_ids`` and the completions without the prompt
Row = dict[str, list[int]]


# ---------------------------------------------------------------------------------------------------------- helpers
def peak_memory_gib(device: str) -> float:
    """Peak memory of this process in GiB: ``callbacks.run_summary.peak_memory_gib`` (the CUDA allocator's peak on a
    GPU, else ``VmHWM``, the peak resident set size, which unlike ``ru_maxrss`` does not count the parent's memory
    image from before ``execve``)."""
    import torch

    from callbacks.run_summary import peak_memory_gib as process_peak

    return process_peak(torch.device(device))


def resolved_model(name: str) -> str:
    """The local folder of ``name`` (``builtin:tiny-llama`` is materialised in ``$LIGHTNING_RLHF_CACHE``)."""
    from lightning_rlhf.models.factory import resolve_pretrained

    return resolve_pretrained(name)


def sft_sequences(rows: list[Row]) -> list[tuple[list[int], int]]:
    """``(prompt + chosen token ids, prompt length)`` of every row: the demonstrations SFT trains on."""
    return [(r["prompt_ids"] + r["chosen_ids"], len(r["prompt_ids"])) for r in rows]


# ------------------------------------------------------------------------------------------------------- data (parent)
def fixed_rows(tokenizer: Any, vocab_size: int, n: int, prompt_len: int, completion_len: int, seed: int) -> list[Row]:
    """``n`` rows of uniformly random non-special token ids with exactly ``prompt_len`` / ``completion_len`` tokens."""
    special = set(tokenizer.all_special_ids)
    pool = [i for i in range(vocab_size) if i not in special]
    rng = random.Random(seed)

    def draw(k: int) -> list[int]:
        return [rng.choice(pool) for _ in range(k)]

    return [{"prompt_ids": draw(prompt_len), "chosen_ids": draw(completion_len), "rejected_ids": draw(completion_len)}
            for _ in range(n)]


def real_rows(tokenizer: Any, path: str, domains: list[str] | None, max_length: int, n: int, seed: int) -> list[Row]:
    """``n`` rows of a preference file tokenized by our ``PreferenceDataModule``, among those that fit untruncated.

    A row is kept when prompt + chosen and prompt + rejected are both shorter than ``max_length`` tokens (the data
    module truncates exactly to ``max_length``, so a shorter sequence was not cut). The sample is seeded.
    """
    import datasets

    from lightning_rlhf.data import PreferenceDataModule

    datasets.disable_progress_bars()
    dm = PreferenceDataModule(train_path=path, val_fraction=0.0, domains=domains, max_length=max_length,
                              max_prompt_length=max_length - 1, skip_invalid_rows=True, seed=seed)
    dm.set_tokenizer(tokenizer)
    dm.setup("fit")
    columns = ["prompt_len", "chosen_ids", "rejected_ids", "chosen_prompt_len", "rejected_prompt_len"]
    fits = []
    for item in dm.train_dataset.select_columns(columns).to_list():
        plen = item["prompt_len"]
        if (item["chosen_prompt_len"] == plen == item["rejected_prompt_len"] and len(item["chosen_ids"]) < max_length
                and len(item["rejected_ids"]) < max_length and len(item["chosen_ids"]) > plen
                and len(item["rejected_ids"]) > plen):
            prompt = item["chosen_ids"][:plen]
            if item["rejected_ids"][:plen] != prompt:
                raise RuntimeError(f"{path}: chosen and rejected sequences of one row start with different prompts")
            fits.append({"prompt_ids": prompt, "chosen_ids": item["chosen_ids"][plen:],
                         "rejected_ids": item["rejected_ids"][plen:]})
    if len(fits) < n:
        raise SystemExit(
            f"Only {len(fits)} rows of {path!r} fit in --max-length {max_length} tokens (of "
            f"{len(dm.train_dataset)} valid rows); the bench needs (--warmup + --steps) * --batch-size = {n}. "
            "Raise --max-length, or lower --batch-size / --steps / --warmup."
        )
    random.Random(seed).shuffle(fits)
    return fits[:n]


# ----------------------------------------------------------------------------------------------------- workers
def run_ours(task: dict[str, Any], rows: list[Row]) -> dict[str, Any]:
    """Train our LightningModule for ``warmup + steps`` optimizer steps; step times from ``RunSummary``."""
    import lightning as L
    from torch.utils.data import DataLoader

    from callbacks.run_summary import RunSummary
    from lightning_rlhf.data import DemonstrationDataModule, PreferenceDataModule
    from lightning_rlhf.methods import DPOModule, RewardModelModule, SFTModule

    method, B, packing = task["method"], task["batch_size"], task.get("packing", "none")
    L.seed_everything(task["seed"], verbose=False)
    common = dict(model_name_or_path=task["model"], lr=task["lr"], adam_betas=ADAM_BETAS, weight_decay=0.0,
                  warmup_steps=0, lr_schedule="constant", max_grad_norm=MAX_GRAD_NORM, micro_batch_size=None,
                  dtype="float32", gradient_checkpointing=False, export_dir=None,
                  fused_adamw=bool(task.get("fused_adamw")))
    if method == "dpo":
        module: L.LightningModule = DPOModule(beta=DPO_BETA, loss_type="sigmoid", precompute_ref_logprobs=False,
                                              padding_free=packing == "padding_free", **common)
    elif method == "rm":
        module = RewardModelModule(padding_free=packing == "padding_free", **common)
    else:
        module = SFTModule(packing=packing, **common)

    # the data modules' own collate functions build the batches (same padding and masks as in training)
    dm_args = dict(max_length=task["max_length"], max_prompt_length=task["max_length"] - 1, batch_size=B)
    if method == "sft":
        dm: Any = DemonstrationDataModule(packing="greedy" if packing == "greedy" else "none", **dm_args)
        items = [{"input_ids": ids, "seq_prompt_len": plen, "prompt_ids": ids[:plen], "domain_id": 0}
                 for ids, plen in sft_sequences(rows)]
    else:
        dm = PreferenceDataModule(**dm_args)
        items = [{"chosen_ids": r["prompt_ids"] + r["chosen_ids"], "rejected_ids": r["prompt_ids"] + r["rejected_ids"],
                  "chosen_prompt_len": len(r["prompt_ids"]), "rejected_prompt_len": len(r["prompt_ids"]),
                  "domain_id": 0, "index": i} for i, r in enumerate(rows)]
    dm.set_tokenizer(module.tokenizer)
    batches = [dm.collate(items[s : s + B]) for s in range(0, len(items), B)]
    tokens = [int(b.attention_mask.sum()) for b in batches]

    summary = RunSummary(warmup_steps=task["warmup"])

    class CpuTimer(L.Callback):
        """Process CPU time of each step, over the same hooks as ``RunSummary`` (batch start to batch end)."""

        def __init__(self) -> None:
            self.cpu_times: list[float] = []
            self._c0 = 0.0

        def on_train_batch_start(self, *args: Any) -> None:
            self._c0 = time.process_time()

        def on_train_batch_end(self, *args: Any) -> None:
            self.cpu_times.append(time.process_time() - self._c0)

    cpu_timer = CpuTimer()
    with tempfile.TemporaryDirectory(prefix="bench_ours_") as root:
        trainer = L.Trainer(
            accelerator=task["device"], devices=1, precision="bf16-mixed" if task["precision"] == "bf16" else "32-true",
            max_steps=task["warmup"] + task["steps"], logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
            default_root_dir=root, callbacks=[cpu_timer, summary],
        )
        loader = DataLoader(batches, batch_size=None, shuffle=False, collate_fn=_identity, num_workers=0)
        trainer.fit(module, train_dataloaders=loader)
    return {"step_times": list(summary.step_times), "cpu_times": cpu_timer.cpu_times, "tokens": tokens, "peak_mem_gib": peak_memory_gib(task["device"]),
            "global_step": trainer.global_step}


def _identity(batch: Any) -> Any:
    """DataLoader collate_fn for batches that are already built."""
    return batch


def run_trl(task: dict[str, Any], rows: list[Row]) -> dict[str, Any]:
    """Train with TRL's trainer for ``warmup + steps`` optimizer steps; step times from a ``TrainerCallback``."""
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer, RewardConfig, RewardTrainer, SFTConfig, SFTTrainer

    method, cuda = task["method"], task["device"] == "cuda"

    class StepTimer(TrainerCallback):
        """Wall time of each optimizer step (``on_step_begin`` to ``on_step_end``), CUDA synchronised."""

        def __init__(self) -> None:
            self.step_times: list[float] = []
            self.cpu_times: list[float] = []
            self._c0 = 0.0
            self._t0 = 0.0

        def _sync(self) -> None:
            if cuda:
                torch.cuda.synchronize()

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if cuda:  # as RunSummary does at on_fit_start
                torch.cuda.reset_peak_memory_stats()

        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self._sync()
            self._t0 = time.perf_counter()
            self._c0 = time.process_time()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self._sync()
            self.step_times.append(time.perf_counter() - self._t0)
            self.cpu_times.append(time.process_time() - self._c0)

    class PreTokenizedDPOTrainer(DPOTrainer):
        """``DPOTrainer`` whose rows already hold ``prompt_ids`` / ``chosen_ids`` / ``rejected_ids``: TRL 1.16 always
        re-tokenizes text columns, and these ids must stay exactly the ones ours trains on."""

        def _prepare_dataset(self, dataset: Any, processing_class: Any, args: Any, dataset_name: str) -> Any:
            return dataset

    class CountingCollator:
        """Wraps the trainer's collator; records the non-pad tokens of every batch it returns, in order."""

        def __init__(self, inner: Any) -> None:
            self.inner = inner
            self.tokens: list[int] = []

        def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
            out = self.inner(features)
            # padding-free batches (one flattened row, no attention mask) hold real tokens only
            self.tokens.append(int(out["attention_mask"].sum()) if "attention_mask" in out else out["input_ids"].numel())
            return out

    path = resolved_model(task["model"])
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    timer = StepTimer()
    with tempfile.TemporaryDirectory(prefix="bench_trl_") as root:
        common = dict(
            output_dir=root, max_steps=task["warmup"] + task["steps"], per_device_train_batch_size=task["batch_size"],
            gradient_accumulation_steps=1, learning_rate=task["lr"], lr_scheduler_type="constant", warmup_steps=0,
            optim="adamw_torch_fused" if task.get("fused_adamw") else "adamw_torch", adam_beta1=ADAM_BETAS[0],
            adam_beta2=ADAM_BETAS[1], adam_epsilon=ADAM_EPS,
            weight_decay=0.0, max_grad_norm=MAX_GRAD_NORM, gradient_checkpointing=False,
            bf16=task["precision"] == "bf16", fp16=False, use_cpu=not cuda, report_to="none", save_strategy="no",
            eval_strategy="no", logging_strategy="no", disable_tqdm=True, dataloader_num_workers=0,
            dataloader_pin_memory=False, train_sampling_strategy="sequential", seed=task["seed"],
            max_length=task["max_length"], model_init_kwargs={"dtype": "float32"},
        )
        if method == "dpo":
            data = Dataset.from_list(rows)
            trainer: Any = PreTokenizedDPOTrainer(
                model=path, args=DPOConfig(beta=DPO_BETA, loss_type=["sigmoid"], precompute_ref_log_probs=False,
                                           truncation_mode="keep_start", **common),
                train_dataset=data, processing_class=tokenizer, callbacks=[timer])
        elif method == "rm":
            data = Dataset.from_list([{"chosen_ids": r["prompt_ids"] + r["chosen_ids"],
                                       "rejected_ids": r["prompt_ids"] + r["rejected_ids"]} for r in rows])
            trainer = RewardTrainer(model=path, args=RewardConfig(center_rewards_coefficient=None, **common),
                                    train_dataset=data, processing_class=tokenizer, callbacks=[timer])
        else:
            data = Dataset.from_list([{"input_ids": ids, "labels": [-100] * plen + ids[plen:]}
                                      for ids, plen in sft_sequences(rows)])
            trl_padding_free = task.get("packing") == "padding_free"
            if trl_padding_free:  # TRL refuses a max_length it does not enforce; every row already fits in it
                common["max_length"] = None
            trainer = SFTTrainer(model=path, args=SFTConfig(packing=False, padding_free=trl_padding_free,
                                                            loss_type="nll", **common),
                                 train_dataset=data, processing_class=tokenizer, callbacks=[timer])
        if len(trainer.train_dataset) != len(rows):
            raise RuntimeError(f"TRL kept {len(trainer.train_dataset)} of the {len(rows)} rows it was given")
        counter = CountingCollator(trainer.data_collator)
        trainer.data_collator = counter
        trainer.train()
    return {"step_times": timer.step_times, "cpu_times": timer.cpu_times, "tokens": counter.tokens[: len(timer.step_times)],
            "peak_mem_gib": peak_memory_gib(task["device"]), "global_step": trainer.state.global_step}


def worker(task_path: str) -> None:
    """Run one (method, data, side) measurement described by a task file; print one ``BENCH_RESULT`` JSON line."""
    task = json.loads(Path(task_path).read_text())
    rows = json.loads(Path(task["rows_path"]).read_text())
    result = (run_ours if task["side"] == "ours" else run_trl)(task, rows)
    expected = task["warmup"] + task["steps"]
    if len(result["step_times"]) != expected or result["global_step"] != expected:
        raise RuntimeError(f"{task['side']} recorded {len(result['step_times'])} step times and reached global step "
                           f"{result['global_step']}; expected {expected} (--warmup + --steps)")
    print(RESULT_PREFIX + json.dumps(result), flush=True)


# ------------------------------------------------------------------------------------------------------ parent
def run_worker(script: str, name: str, task: dict[str, Any], task_dir: Path) -> tuple[dict[str, Any], float]:
    """Run ``script --worker <task file>`` in a fresh Python process (so its peak memory is its own); the JSON of its
    last ``BENCH_RESULT`` line and its wall time. A failed worker stops the run with the tail of its output."""
    task_path = task_dir / f"{name}.json"
    task_path.write_text(json.dumps(task))
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, script, "--worker", str(task_path)], capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-40:])
        raise SystemExit(f"Worker {name} failed (exit code {proc.returncode}); last lines of its output:\n{tail}")
    return json.loads(lines[-1][len(RESULT_PREFIX):]), time.perf_counter() - t0


def measure(task: dict[str, Any], task_dir: Path) -> dict[str, Any]:
    """Run one measurement in a fresh Python process and summarise it."""
    raw, wall_s = run_worker(os.path.abspath(__file__),
                             f"{task['method']}_{task['data']}_{task['side']}_{task['packing']}", task, task_dir)
    W = task["warmup"]
    times, tokens = raw["step_times"][W:], raw["tokens"][W:]
    return {
        "method": task["method"], "data": task["data"], "side": task["side"], "packing": task["packing"],
        "steps_timed": len(times),
        "median_s": statistics.median(times),
        "tokens_per_step": statistics.fmean(tokens),
        "tokens_per_s": statistics.median(n / t for n, t in zip(tokens, times)),
        "median_cpu_s": statistics.median(raw["cpu_times"][W:]),
        "tokens_per_cpu_s": statistics.median(n / max(t, 1e-9) for n, t in zip(tokens, raw["cpu_times"][W:])),
        "peak_mem_gib": raw["peak_mem_gib"], "mem_kind": "GPU" if task["device"] == "cuda" else "RSS",
        "step_times": raw["step_times"], "tokens": raw["tokens"], "worker_wall_s": round(wall_s, 1),
    }


def token_mismatches(ours: dict[str, Any], trl: dict[str, Any]) -> list[str]:
    """Steps where the two sides' token counts differ by more than ``TOKEN_TOLERANCE`` (all steps, warm-up included)."""
    where = f"{ours['method']}/{ours['data']} ({ours['side']} {ours['packing']} vs {trl['side']} {trl['packing']})"
    if len(ours["tokens"]) != len(trl["tokens"]):
        return [f"{where}: ours counted {len(ours['tokens'])} batches, TRL {len(trl['tokens'])}"]
    return [f"{where} step {i}: ours {a} tokens, TRL {b}" for i, (a, b) in enumerate(zip(ours["tokens"], trl["tokens"]))
            if abs(a - b) > TOKEN_TOLERANCE * max(a, b)]


def load_average() -> str:
    """The 1, 5 and 15 minute load averages (other processes share the CPU: label timings with them)."""
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def machine(device: str) -> str:
    """The GPU's name on ``cuda``, else the CPU model and core count."""
    import torch

    if device == "cuda":
        return torch.cuda.get_device_name(0)
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores"


def git_state() -> str:
    """The code measured: the repository's short commit, plus the package files with uncommitted changes and a hash of
    those changes (so a run can tell when the tree changed under it); ``unknown`` outside a git checkout."""
    root = Path(__file__).resolve().parent.parent
    paths = ["--", "lightning_rlhf", "callbacks"]

    def git(*cmd: str) -> str:
        return subprocess.run(["git", "-C", str(root), *cmd], capture_output=True, text=True, check=True).stdout

    try:
        commit = git("rev-parse", "--short", "HEAD").strip()
        changed = [line[3:] for line in git("status", "--porcelain", *paths).splitlines()]
        diff = git("diff", "HEAD", *paths)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    if not changed:
        return commit
    digest = hashlib.sha256((diff + "\n".join(changed)).encode()).hexdigest()[:8]
    return f"{commit} + uncommitted changes ({digest}) in {', '.join(changed)}"


def header(args: argparse.Namespace) -> dict[str, Any]:
    """Date, machine, code state, library versions and the settings of the run."""
    import torch

    versions = {pkg: importlib.metadata.version(pkg) for pkg in ("torch", "transformers", "trl", "lightning")}
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "git": git_state(),
        "machine": machine(args.device),
        "device": args.device, "torch_threads": torch.get_num_threads(), "versions": versions,
        "settings": {k: v for k, v in vars(args).items() if k not in ("json", "worker")},
    }


def _label(r: dict[str, Any]) -> str:
    """``ours`` / ``TRL``, with the packing mode when there is one."""
    side = "TRL" if r["side"] == "trl" else "ours"
    return side if r["packing"] == "none" else f"{side} {r['packing'].replace('_', '-')}"


def format_table(head: dict[str, Any], records: list[dict[str, Any]]) -> str:
    """The header lines and the aligned table."""
    s = head["settings"]
    v = head["versions"]
    lines = [
        f"# {head['date']} | {head['machine']} | device {head['device']}, {head['torch_threads']} torch threads | "
        f"torch {v['torch']}, transformers {v['transformers']}, trl {v['trl']}, lightning {v['lightning']}",
        f"# code: git {head['git']}" + (f" | load average before/after: {head['load_before']} / {head['load_after']}"
                                        if "load_before" in head else ""),
        *([f"# WARNING: the code changed during the run (now git {head['git_at_end']}); measure again on a tree that "
           "stays put"] if "git_at_end" in head else []),
        f"# model {s['model']} | {s['precision']} | batch {s['batch_size']} | fixed: prompt {s['prompt_len']} + "
        f"completion {s['completion_len']} tokens | real: {s['data']}"
        + (f" {s['domains']}" if s["domains"] else "") + f", <= {s['max_length']} tokens | warm-up {s['warmup']}, "
        f"timed {s['steps']} | lr {s['lr']} | AdamW: " + ("fused (both sides)" if s.get("fused_adamw") else
                                                          "torch default (both sides)"),
        "# packing: ours padding-free = model.padding_free (RM, DPO) / model.packing: padding_free (SFT), rows no "
        "longer than the micro-batch's longest sequence (DPO: one row); ours greedy = data.packing + model.packing: "
        "greedy (the batch's examples in rows of --max-length); TRL padding-free = SFTConfig(padding_free=True) (one "
        "flattened row per batch); TRL 1.16's RewardTrainer has no padding-free option (its DPO padding_free: not measured)",
    ]
    cols = ["method", "data", "side", "steps timed", "s/step (median)", "tokens/step", "tokens/s", "peak mem GiB",
            "vs TRL tokens/s", "vs TRL mem", "vs TRL padding-free tokens/s", "CPU s/step", "tokens/CPU-s",
            "vs TRL tokens/CPU-s"]
    by_key = {(r["method"], r["data"], r["side"], r["packing"]): r for r in records}
    table = [cols]
    for r in records:
        base = by_key.get((r["method"], r["data"], "trl", "none"))
        base = None if base is r else base
        pf = by_key.get((r["method"], r["data"], "trl", "padding_free"))
        pf = None if pf is r or r["side"] == "trl" else pf
        table.append([
            r["method"], r["data"], _label(r), str(r["steps_timed"]),
            f"{r['median_s']:.4f}", f"{r['tokens_per_step']:.0f}", f"{r['tokens_per_s']:,.0f}",
            f"{r['peak_mem_gib']:.3f} {r['mem_kind']}",
            f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}" if base else "",
            f"{r['peak_mem_gib'] / base['peak_mem_gib']:.2f}" if base else "",
            f"{r['tokens_per_s'] / pf['tokens_per_s']:.2f}" if pf else "",
            f"{r['median_cpu_s']:.4f}", f"{r['tokens_per_cpu_s']:,.0f}",
            f"{r['tokens_per_cpu_s'] / base['tokens_per_cpu_s']:.2f}" if base else "",
        ])
    widths = [max(len(row[i]) for row in table) for i in range(len(cols))]
    left = {0, 1, 2}
    for row in table:
        lines.append("  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (the hidden ``--worker TASK.json`` runs one measurement instead)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--data-kinds", nargs="+", choices=DATA_KINDS, default=list(DATA_KINDS))
    p.add_argument("--model", default="builtin:tiny-llama", help="HF model folder (or builtin:tiny-llama)")
    p.add_argument("--data", default="builtin:hh-rlhf",
                   help="preference file (prompt/chosen/rejected; json, jsonl, parquet, csv, optionally .gz) for the "
                        "'real' data kind, e.g. ../shared/data/preferences_train.jsonl.gz")
    p.add_argument("--domains", nargs="+", default=None, help="keep only rows of these domains (globs, e.g. 'hh_*')")
    p.add_argument("--batch-size", type=int, default=8, help="pairs (DPO, RM) or sequences (SFT) per optimizer step")
    p.add_argument("--prompt-len", type=int, default=64, help="prompt tokens of the 'fixed' data kind")
    p.add_argument("--completion-len", type=int, default=64, help="completion tokens of the 'fixed' data kind")
    p.add_argument("--max-length", type=int, default=256, help="max prompt + completion tokens (both sides)")
    p.add_argument("--warmup", type=int, default=3, help="untimed optimizer steps first")
    p.add_argument("--steps", type=int, default=20, help="timed optimizer steps")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="bf16 = autocast over fp32 weights (ours: bf16-mixed, TRL: bf16=True)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--padding-free", action="store_true",
                   help="also measure our DPO with padding_free (each micro-batch's sequences packed into one row)")
    p.add_argument("--fused-adamw", action="store_true",
                   help="both sides use torch's fused AdamW kernel (ours model.fused_adamw, TRL optim=adamw_torch_fused)")
    p.add_argument("--no-packing-rows", dest="packing_rows", action="store_false",
                   help="leave out the packed rows (ours padding-free RM and SFT, ours greedy SFT, TRL padding-free SFT)")
    p.add_argument("--json", default=None, help="also save the header and records to this file")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker is None:
        if min(args.batch_size, args.prompt_len, args.completion_len, args.steps) < 1 or args.warmup < 0:
            p.error("--batch-size, --prompt-len, --completion-len and --steps must be >= 1, --warmup >= 0")
        if "fixed" in args.data_kinds and args.prompt_len + args.completion_len > args.max_length:
            p.error(f"--prompt-len + --completion-len ({args.prompt_len + args.completion_len}) exceeds "
                    f"--max-length ({args.max_length})")
        if args.device == "cuda":
            import torch

            if not torch.cuda.is_available():
                p.error("--device cuda but torch sees no CUDA device")
    return args


def main(argv: list[str] | None = None) -> None:
    """Prepare the token ids, run every (method, data, side) in its own worker, print the table, check equal work."""
    args = parse_args(argv)
    if args.worker is not None:
        worker(args.worker)
        return
    from lightning_rlhf.models.factory import load_tokenizer
    from transformers import AutoConfig

    path = resolved_model(args.model)
    tokenizer = load_tokenizer(args.model)
    vocab = min(len(tokenizer), AutoConfig.from_pretrained(path).vocab_size)
    n_rows = (args.warmup + args.steps) * args.batch_size
    head = header(args)
    head["load_before"] = load_average()
    records: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench_throughput_") as tmp:
        tmp_dir = Path(tmp)
        for kind in args.data_kinds:
            if kind == "fixed":
                rows = fixed_rows(tokenizer, vocab, n_rows, args.prompt_len, args.completion_len, args.seed)
            else:
                rows = real_rows(tokenizer, args.data, args.domains, args.max_length, n_rows, args.seed)
            rows_path = tmp_dir / f"rows_{kind}.json"
            rows_path.write_text(json.dumps(rows))
            for method in args.methods:
                for side, packing in runs_of(method, args):
                    task = {"method": method, "data": kind, "side": side, "packing": packing, "rows_path": str(rows_path),
                            "model": args.model, "device": args.device, "precision": args.precision,
                            "batch_size": args.batch_size, "warmup": args.warmup, "steps": args.steps,
                            "lr": args.lr, "max_length": args.max_length, "seed": args.seed,
                            "fused_adamw": args.fused_adamw,
                            }
                    records.append(measure(task, tmp_dir))
                    r = records[-1]
                    print(f"  {method:<4} {kind:<6} {side:<5} {packing:<12} {r['median_s']:.4f} s/step  "
                          f"({r['worker_wall_s']} s in all)", file=sys.stderr, flush=True)
    head["load_after"] = load_average()
    end_state = git_state()
    if end_state != head["git"]:
        head["git_at_end"] = end_state
    order = {(m, d): i for i, (m, d) in enumerate((m, d) for m in args.methods for d in args.data_kinds)}
    records.sort(key=lambda r: (order[(r["method"], r["data"])], SIDES.index(r["side"]), PACKINGS.index(r["packing"])))
    print(format_table(head, records), flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"header": head, "records": records}, indent=1) + "\n")
    by_key = {(r["method"], r["data"], r["side"], r["packing"]): r for r in records}
    problems = [msg for r in records if not (r["side"] == "trl" and r["packing"] == "none")
                for msg in token_mismatches(r, by_key[(r["method"], r["data"], "trl", "none")])]
    if problems:
        raise SystemExit("Unequal work: the sides' per-step token counts differ by more than "
                         f"{TOKEN_TOLERANCE:.0%}:\n  " + "\n  ".join(problems))


if __name__ == "__main__":
    main()
