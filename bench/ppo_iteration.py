"""One online-RL iteration of our ``PPOModule`` against one optimizer step of TRL 1.16's ``GRPOTrainer``.

One command, one table. Both sides get the same model folder, the same prompt token ids, the same number of
completions per prompt, the same number of new tokens per completion and the same precision, and both take exactly
one optimizer step per iteration:

    OMP_NUM_THREADS=1 python bench/ppo_iteration.py                      # CPU, built-in tiny Llama, fp32
    OMP_NUM_THREADS=1 python bench/ppo_iteration.py --ours grpo          # our critic-free GRPO vs TRL's, like for like
    python bench/ppo_iteration.py --model /tmp/smollm2-135m-random --device cuda --precision bf16 \\
        --prompts 64 --completions 4 --new-tokens 128 --prompt-len 64 --warmup 2 --iters 5

Each side runs in a fresh Python process (the script re-invokes itself with a hidden ``--worker`` flag and reads back
one JSON line), as ``bench/train_throughput.py`` does; a third process measures the memory bandwidth and a matmul
peak.

* **Ours**: ``lightning_rlhf.methods.PPOModule`` under a ``lightning.Trainer``. Every prompt is repeated
  ``--completions`` times in the prompt batch (our PPO samples one response per prompt row), so one iteration
  samples ``B = prompts x completions`` responses of ``--new-tokens`` tokens, scores them (policy old log-probs,
  reference log-probs, critic values, reward) and takes one optimizer step (``ppo_epochs=1``, one mini-batch = the
  whole batch). ``--engine`` is passed as ``rollout_engine=`` when ``PPOModule`` accepts it (checked with
  ``inspect.signature``); ``--ppo-set KEY=VALUE`` passes further ``PPOModule`` arguments.
* **TRL**: ``trl.GRPOTrainer`` with ``num_generations = completions``, ``per_device_train_batch_size = prompts x
  completions`` (one generation batch per optimizer step, ``num_iterations=1``), ``max_completion_length =
  new tokens``, ``beta > 0`` (reference log-probs scored every step, like our KL penalty), no vLLM, no logging.
* **Micro-batches** (``--micro-batch M``, default: none): ours ``micro_batch_size = rollout_micro_batch_size = M``;
  TRL ``per_device_train_batch_size = M`` with ``B / M`` accumulation steps and ``generation_batch_size = B``, so
  both still sample all ``B`` rows in one generate call and take one optimizer step per iteration.
* **Same optimizer**: AdamW, same lr, betas, eps, no weight decay, constant schedule, clipping at 1.0, no gradient
  checkpointing; fp32 weights, ``--precision bf16`` = bf16 autocast (ours ``bf16-mixed``, TRL ``bf16=True``).
* **Same reward**: a rule-based count of ``"e"`` in the decoded response: our ``TokenCountReward`` and the same count
  written as a TRL reward function. No reward model on either side.
* **Full-length responses on both sides**: ours sets the generator's EOS id to an id outside the vocabulary (never
  sampled, so no row stops early); TRL gets ``generation_kwargs={"min_new_tokens": N}`` (EOS masked until N tokens).
  The script counts the tokens each side actually generated in every iteration and fails if the two sides differ by
  more than 1% (or either is off the expected ``B x N``), and checks that both sides generated from the same prompt
  rows (token counts and a hash of the rows) in every iteration.

Columns (median over the ``--iters`` timed iterations after ``--warmup`` untimed ones; CUDA synchronised):

* ``generate``: ours ``time/generate`` (``make_experience``'s ``_timing``); TRL the time in
  ``_generate_single_turn`` (``model.generate``).
* ``score``: ours ``time/score`` (policy old log-probs, reference log-probs, critic values, reward); TRL the rest of
  ``_generate_and_score_completions`` (reference log-probs, decoding, reward, group advantages).
* ``update``: ours ``time/update`` (``ppo_update``: policy + critic forward/backward, clipping, optimizer step); TRL
  from the end of ``_generate_and_score_completions`` to ``on_step_end`` (loss forward, backward, optimizer step).
* ``other``: the rest of the iteration (ours: advantages, statistics, logging, Lightning hooks; TRL: the time from
  ``on_step_begin`` to the start of generation).
* ``total``: ours ``on_train_batch_start`` -> ``on_train_batch_end``; TRL ``on_step_begin`` -> ``on_step_end``.
* ``gen tokens``: tokens generated per iteration; ``gen tok/s``: those tokens / ``generate``.
* ``% of floor``: the bandwidth floor of the generate phase / ``generate``. The floor is ``new tokens`` model
  forwards (the prefill and each decode step read every weight once) x bytes of the weights read per forward (all
  parameters at the compute dtype's width: 4 B fp32, 2 B bf16; an untied input embedding is not counted, a tied one
  once, as the LM head) / the bandwidth measured here with a large tensor copy (read + write bytes / time).
* ``update TFLOP/s``: the update phase's model FLOPs / ``update``. FLOPs = 6·N·T (forward 2·N·T + backward 4·N·T;
  attention score/value FLOPs left out). N = the parameters the update trains, counted on the trained models at the
  end of the run without the input embeddings (a lookup) but with the LM head (a tied embedding counted once, as the
  head): ours the policy + the critic (a separate value model's trunk and value head, or a shared critic's value head),
  TRL the policy. T = the non-pad prompt + response tokens the update trains on (ours: PPOModule's own count,
  ``tokens_per_s/update x time/update``; TRL: prompt + completion tokens) x passes (``ppo_epochs`` /
  ``num_iterations``, both 1 here). Neither update phase runs the reference or an old-log-prob pass (both score).
  Both sides apply the LM head only at the positions that predict response tokens; the footer says what share of the
  counted FLOPs that leaves unrun.
* ``update MFU``: ``update TFLOP/s`` / peak. Peak: ``--peak-tflops``; else the dense spec peak of a listed GPU
  (:data:`GPU_PEAKS`) in the run's precision (bf16; for fp32 the TF32 figure when the side's process allows TF32
  matmuls, else plain FP32); else (CPU, unlisted GPU) the median TFLOP/s of a ``--matmul-n`` square matmul in the
  run's precision, measured in the bandwidth process; the header line then says "MFU vs measured matmul peak".
* ``peak mem``: GPU ``torch.cuda.max_memory_allocated``; CPU peak RSS (``VmHWM``) of the worker process.

``--json PATH`` saves the header and the records (with every iteration's phase times and token counts).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import importlib.metadata
import inspect
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from train_throughput import (  # noqa: E402  (same folder)
    RESULT_PREFIX,
    git_state,
    machine,
    peak_memory_gib,
    resolved_model,
    run_worker,
)

SIDES = ("ours", "trl")
TOKEN_TOLERANCE = 0.01  # largest allowed relative difference of generated tokens per iteration between the sides
PHASES = ("generate", "score", "update", "other", "total")

# settings shared by both sides
ADAM_BETAS = (0.9, 0.95)
ADAM_EPS = 1e-8
MAX_GRAD_NORM = 1.0
KL_BETA = 0.05  # ours kl_coef, TRL beta
CLIP_EPS = 0.2  # ours clip_eps, TRL epsilon
REWARD_TOKEN = "e"  # the rule-based reward counts this substring in the decoded response

#: dense (no sparsity) spec-sheet peaks in TFLOP/s by a substring of ``torch.cuda.get_device_name()``, first match
#: wins: (substrings, label, {bf16, tf32, fp32}); "fp32" is the plain FP32 (non-tensor-core) figure. NVL variants (lower
#: clocks) are not listed: their names fall through to the measured matmul peak, as any other GPU does.
GPU_PEAKS: tuple[tuple[tuple[str, ...], str, dict[str, float]], ...] = (
    (("H100 PCIe",), "H100 PCIe", {"bf16": 756.0, "tf32": 378.0, "fp32": 51.2}),
    (("H100 80GB HBM3", "H100 SXM"), "H100 SXM", {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    (("H200",), "H200 (= H100 SXM)", {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    (("A100",), "A100", {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5}),
)
FLOP_RULE = ("update FLOPs = 6·N·T (forward 2·N·T + backward 4·N·T; attention score/value FLOPs left out); N = "
             "parameters the update trains, without input embeddings (a lookup) but with the LM head (a tied embedding "
             "counted once, as the head); T = non-pad prompt + response tokens of the sequences it trains on x passes")

#: defaults that depend on --device (a 2-core CPU needs a much smaller shape than the GPU acceptance target)
DEVICE_DEFAULTS: dict[str, dict[str, int]] = {
    "cpu": {"prompts": 8, "new_tokens": 32, "prompt_len": 64},
    "cuda": {"prompts": 64, "new_tokens": 128, "prompt_len": 64},
}


# ---------------------------------------------------------------------------------------------------------- helpers
def _sync(device: str) -> None:
    """Wait for queued CUDA work (no-op on CPU)."""
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def prompt_key(i: int) -> str:
    """The text both sides carry for prompt ``i`` (TRL looks its token ids up by this text)."""
    return f"bench prompt {i}"


def make_prompts(tokenizer: Any, vocab_size: int, n: int, prompt_len: int, seed: int) -> list[list[int]]:
    """``n`` prompts of exactly ``prompt_len`` uniformly random non-special token ids (seeded)."""
    special = set(tokenizer.all_special_ids)
    pool = [i for i in range(vocab_size) if i not in special]
    rng = random.Random(seed)
    return [[rng.choice(pool) for _ in range(prompt_len)] for _ in range(n)]


def prompts_digest(rows: list[list[int]]) -> str:
    """A hash of the multiset of prompt rows of one iteration (the same prompts, in any row order, hash alike)."""
    return hashlib.sha256(json.dumps(sorted(list(map(int, r)) for r in rows)).encode()).hexdigest()[:16]


def engine_supported() -> bool:
    """Whether ``PPOModule.__init__`` accepts a ``rollout_engine`` argument (the engine switch)."""
    from lightning_rlhf.methods import PPOModule

    return "rollout_engine" in inspect.signature(PPOModule.__init__).parameters


def parse_value(text: str) -> Any:
    """A ``--ppo-set`` value: JSON when it parses (``true``, ``3``, ``0.5``, ``null``), else the string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


