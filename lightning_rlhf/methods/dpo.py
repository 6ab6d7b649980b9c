"""Direct Preference Optimization (spec 1.3)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from lightning_rlhf.data.batches import PreferenceBatch
from lightning_rlhf.losses.preference import DPOLossType, DPOOutput, dpo_loss
from lightning_rlhf.methods.base import RLHFModule
from lightning_rlhf.methods.preference_metrics import PairwiseMetrics
from lightning_rlhf.models.factory import load_causal_lm, load_reference
from lightning_rlhf.packing import pack_sequences, packed_sequence_logprobs, packed_sequences_supported
from lightning_rlhf.rollout.scoring import sequence_logprobs


class DPOModule(RLHFModule):
    """DPO and its IPO / hinge / conservative variants against a frozen reference policy.

    Logged: ``train/loss``, ``train/reward_accuracy`` (``mean(h > 0)``), ``train/chosen_reward``,
    ``train/rejected_reward``, ``train/margin``; on validation ``val/accuracy`` (implicit-reward accuracy),
    ``val/margin`` and ``val/accuracy/<domain>``.

    Args:
        model_name_or_path: Policy to train (usually an SFT export): hub id, local folder, or ``builtin:tiny-llama``.
        ref_model_name_or_path: Frozen reference ``pi_ref``; default: the same checkpoint as the policy.
        beta: KL strength ``beta``.
        loss_type: ``sigmoid`` (DPO), ``ipo`` or ``hinge``.
        label_smoothing: Conservative-DPO label noise ``eps`` (``sigmoid`` only).
        precompute_ref_logprobs: Score every training and validation pair with the reference once before training,
            cache the log-probs, and free the reference model.
        padding_free: Score each micro-batch's ``2B`` sequences as one row without padding (position ids restart per
            sequence; transformers' packed-sequence attention keeps them apart), so no compute is spent on padding.
            Needs a transformers version with packed-sequence masks (checked at start) and an attention
            implementation that honours them (``sdpa``, ``eager``, ``flash_attention_2``). Same loss as the padded
            batch up to float rounding (tests/test_packing.py).
        lr: Peak learning rate (DPO is usually run at 5e-7 to 5e-6 on pretrained models).
        micro_batch_size: Pairs per micro-batch (gradient accumulation inside a step).
    """

    frozen_modules = ("reference",)
    lora_targets = ("policy",)

    def __init__(
        self,
        ref_model_name_or_path: str | None = None,
        beta: float = 0.1,
        loss_type: DPOLossType = "sigmoid",
        label_smoothing: float = 0.0,
        precompute_ref_logprobs: bool = False,
        padding_free: bool = False,
        lr: float = 5e-6,
        **kwargs: Any,
    ) -> None:
        super().__init__(lr=lr, **kwargs)
        if beta <= 0:
            raise ValueError(f"model.beta must be positive, got {beta}")
        if padding_free and not packed_sequences_supported():
            raise ValueError("model.padding_free needs a transformers version with packed-sequence attention masks "
                             "(transformers.masking_utils.find_packed_sequence_indices); upgrade transformers or set "
                             "model.padding_free: false")
        if label_smoothing and loss_type != "sigmoid":
            raise ValueError(f"model.label_smoothing needs model.loss_type: sigmoid (got {loss_type!r})")
        self.ref_model_name_or_path = ref_model_name_or_path or self.model_name_or_path
        self.beta = beta
        self.padding_free = padding_free
        self.loss_type = loss_type
        self.label_smoothing = label_smoothing
        self.precompute_ref_logprobs = precompute_ref_logprobs
        self.save_hyperparameters()
        self.val_metrics: PairwiseMetrics | None = None
        self._ref_cache: dict[str, torch.Tensor] = {}

    def build_models(self) -> None:
        self.policy = load_causal_lm(
            self.model_name_or_path,
            dtype=self.dtype_name,
            gradient_checkpointing=self.gradient_checkpointing,
            trust_remote_code=self.trust_remote_code,
            attn_implementation=self.attn_implementation,
        ).train()
        self.reference = load_reference(self.ref_model_name_or_path, self.dtype_name, self.trust_remote_code)

    def setup(self, stage: str) -> None:
        super().setup(stage)  # strategy checks
        self.val_metrics = PairwiseMetrics(self.domain_names(), prefix="val")

    def export_model(self) -> nn.Module:
        return self.policy

    # ------------------------------------------------------------------ reference log-probs
    def _reference_logps(self, batch: PreferenceBatch, split: str) -> torch.Tensor:
        """``(2B,)`` summed response log-probs under the reference (cached when precomputed)."""
        if split in self._ref_cache and batch.index is not None:
            cache = self._ref_cache[split]
            idx = batch.index.to(cache.device)
            return torch.cat([cache[idx, 0], cache[idx, 1]]).to(self.device)
        with torch.no_grad():
            return self.sequence_logps(self.reference, batch)

    def sequence_logps(self, model: nn.Module, batch: PreferenceBatch) -> torch.Tensor:
        """``(2B,)`` summed response log-probs of the batch's sequences under ``model`` (padded or packed)."""
        if self.padding_free:
            packed = pack_sequences(batch.input_ids, batch.attention_mask, batch.loss_mask)
            logits = model(input_ids=packed.input_ids, position_ids=packed.position_ids, use_cache=False).logits
            return packed_sequence_logprobs(logits, packed)
        logits = self.lm_forward(model, batch.input_ids, batch.attention_mask)
        return sequence_logprobs(logits, batch.input_ids, batch.loss_mask)

    @torch.no_grad()
    def _precompute(self, loader: DataLoader, size: int) -> torch.Tensor:
        cache = torch.full((size, 2), float("nan"))
        for batch in loader:
            batch = self.transfer_batch_to_device(batch, self.device, 0)
            for s, e in self.micro_batches(batch.num_pairs):
                mb = batch.slice(s, e)
                logps = self._reference_logps(mb, split="none").float().cpu()
                n = mb.num_pairs
                cache[mb.index.cpu(), 0] = logps[:n]
                cache[mb.index.cpu(), 1] = logps[n:]
        return cache

    def on_fit_start(self) -> None:
        if not self.precompute_ref_logprobs or self._ref_cache:
            return
        dm = self.trainer.datamodule
        if dm is None or not hasattr(dm, "train_dataset"):
            raise RuntimeError("model.precompute_ref_logprobs needs a PreferenceDataModule passed as `datamodule`.")
        for split, ds in (("train", dm.train_dataset), ("val", dm.val_dataset)):
            if ds is None:
                continue
            loader = DataLoader(ds, batch_size=dm.val_batch_size, shuffle=False, collate_fn=dm.collate)
            self._ref_cache[split] = self._precompute(loader, len(ds))
        del self.reference  # not needed any more: every pair is cached
        self.reference = None

    # ------------------------------------------------------------------ steps
    def dpo_outputs(self, batch: PreferenceBatch, split: str) -> DPOOutput:
        """Policy forward on the ``2B`` sequences and the DPO loss terms per pair."""
        B = batch.num_pairs
        logps = self.sequence_logps(self.policy, batch)  # (2B,)
        ref = self._reference_logps(batch, split)
        return dpo_loss(
            logps[:B], logps[B:], ref[:B], ref[B:], beta=self.beta, loss_type=self.loss_type,
            label_smoothing=self.label_smoothing,
        )

    def training_step(self, batch: PreferenceBatch, batch_idx: int) -> torch.Tensor:
        self.policy.train()
        B = batch.num_pairs
        chunks = self.micro_batches(B)
        total = torch.zeros((), device=self.device)
        hs, chosen, rejected = [], [], []
        for i, (s, e) in enumerate(chunks):
            out = self.dpo_outputs(batch.slice(s, e), "train")
            loss = out.losses.sum() / B
            self.backward_micro(loss, sync=i == len(chunks) - 1)
            total += loss.detach()
            hs.append(out.logits.detach())
            chosen.append(out.chosen_rewards)
            rejected.append(out.rejected_rewards)
        grad_norm = self.optimizer_update(total)  # skips (or stops on) a non-finite loss / gradient
        self.iteration += 1
        h, cr, rr = torch.cat(hs), torch.cat(chosen), torch.cat(rejected)
        if self.is_logging_step():
            acc = (h > 0).float().mean()
            self.log_train_step(
                {
                    "train/loss": total,
                    "train/reward_accuracy": acc,
                    "train/chosen_reward": cr.mean(),
                    "train/rejected_reward": rr.mean(),
                    "train/margin": (cr - rr).mean(),
                    "train/grad_norm": grad_norm,
                    "train/lr": self.current_lr(),
                },
                {"loss": total, "acc": acc}, batch_size=B,
            )
        return total

    def validation_step(self, batch: PreferenceBatch, batch_idx: int) -> None:
        out = self.dpo_outputs(batch, "val")
        self.val_metrics.update(out.logits, batch.domain_ids)
        self.log("val/loss", out.losses.mean(), batch_size=batch.num_pairs, sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        if self.val_metrics is None:
            return
        metrics = self.val_metrics.compute_and_reset()
        self.log_dict(metrics)
        self.log("val_acc", metrics["val/accuracy"], prog_bar=True, logger=False)
