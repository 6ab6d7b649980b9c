"""Model and tokenizer factories.

Every model is loaded with ``from_pretrained(name_or_path)``: a hub id, a local folder, or the built-in offline
model ``builtin:tiny-llama``. The built-in name resolves to a folder that is created once (deterministically, from a
config and the tokenizer shipped in ``lightning_rlhf/assets/tokenizer``) in the cache directory and then loaded
through exactly the same ``from_pretrained`` path as any real checkpoint.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Literal

import torch

log = logging.getLogger(__name__)

BUILTIN_PREFIX = "builtin:"
ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets"
TOKENIZER_DIR = ASSETS_DIR / "tokenizer"

DType = Literal["auto", "float32", "bfloat16", "float16"]

#: Shapes of the built-in offline models. All share the shipped 4096-token BPE tokenizer.
BUILTIN_MODELS: dict[str, dict[str, Any]] = {
    "tiny-llama": dict(
        hidden_size=64,
        intermediate_size=192,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
    ),
    "small-llama": dict(
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=8,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
    ),
}


def cache_dir() -> Path:
    """Where built-in models are materialised: ``$LIGHTNING_RLHF_CACHE`` or ``~/.cache/lightning_rlhf``."""
    return Path(os.environ.get("LIGHTNING_RLHF_CACHE", Path.home() / ".cache" / "lightning_rlhf"))


def _build_builtin(name: str, target: Path) -> None:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **BUILTIN_MODELS[name],
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.rename(tmp, target)  # atomic; another rank may have won the race
        except OSError:
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def looks_like_local_path(name_or_path: str) -> bool:
    """Whether a model name is meant as a local folder rather than a hub id (``org/name`` or ``name``).

    True when it exists, starts with ``.``, ``/`` or ``~``, has a backslash, a trailing slash or more than one ``/``,
    or when its first component is an existing local folder (``runs/sft_exprt`` next to a ``runs/`` folder).
    """
    if name_or_path.startswith(BUILTIN_PREFIX):
        return False
    if Path(name_or_path).expanduser().exists():
        return True
    if name_or_path.startswith((".", "/", "~")) or "\\" in name_or_path or name_or_path.endswith("/"):
        return True
    parts = name_or_path.split("/")
    return len(parts) > 2 or (len(parts) == 2 and Path(parts[0]).is_dir())


def check_model_path(name_or_path: str | None, flag: str) -> None:
    """Fail at once, naming ``flag``, when ``name_or_path`` looks like a local folder that does not exist
    (``from_pretrained`` would take it for a hub id and retry the network for a minute before failing).

    Args:
        name_or_path: The value of the flag (``None`` passes).
        flag: The flag's name for the message, e.g. ``model.model_name_or_path``.

    Raises:
        FileNotFoundError: naming the flag, the path, and what its nearest existing parent folder holds.
    """
    if name_or_path is None or not looks_like_local_path(name_or_path):
        return
    path = Path(name_or_path).expanduser()
    if path.exists():
        return
    parent = path.absolute().parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    try:
        entries = sorted(p.name for p in parent.iterdir() if not p.name.startswith("."))
    except OSError:
        entries = []
    shown = ", ".join(entries[:12]) + (", ..." if len(entries) > 12 else "")
    raise FileNotFoundError(
        f"{flag}: the folder {name_or_path!r} does not exist (looked in {path.absolute()}); {parent} holds: "
        f"[{shown}]. Give an existing model folder, a hub id (org/name) or builtin:tiny-llama."
    )


def resolve_pretrained(name_or_path: str) -> str:
    """Map a model name to something ``from_pretrained`` accepts.

    ``builtin:<name>`` (one of :data:`BUILTIN_MODELS`) becomes a cached local folder, built on first use;
    anything else (hub id or local folder) is returned unchanged.
    """
    if not name_or_path.startswith(BUILTIN_PREFIX):
        check_model_path(name_or_path, "model path")  # a missing local folder fails now, not after hub retries
        return name_or_path
    name = name_or_path[len(BUILTIN_PREFIX) :]
    if name not in BUILTIN_MODELS:
        raise ValueError(
            f"Unknown built-in model {name_or_path!r}; choose one of "
            f"{[BUILTIN_PREFIX + n for n in BUILTIN_MODELS]} or give a hub id / local folder."
        )
    target = cache_dir() / f"{name}-v1"
    if not (target / "config.json").exists():
        _build_builtin(name, target)
    return str(target)


def torch_dtype(dtype: DType) -> torch.dtype | str:
    """Translate a dtype name from a config into what ``from_pretrained(dtype=...)`` takes."""
    if dtype == "auto":
        return "auto"
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    except KeyError:
        raise ValueError(f"dtype must be one of auto, float32, bfloat16, float16; got {dtype!r}") from None


def load_tokenizer(
    name_or_path: str, padding_side: Literal["left", "right"] = "right", trust_remote_code: bool = False
) -> Any:
    """Load a tokenizer and make sure it can pad.

    An encoder tokenizer without an EOS token (BERT-style) uses its SEP token as EOS. A tokenizer without a pad
    token gets its EOS token as pad token (the attention mask, never the token id, marks
    padding everywhere in this package, so pad == eos is safe).
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_pretrained(name_or_path), trust_remote_code=trust_remote_code)
    if tokenizer.eos_token is None and getattr(tokenizer, "sep_token", None) is not None:
        tokenizer.eos_token = tokenizer.sep_token  # encoder (BERT-style) reward models: responses end with [SEP]
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"Tokenizer of {name_or_path!r} has neither a pad nor an eos token; set one.")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = padding_side
    return tokenizer


def load_causal_lm(
    name_or_path: str,
    dtype: DType = "float32",
    gradient_checkpointing: bool = False,
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
) -> Any:
    """Load a causal LM with ``AutoModelForCausalLM.from_pretrained``.

    Args:
        name_or_path: Hub id, local folder or ``builtin:tiny-llama``.
        dtype: Parameter dtype.
        gradient_checkpointing: Trade compute for activation memory.
        trust_remote_code: Allow code from the checkpoint's repository to run (off by default).
        attn_implementation: e.g. ``"sdpa"``, ``"eager"``, ``"flash_attention_2"``; ``None`` lets transformers choose.
    """
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = dict(dtype=torch_dtype(dtype), trust_remote_code=trust_remote_code)
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    model = AutoModelForCausalLM.from_pretrained(resolve_pretrained(name_or_path), **kwargs)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return model


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    """Put ``model`` in eval mode with ``requires_grad=False`` everywhere; returns it."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def load_reference(name_or_path: str, dtype: DType = "float32", trust_remote_code: bool = False) -> Any:
    """A frozen copy of a causal LM, used as ``pi_ref``."""
    return freeze(load_causal_lm(name_or_path, dtype=dtype, trust_remote_code=trust_remote_code))
