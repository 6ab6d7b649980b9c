"""MetaRM: a Bradley-Terry reward model meta-learned to keep telling policy samples apart (spec 3).

Dou et al., "MetaRM: Shifted Distributions Alignment via Meta-Learning" (arXiv 2405.00438), Algorithm 1. Each
training step sees a preference minibatch ``X_t`` and a meta minibatch ``X_s`` of ``k`` responses per prompt sampled
from the current (shifted) policy, and does:

1. the difference loss on ``X_s`` (to maximise): ``J(theta) = mean_x c * sum_{i<j} sigmoid(|r(x,s_i) - r(x,s_j)|)``
   (:func:`~lightning_rlhf.losses.meta_rm.difference_loss`, ``c = 2/k^2``);
2. the meta step, plain gradient ascent without optimizer state: ``theta' = theta + eta * dJ/dtheta``;
3. the outer step: the reward model's loss at ``theta'`` (Bradley-Terry, plus the optional centering and LM terms of
   :class:`~lightning_rlhf.methods.reward_model.RewardModelModule`), its gradient with respect to ``theta'`` applied
   to ``theta`` by the optimizer (``alpha`` = the learning rate).

``meta_order: first`` is the paper's algorithm and its authors' implementation: back up the parameters, take the meta
step in place, back-propagate the loss at ``theta'``, restore the backed-up parameters (bit for bit), step the
optimizer. ``meta_order: second`` (our extension, for small models) differentiates through the meta step:
the gradient is ``d/dtheta L(theta + eta * dJ/dtheta) = g' + eta * H_J(theta) g'`` with ``g' = dL/dtheta'(theta')``;
the Hessian-vector product is a double backward through ``dJ/dtheta`` (``create_graph=True``), recomputed micro-batch
by micro-batch so that no graph outlives its micro-batch.

Under DDP the meta gradient ``dJ/dtheta`` is computed with ``torch.autograd.grad`` (DDP's gradient hooks, which fire
only when gradients accumulate into ``.grad``, stay silent) and then averaged across ranks by hand, exactly like DDP
averages the outer gradient: every rank takes the same meta step, the global one. DeepSpeed and FSDP are refused
(their engines own the parameters and the backward pass), and so is fp16 with a gradient scaler.

Which steps take the meta step: all of them (the paper), unless the :class:`callbacks.meta_step.MetaStepSchedule`
callback switches ``meta_step_enabled`` step by step. Without a sample-set stream, or with the meta step off, a step
is exactly a :class:`RewardModelModule` step.

Batches: ``{"preferences": PreferenceBatch, "samples": SampleSetBatch}`` (a multi-stream data module; the keys are
``model.preference_stream`` / ``model.sample_stream``), or a bare ``PreferenceBatch`` (no meta step possible).
Validation batches may be either kind, or such a dict: preference batches give the reward model's ``val/accuracy``
(overall and per domain), sample-set batches the discrimination metrics on held-out policy samples.

Logged: everything :class:`RewardModelModule` logs, plus ``train/meta_step`` (1 on meta steps), ``train/meta_steps``
(count so far, saved in checkpoints), ``train/meta_objective`` (``J`` at ``theta``), ``train/meta_grad_norm``
(``|dJ/dtheta|``, global), ``train/meta_score_std`` (mean within-prompt score std on the meta batch); on validation
sample sets ``val/samples/score_std`` (mean within-prompt std), ``val/samples/abs_delta_mean`` (mean pairwise
``|delta r|``), ``val/samples/norm_abs_delta_mean`` (``|delta r|`` divided by the largest one) and
``val/samples/norm_abs_delta_hist/<lo>-<hi>`` (the share of pairs in each bin of ``[0, 1]``: the paper's histogram).
"""

from __future__ import annotations

from typing import Any, Literal

import torch

from lightning_rlhf.data.batches import PreferenceBatch, SampleSetBatch
from lightning_rlhf.losses.meta_rm import (
    DifferenceNorm,
    difference_loss,
    normalized_difference_histogram,
    pairwise_abs_differences,
    within_prompt_std,
)
from lightning_rlhf.methods.base import check_choice
from lightning_rlhf.methods.reward_model import RewardModelModule

MetaOrder = Literal["first", "second"]
#: elements per all-reduce of the meta gradient (bounds the extra memory of the flattened bucket)
_BUCKET_NUMEL = 1 << 24


