"""A rollout engine with its own decode loop: ``StaticCacheGenerator``.

Same contract as :class:`~lightning_rlhf.rollout.generation.HFGenerator` (left-padded prompts in; responses cut at
the first EOS, padded after it), with these differences:

* **Static shapes.** The token and log-prob buffers are allocated once; with ``cache="static"`` (the default when
  compiling) so are the KV cache (``transformers.StaticCache``) and the attention mask, for ``P + max_new_tokens``
  columns. Every decode step then has the same shapes, so with ``compile=True`` the one-token step is compiled once
  per batch shape (``torch.compile``; on CUDA with ``mode="reduce-overhead"``, which replays it as a CUDA graph: no
  per-token Python or kernel-launch overhead). Uncompiled, a ``DynamicCache`` that grows by a column per step is
  faster (it attends only to the tokens so far), so ``cache="auto"`` picks it then.
* **Prompts encoded once.** One prefill over the left-padded prompts, then one token per step for every row.
* **No host syncs per token.** Sampling inverts each row's CDF with one uniform draw from a seeded
  ``torch.Generator`` on the model's device (:func:`sample_tokens`), so nothing waits on the host. Whether every row has finished is read every ``check_every`` steps only.
* **Rollout log-probs.** The output carries ``logprobs``: ``log softmax(logits / temperature)`` of each sampled token
  (the full distribution, before top-k / top-p filtering, which is what PPO's ratio uses). They equal a recomputation
  by a full forward pass up to the rounding of the incremental (cached) pass, so PPO can reuse them as its old
  log-probs (``PPOModule(reuse_rollout_logprobs=True)``) instead of a second policy forward.
* ``synced_gpus=True`` (set by the module under FSDP / ZeRO-3) keeps every rank stepping until all ranks have
  finished, so sharded parameters are gathered the same number of times everywhere.

The samples differ from ``HFGenerator``'s for the same seed (a different RNG consumption); greedy decoding gives the
same tokens (tests/test_engine.py).
"""

from __future__ import annotations

from typing import Any, Callable, Literal, Optional, Sequence, Union

import torch

from lightning_rlhf.rollout.generation import GenerationOutput, SamplingSettings, truncate_at_eos
from lightning_rlhf.rollout.scoring import position_ids_from_attention_mask