# ------------------------------------------------------------------------------------------------------- workers
def copy_bandwidth(device: str, mib: int, warmup: int = 3, repeats: int = 10) -> tuple[float, float]:
    """Memory bandwidth of ``device``: ``(bytes per second, seconds)`` of the median timed ``dst.copy_(src)`` of a
    ``mib`` MiB float32 tensor, counting the bytes read and the bytes written."""
    import torch

    n_bytes = mib * 2**20
    src = torch.empty(n_bytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    times = []
    for i in range(warmup + repeats):
        _sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    seconds = statistics.median(times)
    return 2 * n_bytes / seconds, seconds


def model_read_sizes(model: str) -> dict[str, Any]:
    """Parameters of ``model`` (counted on the meta device, nothing is loaded): ``params`` (tied ones once),
    ``params_read_per_forward`` (an untied input embedding is only gathered, B rows per step, so it is left out),
    ``tied_embeddings`` and ``kv_values_per_token`` (K and V values cached per token: 2 x layers x kv heads x head dim)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(resolved_model(model))
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(cfg)
    total = sum(p.numel() for p in meta.parameters())  # shared (tied) parameters counted once
    emb = meta.get_input_embeddings().weight
    out = meta.get_output_embeddings()
    tied = out is not None and out.weight is emb
    read = total if tied else total - emb.numel()
    text = cfg.get_text_config()
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    return {"params": total, "params_read_per_forward": read, "tied_embeddings": tied,
            "kv_values_per_token": 2 * text.num_hidden_layers * kv_heads * head_dim}


def flop_params(model: Any) -> dict[str, Any]:
    """Parameters of ``model`` that the 6·N·T rule counts: every parameter except the input embeddings (a table
    lookup, no matmul); an output head tied to an embedding is counted once, as the LM head. ``params``: that count N;
    ``trainable``: the part of N with ``requires_grad``; ``embedding``: the parameters left out; ``lm_head``: the
    output head's weight (0 without one, e.g. a sequence-classification critic, whose small head is in N); ``tied``."""
    import torch.nn as nn

    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    head_w = getattr(head, "weight", None)
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    tied = head_w is not None and id(head_w) in embeddings
    left_out = embeddings - {id(head_w)}
    n = trainable = embedding = 0
    for p in model.parameters():  # shared (tied) parameters are yielded once
        if id(p) in left_out:
            embedding += p.numel()
        else:
            n += p.numel()
            trainable += p.numel() if p.requires_grad else 0
    head_n = head_w.numel() if head_w is not None else 0
    return {"params": n, "trainable": trainable, "embedding": embedding, "lm_head": head_n, "tied": tied}


def tf32_matmul() -> bool:
    """Whether float32 CUDA matmuls of this process may run in TF32 (``allow_tf32`` or a float32 matmul precision
    below ``highest``)."""
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # newer torch deprecates allow_tf32 in favour of fp32_precision
        mode = getattr(torch.backends.cuda.matmul, "fp32_precision", "none")
        if mode in ("tf32", "ieee"):
            return mode == "tf32"
        return bool(torch.backends.cuda.matmul.allow_tf32) or torch.get_float32_matmul_precision() != "highest"


def matmul_tflops(device: str, precision: str, n: int, warmup: int, repeats: int) -> tuple[float, float]:
    """A practical compute peak of ``device``: ``(TFLOP/s, seconds)`` of the median timed ``n x n @ n x n`` matmul
    (2 n^3 FLOPs) in the run's precision (bf16 tensors for ``bf16``, float32 for ``fp32``)."""
    import torch

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    c = torch.empty_like(a)
    times = []
    for i in range(warmup + repeats):
        _sync(device)
        t0 = time.perf_counter()
        torch.matmul(a, b, out=c)
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    seconds = statistics.median(times)
    return 2 * n**3 / seconds / 1e12, seconds


def run_bandwidth(task: dict[str, Any]) -> dict[str, Any]:
    """Memory bandwidth of the device (:func:`copy_bandwidth`), the model's sizes (:func:`model_read_sizes`) and the
    matmul peak (:func:`matmul_tflops`; on CUDA in fp32 both without and with TF32)."""
    import torch

    device, precision, n = task["device"], task["precision"], task["matmul_n"]
    bandwidth, seconds = copy_bandwidth(device, task["bandwidth_mib"])
    warmup, repeats = (3, 10) if device == "cuda" else (2, 5)
    matmul: dict[str, Any] = {"n": n, "repeats": repeats}
    if device == "cuda" and precision == "fp32":
        before = torch.get_float32_matmul_precision()
        for mode, setting in (("fp32", "highest"), ("tf32", "high")):
            torch.set_float32_matmul_precision(setting)
            matmul[mode + "_tflops"], matmul[mode + "_s"] = matmul_tflops(device, precision, n, warmup, repeats)
        torch.set_float32_matmul_precision(before)
    else:
        matmul[precision + "_tflops"], matmul[precision + "_s"] = matmul_tflops(device, precision, n, warmup, repeats)
    return {"bandwidth_Bps": bandwidth, "copy_mib": task["bandwidth_mib"], "copy_s": seconds,
            "torch_threads": torch.get_num_threads(), "matmul": matmul,
            "gpu_name": torch.cuda.get_device_name(0) if device == "cuda" else None, **model_read_sizes(task["model"])}


def run_ours(task: dict[str, Any], prompts: list[list[int]]) -> dict[str, Any]:
    """``warmup + iters`` iterations of our ``PPOModule``; phase times from the dict ``training_step`` returns."""
    import lightning as L
    import torch
    from torch.utils.data import DataLoader

    from lightning_rlhf.data.batches import PromptBatch
    from lightning_rlhf.methods import PPOModule

    P, C, N, device = task["prompts"], task["completions"], task["new_tokens"], task["device"]
    B = P * C
    n_iter = task["warmup"] + task["iters"]
    L.seed_everything(task["seed"], verbose=False)
    kwargs: dict[str, Any] = dict(
        model_name_or_path=task["model_path"],
        reward_fn={"class_path": "lightning_rlhf.rewards.TokenCountReward", "init_args": {"token": REWARD_TOKEN}},
        critic=task["critic"], lr=task["lr"], critic_lr=task["lr"], adam_betas=ADAM_BETAS, weight_decay=0.0,
        warmup_steps=0, lr_schedule="constant", max_grad_norm=MAX_GRAD_NORM, kl_coef=KL_BETA, clip_eps=CLIP_EPS,
        ppo_epochs=1, mini_batch_size=None, micro_batch_size=task["micro_batch"],
        rollout_micro_batch_size=task["micro_batch"],
        max_new_tokens=N, temperature=1.0, top_p=1.0, top_k=0, dtype="float32", gradient_checkpointing=False,
        export_dir=None, log_samples_every_n=0, max_iterations=n_iter, seed=task["seed"],
    )
    grpo = task.get("ours") == "grpo"
    if grpo:  # our critic-free GRPO, configured as TRL's GRPOTrainer is below
        kwargs.update(advantage="grpo", critic="none", n_samples_per_prompt=C, scale_rewards="group", kl_in="loss",
                      kl_loss_coef=KL_BETA, loss_agg=task["loss_agg"], reward_norm="none")
    if engine_supported():
        kwargs["rollout_engine"] = task["engine"]
    elif task["engine"] != "hf":
        raise SystemExit(f"--engine {task['engine']!r}: this PPOModule has no 'rollout_engine' argument")
    kwargs.update(task["ppo_set"])
    module = PPOModule(**kwargs)
    never_id = task["never_id"]

    # prompt batches: each prompt repeated C times in a row (TRL's RepeatSampler orders a step's rows the same way);
    # our GRPO gets the P prompts once and samples C responses per prompt itself (its rows come out in that order)
    batches = []
    repeat = 1 if grpo else C
    for it in range(n_iter):
        idx = [i for i in range(it * P, (it + 1) * P) for _ in range(repeat)]
        batches.append(PromptBatch(
            input_ids=torch.tensor([prompts[i] for i in idx], dtype=torch.long),
            attention_mask=torch.ones((len(idx), len(prompts[0])), dtype=torch.long),
            domain_ids=torch.zeros(len(idx), dtype=torch.long),
            prompt_ids=[prompt_key(i) for i in idx], prompts=[prompt_key(i) for i in idx], domains=[""] * len(idx),
        ))
    rows_per_batch_row = C // repeat  # rollouts per prompt row of a batch

    class IterationTimer(L.Callback):
        """Forces full-length responses and records each iteration's wall time, phase times and generated tokens."""

        def __init__(self) -> None:
            self.rows: list[dict[str, float]] = []
            self._t0 = 0.0

        def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()

        def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                                 batch_idx: int) -> None:
            gen = getattr(pl_module, "generator", None)
            if gen is None or not hasattr(gen, "eos_token_id"):
                raise SystemExit(f"cannot force full-length responses: the rollout generator {type(gen).__name__} "
                                 "has no 'eos_token_id' attribute")
            if getattr(gen, "pad_token_id", None) is None:  # a generator that pads with its EOS id keeps the real pad
                gen.pad_token_id = pl_module.tokenizer.pad_token_id
            gen.eos_token_id = never_id  # outside the vocabulary: never sampled, no row stops early
            _sync(device)
            self._t0 = time.perf_counter()

        def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                               batch_idx: int) -> None:
            _sync(device)
            total = time.perf_counter() - self._t0
            out = {k: float(v) for k, v in outputs.items()}
            rollout_rows = batch.input_ids.repeat_interleave(rows_per_batch_row, dim=0)  # (B, P) as sampled
            row = {"generate": out["time/generate"], "score": out["time/score"], "update": out["time/update"],
                   "total": total, "gen_tokens": round(out["response/length"] * len(rollout_rows)),
                   "prompt_tokens": int(batch.attention_mask.sum()) * rows_per_batch_row,
                   "prompt_digest": prompts_digest(rollout_rows.tolist())}
            row["other"] = total - row["generate"] - row["score"] - row["update"]
            # tokens the update ran through (non-pad prompt + response, every epoch): PPOModule's own count when it
            # logs one (tokens_per_s/update x time/update), else (prompt + generated tokens) x ppo_epochs
            if "tokens_per_s/update" in out:
                row["update_tokens"] = round(out["tokens_per_s/update"] * out["time/update"])
            else:
                row["update_tokens"] = (row["prompt_tokens"] + row["gen_tokens"]) * kwargs["ppo_epochs"]
            self.rows.append(row)

    timer = IterationTimer()
    with tempfile.TemporaryDirectory(prefix="bench_ppo_ours_") as root:
        trainer = L.Trainer(
            accelerator=device, devices=1, precision="bf16-mixed" if task["precision"] == "bf16" else "32-true",
            max_epochs=1, max_steps=-1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0, default_root_dir=root,
            callbacks=[timer],
        )
        loader = DataLoader(batches, batch_size=None, shuffle=False, collate_fn=_identity, num_workers=0)
        trainer.fit(module, train_dataloaders=loader)
    # the models the update trains: the policy and the critic (a separate value model, or the shared value head)
    trained = {"policy": flop_params(module.policy)}
    if module.critic is not None:
        trained["critic"] = flop_params(getattr(module.critic, "hf_model", module.critic))
    elif module.value_head is not None:
        trained["value_head"] = flop_params(module.value_head)
    return {"rows": timer.rows, "optimizer_steps": trainer.global_step,
            "peak_mem_gib": peak_memory_gib(device), "generator": type(module.generator).__name__,
            "ppo_kwargs": {k: v for k, v in kwargs.items() if k != "reward_fn"}, "flop_params": trained,
            "passes": kwargs["ppo_epochs"], "tf32": tf32_matmul() if device == "cuda" else None}