class MetaRewardModelModule(RewardModelModule):
    """MetaRM (Dou et al. 2024): a reward model whose every step first takes a gradient-ascent step on the difference
    loss of policy samples, then applies the Bradley-Terry gradient taken there. See the module docstring.

    Args:
        meta_order: ``first`` (the paper: the outer gradient at ``theta'`` is applied as is) or ``second`` (also
            differentiate through the meta step; needs double backward: small models).
        meta_lr: The meta step size ``eta``; ``null`` = ``model.lr`` (the paper: ``eta = alpha``). Constant (the
            learning-rate schedule applies to the outer step only).
        difference_norm: Normalisation of the difference loss per prompt: ``paper`` (``2/k^2``) or ``pairs``
            (``2/(k(k-1))``, the mean over pairs).
        abs_eps: 0 uses ``|d|`` in the difference loss; ``> 0`` the smooth ``sqrt(d^2 + abs_eps)`` (e.g. ``1e-12``).
        meta_micro_batch_size: Prompts (each with its ``k`` responses) per micro-batch of the meta pass; ``null`` =
            ``model.micro_batch_size`` (``null`` there too: the whole meta batch at once).
        preference_stream: Key of the preference batch in a multi-stream training batch.
        sample_stream: Key of the sample-set (meta) batch in a multi-stream training batch.
        histogram_bins: Bins of ``[0, 1]`` in the logged histogram of normalised ``|delta r|`` on validation samples.
        center_coef: See :class:`RewardModelModule`.
        lm_coef: See :class:`RewardModelModule`.
        padding_free: See :class:`RewardModelModule`; applies to the meta pass over the sample sets too (also the
            double backward of ``meta_order: second``).
        pack_row_length: See :class:`RewardModelModule`.
    """

    def __init__(
        self,
        meta_order: MetaOrder = "first",
        meta_lr: float | None = None,
        difference_norm: DifferenceNorm = "paper",
        abs_eps: float = 0.0,
        meta_micro_batch_size: int | None = None,
        preference_stream: str = "preferences",
        sample_stream: str = "samples",
        histogram_bins: int = 5,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        check_choice("meta_order", meta_order, ("first", "second"))
        if meta_lr is not None and meta_lr < 0:
            raise ValueError(f"model.meta_lr must be >= 0 or null (= model.lr), got {meta_lr}")
        check_choice("difference_norm", difference_norm, ("paper", "pairs"))
        if abs_eps < 0:
            raise ValueError(f"model.abs_eps must be >= 0, got {abs_eps}")
        if meta_micro_batch_size is not None and meta_micro_batch_size < 1:
            raise ValueError(f"model.meta_micro_batch_size must be >= 1 or null, got {meta_micro_batch_size}")
        if histogram_bins < 1:
            raise ValueError(f"model.histogram_bins must be >= 1, got {histogram_bins}")
        if meta_order == "second" and self.gradient_checkpointing:
            raise ValueError(
                "model.meta_order: second needs a double backward through the reward model, which has not been "
                "verified with activation checkpointing; set model.gradient_checkpointing: false or meta_order: first."
            )
        self.meta_order: MetaOrder = meta_order
        self.meta_lr = meta_lr
        self.difference_norm: DifferenceNorm = difference_norm
        self.abs_eps = abs_eps
        self.meta_micro_batch_size = meta_micro_batch_size
        self.preference_stream = preference_stream
        self.sample_stream = sample_stream
        self.histogram_bins = histogram_bins
        self.save_hyperparameters()
        #: whether the next training step takes the meta step (set step by step by callbacks.meta_step.MetaStepSchedule)
        self.meta_step_enabled = True
        #: meta steps taken so far (saved in checkpoints)
        self.meta_steps = 0
        self._val_abs_deltas: list[torch.Tensor] = []
        self._val_stds: list[torch.Tensor] = []

    @property
    def required_streams(self) -> tuple[str, str]:
        """The data streams a :class:`~lightning_rlhf.data.streams.MultiStreamDataModule` must declare."""
        return (self.preference_stream, self.sample_stream)

    @property
    def eta(self) -> float:
        """The meta step size."""
        return float(self.lr if self.meta_lr is None else self.meta_lr)

    # ------------------------------------------------------------------ checks
    def check_strategy(self, strategy: Any = None, batch_size: int | None = None) -> None:
        """Refuse what the meta step cannot run under (see the module docstring), then the base checks."""
        strategy = strategy if strategy is not None else self.trainer.strategy
        from lightning_rlhf.methods.base import _strategy_kind

        kind = _strategy_kind(strategy)
        if kind in ("deepspeed", "fsdp"):
            raise ValueError(
                f"MetaRewardModelModule does not support strategy {type(strategy).__name__}: the meta step shifts the "
                "parameters in place, takes an extra backward pass whose gradient it reduces itself, and restores the "
                f"parameters bit for bit, which the {kind} engine's sharded parameters and its own backward/step do "
                "not allow. Use strategy ddp (or one device)."
            )
        if self._trainer is not None and getattr(self.trainer.precision_plugin, "scaler", None) is not None:
            raise ValueError(
                "MetaRewardModelModule does not support fp16 with a gradient scaler (trainer.precision: 16-mixed): "
                "the meta gradient is taken unscaled and would underflow. Use trainer.precision: bf16-mixed or 32."
            )
        super().check_strategy(strategy, batch_size)

    # ------------------------------------------------------------------ batches
    def split_streams(self, batch: Any) -> tuple[PreferenceBatch, SampleSetBatch | None]:
        """The preference and the sample-set (meta) batch of a training batch."""
        if isinstance(batch, PreferenceBatch):
            return batch, None
        if isinstance(batch, dict):
            if self.preference_stream not in batch:
                raise KeyError(
                    f"the training batch has streams {sorted(batch)} but no {self.preference_stream!r} "
                    "(model.preference_stream)"
                )
            samples = batch.get(self.sample_stream)
            if samples is not None and not isinstance(samples, SampleSetBatch):
                raise TypeError(
                    f"stream {self.sample_stream!r} (model.sample_stream) holds a {type(samples).__name__}, "
                    "expected a SampleSetBatch (a sample-set data module)"
                )
            return batch[self.preference_stream], samples
        raise TypeError(
            f"MetaRewardModelModule trains on a PreferenceBatch or a dict of streams, got {type(batch).__name__}"
        )

    def meta_micro_batches(self, n: int) -> list[tuple[int, int]]:
        """``(start, stop)`` prompt ranges of the meta pass's micro-batches."""
        size = self.meta_micro_batch_size or self.micro_batch_size or n
        return [(s, min(s + size, n)) for s in range(0, n, size)]

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for _, p in self.trainable_parameters_named()]

    # ------------------------------------------------------------------ the meta step
    def _all_reduce_mean_(self, tensors: list[torch.Tensor]) -> None:
        """Average ``tensors`` in place across ranks (what DDP does with ``.grad``), in buckets of flattened copies."""
        if self._trainer is None or self.trainer.world_size <= 1 or not torch.distributed.is_initialized():
            return
        world = torch.distributed.get_world_size()
        start = 0
        while start < len(tensors):
            stop, numel = start, 0
            while stop < len(tensors) and (stop == start or numel + tensors[stop].numel() <= _BUCKET_NUMEL):
                numel += tensors[stop].numel()
                stop += 1
            chunk = tensors[start:stop]
            flat = torch.cat([t.reshape(-1) for t in chunk])
            torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM)
            flat.div_(world)
            offset = 0
            for t in chunk:
                t.copy_(flat[offset : offset + t.numel()].view_as(t))
                offset += t.numel()
            start = stop

    def meta_gradient(
        self, samples: SampleSetBatch, params: list[torch.nn.Parameter]
    ) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        """``dJ/dtheta`` at the current parameters, averaged over ranks (the global meta gradient).

        Returns:
            The gradients (one per parameter, same shapes), the local ``J`` (mean over this rank's prompts, ``()``)
            and this rank's scores ``(B*k,)``, detached.
        """
        B, k = samples.num_prompts, samples.num_samples
        grads: list[torch.Tensor] | None = None
        objective = torch.zeros((), device=self.device)
        scores = []
        for s, e in self.meta_micro_batches(B):
            mb = samples.slice(s, e)
            r = self.score_sequences(mb.input_ids, mb.attention_mask)  # (mb*k,) read at the last non-pad token
            J = difference_loss(r, k, self.difference_norm, self.abs_eps).sum() / B
            g = torch.autograd.grad(J, params, materialize_grads=True)  # no DDP hook fires
            if grads is None:
                grads = list(g)
            else:
                torch._foreach_add_(grads, list(g))
            objective += J.detach()
            scores.append(r.detach())
        assert grads is not None
        self._all_reduce_mean_(grads)
        return grads, objective, torch.cat(scores)

    def hessian_vector_product(
        self, samples: SampleSetBatch, params: list[torch.nn.Parameter], vector: list[torch.Tensor]
    ) -> list[torch.Tensor]:
        """``H_J(theta) v`` (the Hessian of the global ``J`` times ``vector``), by a double backward per micro-batch."""
        from torch.nn.attention import SDPBackend, sdpa_kernel

        B, k = samples.num_prompts, samples.num_samples
        out: list[torch.Tensor] | None = None
        for s, e in self.meta_micro_batches(B):
            mb = samples.slice(s, e)
            with sdpa_kernel(SDPBackend.MATH):  # the fused attention kernels have no double backward
                r = self.score_sequences(mb.input_ids, mb.attention_mask)
                J = difference_loss(r, k, self.difference_norm, self.abs_eps).sum() / B
                g = torch.autograd.grad(J, params, create_graph=True, materialize_grads=True)
                dot = sum((gi * vi).sum() for gi, vi in zip(g, vector) if gi.requires_grad)
                if not isinstance(dot, torch.Tensor) or not dot.requires_grad:
                    hv = [torch.zeros_like(p) for p in params]  # J is locally linear in every parameter
                else:
                    hv = list(torch.autograd.grad(dot, params, materialize_grads=True))
            if out is None:
                out = hv
            else:
                torch._foreach_add_(out, hv)
        assert out is not None
        self._all_reduce_mean_(out)
        return out

    def meta_backward(
        self, preferences: PreferenceBatch, samples: SampleSetBatch
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """One meta step and the outer backward. On return the parameters are exactly those on entry and ``.grad``
        holds the gradient the optimizer applies: ``dL/dtheta'(theta')`` (first order) or
        ``d/dtheta L(theta + eta dJ/dtheta)`` (second order).

        Returns:
            The outer loss ``()``, chosen and rejected scores ``(B,)`` at ``theta'``, and meta statistics.
        """
        params = self.trainable_parameters()
        grads, objective, sample_scores = self.meta_gradient(samples, params)
        meta_grad_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        backup = [p.detach().clone() for p in params]
        try:
            with torch.no_grad():
                torch._foreach_add_(params, grads, alpha=self.eta)  # theta' = theta + eta * dJ/dtheta
            del grads
            total, r_w, r_l = self.preference_backward(preferences)  # dL/dtheta'(theta') in .grad (DDP-averaged)
        finally:
            with torch.no_grad():
                for p, b in zip(params, backup):
                    p.copy_(b)  # exactly theta again
        del backup
        if self.meta_order == "second":
            outer = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
            hv = self.hessian_vector_product(samples, params, [g.detach() for g in outer])
            with torch.no_grad():
                for p, g, h in zip(params, outer, hv):
                    p.grad = g.add_(h, alpha=self.eta)
        stats = {
            "train/meta_objective": objective,
            "train/meta_grad_norm": meta_grad_norm.detach(),
            "train/meta_score_std": within_prompt_std(sample_scores, samples.num_samples).mean(),
        }
        return total, r_w, r_l, stats

    # ------------------------------------------------------------------ training
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        preferences, samples = self.split_streams(batch)
        self.reward_model.train()
        meta = bool(self.meta_step_enabled)
        if meta and samples is None:
            raise ValueError(
                f"the meta step needs a sample-set stream {self.sample_stream!r} (model.sample_stream) in every "
                "training batch; train on a multi-stream data module with a preference and a sample-set stream, or "
                "switch meta steps off with the MetaStepSchedule callback."
            )
        stats: dict[str, torch.Tensor] = {}
        if meta:
            total, r_w, r_l, stats = self.meta_backward(preferences, samples)
            self.meta_steps += 1
        else:
            total, r_w, r_l = self.preference_backward(preferences)
        watch = torch.cat([r_w, r_l, stats["train/meta_grad_norm"].reshape(1)]) if meta else torch.cat([r_w, r_l])
        grad_norm = self.optimizer_update(total, watch=watch)  # skips (or stops on) non-finite values
        self.iteration += 1
        if self.is_logging_step():
            metrics = self.train_metrics(total, r_w, r_l, grad_norm)
            metrics.update(stats)
            metrics["train/meta_step"] = float(meta)
            metrics["train/meta_steps"] = float(self.meta_steps)
            self.log_train_step(metrics, {"loss": total, "acc": metrics["train/accuracy"]},
                                batch_size=preferences.num_pairs)
        return total

    @torch.no_grad()
    def meta_score_spread(self, batch: Any) -> float:
        """The reward model's score spread on the meta batch of ``batch``: the mean over prompts of the standard
        deviation of its ``k`` scores, averaged over ranks (collective: every rank must call it). For
        :class:`callbacks.meta_step.MetaStepSchedule`'s ``after_shift``; ``inf`` when the batch has no sample set."""
        _, samples = self.split_streams(batch)
        stats = torch.zeros(2, device=self.device, dtype=torch.float64)
        if samples is not None:
            for s, e in self.meta_micro_batches(samples.num_prompts):
                mb = samples.slice(s, e)
                r = self.score_sequences(mb.input_ids, mb.attention_mask)
                stats[0] += within_prompt_std(r, samples.num_samples).double().sum()
                stats[1] += e - s
        if self._trainer is not None and self.trainer.world_size > 1:
            stats = self.trainer.strategy.reduce(stats, reduce_op="sum")
        return float(stats[0] / stats[1]) if stats[1] > 0 else float("inf")

    # ------------------------------------------------------------------ validation
    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        if isinstance(batch, dict):
            for value in batch.values():
                self.validation_step(value, batch_idx, dataloader_idx)
        elif isinstance(batch, SampleSetBatch):
            r = self.score_sequences(batch.input_ids, batch.attention_mask)
            self._val_abs_deltas.append(pairwise_abs_differences(r, batch.num_samples).flatten().float())
            self._val_stds.append(within_prompt_std(r, batch.num_samples))
        elif isinstance(batch, PreferenceBatch):
            super().validation_step(batch, batch_idx)
        else:
            raise TypeError(f"unexpected validation batch {type(batch).__name__}")

    def on_validation_epoch_end(self) -> None:
        if self.val_metrics is not None and self.val_metrics.accuracy.update_count > 0:  # preference batches seen
            super().on_validation_epoch_end()
        metrics = self.sample_set_metrics()
        if metrics:
            self.log_dict(metrics, sync_dist=False)

    def sample_set_metrics(self) -> dict[str, float]:
        """Reduce (across ranks) and reset the validation statistics of sample sets; empty when there were none.
        Collective under DDP when any rank saw sample sets (every rank must then call it, as Lightning does)."""
        local = torch.cat(self._val_abs_deltas) if self._val_abs_deltas else torch.zeros(0, device=self.device)
        stds = torch.cat(self._val_stds) if self._val_stds else torch.zeros(0, device=self.device)
        self._val_abs_deltas, self._val_stds = [], []
        sums = torch.stack([
            local.double().sum(), torch.tensor(float(local.numel()), dtype=torch.float64, device=local.device),
            stds.double().sum(), torch.tensor(float(stds.numel()), dtype=torch.float64, device=local.device),
            local.double().max() if local.numel() else torch.zeros((), dtype=torch.float64, device=local.device),
        ])
        distributed = self._trainer is not None and self.trainer.world_size > 1
        if distributed:
            gathered = self.all_gather(sums)  # (world, 5)
            sums = torch.cat([gathered[:, :4].sum(0), gathered[:, 4].max().reshape(1)])
        if sums[1] == 0:
            return {}
        top = float(sums[4])
        bins = self.histogram_bins
        counts = torch.zeros(bins, dtype=torch.float64, device=local.device)
        if local.numel() and top > 0:
            index = (local.double() / top * bins).long().clamp(max=bins - 1)
            counts += torch.bincount(index, minlength=bins).double()
        elif local.numel():
            counts[0] += local.numel()
        if distributed:
            counts = self.all_gather(counts).sum(0)
        out = {
            "val/samples/abs_delta_mean": float(sums[0] / sums[1]),
            "val/samples/norm_abs_delta_mean": float(sums[0] / sums[1] / top) if top > 0 else 0.0,
            "val/samples/score_std": float(sums[2] / sums[3]) if sums[3] > 0 else 0.0,
            "val/samples/num_pairs": float(sums[1]),
        }
        for b, share in enumerate((counts / sums[1]).tolist()):
            out[f"val/samples/norm_abs_delta_hist/{b / bins:.1f}-{(b + 1) / bins:.1f}"] = share
        logger = getattr(self, "logger", None) if self._trainer is not None else None
        experiment = getattr(logger, "experiment", None) if logger is not None else None
        if not distributed and local.numel() and hasattr(experiment, "add_histogram"):
            normalized, _ = normalized_difference_histogram(local, bins)
            experiment.add_histogram("val/samples/norm_abs_delta", normalized.cpu(), self.trainer.global_step)
        return out

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["meta_steps"] = self.meta_steps

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        self.meta_steps = int(checkpoint.get("meta_steps", 0))