CacheKind = Literal["auto", "static", "dynamic"]


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Top-k then nucleus (top-p) filtering: removed entries become ``-inf``.

    Matches ``transformers``' ``TopKLogitsWarper`` followed by ``TopPLogitsWarper`` (with ``min_tokens_to_keep=1``):
    top-p keeps the smallest set of highest-probability tokens whose mass reaches ``top_p``.

    Args:
        logits: ``(B, V)`` (already divided by the temperature).
        top_k: keep the ``k`` largest logits; 0 keeps all.
        top_p: nucleus mass in ``(0, 1]``; 1.0 keeps all.

    Returns:
        ``(B, V)`` filtered logits (a new tensor when anything is filtered, else ``logits`` itself).
    """
    if top_k and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=False)  # ascending, as HF
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)  # (B, V)
        remove_sorted = cum <= (1 - top_p)
        remove_sorted[..., -1:] = False  # always keep the most likely token
        remove = remove_sorted.scatter(-1, order, remove_sorted)
        logits = logits.masked_fill(remove, float("-inf"))
    return logits


_MASK32 = 0xFFFFFFFF
_GOLDEN32 = 0x9E3779B9


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """``(x * c) mod 2**32`` for int64 ``x`` in ``[0, 2**32)`` without int64 overflow (``c`` split in 16-bit halves)."""
    hi, lo = c >> 16, c & 0xFFFF
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & _MASK32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer finaliser (xor-shift-multiply, "lowbias32" constants) on int64 values in ``[0, 2**32)``."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def counter_uniform(row_seeds: torch.Tensor, step: int) -> torch.Tensor:
    """One uniform number in ``[0, 1)`` per row, a pure function of ``(row seed, step)`` (a counter-based RNG).

    A row's draws therefore do not depend on which other rows share the batch or on any RNG state: the offline
    contrastive-baseline pass batches many prompts and still samples each from its own seed.

    Args:
        row_seeds: ``(B,)`` int64 seeds in ``[0, 2**63)``.
        step: the decode step (0-based).

    Returns:
        ``(B,)`` float32 with 24 random bits each.
    """
    seeds = row_seeds.long()
    key = _mix32((seeds & _MASK32) ^ _mix32(((seeds >> 32) & _MASK32) ^ _GOLDEN32))
    x = _mix32((key + (step + 1) * _GOLDEN32) & _MASK32)
    x = _mix32(x ^ key)
    return (x >> 8).float() * 2.0**-24


def sample_tokens(
    logits: torch.Tensor, generator: Optional[torch.Generator] = None, uniform: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Categorical sample of each row by inverting its CDF with one uniform draw per row. No host sync.

    ``tok = min{i : cdf_i > u * cdf_V}``, ``cdf`` the cumulative sum of ``exp(logits - max)``: a token with zero
    probability (``-inf`` logit) has no width in the CDF and is never chosen. One random number per row (the
    exponential-race / Gumbel form needs one per vocabulary entry, several times slower on a CPU).

    Args:
        logits: ``(B, V)`` unnormalised log-probabilities (``-inf`` on filtered entries).
        generator: RNG on ``logits.device`` for ``u``; ``None`` uses the global one.
        uniform: ``(B,)`` the draws ``u`` in ``[0, 1)`` to use instead (e.g. :func:`counter_uniform`).

    Returns:
        ``(B,)`` long token ids.
    """
    logits = logits.float()
    weights = (logits - logits.amax(dim=-1, keepdim=True)).exp_()  # (B, V), max entry 1
    cdf = weights.cumsum_(dim=-1)  # (B, V)
    if uniform is None:
        u = torch.rand((logits.shape[0], 1), dtype=cdf.dtype, device=cdf.device, generator=generator)
    else:
        u = uniform.to(device=cdf.device, dtype=cdf.dtype).reshape(-1, 1)
    return torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp_(max=logits.shape[-1] - 1).squeeze(-1)


