"""Scalar-head models: reward models (one score per sequence) and critics (one value per token).

Both wrap a Hugging Face ``AutoModelForSequenceClassification`` with ``num_labels=1``. For decoder backbones
(Llama, GPT-2, Qwen, ... which expose a per-token linear ``score`` head) the head is applied to every position
with padding-independent position ids, and the sequence score is read where transformers reads it (the last real
token that is not the pad id, :func:`~lightning_rlhf.rollout.scoring.score_token_index`): left and right padding give
the same score, and an exported reward model scores the same under plain transformers or TRL, also when the pad id
equals the eos id. Loading a
causal-LM checkpoint (e.g. an SFT export) this way gives "a causal LM with a linear value head": the trunk is
reused and a fresh head is initialised. Encoder backbones with their own pooling (BERT-style ``classifier``)
return their pooled logit.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lightning_rlhf.models.factory import DType, resolve_pretrained, torch_dtype
from lightning_rlhf.packing import PackedSequences, has_padding, pack_sequences, packed_score_index
from lightning_rlhf.rollout.scoring import position_ids_from_attention_mask, score_token_index


class ScalarHeadModel(nn.Module):
    """A sequence-classification model used as a reward model or critic.

    Args:
        hf_model: An ``AutoModelForSequenceClassification`` instance with ``num_labels == 1``.
    """

    def __init__(self, hf_model: nn.Module) -> None:
        super().__init__()
        if getattr(hf_model.config, "num_labels", 1) != 1:
            raise ValueError(f"A reward model needs num_labels=1, got {hf_model.config.num_labels}.")
        self.hf_model = hf_model
        self.per_token = hasattr(hf_model, "score") and hasattr(hf_model, hf_model.base_model_prefix)

    @property
    def config(self) -> Any:
        return self.hf_model.config

    def _trunk(self) -> nn.Module:
        return getattr(self.hf_model, self.hf_model.base_model_prefix)

    def token_values(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, return_hidden: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Per-token scalar outputs.

        Args:
            input_ids: ``(B, T)``.
            attention_mask: ``(B, T)``.
            return_hidden: Also return the trunk's last hidden states ``(B, T, H)``.

        Returns:
            ``(B, T)`` float32 values (float64 for a float64 model), and the hidden states when asked.
        """
        if not self.per_token:
            raise TypeError(
                f"{type(self.hf_model).__name__} pools internally and has no per-token head; "
                "use a decoder backbone (it exposes `score`) for a critic."
            )
        out = self._trunk()(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids_from_attention_mask(attention_mask),
            use_cache=False,
        )
        hidden = out[0]  # (B, T, H)
        values = _at_least_float32(self.hf_model.score(hidden).squeeze(-1))  # (B, T)
        return (values, hidden) if return_hidden else values

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        padding_free: bool = False,
        row_length: int | None = None,
    ) -> torch.Tensor:
        """Sequence scores read at the last real token that is not the pad id (transformers' convention).

        Args:
            input_ids: ``(B, T)``, left or right padded.
            attention_mask: ``(B, T)``.
            padding_free: Run the trunk once over the ``B`` sequences laid end to end in one row without padding
                (:func:`~lightning_rlhf.packing.pack_sequences`: position ids restart per sequence and transformers'
                packed-sequence masks keep the sequences apart) and apply the head only at each sequence's score
                token. Same scores as the padded batch up to float rounding; decoder backbones only. A batch without
                padding runs the plain forward pass.
            row_length: With ``padding_free``: most tokens per packed row (``None``: the longest sequence of the
                batch, so no row costs more attention than a padded one; ``0``: one row for the whole batch).

        Returns:
            ``(B,)`` float32 scores (float64 for a float64 model).
        """
        if not self.per_token:
            if padding_free:
                raise TypeError(f"{type(self.hf_model).__name__} pools internally: padding_free needs a decoder "
                                "backbone (one that exposes a per-token `score` head)")
            return _at_least_float32(self.hf_model(input_ids=input_ids, attention_mask=attention_mask).logits[:, 0])
        if padding_free and has_padding(attention_mask):
            return self.packed_scores(input_ids, attention_mask, row_length=row_length)[0]
        return self.read_scores(self.token_values(input_ids, attention_mask), input_ids, attention_mask)

    def packed_scores(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        loss_mask: torch.Tensor | None = None,
        row_length: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, PackedSequences]:
        """Scores of a padded batch computed padding-free (see :meth:`forward`), with the trunk's packed hidden states.

        Args:
            input_ids: ``(B, L)``, left or right padded.
            attention_mask: ``(B, L)``.
            loss_mask: ``(B, L)`` carried into the packed batch (for an LM loss on the hidden states); default zeros.
            row_length: Most tokens per packed row (``None``: the batch's longest sequence; ``0``: one row).

        Returns:
            ``(B,)`` scores, the ``(R, T, H)`` hidden states of the packed rows and the
            :class:`~lightning_rlhf.packing.PackedSequences` they belong to.
        """
        if loss_mask is None:
            loss_mask = torch.zeros_like(attention_mask)
        packed = pack_sequences(input_ids, attention_mask, loss_mask,
                                row_length=None if row_length == 0 else (row_length or 1))
        hidden = self._trunk()(input_ids=packed.input_ids, position_ids=packed.position_ids, use_cache=False)[0]
        idx = packed_score_index(input_ids, attention_mask, getattr(self.config, "pad_token_id", None), packed)
        picked = hidden.reshape(-1, hidden.shape[-1])[idx]  # (B, H) each sequence's score token
        scores = _at_least_float32(self.hf_model.score(picked).squeeze(-1))  # (B,)
        return scores, hidden, packed

    def read_scores(self, values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``(B,)`` sequence scores from per-token ``values`` ``(B, T)``, read at :func:`score_token_index`."""
        idx = score_token_index(input_ids, attention_mask, getattr(self.config, "pad_token_id", None))
        return values.gather(1, idx[:, None]).squeeze(1)

    def save_pretrained(self, directory: str, **kwargs: Any) -> None:
        """Save as a plain Hugging Face sequence-classification folder."""
        self.hf_model.save_pretrained(directory, **kwargs)


def _at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """16-bit outputs as float32; float32 and float64 ones (exactness tests) unchanged."""
    return x if x.dtype == torch.float64 else x.float()


def load_scalar_model(
    name_or_path: str,
    dtype: DType = "float32",
    gradient_checkpointing: bool = False,
    trust_remote_code: bool = False,
    pad_token_id: int | None = None,
) -> ScalarHeadModel:
    """Load a reward model / critic with ``AutoModelForSequenceClassification.from_pretrained(num_labels=1)``.

    Args:
        name_or_path: A reward-model folder exported by ``RewardModelModule``, any HF sequence-classification model,
            or a causal-LM checkpoint (a new linear head is initialised on its trunk).
        dtype: Parameter dtype.
        gradient_checkpointing: Enable activation checkpointing in the trunk.
        trust_remote_code: Allow repository code (off by default).
        pad_token_id: Written into the config when it has none (HF classification heads require one).
    """
    from transformers import AutoModelForSequenceClassification

    import transformers

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # "newly initialized score weights" is expected here
    try:
        hf_model = AutoModelForSequenceClassification.from_pretrained(
            resolve_pretrained(name_or_path),
            num_labels=1,
            dtype=torch_dtype(dtype),
            trust_remote_code=trust_remote_code,
        )
    finally:
        transformers.logging.set_verbosity(verbosity)
    if hf_model.config.pad_token_id is None and pad_token_id is not None:
        hf_model.config.pad_token_id = pad_token_id
    if gradient_checkpointing:
        hf_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return ScalarHeadModel(hf_model)
