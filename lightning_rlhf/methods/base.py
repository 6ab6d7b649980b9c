"""The base LightningModule of every method: manual optimization done right.

What it gives a method:

* ``configure_optimizers``: AdamW over :meth:`RLHFModule.param_groups` and a warm-up + decay schedule that the
  module steps itself (:meth:`RLHFModule.optimizer_update`), because Lightning does not step schedulers under manual
  optimization.
* :meth:`RLHFModule.micro_batches` + :meth:`RLHFModule.backward_micro`: gradient accumulation over micro-batches, with
  DDP's gradient all-reduce skipped on all but the last one.
* Gradient clipping by global norm (``Trainer(gradient_clip_val=...)`` is not allowed with manual optimization).
* An ``iteration`` counter saved in checkpoints (``trainer.global_step`` counts optimizer steps).
* Frozen models (reference, reward) kept out of checkpoints: list their attribute names in ``frozen_modules``.
* Export of the trained model as a plain Hugging Face folder at the end of ``fit`` (:meth:`export_pretrained`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from torch import nn

from lightning_rlhf.models.factory import DType, load_tokenizer
from lightning_rlhf.rollout.scoring import position_ids_from_attention_mask

log = logging.getLogger(__name__)

LRSchedule = Literal["constant", "linear", "cosine"]


def lr_lambda(step: int, warmup_steps: int, total_steps: int, schedule: LRSchedule, min_ratio: float = 0.0) -> float:
    """Multiplier of the base learning rate at optimizer step ``step``: linear warm-up, then constant/linear/cosine."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant" or total_steps <= warmup_steps:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if schedule == "linear":
        return max(min_ratio, 1.0 - progress * (1.0 - min_ratio))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class RLHFModule(L.LightningModule):
    """Base of all methods. Not used directly.

    Args:
        model_name_or_path: Model to train: hub id, local folder, or ``builtin:tiny-llama`` (offline tiny model).
        lr: Peak learning rate.
        weight_decay: AdamW weight decay (not applied to biases and norms).
        adam_betas: AdamW betas.
        warmup_steps: Linear warm-up optimizer steps.
        lr_schedule: Decay after warm-up: ``constant``, ``linear`` or ``cosine`` (to 0 over the run's optimizer steps).
        max_grad_norm: Clip gradients to this global norm; ``null`` or 0 disables clipping.
        micro_batch_size: Split each batch into micro-batches of this many examples (pairs for preference
            data) and accumulate gradients; ``null`` = the whole batch at once.
        dtype: Parameter dtype of the loaded models.
        gradient_checkpointing: Recompute activations in the backward pass to save memory.
        trust_remote_code: Allow code from model repositories to run (off by default).
        attn_implementation: Attention kernel (``sdpa``, ``eager``, ``flash_attention_2``); ``null`` = transformers' choice.
        export_dir: Where the trained model is saved as a plain Hugging Face folder at the end of ``fit``;
            ``auto`` = ``<log dir>/export``; ``null`` disables export.
    """

    #: attribute names of frozen sub-models that stay out of checkpoints and are rebuilt from their paths
    frozen_modules: tuple[str, ...] = ()

    def __init__(
        self,
        model_name_or_path: str = "builtin:tiny-llama",
        lr: float = 1e-4,
        weight_decay: float = 0.0,
        adam_betas: tuple[float, float] = (0.9, 0.95),
        warmup_steps: int = 0,
        lr_schedule: LRSchedule = "constant",
        max_grad_norm: float | None = 1.0,
        micro_batch_size: int | None = None,
        dtype: DType = "float32",
        gradient_checkpointing: bool = False,
        trust_remote_code: bool = False,
        attn_implementation: str | None = None,
        export_dir: str | None = "auto",
    ) -> None:
        super().__init__()
        if lr <= 0:
            raise ValueError(f"model.lr must be positive, got {lr}")
        if micro_batch_size is not None and micro_batch_size < 1:
            raise ValueError(f"model.micro_batch_size must be >= 1 or null, got {micro_batch_size}")
        self.automatic_optimization = False
        self.strict_loading = False  # frozen models are not in checkpoints
        self.model_name_or_path = model_name_or_path
        self.lr = lr
        self.weight_decay = weight_decay
        self.adam_betas = tuple(adam_betas)
        self.warmup_steps = warmup_steps
        self.lr_schedule = lr_schedule
        self.max_grad_norm = max_grad_norm
        self.micro_batch_size = micro_batch_size
        self.dtype_name = dtype
        self.gradient_checkpointing = gradient_checkpointing
        self.trust_remote_code = trust_remote_code
        self.attn_implementation = attn_implementation
        self.export_dir = export_dir
        self.iteration = 0
        self.tokenizer = load_tokenizer(model_name_or_path, trust_remote_code=trust_remote_code)
        self._models_built = False

    # ------------------------------------------------------------------ models
    def configure_model(self) -> None:
        """Build the models once (Lightning calls this inside the strategy's context)."""
        if self._models_built:
            return
        self.build_models()
        self._models_built = True

    def build_models(self) -> None:
        """Create the trainable and frozen models as attributes. Override."""
        raise NotImplementedError

    def lm_forward(self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Causal-LM logits ``(B, T, V)`` with padding-independent position ids (left or right padding)."""
        return model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids_from_attention_mask(attention_mask),
            use_cache=False,
        ).logits

    # ------------------------------------------------------------------ optimization
    def param_groups(self) -> list[dict[str, Any]]:
        """Parameter groups for AdamW. Default: all trainable parameters, no weight decay on biases and norms."""
        return self.decay_groups(self.trainable_parameters_named(), self.lr)

    def trainable_parameters_named(self) -> Iterator[tuple[str, nn.Parameter]]:
        frozen = tuple(f"{m}." for m in self.frozen_modules)
        for name, p in self.named_parameters():
            if p.requires_grad and not name.startswith(frozen):
                yield name, p

    def decay_groups(self, named: Iterator[tuple[str, nn.Parameter]], lr: float) -> list[dict[str, Any]]:
        """Split parameters into weight-decayed matrices and undecayed vectors (biases, norms)."""
        decay, no_decay = [], []
        for _, p in named:
            (decay if p.ndim >= 2 else no_decay).append(p)
        groups = [{"params": decay, "lr": lr, "weight_decay": self.weight_decay}]
        if no_decay:
            groups.append({"params": no_decay, "lr": lr, "weight_decay": 0.0})
        return [g for g in groups if g["params"]]

    def total_optimizer_steps(self) -> int:
        """Optimizer steps in this run, for the LR schedule. Override when one training_step makes several."""
        return int(self.trainer.estimated_stepping_batches) if self._trainer is not None else 1

    def configure_optimizers(self) -> Any:
        groups = self.param_groups()
        if not groups:
            raise RuntimeError(f"{type(self).__name__} has no trainable parameters.")
        optimizer = torch.optim.AdamW(groups, lr=self.lr, betas=self.adam_betas, weight_decay=self.weight_decay)
        total = self.total_optimizer_steps()
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: lr_lambda(s, self.warmup_steps, total, self.lr_schedule)
        )
        return [optimizer], [scheduler]

    def micro_batches(self, n: int) -> list[tuple[int, int]]:
        """``(start, stop)`` ranges that split ``n`` examples into micro-batches of ``micro_batch_size``."""
        size = self.micro_batch_size or n
        return [(s, min(s + size, n)) for s in range(0, n, size)]

    @contextlib.contextmanager
    def no_grad_sync(self, sync: bool) -> Iterator[None]:
        """Skip DDP's gradient all-reduce unless ``sync`` (the last micro-batch before an optimizer step)."""
        model = self.trainer.model if self._trainer is not None else None
        if not sync and model is not None and hasattr(model, "no_sync") and hasattr(model, "require_backward_grad_sync"):
            with model.no_sync():
                yield
        else:
            yield

    def backward_micro(self, loss: torch.Tensor, sync: bool = True) -> None:
        """``manual_backward`` that all-reduces gradients across ranks only when ``sync``."""
        with self.no_grad_sync(sync):
            self.manual_backward(loss)

    def optimizer_update(self) -> torch.Tensor:
        """Clip, step the optimizer and the LR scheduler, zero the gradients. Returns the pre-clip gradient norm."""
        opt = self.optimizers()
        params = [p for g in opt.optimizer.param_groups for p in g["params"] if p.grad is not None]
        grad_norm = (
            torch.nn.utils.get_total_norm([p.grad for p in params]) if params else torch.zeros((), device=self.device)
        )
        if self.max_grad_norm:
            self.clip_gradients(opt, gradient_clip_val=self.max_grad_norm, gradient_clip_algorithm="norm")
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched = self.lr_schedulers()
        if sched is not None:
            sched.step()
        return grad_norm.detach()

    def current_lr(self) -> float:
        return float(self.optimizers().optimizer.param_groups[0]["lr"])

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        frozen = tuple(f"{m}." for m in self.frozen_modules)
        if frozen:
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith(frozen)}
        checkpoint["iteration"] = self.iteration

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.iteration = int(checkpoint.get("iteration", 0))
        self.configure_model()

    # ------------------------------------------------------------------ export
    def export_model(self) -> nn.Module:
        """The model saved by :meth:`export_pretrained`. Override."""
        raise NotImplementedError

    def resolved_export_dir(self) -> str | None:
        if self.export_dir is None:
            return None
        if self.export_dir != "auto":
            return self.export_dir
        root = (self.trainer.log_dir if self._trainer is not None else None) or os.getcwd()
        return str(Path(root) / "export")

    def export_pretrained(self, directory: str) -> str:
        """Save the trained model and the tokenizer as a plain Hugging Face folder that ``from_pretrained`` loads."""
        Path(directory).mkdir(parents=True, exist_ok=True)
        self.export_model().save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)
        return directory

    def on_fit_end(self) -> None:
        directory = self.resolved_export_dir()
        if directory is None:
            return
        if self.trainer.is_global_zero:
            self.export_pretrained(directory)
            log.warning("Exported %s to %s", type(self.export_model()).__name__, directory)
        self.trainer.strategy.barrier("export")

    # ------------------------------------------------------------------ helpers
    def domain_names(self) -> list[str]:
        """Domain labels of the attached data module (``["default"]`` if it has none)."""
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        return list(getattr(dm, "domain_names", None) or ["default"])
