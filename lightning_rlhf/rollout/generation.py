"""Response generation for rollouts: a small pluggable ``Generator`` interface and an HF ``generate`` backend.

Contract of every generator: prompts come LEFT-padded (so all responses start at the same column ``P``);
the output response is cut at the first EOS, which is kept and included in ``action_mask``; every position
after it holds ``pad_token_id`` and has ``action_mask`` 0. Generation runs without gradients and with the model
in eval mode (dropout off); the previous train/eval mode is restored afterwards.

Seeding: HF sampling draws from the global torch RNG. ``HFGenerator`` samples inside
``torch.random.fork_rng`` after seeding the forked RNG with a per-call seed, so (1) the samples depend only on
that seed, not on whatever consumed the global RNG before, and (2) the global RNG stream (dropout, data
shuffling) is left exactly as it was. The per-call seed is ``generate(..., seed=...)`` when given (the PPO module
passes one derived from its base seed, the iteration and the rank, so a resumed run samples the same); else it is
derived from the constructor ``seed``, the rank and an internal call counter; with neither, the global RNG is
used as is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Protocol, Sequence, Union, runtime_checkable

import torch


@dataclass
class GenerationOutput:
    """What a generator returns.

    Attributes:
        sequences: ``(B, P+R)`` left-padded prompts followed by responses (pad after the first EOS).
        attention_mask: ``(B, P+R)`` prompt attention mask followed by ``action_mask``.
        action_mask: ``(B, R)`` 1 on response tokens up to and including the first EOS.
        prompt_length: ``P``.
        stopped_by_eos: ``(B,)`` bool, True where the response contains an EOS (False: it hit the length cap).
        logprobs: ``(B, R)`` log-probs of the sampled tokens under ``softmax(logits / temperature)`` (0 on padding),
            when the backend records them (:class:`~lightning_rlhf.rollout.engine.StaticCacheGenerator` does;
            ``HFGenerator`` does not), else ``None``.
    """

    sequences: torch.Tensor  # (B, P+R)
    attention_mask: torch.Tensor  # (B, P+R)
    action_mask: torch.Tensor  # (B, R)
    prompt_length: int
    stopped_by_eos: torch.Tensor  # (B,) bool
    logprobs: Optional[torch.Tensor] = None  # (B, R)


@runtime_checkable
class Generator(Protocol):
    """Anything that samples responses for a batch of left-padded prompts."""

    def generate(
        self, model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, seed: Optional[int] = None
    ) -> GenerationOutput:
        """Sample responses.

        Args:
            model: the policy (a HF causal LM or anything the backend understands).
            input_ids: ``(B, P)`` left-padded prompt ids.
            attention_mask: ``(B, P)`` prompt mask.
            seed: per-call sampling seed (the PPO module passes one per iteration and rank); ``None``: backend's choice.

        Returns:
            :class:`GenerationOutput`.
        """
        ...


def response_lengths(action_mask: torch.Tensor) -> torch.Tensor:
    """Number of response tokens (EOS included) per row.

    Args:
        action_mask: ``(B, R)``.

    Returns:
        ``(B,)`` long.
    """
    return action_mask.long().sum(-1)


def truncate_at_eos(
    responses: torch.Tensor, eos_token_id: Union[int, Sequence[int]], pad_token_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cut each response after its first EOS: mask and pad everything after it.

    Args:
        responses: ``(B, R)`` generated token ids.
        eos_token_id: one EOS id or several.
        pad_token_id: id written after the first EOS.

    Returns:
        ``(responses, action_mask, stopped_by_eos)``: ``(B, R)`` ids with pad after the first EOS,
        ``(B, R)`` long mask (1 up to and including the first EOS; all 1 when there is none), ``(B,)`` bool.
    """
    eos_ids = torch.as_tensor(
        [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id), device=responses.device
    )
    is_eos = torch.isin(responses, eos_ids)  # (B, R)
    # number of EOS strictly before position t; a token is kept while no EOS came before it
    eos_before = torch.cumsum(is_eos.long(), dim=-1) - is_eos.long()  # (B, R)
    action_mask = (eos_before == 0).long()  # (B, R)
    responses = torch.where(action_mask.bool(), responses, torch.full_like(responses, pad_token_id))
    return responses, action_mask, is_eos.any(dim=-1)


