"""Bradley-Terry reward model (spec 1.2)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lightning_rlhf.data.batches import PreferenceBatch
from lightning_rlhf.losses.preference import bradley_terry_loss, reward_centering_loss
from lightning_rlhf.losses.sft import masked_nll_sum
from lightning_rlhf.methods.base import RLHFModule
from lightning_rlhf.methods.preference_metrics import PairwiseMetrics
from lightning_rlhf.models.value import ScalarHeadModel, load_scalar_model
from lightning_rlhf.packing import has_padding, packed_sequences_supported, packed_token_nll


class RewardModelModule(RLHFModule):
    """Trains ``r_phi(x, y)`` with ``L = mean BT + lm_coef * NLL(y_w) + center_coef * mean (r_w + r_l)^2``.

    The backbone is any ``AutoModelForSequenceClassification`` (``num_labels=1``) or a causal LM, which gets a
    linear value head; the score is read at the last non-pad token. The exported folder loads with
    ``AutoModelForSequenceClassification.from_pretrained`` and is what PPO's ``reward_model`` takes.

    Logged: ``train/loss``, ``train/accuracy``, ``train/margin``, ``train/score_mean``, ``train/score_std``; on
    validation ``val/accuracy``, ``val/margin`` and ``val/accuracy/<domain>`` for every domain in the data.

    Args:
        model_name_or_path: Backbone: a reward-model folder, a sequence-classification model, or a causal LM
            (e.g. an SFT export, or ``builtin:tiny-llama``).
        center_coef: Weight of the score-centering penalty ``(r_w + r_l)^2``.
        lm_coef: Weight of the LM loss on the chosen response (needs a backbone whose input embeddings are tied to
            its output layer, so the LM head is available).
        padding_free: Score each micro-batch's ``2B`` sequences without padding: they are laid end to end in packed
            rows whose position ids restart per sequence (transformers' packed-sequence masks keep them apart), and
            each score is read at its sequence's last token. Same loss and gradients as the padded batch up to float
            rounding (tests/test_packing.py). A micro-batch without padding runs the plain forward pass. Needs a decoder backbone (per-token ``score`` head), a transformers
            version with packed-sequence masks (checked at start) and an attention implementation that honours them
            (``sdpa``, ``eager``, ``flash_attention_2``).
        pack_row_length: With ``padding_free``: most tokens per packed row. ``null`` = the micro-batch's longest
            sequence (rows filled first-fit decreasing: no row costs more attention than a padded row, which matters
            for ``sdpa``/``eager``, whose packed-row attention is dense); ``0`` = one row holding the whole
            micro-batch (for ``flash_attention_2``, which attends per sequence).
        micro_batch_size: Pairs per micro-batch (gradient accumulation inside a step).
    """

    def __init__(
        self,
        center_coef: float = 0.0,
        lm_coef: float = 0.0,
        padding_free: bool = False,
        pack_row_length: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if center_coef < 0 or lm_coef < 0:
            raise ValueError("model.center_coef and model.lm_coef must be >= 0")
        if padding_free and not packed_sequences_supported():
            raise ValueError("model.padding_free needs a transformers version with packed-sequence attention masks "
                             "(transformers.masking_utils.find_packed_sequence_indices); upgrade transformers or set "
                             "model.padding_free: false")
        if pack_row_length is not None and pack_row_length < 0:
            raise ValueError(f"model.pack_row_length must be >= 0 or null, got {pack_row_length}")
        self.center_coef = center_coef
        self.lm_coef = lm_coef
        self.padding_free = padding_free
        self.pack_row_length = pack_row_length
        self.save_hyperparameters()
        self.val_metrics: PairwiseMetrics | None = None

    def build_models(self) -> None:
        self.reward_model: ScalarHeadModel = load_scalar_model(
            self.model_name_or_path,
            dtype=self.dtype_name,
            gradient_checkpointing=self.gradient_checkpointing,
            trust_remote_code=self.trust_remote_code,
            pad_token_id=self.tokenizer.pad_token_id,
        ).train()
        if self.lm_coef > 0 and not (
            self.reward_model.per_token and getattr(self.reward_model.config, "tie_word_embeddings", False)
        ):
            raise ValueError(
                "model.lm_coef > 0 needs a decoder backbone with tied input/output embeddings "
                f"({self.model_name_or_path!r} has none); set model.lm_coef: 0."
            )
        if self.padding_free and not self.reward_model.per_token:
            raise ValueError(f"model.padding_free needs a decoder backbone with a per-token score head; "
                             f"{type(self.reward_model.hf_model).__name__} pools internally. Set model.padding_free: "
                             "false.")

    def setup(self, stage: str) -> None:
        super().setup(stage)  # strategy checks
        self.val_metrics = PairwiseMetrics(self.domain_names(), prefix="val")

    def export_model(self) -> nn.Module:
        return self.reward_model

    def score_sequences(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``(N,)`` scores of ``(N, T)`` padded sequences, read at each one's last non-pad token; computed padding-free
        when ``model.padding_free`` (every scoring pass of this module and of MetaRM goes through here)."""
        return self.reward_model(input_ids, attention_mask, padding_free=self.padding_free,
                                 row_length=self.pack_row_length)

    def score_pairs(self, batch: PreferenceBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Scores of chosen ``(B,)`` and rejected ``(B,)`` responses, and the chosen token-mean NLL when
        ``lm_coef > 0``."""
        B = batch.num_pairs
        if self.lm_coef > 0 and self.padding_free and has_padding(batch.attention_mask):
            chosen_only = batch.loss_mask.clone()
            chosen_only[B:] = 0
            scores, hidden, packed = self.reward_model.packed_scores(batch.input_ids, batch.attention_mask,
                                                                     chosen_only, row_length=self.pack_row_length)
            emb = self.reward_model.hf_model.get_input_embeddings().weight
            nll, n = packed_token_nll(hidden @ emb.T, packed)  # rejected rows carry no loss tokens
            return scores[:B], scores[B:], nll / n.clamp(min=1)
        if self.lm_coef > 0:
            values, hidden = self.reward_model.token_values(batch.input_ids, batch.attention_mask, return_hidden=True)
            scores = self.reward_model.read_scores(values, batch.input_ids, batch.attention_mask)
            emb = self.reward_model.hf_model.get_input_embeddings().weight
            logits = hidden[:B] @ emb.T
            nll, n = masked_nll_sum(logits, batch.input_ids[:B], batch.loss_mask[:B])
            return scores[:B], scores[B:], nll / n.clamp(min=1)
        scores = self.score_sequences(batch.input_ids, batch.attention_mask)
        return scores[:B], scores[B:], None

    def preference_backward(self, batch: PreferenceBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Forward and backward of ``L`` over the micro-batches of ``batch`` (DDP all-reduce on the last one only).

        Leaves ``dL/dtheta`` (at the current parameters) in ``.grad`` and steps nothing. Returns the detached loss
        ``()`` and the chosen and rejected scores ``(B,)`` each."""
        B = batch.num_pairs
        chunks = self.micro_batches(B)
        total = torch.zeros((), device=self.device)
        chosen_all, rejected_all = [], []
        for i, (s, e) in enumerate(chunks):
            r_w, r_l, nll = self.score_pairs(batch.slice(s, e))
            loss = bradley_terry_loss(r_w, r_l).sum() / B
            if self.center_coef:
                loss = loss + self.center_coef * reward_centering_loss(r_w, r_l).sum() / B
            if nll is not None:
                loss = loss + self.lm_coef * nll * (e - s) / B
            self.backward_micro(loss, sync=i == len(chunks) - 1)
            total += loss.detach()
            chosen_all.append(r_w.detach())
            rejected_all.append(r_l.detach())
        return total, torch.cat(chosen_all), torch.cat(rejected_all)

    def train_metrics(
        self, total: torch.Tensor, r_w: torch.Tensor, r_l: torch.Tensor, grad_norm: torch.Tensor
    ) -> dict[str, torch.Tensor | float]:
        """The per-step metrics logged by :meth:`training_step`."""
        scores = torch.cat([r_w, r_l])
        return {
            "train/loss": total,
            "train/accuracy": (r_w > r_l).float().mean(),
            "train/margin": (r_w - r_l).mean(),
            "train/score_mean": scores.mean(),
            "train/score_std": scores.std(),
            "train/grad_norm": grad_norm,
            "train/lr": self.current_lr(),
        }

    def training_step(self, batch: PreferenceBatch, batch_idx: int) -> torch.Tensor:
        self.reward_model.train()
        total, r_w, r_l = self.preference_backward(batch)
        scores = torch.cat([r_w, r_l])
        grad_norm = self.optimizer_update(total, watch=scores)  # skips (or stops on) non-finite loss/rewards/grads
        self.iteration += 1
        if self.is_logging_step():
            metrics = self.train_metrics(total, r_w, r_l, grad_norm)
            self.log_train_step(metrics, {"loss": total, "acc": metrics["train/accuracy"]}, batch_size=batch.num_pairs)
        return total

    def validation_step(self, batch: PreferenceBatch, batch_idx: int) -> None:
        r_w, r_l, _ = self.score_pairs(batch) if self.lm_coef == 0 else (*self.score_pairs(batch)[:2], None)
        self.val_metrics.update(r_w - r_l, batch.domain_ids)
        self.log("val/loss", bradley_terry_loss(r_w, r_l).mean(), batch_size=batch.num_pairs, sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        if self.val_metrics is None:
            return
        metrics = self.val_metrics.compute_and_reset()
        self.log_dict(metrics, sync_dist=False)
        self.log("val_acc", metrics["val/accuracy"], prog_bar=True, logger=False)
