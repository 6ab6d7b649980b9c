"""Rollout generation speed: HF ``generate`` against our static-cache engine, beside the memory-bandwidth floor.

One command prints one table:

    OMP_NUM_THREADS=1 python bench/generation.py                        # CPU, built-in tiny Llama, fp32
    python bench/generation.py --model /tmp/smollm2-135m-random --device cuda --precision bf16 \\
        --batch-sizes 1 64 256 --prompt-len 128 --new-tokens 128 --engines hf static static+compile

For every engine and batch size the same left-padded random prompts (lengths drawn between half and all of
``--prompt-len``) are decoded for exactly ``--new-tokens`` tokens (no EOS: the EOS id is set to one the vocabulary
does not contain, so every row runs to full length and both engines do the same work), sampling at temperature 1
from the full distribution, with the model in eval mode. Each measurement is ``--warmup`` untimed calls, then the
median of ``--repeats`` timed calls (CUDA synchronised around each); the engines take turns call by call, so
changes in the machine's load hit them alike.

Columns:

* ``ms/step``: wall time of one call divided by ``--new-tokens`` (the prefill is included, as in a rollout).
* ``tokens/s``: ``batch * new_tokens / seconds``.
* ``floor ms``: the memory-bandwidth floor of one decode step: every weight (an untied input embedding excepted: it is
  only gathered) and the mean KV cache are read once per step, ``(weight bytes + mean KV-cache bytes) / bandwidth``.
  The bandwidth is measured here by timing a large tensor copy (bytes read + bytes written per second;
  ``bench/ppo_iteration.py``'s ``copy_bandwidth``, which also sizes the model).
* ``% of floor``: ``floor ms / ms per step``: 100% would be a decode at the bandwidth limit.

``static`` is :class:`lightning_rlhf.rollout.engine.StaticCacheGenerator`; ``static+compile`` the same with the
one-token step compiled (``torch.compile``; CUDA graphs on a GPU: the first call compiles, the warm-up absorbs it).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.ppo_iteration import copy_bandwidth, model_read_sizes  # noqa: E402
from bench.train_throughput import git_state, machine, resolved_model  # noqa: E402
from lightning_rlhf.rollout.engine import build_generator  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def prompts(batch: int, prompt_len: int, vocab: int, seed: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded random prompts ``(B, P)`` and their mask; lengths uniform in ``[P // 2, P]``."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(max(prompt_len // 2, 1), prompt_len + 1, (batch,), generator=g)
    ids = torch.randint(3, vocab, (batch, prompt_len), generator=g)
    mask = (torch.arange(prompt_len)[None] >= (prompt_len - lengths)[:, None]).long()
    return (ids * mask).to(device), mask.to(device)


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Measure every (engine, batch size); returns one record per row of the table."""
    from transformers import AutoModelForCausalLM

    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(resolved_model(args.model), dtype=dtype).to(device).eval()
    vocab = model.config.get_text_config().vocab_size
    itemsize = torch.finfo(dtype).bits // 8
    sizes = model_read_sizes(args.model)
    weight_bytes = sizes["params_read_per_forward"] * itemsize
    kv_token = sizes["kv_values_per_token"] * itemsize
    bandwidth, _ = copy_bandwidth(args.device, 2048 if device.type == "cuda" else 256)
    records = []
    for batch in args.batch_sizes:
        ids, mask = prompts(batch, args.prompt_len, vocab, args.seed, device)
        gens = {engine: build_generator(engine.partition("+")[0], max_new_tokens=args.new_tokens, do_sample=True,
                                        temperature=1.0, eos_token_id=vocab + 7, pad_token_id=0,
                                        pad_to_max_new_tokens=True, compile=engine.endswith("+compile"))
                for engine in args.engines}
        times: dict[str, list[float]] = {engine: [] for engine in args.engines}
        # round robin over the engines, so drift in the machine's load hits them alike
        for i in range(args.warmup + args.repeats):
            for engine, gen in gens.items():
                _sync(device)
                t = time.perf_counter()
                out = gen.generate(model, ids, mask, seed=args.seed + i)
                _sync(device)
                if i >= args.warmup:
                    times[engine].append(time.perf_counter() - t)
                new_tokens = int(out.action_mask.sum())
                if new_tokens != batch * args.new_tokens:
                    raise RuntimeError(f"{engine} batch {batch}: {new_tokens} tokens, expected "
                                       f"{batch * args.new_tokens}")
        mean_context = float(mask.sum(-1).float().mean()) + args.new_tokens / 2
        floor_s = (weight_bytes + batch * mean_context * kv_token) / bandwidth
        for engine in args.engines:
            seconds = statistics.median(times[engine])
            step_s = seconds / args.new_tokens
            records.append(dict(engine=engine, batch=batch, ms_per_step=1e3 * step_s,
                                tokens_per_s=batch * args.new_tokens / seconds, floor_ms=1e3 * floor_s,
                                pct_of_floor=100 * floor_s / step_s, seconds=seconds))
    print(f"# weights {weight_bytes / 2**20:.1f} MiB ({args.precision}), KV cache {kv_token} B/token, "
          f"measured copy bandwidth {bandwidth / 1e9:.1f} GB/s")
    return records


def format_table(records: list[dict[str, Any]]) -> str:
    """The printed table, with each engine's tokens/s relative to ``hf`` at the same batch size."""
    hf = {r["batch"]: r["tokens_per_s"] for r in records if r["engine"] == "hf"}
    lines = [f"{'engine':16} {'batch':>5} {'ms/step':>8} {'tokens/s':>10} {'floor ms':>9} {'% of floor':>10} {'vs hf':>6}"]
    for r in records:
        ratio = f"{r['tokens_per_s'] / hf[r['batch']]:.2f}" if r["batch"] in hf else "-"
        lines.append(f"{r['engine']:16} {r['batch']:>5} {r['ms_per_step']:>8.2f} {r['tokens_per_s']:>10.0f} "
                     f"{r['floor_ms']:>9.3f} {r['pct_of_floor']:>9.1f}% {ratio:>6}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="builtin:tiny-llama", help="folder, hub id or builtin:tiny-llama")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="weights and cache dtype")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16, 64], help="rows per generate call")
    p.add_argument("--prompt-len", type=int, default=64, help="longest prompt (others down to half of it)")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens generated per row")
    p.add_argument("--engines", nargs="+", default=["hf", "static"],
                   help="hf, static, static+compile (compile takes minutes on a CPU)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls first")
    p.add_argument("--repeats", type=int, default=3, help="timed calls (median)")
    p.add_argument("--seed", type=int, default=0, help="prompt and sampling seed")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    print(f"# {time.strftime('%Y-%m-%dT%H:%M:%S%z')} | {machine(args.device)} | torch {torch.__version__}, "
          f"{torch.get_num_threads()} torch threads")
    print(f"# code: {git_state()} | model {args.model} | prompt <= {args.prompt_len}, {args.new_tokens} new tokens, "
          f"sampling at T=1, {args.warmup} warm-up + median of {args.repeats}")
    records = run(args)
    print(format_table(records))


if __name__ == "__main__":
    main()
