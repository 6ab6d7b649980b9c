"""Supervised fine-tuning on demonstrations (spec 1.1)."""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import nn
from torchmetrics.text import Perplexity

from lightning_rlhf.data.batches import TokenBatch
from lightning_rlhf.losses.sft import masked_nll_sum
from lightning_rlhf.methods.base import RLHFModule, check_choice
from lightning_rlhf.models.factory import load_causal_lm
from lightning_rlhf.packing import has_padding, pack_sequences, packed_sequences_supported, packed_token_nll

SFTPacking = Literal["none", "padding_free", "greedy"]


class SFTModule(RLHFModule):
    """Token-level cross-entropy on response tokens only (prompt and padding masked).

    Logged: ``train/loss`` (token-mean NLL), ``train/grad_norm``, ``train/lr``, ``train/tokens``; on validation,
    ``val/loss`` and ``val/perplexity`` of the responses (torchmetrics ``Perplexity``).

    Args:
        model_name_or_path: Model to fine-tune: hub id, local folder, or ``builtin:tiny-llama``.
        packing: ``none`` (padded batches); ``padding_free``: each micro-batch's sequences are laid end to end without
            padding in rows no longer than ``pack_row_length`` (position ids restart per sequence, transformers'
            packed-sequence masks keep them apart), same loss and gradients as the padded batch up to float rounding
            (a micro-batch without padding runs the plain forward pass);
            ``greedy``: the data module packs the examples (``data.packing: greedy``, rows of ``data.max_length``)
            and the model runs on its packed rows. Both need a transformers version with packed-sequence masks and an
            attention implementation that honours them (``sdpa``, ``eager``, ``flash_attention_2``).
        pack_row_length: With ``packing: padding_free``: most tokens per packed row. ``null`` = the micro-batch's
            longest sequence (first-fit decreasing: no row costs more attention than a padded row, which matters for
            ``sdpa``/``eager``, whose packed-row attention is dense); ``0`` = one row for the whole micro-batch.
        micro_batch_size: Sequences per micro-batch (rows of a packed batch) (gradient accumulation inside a step).
    """

    def __init__(self, packing: SFTPacking = "none", pack_row_length: int | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        check_choice("packing", packing, ("none", "padding_free", "greedy"))
        if packing != "none" and not packed_sequences_supported():
            raise ValueError(f"model.packing: {packing} needs a transformers version with packed-sequence attention "
                             "masks (transformers.masking_utils.find_packed_sequence_indices); upgrade transformers or "
                             "set model.packing: none")
        if pack_row_length is not None and pack_row_length < 0:
            raise ValueError(f"model.pack_row_length must be >= 0 or null, got {pack_row_length}")
        self.packing: SFTPacking = packing
        self.pack_row_length = pack_row_length
        self.save_hyperparameters()
        self.val_perplexity = Perplexity(ignore_index=-100)

    lora_targets = ("policy",)

    def build_models(self) -> None:
        self.policy = load_causal_lm(
            self.model_name_or_path,
            dtype=self.dtype_name,
            gradient_checkpointing=self.gradient_checkpointing,
            trust_remote_code=self.trust_remote_code,
            attn_implementation=self.attn_implementation,
        ).train()

    def export_model(self) -> nn.Module:
        return self.policy

    def setup(self, stage: str) -> None:
        super().setup(stage)
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        data_packing = getattr(dm, "packing", None)
        if data_packing is not None and (data_packing == "greedy") != (self.packing == "greedy"):
            raise ValueError(f"model.packing: {self.packing} and data.packing: {data_packing} disagree: greedy packing "
                             "is done by the data module and read by the model; set both to greedy, or neither.")

    def _check_batch(self, batch: TokenBatch) -> None:
        if (batch.position_ids is not None) != (self.packing == "greedy"):
            raise ValueError("SFTModule got " + ("packed rows (data.packing: greedy) but model.packing is "
                             f"{self.packing}" if batch.position_ids is not None else "padded batches but "
                             "model.packing is greedy (set data.packing: greedy)"))

    def token_logits_and_nll(self, batch: TokenBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Logits of the forward pass (``(B, T, V)``, or ``(R, T, V)`` over packed rows), and the summed NLL of the
        response tokens with their count (scalars), computed as ``model.packing`` says."""
        if batch.position_ids is not None:  # greedy rows: sequence starts carry no loss, padding sits at row ends
            logits = self.policy(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False).logits
            return (logits, *masked_nll_sum(logits, batch.input_ids, batch.loss_mask))
        if self.packing == "padding_free" and has_padding(batch.attention_mask):
            packed = pack_sequences(batch.input_ids, batch.attention_mask, batch.loss_mask,
                                    row_length=None if self.pack_row_length == 0 else (self.pack_row_length or 1))
            logits = self.policy(input_ids=packed.input_ids, position_ids=packed.position_ids, use_cache=False).logits
            return (logits, *packed_token_nll(logits, packed))
        logits = self.lm_forward(self.policy, batch.input_ids, batch.attention_mask)
        return (logits, *masked_nll_sum(logits, batch.input_ids, batch.loss_mask))

    def training_step(self, batch: TokenBatch, batch_idx: int) -> torch.Tensor:
        self.policy.train()
        self._check_batch(batch)
        # tokens per rank averaged over ranks: the loss is then the token mean over all ranks' sequences under DDP
        num_tokens = self.mean_over_ranks(batch.loss_mask[:, 1:].sum()).clamp(min=1)
        chunks = self.micro_batches(len(batch))
        total = torch.zeros((), device=self.device)
        for i, (s, e) in enumerate(chunks):
            _, nll, _ = self.token_logits_and_nll(batch.slice(s, e))
            loss = nll / num_tokens
            self.backward_micro(loss, sync=i == len(chunks) - 1)
            total += loss.detach()
        grad_norm = self.optimizer_update(total)  # skips (or stops on) a non-finite loss / gradient
        self.iteration += 1
        if self.is_logging_step():
            self.log_train_step(
                {"train/loss": total, "train/grad_norm": grad_norm, "train/lr": self.current_lr(),
                 "train/tokens": num_tokens.float()},
                {"loss": total}, batch_size=len(batch),
            )
        return total

    def validation_step(self, batch: TokenBatch, batch_idx: int) -> None:
        self._check_batch(batch)
        if self.packing == "padding_free":  # perplexity needs the padded layout: validate on the padded batch
            logits = self.lm_forward(self.policy, batch.input_ids, batch.attention_mask)
            nll, n = masked_nll_sum(logits, batch.input_ids, batch.loss_mask)
        else:
            logits, nll, n = self.token_logits_and_nll(batch)
        target = batch.input_ids[:, 1:].masked_fill(batch.loss_mask[:, 1:] == 0, -100)
        self.val_perplexity.update(logits[:, :-1].float(), target)
        self.log("val/loss", nll / n.clamp(min=1), batch_size=len(batch), sync_dist=True)
        self.log("val/perplexity", self.val_perplexity, prog_bar=True, batch_size=len(batch))