class StaticCacheGenerator(SamplingSettings):
    """Rollout generation with a preallocated KV cache and an own, sync-free decode loop (see the module docstring).

    Args:
        max_new_tokens: response length cap ``R``.
        temperature: sampling temperature (the policy's log-probs must then be computed on ``logits / temperature``).
        top_p: nucleus sampling; 1.0 samples from the full distribution (what PPO's ratio assumes).
        top_k: top-k sampling; 0 disables it.
        do_sample: False for greedy decoding.
        eos_token_id: EOS id(s); a row stops at its first EOS. ``None``: the model's generation config / config.
        pad_token_id: id written after EOS (may equal ``eos_token_id``); ``None``: the (first) EOS id.
        seed: base seed for per-rank reproducible sampling when ``generate`` gets no ``seed``; ``None``: the global RNG.
        pad_to_max_new_tokens: always return ``max_new_tokens`` response columns; otherwise ``R`` is cut to the
            longest response of the batch.
        compile: compile the one-token decode step with ``torch.compile`` (CUDA: ``mode="reduce-overhead"``, CUDA
            graphs). Compilation costs seconds to minutes once per batch shape; worth it for long rollouts on a GPU.
        cache: ``static`` (``transformers.StaticCache`` for ``P + max_new_tokens`` positions: fixed shapes, needed by
            ``compile``), ``dynamic`` (``DynamicCache``, grown by one column per step: attends only to the tokens so
            far, faster uncompiled, e.g. on a CPU) or ``auto`` (``static`` with ``compile``, else ``dynamic``).
        check_every: read "have all rows finished?" on the host every this many steps (each read is a device sync).
        prompt_bucket: with the static cache, left-pad the prompts to a multiple of this many columns, so prompt
            batches of varying length share a few shapes (a compiled step is specialised to its shapes and would
            otherwise recompile for every new prompt length). 1 disables it.
        synced_gpus: keep decoding until every rank has finished (FSDP / ZeRO-3 set it).
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
        compile: bool = False,
        cache: CacheKind = "auto",
        check_every: int = 8,
        prompt_bucket: int = 64,
        synced_gpus: bool = False,
    ) -> None:
        super().__init__(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                         do_sample=do_sample, eos_token_id=eos_token_id, pad_token_id=pad_token_id, seed=seed,
                         pad_to_max_new_tokens=pad_to_max_new_tokens, synced_gpus=synced_gpus)
        if cache not in ("auto", "static", "dynamic"):
            raise ValueError(f"StaticCacheGenerator: cache must be auto, static or dynamic, got {cache!r}")
        if compile and cache == "dynamic":
            raise ValueError("StaticCacheGenerator: compile=True needs cache='static' (or 'auto'): fixed shapes")
        if prompt_bucket < 1:
            raise ValueError(f"StaticCacheGenerator: prompt_bucket must be >= 1, got {prompt_bucket}")
        if check_every < 1:
            raise ValueError(f"StaticCacheGenerator: check_every must be >= 1, got {check_every}")
        self.compile = compile
        self.cache = cache
        self.check_every = check_every
        self.prompt_bucket = prompt_bucket
        self._compiled: dict[int, Callable[..., torch.Tensor]] = {}

    # ------------------------------------------------------------------ helpers
    def _step_fn(self, model: torch.nn.Module) -> Callable[..., torch.Tensor]:
        """``(ids (B, n), mask (B, P+R), position_ids (B, n), cache) -> last-position logits (B, V)``."""

        def step(input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                 cache: Any) -> torch.Tensor:
            out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                        past_key_values=cache, use_cache=True, logits_to_keep=1)
            return out.logits[:, -1]

        if not self.compile:
            return step
        key = id(model)
        if key not in self._compiled:
            on_cuda = next(model.parameters()).device.type == "cuda"
            self._compiled[key] = torch.compile(step, mode="reduce-overhead" if on_cuda else None, dynamic=False)
        return self._compiled[key]

    def _all_finished(self, finished: torch.Tensor) -> bool:
        done = finished.all()
        if self.synced_gpus and torch.distributed.is_available() and torch.distributed.is_initialized():
            flag = done.to(torch.int32)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
            return bool(flag.item())
        return bool(done.item())

    # ------------------------------------------------------------------ generate
    @torch.no_grad()
    def generate(
        self,
        model: torch.nn.Module,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        seed: Optional[int] = None,
        row_seeds: Optional[torch.Tensor] = None,
    ) -> GenerationOutput:
        """Sample one response per left-padded prompt.

        Args:
            model: a HF causal LM (unwrapped from DDP) whose forward accepts ``past_key_values``, ``position_ids``
                and ``logits_to_keep``.
            input_ids: ``(B, P)`` left-padded prompt ids.
            attention_mask: ``(B, P)`` prompt mask; its last column must be all ones (left padding).
            seed: per-call seed (overrides the derived one).
            row_seeds: ``(B,)`` int64 seeds, one per row: row ``i`` then samples from :func:`counter_uniform` of
                its own seed, whatever else is in the batch (``seed`` is not used).

        Returns:
            :class:`GenerationOutput` with ``logprobs`` ``(B, R)`` set (0 after the first EOS).
        """
        from transformers import DynamicCache, StaticCache

        if attention_mask.shape[1] and not bool(attention_mask[:, -1].all()):
            raise ValueError("StaticCacheGenerator.generate: prompts must be LEFT-padded (attention_mask[:, -1] has zeros)")
        eos_list, pad = self.resolve_eos_pad(model)
        call_seed = self._call_seed(seed)
        self._calls += 1
        device = input_ids.device
        rng: Optional[torch.Generator] = None
        if call_seed is not None:
            rng = torch.Generator(device=device)
            rng.manual_seed(call_seed)
        static = self.cache == "static" or (self.cache == "auto" and self.compile)
        if static and input_ids.shape[1] % self.prompt_bucket:
            extra = self.prompt_bucket - input_ids.shape[1] % self.prompt_bucket  # more left padding
            input_ids = torch.nn.functional.pad(input_ids, (extra, 0), value=pad)
            attention_mask = torch.nn.functional.pad(attention_mask, (extra, 0), value=0)
        B, P = input_ids.shape
        R = self.max_new_tokens
        if row_seeds is not None:
            if row_seeds.shape != (B,):
                raise ValueError(f"StaticCacheGenerator.generate: row_seeds must have shape ({B},), got "
                                 f"{tuple(row_seeds.shape)}")
            row_seeds = row_seeds.to(device=device, dtype=torch.long)
        eos_ids = torch.tensor(eos_list, device=device)
        step = self._step_fn(model)
        was_training = model.training
        model.eval()
        try:
            if static:
                cache: Any = StaticCache(config=model.config, max_cache_len=P + R)
                mask = torch.zeros(B, P + R, dtype=torch.long, device=device)  # (B, P+R): filled as tokens arrive
                mask[:, :P] = attention_mask
            else:
                cache = DynamicCache(config=model.config)
                mask = attention_mask.long()  # (B, P + t): grows by a column per step
            tokens = torch.full((B, R), pad, dtype=torch.long, device=device)  # (B, R)
            logprobs = torch.zeros(B, R, dtype=torch.float32, device=device)  # (B, R)
            finished = torch.zeros(B, dtype=torch.bool, device=device)  # (B,)
            positions = position_ids_from_attention_mask(attention_mask)  # (B, P)
            logits = step(input_ids, mask, positions, cache)  # prefill: (B, V)
            next_pos = positions[:, -1:] + 1  # (B, 1)
            for t in range(R):
                scaled = logits.float()
                if self.do_sample and self.temperature != 1.0:
                    scaled = scaled / self.temperature
                if self.do_sample:
                    draws = None if row_seeds is None else counter_uniform(row_seeds, t)
                    tok = sample_tokens(filter_logits(scaled, self.top_k, self.top_p), rng, draws)
                else:
                    tok = scaled.argmax(dim=-1)
                tok = torch.where(finished, torch.full_like(tok, pad), tok)  # (B,)
                tokens[:, t] = tok
                # log-prob under the full distribution (before top-k / top-p): logit - logsumexp
                logp = scaled.gather(-1, tok[:, None]).squeeze(-1) - torch.logsumexp(scaled, dim=-1)  # (B,)
                logprobs[:, t] = torch.where(finished, 0.0, logp)
                finished = finished | torch.isin(tok, eos_ids)
                if t == R - 1 or ((t + 1) % self.check_every == 0 and self._all_finished(finished)):
                    break  # early only when every row has its EOS: the columns not written are after it
                if static:
                    mask[:, P + t] = 1
                else:
                    mask = torch.cat([mask, mask.new_ones(B, 1)], dim=1)
                logits = step(tok[:, None], mask, next_pos, cache)
                next_pos = next_pos + 1
        finally:
            model.train(was_training)
        responses, action_mask, stopped = truncate_at_eos(tokens, eos_list, pad)  # (B, R), (B, R), (B,)
        width = R if self.pad_to_max_new_tokens else max(int(action_mask.sum(-1).max().item()) if B else 0, 1)
        responses, action_mask, logprobs = responses[:, :width], action_mask[:, :width], logprobs[:, :width]
        logprobs = logprobs * action_mask
        sequences = torch.cat([input_ids, responses], dim=1)
        full_mask = torch.cat([attention_mask.long(), action_mask], dim=1)
        return GenerationOutput(sequences, full_mask, action_mask, P, stopped, logprobs=logprobs)


def build_generator(engine: str, **kwargs: Any) -> Any:
    """A generator by name: ``"hf"`` (:class:`HFGenerator`, ``model.generate``) or ``"static"``
    (:class:`StaticCacheGenerator`; ``compile`` is passed only to it)."""
    from lightning_rlhf.rollout.generation import HFGenerator

    if engine == "hf":
        kwargs.pop("compile", None)
        return HFGenerator(**kwargs)
    if engine == "static":
        return StaticCacheGenerator(**kwargs)
    raise ValueError(f"rollout engine must be 'hf' or 'static', got {engine!r}")


__all__: Sequence[str] = ["StaticCacheGenerator", "build_generator", "counter_uniform", "filter_logits", "sample_tokens"]
