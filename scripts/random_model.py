"""Write a randomly initialised copy of a model's architecture as a plain Hugging Face folder.

For strategy checks and speed benchmarks, where what matters is the shape (layers, widths, vocabulary), not the
weights: only the source's ``config.json`` and tokenizer files are read, so a folder without weights works. The result
loads with ``from_pretrained(out)`` like any checkpoint, so every config can name it.

    # SmolLM2-135M's shape with its tokenizer:
    python scripts/random_model.py --source models/smollm2-135m-instruct --out /tmp/smollm2-135m-random
    # a ~1.1B Llama-style shape (TinyLlama's widths) with the same tokenizer:
    python scripts/random_model.py --source models/smollm2-135m-instruct --out /tmp/llama-1b-random \\
        --set hidden_size=2048 intermediate_size=5632 num_hidden_layers=22 num_attention_heads=32 \\
              num_key_value_heads=4 head_dim=64
"""

from __future__ import annotations

import argparse
import ast
from pathlib import Path
from typing import Any


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["a=1", "b=x"]`` -> ``{"a": 1, "b": "x"}`` (Python literals where they parse, else strings)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set expects key=value, got {item!r}")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def make_random_model(source: str, out: str, overrides: dict[str, Any] | None = None, seed: int = 0,
                      dtype: str = "float32") -> int:
    """Build ``AutoModelForCausalLM.from_config`` of ``source``'s config (with ``overrides``), seeded; save it and the
    tokenizer to ``out``. Returns the parameter count."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(source)
    for key, value in (overrides or {}).items():
        if not hasattr(config, key):
            raise SystemExit(f"--set {key}: {type(config).__name__} has no attribute {key!r}")
        setattr(config, key, value)
    tokenizer = AutoTokenizer.from_pretrained(source)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    Path(out).mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return sum(p.numel() for p in model.parameters())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", required=True, help="hub id or folder with config.json and tokenizer files")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = parser.parse_args(argv)
    n = make_random_model(args.source, args.out, parse_overrides(args.set), args.seed, args.dtype)
    print(f"wrote {args.out}: {n / 1e6:.1f}M parameters (random, seed {args.seed})")


if __name__ == "__main__":
    main()
