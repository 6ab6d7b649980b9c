"""Experience making: sample responses for a prompt batch and score them, as one component.

PPO, the offline sample passes (contrastive baselines, policy sample sets) and the methods built on them all turn a
batch of prompts into scored rollouts the same way; :class:`ExperienceMaker` is that one way:

1. :meth:`ExperienceMaker.sample`: every prompt repeated ``n_samples_per_prompt`` times (the ``k`` rows of one prompt
   adjacent: row ``b * k + j`` is sample ``j`` of prompt ``b``), sampled by the rollout engine with one seed per call,
   returned as an :class:`~lightning_rlhf.rollout.experience.Experience` whose extras carry the prompt ids, texts
   and domains of every row;
2. :meth:`ExperienceMaker.forward_passes` (no grad, eval mode, micro-batched): old log-probs (or the ones the engine
   recorded), reference log-probs, critic values and, when asked, per-rollout features (the last hidden state at the
   last real token of the critic or the policy);
3. :meth:`ExperienceMaker.score`: the raw sequence scores from the reward source (responses decoded only when the
   source reads text).

The pure forward helpers (:func:`response_logits`, :func:`last_token_features`) are what the PPO update uses too.
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

import torch
from torch import nn

from lightning_rlhf.data.batches import PromptBatch
from lightning_rlhf.rewards import RewardInput, RewardSource
from lightning_rlhf.rollout.engine import StaticCacheGenerator
from lightning_rlhf.rollout.experience import Experience
from lightning_rlhf.rollout.generation import GenerationOutput, HFGenerator, response_lengths
from lightning_rlhf.rollout.scoring import last_token_index, position_ids_from_attention_mask, token_logprobs

FeatureSource = Literal["critic", "policy"]


def response_logits(
    model: nn.Module,
    sequences: torch.Tensor,
    attention_mask: torch.Tensor,
    prompt_length: int,
    temperature: float = 1.0,
    output_hidden_states: bool = False,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Response-aligned logits of a causal LM, and its last hidden states when asked.

    Args:
        model: a causal LM.
        sequences: ``(B, P+R)`` left-padded prompt + response ids.
        attention_mask: ``(B, P+R)``.
        prompt_length: ``P``.
        temperature: the logits are divided by it (the distribution the responses were sampled from).
        output_hidden_states: also return the last layer's hidden states.

    Returns:
        ``(B, R, V)`` logits (position ``P + t - 1`` scores response token ``t``) and ``(B, P+R, H)`` last hidden
        states of every position (``None`` unless asked).
    """
    R = sequences.shape[1] - prompt_length
    out = model(
        input_ids=sequences, attention_mask=attention_mask,
        position_ids=position_ids_from_attention_mask(attention_mask),
        use_cache=False, logits_to_keep=R + 1, output_hidden_states=output_hidden_states,
    )
    logits = out.logits[:, -(R + 1) : -1]  # (B, R, V)
    if temperature != 1.0:
        logits = logits / temperature
    hidden = out.hidden_states[-1] if output_hidden_states else None  # (B, P+R, H)
    return logits, hidden


def last_token_features(hidden: torch.Tensor, attention_mask: torch.Tensor, detach: bool = True) -> torch.Tensor:
    """Per-sequence features: the hidden state at the last real token (the last response token, or EOS).

    Args:
        hidden: ``(B, T, H)`` hidden states.
        attention_mask: ``(B, T)``.
        detach: cut the graph (the rollout's features); ``False`` keeps it (a loss on the features, e.g. GIL's group
            head inside the critic).

    Returns:
        ``(B, H)`` float32.
    """
    idx = last_token_index(attention_mask)  # (B,)
    hidden = hidden.detach() if detach else hidden
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), idx].float()


def wrap_generation(
    gen: GenerationOutput,
    prompt_ids: list[str],
    prompts: list[str],
    domains: list[str],
    domain_ids: Optional[torch.Tensor] = None,
) -> Experience:
    """An ``Experience`` of a generator's output, with the per-row data a reward source reads in its extras.

    Args:
        gen: what a generator returned for ``B`` rows.
        prompt_ids: ``B`` stable prompt ids, one per row.
        prompts: ``B`` prompt texts.
        domains: ``B`` domain labels.
        domain_ids: ``(B,)`` domain indices, when known.

    Returns:
        The experience (``sequences``, masks, ``prompt_length``); extras ``prompt_ids``, ``prompts``, ``domains``,
        ``domain_ids`` (when given), ``stopped_by_eos`` and ``rollout_logprobs`` (when the engine records them).
    """
    extras: dict[str, Any] = {"prompt_ids": prompt_ids, "prompts": prompts, "domains": domains}
    if domain_ids is not None:
        extras["domain_ids"] = domain_ids
    extras["stopped_by_eos"] = gen.stopped_by_eos
    if gen.logprobs is not None:
        extras["rollout_logprobs"] = gen.logprobs
    return Experience(sequences=gen.sequences, attention_mask=gen.attention_mask, action_mask=gen.action_mask,
                      prompt_length=gen.prompt_length, extras=extras)


