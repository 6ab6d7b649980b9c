"""The ``Experience`` container: one rollout batch, flowing from generation through scoring to the PPO loss.

Shapes: ``B`` sequences, ``P`` prompt length (left-padded), ``R`` response length (right-padded after EOS).
Response-aligned fields ``(B, R)`` line up with ``sequences[:, P:]``: entry ``t`` concerns response token ``t``
(scored by the logits at sequence position ``P + t - 1``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional, Sequence, Union

import torch


def _index_value(value: Any, index: torch.Tensor, batch_size: int) -> Any:
    """Select rows ``index`` of a per-sample value; values that are not per-sample are returned as they are."""
    if isinstance(value, torch.Tensor):
        if value.ndim > 0 and value.shape[0] == batch_size:
            return value[index.to(value.device)]
        return value
    if isinstance(value, (list, tuple)) and len(value) == batch_size:
        picked = [value[i] for i in index.tolist()]
        return type(value)(picked) if isinstance(value, tuple) else picked
    return value


def _cat_values(values: Sequence[Any]) -> Any:
    """Concatenate per-sample values of several experiences along the batch dimension."""
    first = values[0]
    if isinstance(first, torch.Tensor) and first.ndim > 0:
        return torch.cat(list(values), dim=0)
    if isinstance(first, list):
        return [item for v in values for item in v]
    if isinstance(first, tuple):
        return tuple(item for v in values for item in v)
    return first


@dataclass
class Experience:
    """One rollout batch with everything the PPO update needs (OpenRLHF-style named container).

    Attributes:
        sequences: ``(B, P+R)`` prompt (left-padded) followed by the response (pad after EOS).
        attention_mask: ``(B, P+R)`` 1 on real prompt tokens and on response tokens up to the first EOS.
        action_mask: ``(B, R)`` 1 on response tokens up to and including the first EOS.
        prompt_length: ``P``, the (padded) prompt width; the response starts at ``sequences[:, P]``.
        logprobs: ``(B, R)`` log-probs of the response tokens under the rollout (old) policy.
        ref_logprobs: ``(B, R)`` the same under the frozen reference model.
        values: ``(B, R)`` critic values from the rollout (old values).
        scores: ``(B,)`` raw sequence scores from the reward source.
        shaped_scores: ``(B,)`` scores after the transform hook, normalisation and the no-EOS penalty.
        kl_coef: ``(B,)`` per-sample KL coefficients ``eta_i``.
        kl: ``(B, R)`` per-token KL estimate ``kl_t`` used in the rewards (0 off the mask).
        rewards: ``(B, R)`` per-token rewards ``r_t``.
        advantages: ``(B, R)`` (whitened) GAE advantages.
        returns: ``(B, R)`` GAE returns (value targets).
        extras: per-prompt fields carried from the data (prompt ids, domains, texts...). Per-sample entries
            (tensors with first dim ``B``, lists/tuples of length ``B``) are sliced with the batch; other
            entries are copied as they are.
    """

    sequences: torch.Tensor  # (B, P+R)
    attention_mask: torch.Tensor  # (B, P+R)
    action_mask: torch.Tensor  # (B, R)
    prompt_length: int  # P
    logprobs: Optional[torch.Tensor] = None  # (B, R) old
    ref_logprobs: Optional[torch.Tensor] = None  # (B, R)
    values: Optional[torch.Tensor] = None  # (B, R)
    scores: Optional[torch.Tensor] = None  # (B,) raw
    shaped_scores: Optional[torch.Tensor] = None  # (B,)
    kl_coef: Optional[torch.Tensor] = None  # (B,)
    kl: Optional[torch.Tensor] = None  # (B, R)
    rewards: Optional[torch.Tensor] = None  # (B, R)
    advantages: Optional[torch.Tensor] = None  # (B, R)
    returns: Optional[torch.Tensor] = None  # (B, R)
    extras: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        """Number of sequences ``B``."""
        return int(self.sequences.shape[0])

    @property
    def response_length(self) -> int:
        """``R``, the (padded) response width."""
        return int(self.sequences.shape[1]) - self.prompt_length

    @property
    def responses(self) -> torch.Tensor:
        """``(B, R)`` the response token ids (a view of ``sequences``)."""
        return self.sequences[:, self.prompt_length :]

    @property
    def device(self) -> torch.device:
        """Device of ``sequences``."""
        return self.sequences.device

    def select(self, index: Union[torch.Tensor, Sequence[int], slice]) -> "Experience":
        """A new ``Experience`` with the rows ``index`` of every per-sample field (extras included).

        Args:
            index: row indices (long tensor or list) or a slice.

        Returns:
            The sliced experience; tensors are indexed copies, non-per-sample extras are shared.
        """
        B = len(self)
        if isinstance(index, slice):
            index = torch.arange(B)[index]
        index = torch.as_tensor(index, dtype=torch.long)
        kwargs: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "extras":
                kwargs["extras"] = {k: _index_value(v, index, B) for k, v in value.items()}
            else:
                kwargs[f.name] = _index_value(value, index, B)
        return Experience(**kwargs)

    def minibatches(
        self,
        size: int,
        shuffle: bool = True,
        generator: Optional[torch.Generator] = None,
        drop_last: bool = False,
    ) -> Iterator["Experience"]:
        """Split into minibatches of ``size`` rows (the last one may be smaller unless ``drop_last``).

        Args:
            size: rows per minibatch.
            shuffle: draw a random permutation first (with ``generator``, a CPU ``torch.Generator``, for
                reproducibility); otherwise keep the order.
            generator: random source for the permutation.
            drop_last: skip a final smaller minibatch.

        Yields:
            ``Experience`` slices with every tensor field and per-sample extra sliced consistently.
        """
        if size <= 0:
            raise ValueError(f"minibatches: size must be positive, got {size}")
        B = len(self)
        order = torch.randperm(B, generator=generator) if shuffle else torch.arange(B)
        for start in range(0, B, size):
            index = order[start : start + size]
            if drop_last and len(index) < size:
                return
            yield self.select(index)

    def to(self, device: Union[torch.device, str]) -> "Experience":
        """A copy with every tensor (fields and extras) moved to ``device``."""
        kwargs: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "extras":
                kwargs["extras"] = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in value.items()}
            else:
                kwargs[f.name] = value.to(device) if isinstance(value, torch.Tensor) else value
        return Experience(**kwargs)

    @staticmethod
    def cat(experiences: Sequence["Experience"], pad_token_id: int = 0) -> "Experience":
        """Concatenate experiences along the batch dimension (e.g. rollout micro-batches).

        Experiences with different prompt or response widths are padded first: prompts on the left with
        ``pad_token_id`` (mask 0), responses on the right (pad token, mask 0, response fields 0).

        Args:
            experiences: a non-empty sequence of experiences with the same fields set.
            pad_token_id: token used to pad ``sequences``.

        Returns:
            One ``Experience`` of ``sum(len(e))`` rows.
        """
        if not experiences:
            raise ValueError("Experience.cat: nothing to concatenate")
        P = max(e.prompt_length for e in experiences)
        R = max(e.response_length for e in experiences)
        padded = [e._pad_to(P, R, pad_token_id) for e in experiences]
        kwargs: dict[str, Any] = {}
        for f in dataclasses.fields(Experience):
            values = [getattr(e, f.name) for e in padded]
            if f.name == "extras":
                kwargs["extras"] = {k: _cat_values([v[k] for v in values]) for k in values[0]}
            elif f.name == "prompt_length":
                kwargs[f.name] = P
            elif values[0] is None:
                kwargs[f.name] = None
            else:
                kwargs[f.name] = _cat_values(values)
        return Experience(**kwargs)

    def _pad_to(self, prompt_length: int, response_length: int, pad_token_id: int) -> "Experience":
        """Pad the prompt on the left and the response on the right to the given widths."""
        left = prompt_length - self.prompt_length
        right = response_length - self.response_length
        if left == 0 and right == 0:
            return self
        pad2 = torch.nn.functional.pad
        kwargs: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "sequences":
                value = pad2(value, (left, right), value=pad_token_id)
            elif f.name == "attention_mask":
                value = pad2(value, (left, right), value=0)
            elif f.name == "prompt_length":
                value = prompt_length
            elif isinstance(value, torch.Tensor) and value.ndim == 2 and f.name != "extras":
                value = pad2(value, (0, right), value=0)  # response-aligned (B, R) fields
            kwargs[f.name] = value
        return Experience(**kwargs)
