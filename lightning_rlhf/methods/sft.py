"""Supervised fine-tuning on demonstrations (spec 1.1)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torchmetrics.text import Perplexity

from lightning_rlhf.data.batches import TokenBatch
from lightning_rlhf.losses.sft import masked_nll_sum
from lightning_rlhf.methods.base import RLHFModule
from lightning_rlhf.models.factory import load_causal_lm


class SFTModule(RLHFModule):
    """Token-level cross-entropy on response tokens only (prompt and padding masked).

    Logged: ``train/loss`` (token-mean NLL), ``train/grad_norm``, ``train/lr``, ``train/tokens``; on validation,
    ``val/loss`` and ``val/perplexity`` of the responses (torchmetrics ``Perplexity``).

    Args:
        model_name_or_path: Model to fine-tune: hub id, local folder, or ``builtin:tiny-llama``.
        micro_batch_size: Sequences per micro-batch (gradient accumulation inside a step).
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
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

    def training_step(self, batch: TokenBatch, batch_idx: int) -> torch.Tensor:
        self.policy.train()
        # tokens per rank averaged over ranks: the loss is then the token mean over all ranks' sequences under DDP
        num_tokens = self.mean_over_ranks(batch.loss_mask[:, 1:].sum()).clamp(min=1)
        chunks = self.micro_batches(len(batch))
        total = torch.zeros((), device=self.device)
        for i, (s, e) in enumerate(chunks):
            mb = batch.slice(s, e)
            logits = self.lm_forward(self.policy, mb.input_ids, mb.attention_mask)
            nll, _ = masked_nll_sum(logits, mb.input_ids, mb.loss_mask)
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
        logits = self.lm_forward(self.policy, batch.input_ids, batch.attention_mask)
        nll, n = masked_nll_sum(logits, batch.input_ids, batch.loss_mask)
        target = batch.input_ids[:, 1:].masked_fill(batch.loss_mask[:, 1:] == 0, -100)
        self.val_perplexity.update(logits[:, :-1].float(), target)
        self.log("val/loss", nll / n.clamp(min=1), batch_size=len(batch), sync_dist=True)
        self.log("val/perplexity", self.val_perplexity, prog_bar=True, batch_size=len(batch))
