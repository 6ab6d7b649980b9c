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
* Other model roles (``lightning_rlhf/models/roles.py``): snapshots of a trained model (``snapshot_roles``, saved in
  checkpoints, refreshed by the method) and several optimizers, one per trained model (``optimizer_roles``).
* Export of the trained model as a plain Hugging Face folder at the end of ``fit`` (:meth:`export_pretrained`),
  gathering full weights first under FSDP and DeepSpeed ZeRO-3.
* A guard against non-finite losses and gradients (``on_nonfinite``): the step is skipped and counted, or the run
  stops with a message; the decision is taken on all ranks together.
* Start-time checks of the strategy (:meth:`RLHFModule.check_strategy`): what DeepSpeed and FSDP need is translated
  or refused with a message naming the setting to change.
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

from lightning_rlhf.models.factory import DType, check_model_path, load_tokenizer
from lightning_rlhf.models.roles import OptimizerRole, Snapshot
from lightning_rlhf.rollout.engine import StaticCacheGenerator
from lightning_rlhf.rollout.scoring import position_ids_from_attention_mask

log = logging.getLogger(__name__)

LRSchedule = Literal["constant", "linear", "cosine"]
NonFinitePolicy = Literal["skip", "stop"]


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


def check_choice(flag: str, value: str, choices: tuple[str, ...]) -> None:
    """Raise naming ``model.<flag>`` when ``value`` is not one of ``choices``."""
    if value not in choices:
        raise ValueError(f"model.{flag} must be one of {' | '.join(choices)}, got {value!r}")


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
            ``auto`` = ``<log dir>/export`` (each run's own version folder); ``null`` disables export. A folder given
            by name that already holds an exported model is refused at start unless ``overwrite_export``.
        overwrite_export: Allow ``export_dir`` to replace an earlier export.
        on_nonfinite: What to do when the loss or the gradient norm is NaN/inf on any rank: ``skip`` (drop the
            gradients, leave parameters and optimizer state unchanged, count it in ``train/nonfinite_steps``) or
            ``stop`` (raise an error naming the step).
        lora_r: Rank of LoRA adapters on the trained language model (needs ``pip install peft``); 0 trains all
            weights. With adapters only they train, and the export saves the merged model plus ``export/adapter``.
        lora_alpha: LoRA scaling numerator (updates are scaled by ``lora_alpha / lora_r``).
        lora_dropout: Dropout on the adapters' input.
        lora_target_modules: Layers that get adapters: module names (e.g. ``[q_proj, v_proj]``) or ``all-linear``.
        fused_adamw: Use torch's fused AdamW kernel (``torch.optim.AdamW(fused=True)``, CPU and CUDA) instead of
            torch's default (on CPU a loop of ~10 small ops per parameter tensor). The same update up to float
            rounding (~1e-7 relative); on the built-in tiny model it cuts the optimizer step from ~2-3 ms to ~0.4 ms
            on CPU (bench/README.md). Off by default so that existing runs keep their exact numbers.
    """

    #: attribute names of frozen sub-models that stay out of checkpoints and are rebuilt from their paths
    frozen_modules: tuple[str, ...] = ()
    #: attribute names of the causal LMs that get LoRA adapters when ``lora_r > 0`` (empty: LoRA not supported)
    lora_targets: tuple[str, ...] = ()
    #: snapshot attribute -> attribute of the model it copies (``{"opponent": "policy"}``): built after the models
    #: (and their LoRA adapters), frozen, kept out of the optimizers, saved in checkpoints (models/roles.py)
    snapshot_roles: dict[str, str] = {}
    #: names of the optimizers :meth:`optimizer_roles` returns, in order (known before the models are built, for the
    #: start-time strategy checks)
    optimizer_role_names: tuple[str, ...] = ("main",)

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
        overwrite_export: bool = False,
        on_nonfinite: NonFinitePolicy = "skip",
        lora_r: int = 0,
        lora_alpha: float = 16.0,
        lora_dropout: float = 0.0,
        lora_target_modules: str | list[str] = "all-linear",
        fused_adamw: bool = False,
    ) -> None:
        super().__init__()
        if lr <= 0:
            raise ValueError(f"model.lr must be positive, got {lr}")
        if micro_batch_size is not None and micro_batch_size < 1:
            raise ValueError(f"model.micro_batch_size must be >= 1 or null, got {micro_batch_size}")
        check_choice("on_nonfinite", on_nonfinite, ("skip", "stop"))
        if lora_r < 0:
            raise ValueError(f"model.lora_r must be >= 0 (0 = no adapters), got {lora_r}")
        if lora_r > 0 and not self.lora_targets:
            raise ValueError(f"model.lora_r: {type(self).__name__} does not support LoRA adapters; set model.lora_r: 0.")
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
        self.overwrite_export = overwrite_export
        self.on_nonfinite = on_nonfinite
        self.lora_r = lora_r
        self.lora_alpha = lora_alpha
        self.lora_dropout = lora_dropout
        self.lora_target_modules = lora_target_modules
        self.fused_adamw = fused_adamw
        self.iteration = 0
        self.nonfinite_steps = 0  # optimizer steps skipped because of NaN/inf (saved in checkpoints)
        check_model_path(model_name_or_path, "model.model_name_or_path")
        self.tokenizer = load_tokenizer(model_name_or_path, trust_remote_code=trust_remote_code)
        self._models_built = False
        self._param_ndims: dict[str, int] = {}  # parameter ranks before sharding (FSDP flattens them)

    # ------------------------------------------------------------------ models
    def configure_model(self) -> None:
        """Build the models once (Lightning calls this inside the strategy's context)."""
        if self._models_built:
            return
        self.build_models()
        if self.lora_r > 0:
            from lightning_rlhf.models.lora import apply_lora

            for name in self.lora_targets:
                setattr(self, name, apply_lora(getattr(self, name), self.lora_r, self.lora_alpha, self.lora_dropout,
                                               self.lora_target_modules))
        for name, source in self.snapshot_roles.items():
            setattr(self, name, Snapshot(getattr(self, source)))
        self._models_built = True
        # ZeRO-3 partitions parameters while they are built: its ``ds_shape`` keeps the full shape
        self._param_ndims = {n: len(getattr(p, "ds_shape", p.shape)) for n, p in self.named_parameters()}

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
        frozen = tuple(f"{m}." for m in (*self.frozen_modules, *self.snapshot_roles))
        for name, p in self.named_parameters():
            if p.requires_grad and not name.startswith(frozen):
                yield name, p

    def decay_groups(self, named: Iterator[tuple[str, nn.Parameter]], lr: float) -> list[dict[str, Any]]:
        """Split parameters into weight-decayed matrices and undecayed vectors (biases, norms)."""
        decay, no_decay = [], []
        for name, p in named:
            # under FSDP (use_orig_params) parameters are 1-D views of their shard: use the rank they were built with
            ndim = self._param_ndims.get(_unwrapped_name(name), p.ndim)
            (decay if ndim >= 2 else no_decay).append(p)
        groups = [{"params": decay, "lr": lr, "weight_decay": self.weight_decay}]
        if no_decay:
            groups.append({"params": no_decay, "lr": lr, "weight_decay": 0.0})
        return [g for g in groups if g["params"]]

    def total_optimizer_steps(self) -> int:
        """Optimizer steps in this run, for the LR schedule. Override when one training_step makes several."""
        return int(self.trainer.estimated_stepping_batches) if self._trainer is not None else 1

    def optimizer_roles(self) -> list[OptimizerRole]:
        """One role per optimizer (models/roles.py). Default: one, ``main``, over :meth:`param_groups`. A method that
        trains a second model with its own optimizer (AIHF's reward model) returns one role per model and steps each
        with ``optimizer_update(role=name)``; the roles' parameters must not overlap."""
        return [OptimizerRole("main", self.param_groups(), self.lr)]

    def configure_optimizers(self) -> Any:
        roles = self.optimizer_roles()
        if tuple(r.name for r in roles) != tuple(self.optimizer_role_names):
            raise RuntimeError(f"{type(self).__name__}.optimizer_roles() returned {[r.name for r in roles]}, but its "
                               f"optimizer_role_names are {list(self.optimizer_role_names)}")
        optimizers, schedulers = [], []
        seen: set[int] = set()
        for role in roles:
            ids = {id(p) for g in role.param_groups for p in g["params"]}
            if ids & seen:
                raise RuntimeError(f"{type(self).__name__}: optimizer role {role.name!r} shares parameters with an "
                                   "earlier role (each parameter must have exactly one optimizer)")
            seen |= ids
            if not role.param_groups:
                raise RuntimeError(f"{type(self).__name__} has no trainable parameters"
                                   + ("." if len(roles) == 1 else f" in optimizer role {role.name!r}."))
            optimizer = torch.optim.AdamW(role.param_groups, lr=role.lr, betas=self.adam_betas,
                                          fused=True if self.fused_adamw else None,
                                          weight_decay=self.weight_decay)
            total = role.total_steps if role.total_steps is not None else self.total_optimizer_steps()
            warmup = role.warmup_steps if role.warmup_steps is not None else self.warmup_steps
            schedule = role.schedule or self.lr_schedule
            scheduler = torch.optim.lr_scheduler.LambdaLR(
                optimizer, lambda s, w=warmup, t=total, k=schedule: lr_lambda(s, w, t, k)
            )
            optimizers.append(optimizer)
            schedulers.append(scheduler)
        return optimizers, schedulers

    def _role_index(self, role: str | None) -> int:
        names = list(self.optimizer_role_names)
        if role is None:
            return 0
        if role not in names:
            raise KeyError(f"{type(self).__name__}: no optimizer role {role!r} (roles: {names})")
        return names.index(role)

    def _role_optimizer_and_scheduler(self, role: str | None) -> tuple[Any, Any]:
        """The (Lightning-wrapped) optimizer and LR scheduler of ``role`` (``None``: the first)."""
        opt, sched = self.optimizers(), self.lr_schedulers()
        if isinstance(opt, list):
            i = self._role_index(role)
            return opt[i], (sched[i] if isinstance(sched, list) else sched)
        if role is not None:
            self._role_index(role)  # one optimizer: only its own name is valid
        return opt, sched

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

    def mean_over_ranks(self, count: torch.Tensor) -> torch.Tensor:
        """``count`` (e.g. this rank's loss tokens) averaged over ranks. Dividing a rank's loss sum by it makes DDP's
        gradient average equal the gradient of the mean over ALL ranks' tokens (a per-rank mean would not when the
        ranks hold different numbers of tokens). Collective: every rank must call it."""
        count = count.detach().float()
        if self._trainer is not None and self.trainer.world_size > 1:
            count = self.trainer.strategy.reduce(count, reduce_op="mean")
        return count

    # --- strategies and non-finite guard: begin ---
    def strategy_kind(self) -> Literal["deepspeed", "fsdp", "other"]:
        """Which optimizer-step path the attached trainer's strategy needs."""
        return _strategy_kind(self.trainer.strategy) if self._trainer is not None else "other"

    def setup(self, stage: str) -> None:
        if self._trainer is not None and stage == "fit":
            self.check_strategy()
            self.check_micro_batch_size()
            self.check_export_dir()

    def check_export_dir(self) -> None:
        """Refuse, at start, an ``export_dir`` given by name that already holds an exported model (a re-run would
        overwrite it), unless ``model.overwrite_export``; ``auto`` exports into the run's own version folder."""
        if self.export_dir in (None, "auto") or self.overwrite_export:
            return
        if (Path(self.export_dir) / "config.json").exists():
            raise FileExistsError(
                f"model.export_dir: {self.export_dir} already holds an exported model, which this run would overwrite. "
                "Choose another folder, use model.export_dir: auto (the run's own log folder), or set "
                "model.overwrite_export: true."
            )

    def check_micro_batch_size(self, batch_size: int | None = None) -> None:
        """Warn when ``model.micro_batch_size`` exceeds the batch (then every batch is one micro-batch).

        Args:
            batch_size: Examples per training batch and rank; default: the data module's ``batch_size``.
        """
        if batch_size is None and self._trainer is not None:
            batch_size = getattr(getattr(self.trainer, "datamodule", None), "batch_size", None)
        if self.micro_batch_size is not None and batch_size and self.micro_batch_size > batch_size:
            log.warning(
                "model.micro_batch_size (%d) > data.batch_size (%d): each batch is a single micro-batch, no gradient "
                "accumulation happens. Lower model.micro_batch_size or raise data.batch_size.",
                self.micro_batch_size, batch_size,
            )

    def check_strategy(self, strategy: Any = None, batch_size: int | None = None) -> None:
        """Fail at start, naming the fix, when the strategy cannot run this module as configured; translate what can
        be translated. Called from ``setup``; methods with more needs extend it.

        * DeepSpeed: one optimizer (given), clipping by the engine (``model.max_grad_norm`` is copied to the config's
          ``gradient_clipping``; a different value there is an error), one backward per optimizer step (the engine's
          ``gradient_accumulation_steps`` is 1 under manual optimization and ZeRO-2 keeps only the last backward's
          gradients, so ``model.micro_batch_size`` smaller than the batch is refused), ``model.on_nonfinite: stop``
          (the engine owns the step, a skipped one cannot be undone), and ZeRO-3 gathers 16-bit weights for export.
        * FSDP: clipping through the root module's ``clip_grad_norm_`` (done in :meth:`optimizer_update`); frozen
          sub-models next to trainable ones need ``use_orig_params: true``.
        * Sharded parameters (FSDP, ZeRO-3): a module that generates (a ``generator`` with ``synced_gpus``) gets
          ``synced_gpus = True``, so every rank runs the same number of forward passes (each one gathers weights).

        Args:
            strategy: The strategy to check; default: the trainer's.
            batch_size: Examples per training batch and rank; default: the data module's ``batch_size``.
        """
        strategy = strategy if strategy is not None else self.trainer.strategy
        kind = _strategy_kind(strategy)
        if batch_size is None and self._trainer is not None:
            batch_size = getattr(self.trainer.datamodule, "batch_size", None)
        if kind == "deepspeed":
            config = strategy.config if isinstance(getattr(strategy, "config", None), dict) else {}
            clip = config.get("gradient_clipping")
            if self.max_grad_norm and clip not in (None, 0, 0.0) and float(clip) != float(self.max_grad_norm):
                raise ValueError(
                    f"model.max_grad_norm={self.max_grad_norm} and the DeepSpeed config's gradient_clipping={clip} "
                    "disagree: DeepSpeed clips inside its engine; set model.max_grad_norm: null or the same value."
                )
            if self.max_grad_norm and clip in (None, 0, 0.0):
                config["gradient_clipping"] = float(self.max_grad_norm)  # translated: the engine clips
            if self.micro_batch_size is not None and (batch_size is None or self.micro_batch_size < batch_size):
                raise ValueError(
                    f"model.micro_batch_size={self.micro_batch_size} accumulates several backward passes per "
                    "optimizer step, which the DeepSpeed engine does not support under manual optimization (its "
                    "gradient_accumulation_steps is 1; ZeRO-2 keeps only the last pass's gradients). Set "
                    "model.micro_batch_size: null and a smaller data.batch_size, or use strategy fsdp."
                )
            if len(self.optimizer_role_names) > 1:
                names = ", ".join(self.optimizer_role_names)
                raise ValueError(
                    f"{type(self).__name__} trains several models with their own optimizers ({names}), and the "
                    "DeepSpeed engine drives one optimizer only; use trainer.strategy: ddp (or fsdp) for this method."
                )
            if self.on_nonfinite != "stop":
                raise ValueError(
                    "model.on_nonfinite: skip cannot undo a step under DeepSpeed (the engine reduces and applies the "
                    "gradients itself); set model.on_nonfinite: stop (configs/strategy/deepspeed_*.yaml do)."
                )
            zero = config.setdefault("zero_optimization", {})
            if int(zero.get("stage", 0)) == 3:
                if self.export_dir is not None:
                    zero.setdefault("stage3_gather_16bit_weights_on_model_save", True)
                # from_pretrained under zero.Init must know about ZeRO-3 to load weights into partitioned parameters;
                # transformers keeps only a weak reference to this object
                try:
                    from transformers.integrations import HfDeepSpeedConfig

                    self._hf_deepspeed_config = HfDeepSpeedConfig(config)
                except ImportError:  # deepspeed not installed: only reachable in unit tests of this check
                    log.warning("deepspeed is not installed: transformers' ZeRO-3 integration not registered.")
        sharded = kind == "fsdp" or (
            kind == "deepspeed" and int((getattr(strategy, "config", None) or {}).get("zero_optimization", {})
                                        .get("stage", 0)) == 3
        )
        generator = getattr(self, "generator", None)
        if sharded and getattr(generator, "synced_gpus", None) is False:
            generator.synced_gpus = True  # ranks whose responses end early keep joining the other ranks' gathers
        if sharded and isinstance(generator, StaticCacheGenerator):
            raise ValueError(
                "model.rollout_engine: static has not been verified with sharded parameters (FSDP, DeepSpeed ZeRO-3) "
                "yet; use model.rollout_engine: hf there, or strategy ddp / deepspeed_stage_2."
            )
        if self.snapshot_roles and sharded:
            raise ValueError(
                f"{type(self).__name__} keeps a snapshot of a trained model ({', '.join(self.snapshot_roles)}), which "
                "is copied parameter by parameter and has not been verified with sharded parameters (FSDP, DeepSpeed "
                "ZeRO-3) yet; use trainer.strategy: ddp or deepspeed_stage_2."
            )
        if self.lora_r > 0 and sharded:
            raise ValueError(
                "model.lora_r > 0 (LoRA adapters) is not supported with sharded parameters (FSDP, DeepSpeed ZeRO-3) "
                "yet; use strategy ddp or deepspeed_stage_2 (adapters are small: sharding them saves little)."
            )
        if kind == "fsdp":
            kwargs = getattr(strategy, "kwargs", {}) or {}
            if self.frozen_modules and kwargs.get("use_orig_params") is False:
                raise ValueError(
                    f"{type(self).__name__} keeps frozen models ({', '.join(self.frozen_modules)}) next to trainable "
                    "ones, which FSDP can only shard with use_orig_params=True (FSDPStrategy's default: do not pass "
                    "use_orig_params=False; see configs/strategy/fsdp.yaml)."
                )

    def _nonfinite_decision(
        self, loss: torch.Tensor | None, grad_norm: torch.Tensor | None, watch: torch.Tensor | None = None
    ) -> bool:
        """True when the loss, the gradient norm or ``watch`` has a NaN/inf on ANY rank (one all-reduce)."""
        bad = torch.zeros((), device=self.device)
        for t in (loss, grad_norm, watch):
            if t is not None:
                bad = bad + (~torch.isfinite(t.detach().float())).any().float()
        if self._trainer is not None and self.trainer.world_size > 1:
            bad = self.trainer.strategy.reduce(bad, reduce_op="sum")
        return bool(bad.item() > 0)

    def _handle_nonfinite(self, loss: torch.Tensor | None, grad_norm: torch.Tensor | None) -> None:
        step = self.trainer.global_step if self._trainer is not None else 0
        loss_value = "n/a" if loss is None else f"{float(loss.detach().float()):.6g} (on this rank)"
        norm_value = "n/a" if grad_norm is None else f"{float(grad_norm.detach().float()):.6g}"
        where = f"optimizer step {step} (iteration {self.iteration}): loss={loss_value}, grad_norm={norm_value}"
        if self.on_nonfinite == "stop":
            raise RuntimeError(
                f"Non-finite loss or gradient at {where}. Stopping because model.on_nonfinite=stop; set "
                "model.on_nonfinite: skip to skip such steps, or lower model.lr / check the data."
            )
        self.nonfinite_steps += 1
        log.warning("Skipping the update at %s (model.on_nonfinite=skip; %d skipped so far).", where,
                    self.nonfinite_steps)

    def optimizer_update(self, loss: torch.Tensor | None = None, watch: torch.Tensor | None = None,
                         role: str | None = None) -> torch.Tensor:
        """Check, clip, step the optimizer and the LR scheduler, zero the gradients. Returns the pre-clip gradient norm.

        Args:
            loss: The step's (detached) loss on this rank, checked for NaN/inf with the gradient norm; on any rank's
                non-finite value the update is skipped on all ranks (``model.on_nonfinite: skip``: gradients dropped,
                parameters and optimizer state unchanged; the step still counts toward ``max_steps``) or the run
                stops (``stop``).
            watch: Other values of the step that must be finite, e.g. rewards (an infinite reward can give a
                finite loss).
            role: Which optimizer (:meth:`optimizer_roles`) to step; ``None``: the first (the only one of most
                methods). Clipping and the norm cover that optimizer's parameters only (under FSDP: every parameter
                holding a gradient, so do one role's backward and step at a time).
        """
        opt, sched = self._role_optimizer_and_scheduler(role)
        kind = self.strategy_kind()
        if kind == "deepspeed":
            # the engine clips (config gradient_clipping) and steps; on_nonfinite is "stop" here (check_strategy)
            if self._nonfinite_decision(loss, None, watch):
                self._handle_nonfinite(loss, None)
            opt.step()
            opt.zero_grad()
            if sched is not None:
                sched.step()
            norm = getattr(self.trainer.model, "get_global_grad_norm", lambda: None)()
            grad_norm = torch.as_tensor(float("nan") if norm is None else float(norm), device=self.device)
            self._log_nonfinite()
            return grad_norm
        # fp16 (a GradScaler): overflowing gradients are the scaler's to skip (it then lowers the scale), and the
        # gradients must be unscaled (Lightning's clip_gradients) before clipping
        scaled = self._trainer is not None and getattr(self.trainer.precision_plugin, "scaler", None) is not None
        clipped = False
        if kind == "fsdp":
            # gradients are sharded: the root module computes the global norm (and clips; inf = only measure)
            grad_norm = self.trainer.model.clip_grad_norm_(self.max_grad_norm or float("inf"))
            clipped = True
        else:
            params = [p for g in opt.optimizer.param_groups for p in g["params"] if p.grad is not None]
            if not params:
                grad_norm = torch.zeros((), device=self.device)
            elif self.max_grad_norm and not scaled:
                # one pass: the pre-clip norm, and the gradients clipped in place (a non-finite norm is skipped below)
                grad_norm = torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
                clipped = True
            else:
                grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        if self._nonfinite_decision(loss, None if scaled else grad_norm, watch):
            self._handle_nonfinite(loss, grad_norm)  # raises when on_nonfinite == "stop"
            opt.zero_grad(set_to_none=True)  # a step without gradients leaves parameters and Adam state unchanged
        elif self.max_grad_norm and not clipped:
            self.clip_gradients(opt, gradient_clip_val=self.max_grad_norm, gradient_clip_algorithm="norm")
        opt.step()
        opt.zero_grad(set_to_none=True)
        if sched is not None:
            sched.step()
        self._log_nonfinite()
        return grad_norm.detach()

    def _log_nonfinite(self) -> None:
        if self._current_fx_name == "training_step" and self.is_logging_step():
            self.log("train/nonfinite_steps", float(self.nonfinite_steps), batch_size=1)
    # --- strategies and non-finite guard: end ---

    def current_lr(self, role: str | None = None) -> float:
        """Learning rate of ``role``'s optimizer (``None``: the first) at this step."""
        opt, _ = self._role_optimizer_and_scheduler(role)
        return float(opt.optimizer.param_groups[0]["lr"])

    def is_logging_step(self) -> bool:
        """Whether this training step's per-step metrics are logged: the steps Lightning writes to the logger
        (every ``trainer.log_every_n_steps`` optimizer steps), the first step, and the last batch of an epoch or of
        ``trainer.max_steps``. Skipping ``self.log`` on the other steps saves its per-call cost (about 0.3 ms a
        value, a few ms a step for a small model) without changing what reaches the logger; the progress bar and
        ``trainer.callback_metrics`` then refresh on logging steps only."""
        trainer = self._trainer
        if trainer is None:
            return True
        step, every = trainer.global_step, max(int(trainer.log_every_n_steps or 1), 1)
        return (step % every == 0 or step <= 1 or trainer.is_last_batch or trainer.should_stop
                or (trainer.max_steps > 0 and step >= trainer.max_steps))

    def log_train_step(self, metrics: dict[str, Any], progress: dict[str, Any], batch_size: int) -> None:
        """Log ``metrics`` (to the logger) and ``progress`` (progress bar only) of a training step. Callers compute
        and log them on logging steps only (``if self.is_logging_step(): ...``)."""
        self.log_dict(metrics, batch_size=batch_size)
        self.log_dict(progress, prog_bar=True, logger=False, batch_size=batch_size)

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        frozen = tuple(f"{m}." for m in self.frozen_modules)
        if frozen:
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith(frozen)}
        checkpoint["iteration"] = self.iteration
        checkpoint["nonfinite_steps"] = self.nonfinite_steps

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.iteration = int(checkpoint.get("iteration", 0))
        self.nonfinite_steps = int(checkpoint.get("nonfinite_steps", 0))
        self.configure_model()
        keys = checkpoint.get("state_dict", {})
        for name in self.snapshot_roles:  # loading is not strict (frozen models are absent): check these here
            if f"{name}.taken_at" not in keys:
                raise RuntimeError(
                    f"The checkpoint has no weights for {type(self).__name__}'s snapshot {name!r} (a copy of "
                    f"{self.snapshot_roles[name]} taken during training, which cannot be rebuilt): it was not written "
                    "by this method. Start a new run instead of resuming from it (ckpt_path)."
                )

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

    def export_pretrained(self, directory: str, state_dict: dict[str, torch.Tensor] | None = None) -> str:
        """Save the trained model and the tokenizer as a plain Hugging Face folder that ``from_pretrained`` loads.

        Args:
            directory: Target folder.
            state_dict: Full weights of the exported model (keys as ``save_pretrained`` expects), when its
                parameters are sharded (:meth:`gathered_export_state_dict`); ``None`` saves the parameters as they are.
        """
        from lightning_rlhf.models.lora import is_peft_model, merged_copy

        Path(directory).mkdir(parents=True, exist_ok=True)
        model = self.export_model()
        if is_peft_model(model):  # LoRA: the adapter alone, and the merged model as a plain folder
            model.save_pretrained(str(Path(directory) / "adapter"))
            merged_copy(model).save_pretrained(directory)
        elif state_dict is None:
            model.save_pretrained(directory)
        else:
            model.save_pretrained(directory, state_dict=state_dict)
        self.tokenizer.save_pretrained(directory)
        return directory

    # --- export under sharded strategies: begin ---
    def _export_prefix(self) -> str:
        """State-dict key prefix of the Hugging Face model that :meth:`export_model` saves (e.g. ``policy.``)."""
        from transformers import PreTrainedModel

        target = self.export_model()
        base = next(name for name, mod in self.named_modules() if mod is target)
        for sub, mod in target.named_modules():
            if isinstance(mod, PreTrainedModel):
                return ".".join(p for p in (base, sub) if p) + "."
        return f"{base}."

    def gathered_export_state_dict(self) -> dict[str, torch.Tensor] | None:
        """Full weights of the exported model, gathered from the shards under FSDP and DeepSpeed ZeRO-3.

        Collective: every rank must call it. Returns the state dict on rank 0 and ``None`` on other ranks; returns
        ``None`` everywhere when parameters are not sharded (the model saves itself).
        """
        if self._trainer is None:
            return None
        kind = self.strategy_kind()
        root = self.trainer.model
        if kind == "fsdp":
            from torch.distributed.fsdp import FullStateDictConfig, StateDictType
            from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

            cfg = FullStateDictConfig(offload_to_cpu=True, rank0_only=True)
            with FSDP.state_dict_type(root, StateDictType.FULL_STATE_DICT, cfg):
                full = root.state_dict()
        elif kind == "deepspeed" and int(getattr(self.trainer.strategy, "zero_stage_3", False)):
            full = root._zero3_consolidated_16bit_state_dict()  # gathered layer by layer onto rank 0
        else:
            return None
        if not self.trainer.is_global_zero:
            return None
        prefix = self._export_prefix()
        out = {}
        for key, value in (full or {}).items():
            key = _unwrapped_name(key)
            if key.startswith(prefix):
                out[key[len(prefix) :]] = value
        return out
    # --- export under sharded strategies: end ---

    def check_run_health(self) -> None:
        """At the end of ``fit``: fail (non-zero exit, nothing exported) with a summary when most of the run's updates
        were skipped for non-finite values, counted over the whole run (resumes included) and all ranks: optimizer
        steps skipped by ``model.on_nonfinite: skip``, and samples dropped for a non-finite reward (a module with
        ``scored_samples`` / ``nonfinite_reward_samples`` counters, e.g. PPO). A smaller share is summarised."""
        steps = int(self.trainer.global_step) if self._trainer is not None else 0
        scored = float(getattr(self, "scored_samples", 0.0) or 0.0)
        dropped = float(getattr(self, "nonfinite_reward_samples", 0.0) or 0.0)
        parts, fatal = [], False
        if self.nonfinite_steps:
            parts.append(f"{self.nonfinite_steps} of {steps} optimizer steps skipped for a non-finite loss or gradient "
                         "(model.on_nonfinite=skip)")
            fatal |= 2 * self.nonfinite_steps > steps
        if dropped:
            parts.append(f"{int(dropped)} of {int(scored)} rollout samples dropped for a non-finite reward "
                         "(model.on_nonfinite_reward=drop)")
            fatal |= 2 * dropped > scored
        if not parts:
            return
        summary = "; ".join(parts)
        if fatal:
            raise RuntimeError(f"Most of this run's updates were skipped: {summary}. The model is not exported. Look "
                               "at the warnings above for the first steps / samples at fault.")
        log.warning("Non-finite values in this run: %s.", summary)

    def on_fit_end(self) -> None:
        if any(getattr(cb, "preempted", False) for cb in self.trainer.callbacks):  # callbacks/preemption.py
            if self.resolved_export_dir() is not None:
                log.warning("Training was stopped by a signal after a checkpoint: not exporting (resume to finish).")
            return
        self.check_run_health()
        directory = self.resolved_export_dir()
        if directory is None:
            return
        state_dict = self.gathered_export_state_dict()  # all ranks (collective under sharded strategies)
        if self.trainer.is_global_zero:
            self.export_pretrained(directory, state_dict)
            log.warning("Exported %s to %s", type(self.export_model()).__name__, directory)
        self.trainer.strategy.barrier("export")

    # ------------------------------------------------------------------ helpers
    def domain_names(self) -> list[str]:
        """Domain labels of the attached data module (``["default"]`` if it has none)."""
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        return list(getattr(dm, "domain_names", None) or ["default"])


def _unwrapped_name(name: str) -> str:
    """A parameter name without the wrapper modules that FSDP / activation checkpointing insert."""
    for wrapper in ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_forward_module."):
        name = name.replace(wrapper, "")
    return name


def _strategy_kind(strategy: Any) -> Literal["deepspeed", "fsdp", "other"]:
    """``deepspeed`` / ``fsdp`` for Lightning's DeepSpeed and FSDP strategies (and subclasses), else ``other``."""
    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy

    if isinstance(strategy, DeepSpeedStrategy):
        return "deepspeed"
    if isinstance(strategy, FSDPStrategy):
        return "fsdp"
    return "other"