def _identity(batch: Any) -> Any:
    """DataLoader collate_fn for batches that are already built."""
    return batch


def run_trl(task: dict[str, Any], prompts: list[list[int]]) -> dict[str, Any]:
    """``warmup + iters`` optimizer steps of ``trl.GRPOTrainer``; phase times from wrapped trainer methods."""
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    P, C, N, device = task["prompts"], task["completions"], task["new_tokens"], task["device"]
    n_iter = task["warmup"] + task["iters"]
    micro = task["micro_batch"] or P * C  # rows per forward/backward; accumulated to one optimizer step
    ids_by_key = {prompt_key(i): ids for i, ids in enumerate(prompts)}
    marks: dict[str, float] = {}
    rows: list[dict[str, float]] = []
    gen_tokens: list[int] = []
    prompt_tokens: list[int] = []
    prompt_digests: list[str] = []

    def timed(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        """``fn`` that records its start and end (CUDA synchronised) in ``marks[name + "_start" / "_end"]``."""

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            _sync(device)
            marks[name + "_start"] = time.perf_counter()
            out = fn(*args, **kwargs)
            _sync(device)
            marks[name + "_end"] = time.perf_counter()
            return out

        return wrapper

    class StepTimer(TrainerCallback):
        """Phase times of each optimizer step from the marks of the wrapped methods (``on_step_begin`` to
        ``on_step_end``, CUDA synchronised)."""

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()

        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            marks.clear()
            _sync(device)
            marks["step_start"] = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            _sync(device)
            end = time.perf_counter()
            gen = marks["generate_end"] - marks["generate_start"]
            gas = marks["gen_and_score_end"] - marks["gen_and_score_start"]
            rows.append({"generate": gen, "score": gas - gen, "update": end - marks["gen_and_score_end"],
                         "other": marks["gen_and_score_start"] - marks["step_start"],
                         "total": end - marks["step_start"], "gen_tokens": gen_tokens[-1],
                         "prompt_tokens": prompt_tokens[-1], "prompt_digest": prompt_digests[-1],
                         # the loss forward + backward runs over prompt + completion, num_iterations times
                         "update_tokens": (prompt_tokens[-1] + gen_tokens[-1]) * args.num_iterations})

    class PreTokenizedGRPOTrainer(GRPOTrainer):
        """``GRPOTrainer`` whose prompts are the pre-made token ids (looked up by the prompt text), so both sides
        generate from exactly the same ids."""

        def _tokenize_prompts(self, prompts: list) -> tuple[list[list[int]], None, dict[str, Any]]:
            return [list(ids_by_key[p]) for p in prompts], None, {}

    def count_reward(prompts: list[str], completions: list[str], **kwargs: Any) -> list[float]:
        """Occurrences of ``REWARD_TOKEN`` in each completion (= our ``TokenCountReward``)."""
        return [float(c.count(REWARD_TOKEN)) for c in completions]

    path = task["model_path"]
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    with tempfile.TemporaryDirectory(prefix="bench_ppo_trl_") as root:
        args = GRPOConfig(
            output_dir=root, max_steps=n_iter, per_device_train_batch_size=micro,
            gradient_accumulation_steps=P * C // micro, generation_batch_size=P * C,
            num_generations=C, num_iterations=1, max_completion_length=N,
            generation_kwargs={"min_new_tokens": N}, beta=KL_BETA, epsilon=CLIP_EPS, temperature=1.0, top_p=1.0,
            loss_type={"token_mean": "dapo", "seq_mean_token_mean": "grpo"}[task.get("loss_agg", "token_mean")],
            scale_rewards="group",
            top_k=0, use_vllm=False, learning_rate=task["lr"], lr_scheduler_type="constant", warmup_steps=0,
            optim="adamw_torch", adam_beta1=ADAM_BETAS[0], adam_beta2=ADAM_BETAS[1], adam_epsilon=ADAM_EPS,
            weight_decay=0.0, max_grad_norm=MAX_GRAD_NORM, gradient_checkpointing=False,
            bf16=task["precision"] == "bf16", fp16=False, use_cpu=device != "cuda", report_to="none",
            save_strategy="no", eval_strategy="no", logging_strategy="no", log_completions=False, disable_tqdm=True,
            dataloader_num_workers=0, dataloader_pin_memory=False, shuffle_dataset=False, seed=task["seed"],
            model_init_kwargs={"dtype": "float32"},
        )
        data = Dataset.from_list([{"prompt": prompt_key(i)} for i in range(len(prompts))])
        trainer = PreTokenizedGRPOTrainer(model=path, reward_funcs=count_reward, args=args, train_dataset=data,
                                          processing_class=tokenizer, callbacks=[StepTimer()])
        generate_single_turn = trainer._generate_single_turn

        def counting_generate(prompt_ids: list[list[int]], *a: Any, **k: Any) -> Any:
            prompt_tokens.append(sum(len(p) for p in prompt_ids))
            prompt_digests.append(prompts_digest(prompt_ids))
            completion_ids, logprobs = generate_single_turn(prompt_ids, *a, **k)
            gen_tokens.append(sum(len(c) for c in completion_ids))
            return completion_ids, logprobs

        trainer._generate_single_turn = timed("generate", counting_generate)
        trainer._generate_and_score_completions = timed("gen_and_score", trainer._generate_and_score_completions)
        if trainer.ref_model is None:
            raise RuntimeError("GRPOTrainer built no reference model although beta > 0")
        trainer.train()
        policy = trainer.accelerator.unwrap_model(trainer.model)
    return {"rows": rows, "optimizer_steps": trainer.state.global_step, "peak_mem_gib": peak_memory_gib(device),
            "flop_params": {"policy": flop_params(policy)}, "passes": args.num_iterations,
            "tf32": tf32_matmul() if device == "cuda" else None}


def worker(task_path: str) -> None:
    """Run one measurement described by a task file; print one ``BENCH_RESULT`` JSON line."""
    task = json.loads(Path(task_path).read_text())
    if task["side"] == "bandwidth":
        result = run_bandwidth(task)
    else:
        prompts = json.loads(Path(task["prompts_path"]).read_text())
        result = (run_ours if task["side"] == "ours" else run_trl)(task, prompts)
        expected = task["warmup"] + task["iters"]
        if len(result["rows"]) != expected or result["optimizer_steps"] != expected:
            raise RuntimeError(f"{task['side']} recorded {len(result['rows'])} iterations and took "
                               f"{result['optimizer_steps']} optimizer steps; expected {expected} of each")
    print(RESULT_PREFIX + json.dumps(result), flush=True)


# ------------------------------------------------------------------------------------------------------ parent
def launch(task: dict[str, Any], task_dir: Path) -> tuple[dict[str, Any], float]:
    """Run one worker in a fresh Python process; its parsed result and its wall time."""
    return run_worker(os.path.abspath(__file__), task["side"], task, task_dir)


def summarise(side: str, raw: dict[str, Any], warmup: int, floor_s: float, wall_s: float) -> dict[str, Any]:
    """Medians over the timed iterations of one side."""
    timed = raw["rows"][warmup:]
    rec: dict[str, Any] = {"side": side, "iters_timed": len(timed)}
    for phase in PHASES:
        rec[phase + "_s"] = statistics.median(r[phase] for r in timed)
    rec["gen_tokens"] = statistics.median(r["gen_tokens"] for r in timed)
    rec["gen_tokens_per_s"] = statistics.median(r["gen_tokens"] / r["generate"] for r in timed)
    rec["floor_pct"] = 100.0 * floor_s / rec["generate_s"]
    rec.update(peak_mem_gib=raw["peak_mem_gib"], rows=raw["rows"], worker_wall_s=round(wall_s, 1))
    rec.update({k: raw[k] for k in ("generator", "ppo_kwargs") if k in raw})
    return rec


def spec_peak(gpu_name: str | None, mode: str) -> tuple[float, str] | None:
    """The dense spec-sheet peak (TFLOP/s) of a GPU listed in :data:`GPU_PEAKS` for ``mode`` (bf16, tf32 or fp32) and
    its label; ``None`` for an unlisted device."""
    if not gpu_name or "NVL" in gpu_name:
        return None
    for subs, label, peaks in GPU_PEAKS:
        if any(sub in gpu_name for sub in subs):
            return peaks[mode], f"{label} dense {mode.upper()} spec"
    return None


def add_mfu(rec: dict[str, Any], raw: dict[str, Any], bw: dict[str, Any], s: dict[str, Any]) -> None:
    """Update-phase model FLOPs (:data:`FLOP_RULE`), achieved TFLOP/s (FLOPs / median update seconds) and MFU against
    the peak: ``--peak-tflops``, else the GPU's spec peak, else the matmul peak measured by the bandwidth worker."""
    timed = rec["rows"][s["warmup"]:]
    mode = "bf16" if s["precision"] == "bf16" else ("tf32" if raw.get("tf32") else "fp32")
    params = raw["flop_params"]
    n = sum(v["params"] for v in params.values())
    tokens = statistics.median(r["update_tokens"] for r in timed)
    prompt_tokens = statistics.median(r["prompt_tokens"] for r in timed) * raw["passes"]
    flops = 6 * n * tokens
    spec = spec_peak(bw.get("gpu_name"), mode)
    if s["peak_tflops"]:
        peak, kind, source = s["peak_tflops"], "given", "--peak-tflops"
    elif spec is not None:
        peak, kind, source = spec[0], "spec", f"{spec[1]} ({bw['gpu_name']})"
    else:
        m = bw["matmul"]
        peak, kind = m[mode + "_tflops"], "measured"
        source = (f"median of {m['repeats']} {m['n']}x{m['n']} {mode} matmuls measured here "
                  f"({bw['torch_threads']} torch threads)")
    achieved = flops / rec["update_s"] / 1e12
    rec.update(
        flop_params=params, update_params=n, update_passes=raw["passes"], update_tokens=tokens, update_flops=flops,
        update_tflops=achieved, matmul_mode=mode, tf32=raw.get("tf32"), peak_tflops=peak, peak_kind=kind,
        peak_source=source, update_mfu=achieved / peak,
        # both sides apply the LM head only at the positions that predict response tokens: the head's share of the
        # counted FLOPs at the other (prompt) positions is counted by the rule but run by neither side
        lm_head_prompt_frac=6 * params["policy"]["lm_head"] * prompt_tokens / flops if flops else 0.0,
        frozen_params=n - sum(v["trainable"] for v in params.values()),
    )


def token_problems(ours: dict[str, Any], trl: dict[str, Any], expected: int, prompt_tokens: int) -> list[str]:
    """Iterations (warm-up included) where the sides generated different token counts (> ``TOKEN_TOLERANCE``
    apart), where a side is off ``expected`` (= B x N, full-length responses) by more than that, where a side's
    prompts did not hold exactly ``prompt_tokens`` (= B x prompt length) tokens, or where the sides' prompt rows
    differ."""
    a_rows, b_rows = ours["rows"], trl["rows"]
    if len(a_rows) != len(b_rows):
        return [f"ours ran {len(a_rows)} iterations, TRL {len(b_rows)}"]
    out = []
    for i, (a, b) in enumerate(zip(a_rows, b_rows)):
        na, nb = a["gen_tokens"], b["gen_tokens"]
        if abs(na - nb) > TOKEN_TOLERANCE * max(na, nb) or max(abs(na - expected), abs(nb - expected)) > \
                TOKEN_TOLERANCE * expected:
            out.append(f"iteration {i}: ours generated {na} tokens, TRL {nb} (expected {expected})")
        if a["prompt_tokens"] != prompt_tokens or b["prompt_tokens"] != prompt_tokens:
            out.append(f"iteration {i}: prompt tokens ours {a['prompt_tokens']}, TRL {b['prompt_tokens']} "
                       f"(expected {prompt_tokens})")
        if a["prompt_digest"] != b["prompt_digest"]:
            out.append(f"iteration {i}: the two sides generated from different prompts")
    return out


def bandwidth_floor(bw: dict[str, Any], s: dict[str, Any]) -> dict[str, float]:
    """Seconds a generate phase cannot go below: ``new_tokens`` forwards x weight bytes / bandwidth; also the
    (tighter, informational) floor that adds the KV-cache reads of every decode step at its context length."""
    width = 2 if s["precision"] == "bf16" else 4
    weight_bytes = bw["params_read_per_forward"] * width
    per_forward = weight_bytes / bw["bandwidth_Bps"]
    rows = s["prompts"] * s["completions"]
    # decode step t (t = 1..N-1) attends over prompt_len + t cached positions
    kv_bytes = sum(bw["kv_values_per_token"] * width * rows * (s["prompt_len"] + t) for t in range(1, s["new_tokens"]))
    floor = s["new_tokens"] * per_forward
    return {"weight_bytes": weight_bytes, "width": width, "per_forward_s": per_forward, "floor_s": floor,
            "floor_kv_s": floor + kv_bytes / bw["bandwidth_Bps"]}


def header(args: argparse.Namespace) -> dict[str, Any]:
    """Date, machine, code state, library versions and the settings of the run."""
    import torch

    versions = {pkg: importlib.metadata.version(pkg) for pkg in ("torch", "transformers", "trl", "lightning")}
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "git": git_state(), "machine": machine(args.device), "device": args.device,
        "torch_threads": torch.get_num_threads(), "versions": versions, "load_start": load_average(),
        "settings": {k: v for k, v in vars(args).items() if k not in ("json", "worker")},
    }


