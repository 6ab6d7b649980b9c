"""LoRA adapters (through ``peft``) on the trainable models of a method, and their export as plain folders.

``pip install "lightning-rlhf[peft]"`` installs peft. A method lists the attribute names of the models that may
carry adapters in ``RLHFModule.lora_targets``; with ``model.lora_r > 0`` those models are wrapped after they are
built, only the adapter weights train, and the export at the end of ``fit`` saves the merged model (a plain Hugging
Face folder that loads without peft) plus the adapter alone in ``<export>/adapter``.
"""

from __future__ import annotations

import copy
from typing import Any

from torch import nn


def _peft() -> Any:
    try:
        import peft
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "model.lora_r > 0 needs the peft package: pip install 'lightning-rlhf[peft]' (or pip install peft)."
        ) from e
    return peft


def apply_lora(
    model: nn.Module, r: int, alpha: float, dropout: float, target_modules: str | list[str]
) -> nn.Module:
    """Wrap a causal LM in a peft ``PeftModel`` with LoRA adapters of rank ``r``; only the adapters stay trainable.

    Args:
        model: A Hugging Face causal LM.
        r: Adapter rank (> 0).
        alpha: LoRA scaling numerator (the update is scaled by ``alpha / r``).
        dropout: Dropout on the adapter input.
        target_modules: Module names (e.g. ``["q_proj", "v_proj"]``) or ``"all-linear"`` (every linear layer but
            the output head).
    """
    if r <= 0:
        raise ValueError(f"LoRA rank must be positive, got {r}")
    peft = _peft()
    config = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules,
                             task_type="CAUSAL_LM")
    return peft.get_peft_model(model, config)


def is_peft_model(model: nn.Module) -> bool:
    """True for a peft ``PeftModel`` (without importing peft when it is not installed)."""
    return any(cls.__name__ == "PeftModel" and cls.__module__.startswith("peft") for cls in type(model).__mro__)


def merged_copy(model: nn.Module) -> nn.Module:
    """A plain model with the adapters merged into its weights, leaving ``model`` (and its adapters) untouched.

    The copy is made on the CPU, so exporting costs host memory, not device memory.
    """
    device_copy = copy.deepcopy(model).to("cpu")
    return device_copy.merge_and_unload()