def _current_rank() -> int:
    """Global rank from ``torch.distributed`` (0 when not initialised)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return 0


class SamplingSettings:
    """What every generator shares: the sampling arguments (validated), EOS / pad resolution and per-call seeds.

    Args: see :class:`HFGenerator`.
    """

    def __init__(
        self,
        max_new_tokens: int = 32,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        do_sample: bool = True,
        eos_token_id: Optional[Union[int, list[int]]] = None,
        pad_token_id: Optional[int] = None,
        seed: Optional[int] = None,
        pad_to_max_new_tokens: bool = False,
        synced_gpus: bool = False,
    ) -> None:
        name = type(self).__name__
        if max_new_tokens <= 0:
            raise ValueError(f"{name}: max_new_tokens must be positive, got {max_new_tokens}")
        if do_sample and temperature <= 0:
            raise ValueError(f"{name}: temperature must be > 0 for sampling, got {temperature}")
        if not 0 < top_p <= 1:
            raise ValueError(f"{name}: top_p must be in (0, 1], got {top_p}")
        if top_k < 0:
            raise ValueError(f"{name}: top_k must be >= 0, got {top_k}")
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_p = top_p
        self.top_k = top_k
        self.do_sample = do_sample
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id
        self.seed = seed
        self.pad_to_max_new_tokens = pad_to_max_new_tokens
        self.synced_gpus = synced_gpus
        self._calls = 0

    def resolve_eos_pad(self, model: torch.nn.Module) -> tuple[list[int], int]:
        """``(EOS ids, pad id)``: the given ones, else the model's generation config / config; pad defaults to the
        first EOS id."""
        eos = self.eos_token_id
        if eos is None:
            eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
            if eos is None:
                eos = getattr(getattr(model, "config", None), "eos_token_id", None)
        if eos is None:
            raise ValueError(f"{type(self).__name__}: no eos_token_id given and the model config has none")
        eos_list = [int(eos)] if isinstance(eos, int) else [int(e) for e in eos]
        pad = self.pad_token_id if self.pad_token_id is not None else eos_list[0]
        return eos_list, int(pad)

    def _call_seed(self, seed: Optional[int]) -> Optional[int]:
        """The seed of this call: the explicit one, else derived from (base seed, rank, call index)."""
        if seed is not None:
            return int(seed)
        if self.seed is None:
            return None
        return (self.seed * 1_000_003 + _current_rank() * 7_919 + self._calls) % (2**63 - 1)


class HFGenerator(SamplingSettings):
    """Sampling with ``transformers``' ``model.generate`` (KV cache on, left-padded prompts).

    Args:
        max_new_tokens: response length cap ``R``.
        temperature: sampling temperature (the policy's log-probs must then be computed on ``logits / temperature``).
        top_p: nucleus sampling; 1.0 samples from the full distribution (what PPO's ratio assumes).
        top_k: top-k sampling; 0 disables it (HF's own default would be 50).
        do_sample: False for greedy decoding.
        eos_token_id: EOS id(s); generation of a row stops at its first EOS.
        pad_token_id: id written after EOS (may equal ``eos_token_id``).
        seed: base seed for per-rank reproducible sampling (see module docstring); ``None`` uses the global RNG.
        pad_to_max_new_tokens: pad responses to exactly ``max_new_tokens`` columns (fixed shapes for
            compiled / sharded scoring passes); otherwise ``R`` is the longest response of the batch.
        synced_gpus: forward to HF ``generate`` (needed by FSDP / ZeRO-3 so all ranks run the same number of
            forward passes).
    """

    def _generation_kwargs(self, model: torch.nn.Module) -> tuple[dict, list[int], int]:
        """``(generate kwargs, eos ids, pad id)``; a full ``GenerationConfig`` overrides the model's defaults."""
        from transformers import GenerationConfig

        eos, pad = self.resolve_eos_pad(model)
        cfg: dict = dict(
            max_new_tokens=self.max_new_tokens,
            min_new_tokens=0,
            do_sample=self.do_sample,
            eos_token_id=eos[0] if len(eos) == 1 else eos,
            pad_token_id=pad,
            use_cache=True,
            num_beams=1,
            repetition_penalty=1.0,  # explicit: a model's own generation_config must not change the policy
            num_return_sequences=1,
        )
        if self.do_sample:
            cfg.update(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)
        return dict(generation_config=GenerationConfig(**cfg), synced_gpus=self.synced_gpus), eos, pad

    @torch.no_grad()
    def generate(
        self,
        model: torch.nn.Module,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        seed: Optional[int] = None,
    ) -> GenerationOutput:
        """Sample one response per left-padded prompt.

        Args:
            model: a HF causal LM (unwrapped from DDP; ``model.generate`` must exist).
            input_ids: ``(B, P)`` left-padded prompt ids.
            attention_mask: ``(B, P)`` prompt mask; its last column must be all ones (left padding).
            seed: per-call seed (overrides the derived one).

        Returns:
            :class:`GenerationOutput`.
        """
        if attention_mask.shape[1] and not bool(attention_mask[:, -1].all()):
            raise ValueError("HFGenerator.generate: prompts must be LEFT-padded (attention_mask[:, -1] has zeros)")
        kwargs, eos, pad = self._generation_kwargs(model)
        call_seed = self._call_seed(seed)
        self._calls += 1
        was_training = model.training
        model.eval()
        try:
            device = input_ids.device
            fork_devices = [device] if device.type == "cuda" else []
            with torch.random.fork_rng(devices=fork_devices, enabled=call_seed is not None):
                if call_seed is not None:
                    torch.default_generator.manual_seed(call_seed)
                    if device.type == "cuda":
                        with torch.cuda.device(device):
                            torch.cuda.manual_seed(call_seed)
                out = model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        finally:
            model.train(was_training)
        sequences = out if isinstance(out, torch.Tensor) else out.sequences  # (B, P+R')
        P = input_ids.shape[1]
        responses, action_mask, stopped = truncate_at_eos(sequences[:, P:], eos, pad)  # (B, R')
        if self.pad_to_max_new_tokens and responses.shape[1] < self.max_new_tokens:
            extra = self.max_new_tokens - responses.shape[1]
            responses = torch.nn.functional.pad(responses, (0, extra), value=pad)
            action_mask = torch.nn.functional.pad(action_mask, (0, extra), value=0)
        sequences = torch.cat([input_ids, responses], dim=1)  # (B, P+R)
        full_mask = torch.cat([attention_mask.long(), action_mask], dim=1)  # (B, P+R)
        return GenerationOutput(sequences, full_mask, action_mask, P, stopped)