def load_average() -> float | None:
    """The machine's 1-minute load average (other jobs on a shared CPU slow both sides); ``None`` where unknown."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


#: the first caveat, by our side's method (--ours)
CRITIC_CAVEAT = {
    "ppo": "PPO trains a critic (here a separate value model: one more forward while scoring, one more forward + "
           "backward in the update); GRPO has none (group-relative advantages).",
    "grpo": "Both sides run GRPO with no critic: same group-std advantages, k3 KL loss with the same beta, the same "
            "loss aggregation; ours computes its advantages in 'other', TRL in 'score'.",
}
CAVEATS = (
    "Our score phase also recomputes the policy's old log-probs (unless --ppo-set makes PPOModule reuse the "
    "sampler's); TRL skips that pass when generation and optimization are aligned (num_iterations=1, one "
    "optimizer step per generation batch) and takes the detached current log-probs.",
    "TRL computes log-probs (and, in the update, entropies) through its fused LM-head kernel: Triton on CUDA, a "
    "PyTorch loop over tiles elsewhere, which is slow on CPU; ours materialises the logits.",
    "Ours computes GAE and whitening outside the phases (in 'other'); TRL's group advantages are in 'score'.",
    "Full length is forced differently: ours moves EOS to an id outside the vocabulary (the real EOS may be sampled "
    "as an ordinary token); TRL masks EOS with min_new_tokens. Both run the same number of forwards.",
    "The floor counts weight reads only (prefill + decode forwards), not the KV cache (see 'with KV'), activations "
    "or sampling; with weights that fit in a CPU cache (the tiny model) it says little.",
)


def _flop_str(x: float) -> str:
    """``x`` FLOPs with an SI prefix (``8.77 GFLOP``)."""
    for prefix, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6)):
        if x >= scale:
            return f"{x / scale:.3g} {prefix}FLOP"
    return f"{x:.3g} FLOP"


def mfu_header(records: list[dict[str, Any]], bw: dict[str, Any]) -> str:
    """The line above the table that says what the update MFU column divides by (measured peaks say so first), with
    the matmul peak measured here beside a spec or given one."""
    peaks = {(r["peak_tflops"], r["peak_kind"], r["peak_source"]) for r in records}
    kinds = {k for _, k, _ in peaks}
    label = ("update MFU vs measured matmul peak (NOT a spec-sheet MFU)" if kinds == {"measured"}
             else "update MFU vs spec-sheet peak" if kinds == {"spec"}
             else "update MFU vs --peak-tflops" if kinds == {"given"} else "update MFU vs mixed peaks")
    if len(peaks) == 1:
        peak, _, source = next(iter(peaks))
        line = f"# {label}: peak {peak:.4g} TFLOP/s = {source}"
    else:
        line = f"# {label}: " + "; ".join(f"{'ours' if r['side'] == 'ours' else 'TRL'} peak {r['peak_tflops']:.4g} "
                                          f"TFLOP/s = {r['peak_source']}" for r in records)
    if kinds != {"measured"}:
        m = bw["matmul"]
        line += "; measured here: " + ", ".join(f"{m[mode + '_tflops']:.4g} TFLOP/s {mode}"
                                               for mode in ("bf16", "tf32", "fp32") if mode + "_tflops" in m) \
            + f" ({m['n']}x{m['n']} matmul, median of {m['repeats']})"
    return line


def mfu_footer(records: list[dict[str, Any]], s: dict[str, Any]) -> list[str]:
    """Lines under the table: the FLOP rule, each side's N and T and FLOPs, the LM-head caveat, frozen parameters."""
    lines = [f"# {FLOP_RULE}"]
    for r in records:
        notes = {"policy": " (tied embedding counted once, as the LM head)" if r["flop_params"]["policy"]["tied"]
                 else " (LM head, no input embedding)", "critic": " (separate: trunk + value head)",
                 "value_head": " (shared critic)"}
        parts = " + ".join(f"{name} {v['params']:,}{notes.get(name, '')}" for name, v in r["flop_params"].items())
        passes = "ppo_epochs" if r["side"] == "ours" else "num_iterations"
        lines.append(
            f"#   {'ours' if r['side'] == 'ours' else 'TRL '}: N = {parts}"
            + (f" = {r['update_params']:,}" if len(r["flop_params"]) > 1 else "")
            + f"; T = {r['update_tokens']:,.0f} tokens ({passes} {r['update_passes']}) -> {_flop_str(r['update_flops'])}"
            f" per update / {r['update_s']:.4f} s = {r['update_tflops']:.4g} TFLOP/s"
            + (f"; WARNING: {r['frozen_params']:,} of N are frozen (LoRA?), 6·N·T overstates"
               if r["frozen_params"] else ""))
    a, b = records
    lines.append(
        "#   no reference or old-log-prob pass runs in either update phase (both are in score); both sides apply the LM "
        "head only at the positions that predict response tokens, so the rule counts head FLOPs at prompt positions "
        f"that neither runs: {100 * a['lm_head_prompt_frac']:.0f}% of ours' counted FLOPs, "
        f"{100 * b['lm_head_prompt_frac']:.0f}% of TRL's")
    return lines