class ExperienceMaker:
    """Samples ``n_samples_per_prompt`` responses per prompt and scores them (see the module docstring).

    Args:
        generator: the rollout engine (``HFGenerator`` or ``StaticCacheGenerator``).
        tokenizer: the policy's tokenizer (decodes responses for text-based rewards).
        reward_source: scores a rollout batch; ``None`` when the caller scores by itself.
        n_samples_per_prompt: ``k``, responses sampled per prompt.
        micro_batch_size: rows per scoring forward pass; ``None`` = the whole batch at once.
        temperature: the sampling temperature (log-probs are computed on ``logits / temperature``).
        reuse_rollout_logprobs: use the log-probs the engine recorded while sampling as the old log-probs instead of
            a policy forward pass (when the engine records them and no policy hidden states are needed).
    """

    def __init__(
        self,
        generator: Union[HFGenerator, StaticCacheGenerator],
        tokenizer: Any,
        reward_source: Optional[RewardSource],
        n_samples_per_prompt: int = 1,
        micro_batch_size: Optional[int] = None,
        temperature: float = 1.0,
        reuse_rollout_logprobs: bool = False,
    ) -> None:
        if n_samples_per_prompt < 1:
            raise ValueError(f"n_samples_per_prompt must be >= 1, got {n_samples_per_prompt}")
        self.generator = generator
        self.tokenizer = tokenizer
        self.reward_source = reward_source
        self.n_samples_per_prompt = n_samples_per_prompt
        self.micro_batch_size = micro_batch_size
        self.temperature = temperature
        self.reuse_rollout_logprobs = reuse_rollout_logprobs

    # ------------------------------------------------------------------ 1. sampling
    @torch.no_grad()
    def sample(self, policy: nn.Module, batch: PromptBatch, seed: int) -> Experience:
        """Sample ``k`` responses per prompt of ``batch`` with one seeded call of the engine.

        Args:
            policy: the causal LM to sample from (its train/eval mode is left as it is).
            batch: ``B`` left-padded prompts.
            seed: the call's sampling seed.

        Returns:
            An ``Experience`` of ``B * k`` rows (``sequences``, masks, ``prompt_length``) whose extras hold, per row,
            ``prompt_ids``, ``prompts``, ``domains``, ``domain_ids``, ``stopped_by_eos``, and ``rollout_logprobs``
            when the engine records them.
        """
        k = self.n_samples_per_prompt
        input_ids, attention_mask = batch.input_ids, batch.attention_mask
        if k > 1:
            input_ids = input_ids.repeat_interleave(k, dim=0)  # (B*k, P), rows of one prompt adjacent
            attention_mask = attention_mask.repeat_interleave(k, dim=0)

        def rows(values: list[Any]) -> list[Any]:
            return [v for v in values for _ in range(k)]

        gen = self.generator.generate(policy, input_ids, attention_mask, seed=seed)
        return wrap_generation(gen, rows(list(batch.prompt_ids)), rows(list(batch.prompts)), rows(list(batch.domains)),
                               batch.domain_ids.repeat_interleave(k, dim=0))

    # ------------------------------------------------------------------ 2. forward passes
    @torch.no_grad()
    def forward_passes(
        self,
        exp: Experience,
        policy: nn.Module,
        reference: Optional[nn.Module] = None,
        critic: Optional[nn.Module] = None,
        value_head: Optional[nn.Module] = None,
        features: Optional[FeatureSource] = None,
    ) -> Experience:
        """Fill ``logprobs``, ``ref_logprobs`` (with a reference), ``values`` (with a critic or a value head) and,
        when ``features`` is set, ``extras["features"]`` ``(B, H)``; micro-batched, no grad, eval mode.

        Args:
            exp: a sampled experience.
            policy: the policy (old log-probs; its trunk feeds ``value_head``).
            reference: the frozen reference model, or ``None``.
            critic: a separate critic (``ScalarHeadModel``), or ``None``.
            value_head: a linear value head on the policy's last hidden states (a shared critic), or ``None``.
            features: ``critic`` (the critic's last hidden state at the last real token; the policy's with a shared
                critic) or ``policy``; ``None`` computes none.

        Returns:
            ``exp``, filled in place. Response-aligned fields are zero off the action mask.
        """
        P = exp.prompt_length
        shared = value_head is not None
        policy_hidden = shared or features == "policy" or (features == "critic" and critic is None)
        reuse = self.reuse_rollout_logprobs and "rollout_logprobs" in exp.extras and not policy_hidden
        modules = [m for m in (policy, critic) if m is not None]
        modes = [m.training for m in modules]
        for m in modules:
            m.eval()
        logprobs, ref_logprobs, values, feats = [], [], [], []
        try:
            for mb in exp.minibatches(self.micro_batch_size or len(exp), shuffle=False):
                hidden = None
                if not reuse:
                    logits, hidden = response_logits(policy, mb.sequences, mb.attention_mask, P, self.temperature,
                                                     output_hidden_states=policy_hidden)
                    logprobs.append(token_logprobs(logits, mb.responses))
                    del logits
                if reference is not None:
                    ref_logits, _ = response_logits(reference, mb.sequences, mb.attention_mask, P, self.temperature)
                    ref_logprobs.append(token_logprobs(ref_logits, mb.responses))
                    del ref_logits
                if critic is not None:
                    v, critic_hidden = critic.token_values(mb.sequences, mb.attention_mask, return_hidden=True)
                    values.append(v[:, P - 1 : -1])  # (b, R): the value of the state before response token t
                    if features == "critic":
                        feats.append(last_token_features(critic_hidden, mb.attention_mask))
                elif value_head is not None:
                    assert hidden is not None
                    values.append(value_head(hidden[:, P - 1 : -1]).squeeze(-1).float())
                if features is not None and (features == "policy" or critic is None):
                    assert hidden is not None
                    feats.append(last_token_features(hidden, mb.attention_mask))
        finally:
            for m, mode in zip(modules, modes):
                m.train(mode)
        mask = exp.action_mask.float()
        exp.logprobs = (exp.extras["rollout_logprobs"].float() if reuse else torch.cat(logprobs)) * mask  # (B, R)
        if reference is not None:
            exp.ref_logprobs = torch.cat(ref_logprobs) * mask  # (B, R)
        if values:
            exp.values = torch.cat(values) * mask  # (B, R)
        if feats:
            exp.extras["features"] = torch.cat(feats)  # (B, H)
        return exp

    # ------------------------------------------------------------------ 3. scores
    def decode_responses(self, exp: Experience) -> list[str]:
        """Response texts up to and including EOS (special tokens skipped)."""
        lengths = response_lengths(exp.action_mask).tolist()
        rows = [r[:n] for r, n in zip(exp.responses.tolist(), lengths)]
        return self.tokenizer.batch_decode(rows, skip_special_tokens=True)

    def reward_input(self, exp: Experience) -> RewardInput:
        """What the reward source sees of ``exp`` (:func:`reward_input`); responses are decoded (and kept in
        ``exp.extras["responses"]``) when the source reads text."""
        if self.reward_source is not None and self.reward_source.needs_text and "responses" not in exp.extras:
            exp.extras["responses"] = self.decode_responses(exp)
        return reward_input(exp)

    def score(self, exp: Experience) -> torch.Tensor:
        """``(B,)`` float32 raw scores from the reward source, on ``exp``'s device."""
        if self.reward_source is None:
            raise RuntimeError("ExperienceMaker.score: no reward source was given")
        return self.reward_source(self.reward_input(exp)).to(exp.device).float()

    # ------------------------------------------------------------------ all three
    @torch.no_grad()
    def make(
        self,
        policy: nn.Module,
        batch: PromptBatch,
        seed: int,
        reference: Optional[nn.Module] = None,
        critic: Optional[nn.Module] = None,
        value_head: Optional[nn.Module] = None,
        features: Optional[FeatureSource] = None,
    ) -> Experience:
        """:meth:`sample`, then :meth:`forward_passes`, then :meth:`score` into ``exp.scores``."""
        exp = self.sample(policy, batch, seed)
        self.forward_passes(exp, policy, reference, critic, value_head, features)
        exp.scores = self.score(exp)  # (B,)
        return exp


#: per-row tensors of the experience that are not data a reward function reads
_INTERNAL_EXTRAS = ("rollout_logprobs", "features")


def reward_input(exp: Experience) -> RewardInput:
    """What a reward source sees of ``exp``: ids, masks, the prompt texts, the decoded responses when
    ``exp.extras["responses"]`` holds them (else none), and the per-row data of the extras (prompt ids, domains,
    ``stopped_by_eos``...; not the internal tensors)."""
    return RewardInput(
        sequences=exp.sequences, attention_mask=exp.attention_mask, prompt_length=exp.prompt_length,
        action_mask=exp.action_mask, prompts=list(exp.extras.get("prompts", [])),
        responses=list(exp.extras.get("responses") or []),
        extras={k: v for k, v in exp.extras.items() if not k.startswith("_") and k not in _INTERNAL_EXTRAS},
    )