def format_table(head: dict[str, Any], bw: dict[str, Any], floor: dict[str, float],
                 records: list[dict[str, Any]]) -> str:
    """The header lines, the aligned table and the caveats."""
    s, v = head["settings"], head["versions"]
    ours = next(r for r in records if r["side"] == "ours")
    B = s["prompts"] * s["completions"]
    lines = [
        f"# {head['date']} | {head['machine']} | device {head['device']}, {head['torch_threads']} torch threads | "
        f"torch {v['torch']}, transformers {v['transformers']}, trl {v['trl']}, lightning {v['lightning']}",
        f"# code: git {head['git']} | 1-min load average {head['load_start']} at start, {head['load_end']} at end "
        f"({os.cpu_count()} CPUs)",
        *([f"# WARNING: the code changed during the run (now git {head['git_at_end']}); measure again on a tree that "
           "stays put"] if "git_at_end" in head else []),
        f"# model {s['model']} ({bw['params']:,} params) | {s['precision']} | {s['prompts']} prompts x "
        f"{s['completions']} completions = {B} rows | prompt {s['prompt_len']} + {s['new_tokens']} new tokens "
        f"(forced, no early EOS) | warm-up {s['warmup']}, timed {s['iters']} | lr {s['lr']}",
        f"# ours: PPOModule, generator {ours.get('generator', '?')}"
        + (f" (rollout_engine={s['engine']})" if s["engine_passed"] else " (no rollout_engine argument)")
        + (f", GRPO (advantage grpo, critic none, {s['completions']} samples per prompt, group std, k3 KL loss "
           f"beta {KL_BETA}, loss_agg {s['loss_agg']})" if s.get("ours") == "grpo" else f", critic {s['critic']}")
        + f", ppo_epochs 1, 1 mini-batch of {B}"
        + (f" in micro-batches of {s['micro_batch']}" if s["micro_batch"] else "")
        + (f", {s['ppo_set']}" if s["ppo_set"] else "")
        + f" | TRL: GRPOTrainer, num_generations {s['completions']}, batch {B}"
        + (f" = {B // s['micro_batch']} accumulated micro-batches of {s['micro_batch']}" if s["micro_batch"] else "")
        + f", beta {KL_BETA}, loss_type {'grpo' if s.get('loss_agg') == 'seq_mean_token_mean' else 'dapo'}, "
        + "scale_rewards group, no vLLM",
        mfu_header(records, bw),
    ]
    cols = ["side", "iters timed", "generate s", "score s", "update s", "other s", "total s", "gen tokens",
            "gen tok/s", "% of floor", "update TFLOP/s", "update MFU", "peak mem GiB"]
    mem = "GPU" if s["device"] == "cuda" else "RSS"
    table = [cols]
    for r in records:
        table.append([
            "ours" if r["side"] == "ours" else "TRL", str(r["iters_timed"]),
            *(f"{r[p + '_s']:.4f}" for p in PHASES), f"{r['gen_tokens']:.0f}", f"{r['gen_tokens_per_s']:,.0f}",
            f"{r['floor_pct']:.1f}%", f"{r['update_tflops']:.3g}", f"{100 * r['update_mfu']:.1f}%",
            f"{r['peak_mem_gib']:.3f} {mem}",
        ])
    by = {r["side"]: r for r in records}
    if "ours" in by and "trl" in by:
        a, b = by["ours"], by["trl"]
        table.append(["TRL/ours", "", *(f"{b[p + '_s'] / a[p + '_s']:.2f}x" if p != "other" else "" for p in PHASES),
                      "", f"{a['gen_tokens_per_s'] / b['gen_tokens_per_s']:.2f}x", "",
                      f"{a['update_tflops'] / b['update_tflops']:.2f}x", "", ""])
    widths = [max(len(row[i]) for row in table) for i in range(len(cols))]
    for row in table:
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
    lines += [
        "# TRL/ours: time ratio (gen tok/s and update TFLOP/s: ours/TRL); > 1 = ours faster (update TFLOP/s: more "
        "model FLOPs per second; ours counts its critic)",
        *mfu_footer(records, s),
        f"# bandwidth floor: {bw['bandwidth_Bps'] / 1e9:.1f} GB/s measured ({bw['copy_mib']} MiB tensor copy, read + "
        f"write, {bw['torch_threads']} torch threads); weights read per forward {floor['weight_bytes'] / 1e6:.2f} MB "
        f"({bw['params_read_per_forward']:,} params x {floor['width']} B"
        + (", tied embedding counted once" if bw["tied_embeddings"] else ", input embedding not counted")
        + f") -> {floor['per_forward_s'] * 1e3:.3f} ms per forward x {s['new_tokens']} forwards = "
        f"{floor['floor_s']:.4f} s per generate phase (with KV-cache reads: {floor['floor_kv_s']:.4f} s); "
        "% of floor = floor / generate s",
        "# caveats:",
        f"#  - {CRITIC_CAVEAT[s.get('ours', 'ppo')]}",
        *(f"#  - {c}" for c in CAVEATS),
    ]
    return "\n".join(lines)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except ``None`` ones (their help text names the device-dependent default)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        return action.help if action.default is None else super()._get_help_string(action)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (the hidden ``--worker TASK.json`` runs one measurement instead)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=_HelpFormatter)
    p.add_argument("--model", default="builtin:tiny-llama", help="HF model folder (or builtin:tiny-llama)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where both sides run")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="bf16 = autocast over fp32 weights (ours: bf16-mixed, TRL: bf16=True)")
    p.add_argument("--prompts", type=int, default=None, help="prompts per iteration (default: 8 on CPU, 64 on CUDA)")
    p.add_argument("--completions", type=int, default=4, help="completions per prompt (TRL num_generations)")
    p.add_argument("--new-tokens", type=int, default=None,
                   help="new tokens per completion, forced on both sides (default: 32 on CPU, 128 on CUDA)")
    p.add_argument("--prompt-len", type=int, default=None, help="tokens per prompt (default: 64)")
    p.add_argument("--warmup", type=int, default=2, help="untimed iterations first")
    p.add_argument("--iters", type=int, default=10, help="timed iterations (the table shows their medians)")
    p.add_argument("--engine", default="hf",
                   help="our rollout engine, passed as PPOModule(rollout_engine=...) when PPOModule accepts it: "
                        "hf (transformers generate) or static")
    p.add_argument("--critic", choices=("separate", "shared"), default="separate", help="our PPO critic")
    p.add_argument("--ours", choices=("ppo", "grpo"), default="ppo",
                   help="our side: PPO with a critic (ppo), or our critic-free GRPO like for like with TRL's (grpo: "
                        "advantage grpo, critic none, n_samples_per_prompt = --completions on unrepeated prompt "
                        "batches, group-std scaling, the k3 KL as a loss term with TRL's beta, --loss-agg on both)")
    p.add_argument("--loss-agg", choices=("token_mean", "seq_mean_token_mean"), default="token_mean",
                   help="--ours grpo: loss aggregation; TRL's loss_type is set to match (dapo / grpo)")
    p.add_argument("--micro-batch", type=int, default=None,
                   help="rows per scoring / training forward (ours: micro_batch_size and rollout_micro_batch_size; "
                        "TRL: per_device_train_batch_size with gradient accumulation up to one optimizer step per "
                        "generation batch); must divide prompts x completions; default: the whole batch")
    p.add_argument("--ppo-set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="extra PPOModule arguments (values parsed as JSON when they parse), e.g. "
                        "reuse_rollout_logprobs=true")
    p.add_argument("--lr", type=float, default=1e-6, help="learning rate (ours: policy and critic; TRL: policy)")
    p.add_argument("--bandwidth-mib", type=int, default=None,
                   help="size of the tensor copied to measure bandwidth (default: 256 on CPU, 2048 on CUDA)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="peak TFLOP/s for the update MFU column (default: the dense spec peak of a listed GPU in the "
                        "run's precision, else a matmul peak measured here)")
    p.add_argument("--matmul-n", type=int, default=None,
                   help="size of the square matmul that measures the practical peak (default: 2048 on CPU, 8192 on "
                        "CUDA)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also save the header and records to this file")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker is not None:
        return args
    defaults = DEVICE_DEFAULTS[args.device]
    for key in ("prompts", "new_tokens", "prompt_len"):
        if getattr(args, key) is None:
            setattr(args, key, defaults[key])
    if args.bandwidth_mib is None:
        args.bandwidth_mib = 2048 if args.device == "cuda" else 256
    if args.matmul_n is None:
        args.matmul_n = 8192 if args.device == "cuda" else 2048
    if min(args.prompts, args.new_tokens, args.prompt_len, args.iters, args.bandwidth_mib, args.matmul_n) < 1 \
            or args.warmup < 0:
        p.error("--prompts, --new-tokens, --prompt-len, --iters, --bandwidth-mib and --matmul-n must be >= 1, "
                "--warmup >= 0")
    if args.peak_tflops is not None and args.peak_tflops <= 0:
        p.error("--peak-tflops must be > 0")
    if args.micro_batch is not None and (args.micro_batch < 1 or (args.prompts * args.completions) % args.micro_batch):
        p.error(f"--micro-batch must be >= 1 and divide --prompts x --completions ({args.prompts * args.completions})")
    if args.completions < 2:
        p.error("--completions must be >= 2 (GRPO needs at least two completions per prompt)")
    ppo_set = {}
    for item in args.ppo_set:
        key, sep, value = item.partition("=")
        if not sep or not key:
            p.error(f"--ppo-set expects KEY=VALUE, got {item!r}")
        ppo_set[key] = parse_value(value)
    args.ppo_set = ppo_set
    args.engine_passed = engine_supported()
    if not args.engine_passed and args.engine != "hf":
        p.error(f"--engine {args.engine!r}: lightning_rlhf.methods.PPOModule has no 'rollout_engine' constructor "
                "argument in this checkout, so only the default engine 'hf' (transformers generate) can be measured")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            p.error("--device cuda but torch sees no CUDA device")
    return args


def main(argv: list[str] | None = None) -> None:
    """Make the prompts, measure bandwidth, run each side in its own worker, print the table, check equal work."""
    args = parse_args(argv)
    if args.worker is not None:
        worker(args.worker)
        return
    from transformers import AutoConfig

    from lightning_rlhf.models.factory import load_tokenizer

    path = resolved_model(args.model)
    tokenizer = load_tokenizer(args.model)
    config_vocab = AutoConfig.from_pretrained(path).get_text_config().vocab_size
    vocab = min(len(tokenizer), config_vocab)
    never_id = max(config_vocab, len(tokenizer))  # no logit exists for it: never sampled
    n_prompts = (args.warmup + args.iters) * args.prompts
    head = header(args)
    common = {"model": args.model, "model_path": path, "device": args.device, "precision": args.precision,
              "prompts": args.prompts, "completions": args.completions, "new_tokens": args.new_tokens,
              "warmup": args.warmup, "iters": args.iters, "lr": args.lr, "seed": args.seed, "engine": args.engine,
              "critic": args.critic, "micro_batch": args.micro_batch, "ppo_set": args.ppo_set, "never_id": never_id,
              "ours": args.ours, "loss_agg": args.loss_agg,
              "bandwidth_mib": args.bandwidth_mib, "matmul_n": args.matmul_n}
    raws: dict[str, tuple[dict[str, Any], float]] = {}
    with tempfile.TemporaryDirectory(prefix="bench_ppo_iteration_") as tmp:
        tmp_dir = Path(tmp)
        prompts_path = tmp_dir / "prompts.json"
        prompts_path.write_text(json.dumps(make_prompts(tokenizer, vocab, n_prompts, args.prompt_len, args.seed)))
        for side in ("bandwidth", *SIDES):
            raws[side] = launch({**common, "side": side, "prompts_path": str(prompts_path)}, tmp_dir)
            print(f"  {side:<9} done ({raws[side][1]:.1f} s in all)", file=sys.stderr, flush=True)
    head["load_end"] = load_average()
    end_state = git_state()
    if end_state != head["git"]:
        head["git_at_end"] = end_state
    bw = raws["bandwidth"][0]
    floor = bandwidth_floor(bw, head["settings"])
    records = [summarise(side, raws[side][0], args.warmup, floor["floor_s"], raws[side][1]) for side in SIDES]
    for rec, side in zip(records, SIDES):
        add_mfu(rec, raws[side][0], bw, head["settings"])
    print(format_table(head, bw, floor, records), flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"header": head, "bandwidth": bw, "floor": floor, "records": records},
                                              indent=1) + "\n")
    B = args.prompts * args.completions
    problems = token_problems(records[0], records[1], B * args.new_tokens, B * args.prompt_len)
    if problems:
        raise SystemExit("Unequal work: generated token counts differ by more than "
                         f"{TOKEN_TOLERANCE:.0%}:\n  " + "\n  ".join(problems))


if __name__ == "__main__":
    main()
