"""Reward sources for online RL behind one small interface: ``source(RewardInput) -> scores (B,)``.

Two kinds:

* :class:`ModelReward`: a reward model (a folder exported by ``RewardModelModule``, or any Hugging Face
  sequence-classification model with one label), scoring token ids, micro-batched, without gradients.
  When its tokenizer differs from the policy's, the prompt text and the decoded response are encoded on the reward
  model's tokenizer exactly as :class:`~lightning_rlhf.data.PreferenceDataModule` encodes a training pair (chat
  template on the prompt when the tokenizer has one, response + EOS, :func:`~lightning_rlhf.data.modules.truncate_pair`),
  so the score is read at the token it was trained on.
* :class:`FunctionReward`: a Python reward function on decoded text (rule-based rewards), e.g.
  :class:`TokenCountReward`. From a config it is given by class path::

      reward_fn:
        class_path: lightning_rlhf.rewards.TokenCountReward
        init_args: {token: "e"}

Non-finite scores (NaN, inf) are caught where they enter, right after the source: :func:`check_scores` counts them,
names the rows (and their prompt ids) and the source, and either returns the mask of finite rows (the PPO update
then drops the others) or raises :class:`NonFiniteRewardError` naming the source.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Protocol, Sequence, Union, runtime_checkable

import torch

log = logging.getLogger(__name__)

NonFiniteRewardPolicy = Literal["drop", "fail"]


class NonFiniteRewardError(FloatingPointError):
    """A reward source returned NaN or inf. The message names the source, the rows and their prompt ids."""


def describe_reward_source(source: Any) -> str:
    """How messages name a reward source: its ``name`` attribute (set by :func:`build_reward_source`) or its class."""
    return str(getattr(source, "name", None) or type(source).__name__)


def check_scores(
    scores: torch.Tensor,
    source: str,
    on_nonfinite: NonFiniteRewardPolicy = "drop",
    prompt_ids: Optional[Sequence[Any]] = None,
    where: str = "",
) -> torch.Tensor:
    """Find the non-finite entries of a batch of reward scores, report them, and fail or hand back what to keep.

    Args:
        scores: ``(B,)`` scores from a reward source.
        source: The source's name for messages (:func:`describe_reward_source`).
        on_nonfinite: ``drop``: log a warning naming the rows and return the finite-row mask; ``fail``: raise.
        prompt_ids: ``B`` prompt ids, named next to the rows.
        where: Context for the message, e.g. ``"iteration 3, rank 0"``.

    Returns:
        ``(B,)`` bool mask, True on rows with a finite score.

    Raises:
        NonFiniteRewardError: with ``on_nonfinite="fail"`` when any score is NaN or inf.
    """
    finite = torch.isfinite(scores)
    if bool(finite.all()):
        return finite
    rows = (~finite).nonzero().flatten().tolist()
    values = scores.detach().float().cpu().tolist()
    shown = ", ".join(
        f"row {i}" + (f" (prompt id {prompt_ids[i]})" if prompt_ids is not None and i < len(prompt_ids) else "")
        + f": {values[i]}" for i in rows[:8]
    ) + (f", ... ({len(rows) - 8} more)" if len(rows) > 8 else "")
    message = (f"Reward source {source} returned {len(rows)} non-finite score(s) of {len(values)}"
               + (f" ({where})" if where else "") + f": {shown}.")
    if on_nonfinite == "fail":
        raise NonFiniteRewardError(f"{message} Stopping because model.on_nonfinite_reward=fail; fix the reward source, "
                                   "or set model.on_nonfinite_reward: drop to leave such samples out of the update.")
    log.warning("%s Dropped from the update (model.on_nonfinite_reward=drop).", message)
    return finite


@dataclass
class RewardInput:
    """What a reward source sees of a rollout batch.

    Attributes:
        sequences: ``(B, P+R)`` left-padded prompt + response ids (pad after EOS).
        attention_mask: ``(B, P+R)`` 1 on real prompt tokens and response tokens up to the first EOS.
        prompt_length: ``P``.
        action_mask: ``(B, R)`` response-token mask.
        prompts: ``B`` prompt texts (as given by the data, before any chat template), or decoded prompts.
        responses: ``B`` decoded responses (special tokens skipped), filled only when a source needs text.
        extras: per-prompt fields carried from the data (prompt ids, domains...).
    """

    sequences: torch.Tensor  # (B, P+R)
    attention_mask: torch.Tensor  # (B, P+R)
    prompt_length: int
    action_mask: torch.Tensor  # (B, R)
    prompts: list[str] = field(default_factory=list)
    responses: list[str] = field(default_factory=list)
    extras: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class RewardSource(Protocol):
    """Scores a rollout batch. ``needs_text``: whether ``RewardInput.responses`` must be decoded first."""

    needs_text: bool

    def __call__(self, inp: RewardInput) -> torch.Tensor:
        """Return ``(B,)`` float32 scores on the device of ``inp.sequences``."""
        ...


class RewardFunction:
    """Base of rule-based reward functions on decoded text. Subclass and implement :meth:`__call__`."""

    def __call__(self, prompts: Sequence[str], responses: Sequence[str], **extras: Any) -> Sequence[float]:
        """Score each (prompt, response) pair.

        Args:
            prompts: ``B`` prompt texts.
            responses: ``B`` response texts.
            extras: per-prompt fields from the data (lists of length ``B``), for functions that need them.

        Returns:
            ``B`` floats (a list or a ``(B,)`` tensor).
        """
        raise NotImplementedError


class TokenCountReward(RewardFunction):
    """Number of (non-overlapping) occurrences of ``token`` in the response text: a toy rule-based reward.

    Args:
        token: substring to count (e.g. ``"e"`` or a word).
        max_count: cap on the count per response; ``None`` = no cap.
        normalize: divide by the response length in characters (rewards density rather than length).
    """

    def __init__(self, token: str = "e", max_count: Optional[int] = None, normalize: bool = False) -> None:
        if not token:
            raise ValueError("TokenCountReward: token must be a non-empty string")
        self.token = token
        self.max_count = max_count
        self.normalize = normalize

    def __call__(self, prompts: Sequence[str], responses: Sequence[str], **extras: Any) -> list[float]:
        """Count ``token`` in each response."""
        out = []
        for text in responses:
            n = text.count(self.token)
            if self.max_count is not None:
                n = min(n, self.max_count)
            out.append(n / max(1, len(text)) if self.normalize else float(n))
        return out


def instantiate_class_path(spec: Union[dict[str, Any], Any]) -> Any:
    """Build an object from ``{"class_path": "pkg.mod.Class", "init_args": {...}}``; objects pass through.

    Args:
        spec: the dict (as written in a YAML config) or an already built object.

    Returns:
        The instance.
    """
    if not isinstance(spec, dict):
        return spec
    if "class_path" not in spec:
        raise ValueError(f"expected a dict with 'class_path' (and optional 'init_args'), got keys {sorted(spec)}")
    module_name, _, cls_name = spec["class_path"].rpartition(".")
    if not module_name:
        raise ValueError(f"class_path must be a dotted path 'package.module.Class', got {spec['class_path']!r}")
    cls = getattr(importlib.import_module(module_name), cls_name)
    return cls(**(spec.get("init_args") or {}))


class FunctionReward:
    """A :class:`RewardSource` around a text reward function (any callable ``fn(prompts, responses, **extras)``).

    Args:
        fn: the reward function, or its ``class_path`` / ``init_args`` dict.
    """

    needs_text = True
    name = "model.reward_fn"

    def __init__(self, fn: Union[RewardFunction, dict[str, Any], Any]) -> None:
        self.fn = instantiate_class_path(fn)
        if not callable(self.fn):
            raise TypeError(f"reward function {type(self.fn).__name__} is not callable")

    def __call__(self, inp: RewardInput) -> torch.Tensor:
        """Call the function on the decoded texts; per-sample list extras are passed as keyword arguments."""
        B = inp.sequences.shape[0]
        extras = {
            k: v for k, v in inp.extras.items()
            if isinstance(v, (list, tuple)) and len(v) == B and k not in ("prompts", "responses")
        }
        scores = self.fn(list(inp.prompts), list(inp.responses), **extras)
        scores = torch.as_tensor(scores, dtype=torch.float32).to(inp.sequences.device).reshape(-1)
        if scores.shape[0] != B:
            raise ValueError(f"reward function returned {scores.shape[0]} scores for {B} responses")
        return scores


class ModelReward:
    """A :class:`RewardSource` around a frozen scalar-head reward model (``ScalarHeadModel``).

    With the policy's tokenizer the rollout ids are scored as they are. With another ``tokenizer`` (an off-the-shelf
    reward model) each row is re-encoded as ``PreferenceDataModule`` encodes a training pair on that tokenizer:
    the prompt text through the chat template (when the tokenizer has one, or as ``apply_chat_template`` says), the
    decoded response followed by the EOS id (only where the policy's response ended with EOS: a response cut at
    ``max_new_tokens`` is scored without one, as on the shared-tokenizer path), ``truncate_pair`` to ``max_length``,
    right-padded with the reward tokenizer's pad id.

    Args:
        model: callable ``model(input_ids, attention_mask) -> (B,)`` scores read at the last non-pad token.
        micro_batch_size: rows per forward pass; ``None`` = the whole batch.
        tokenizer: the reward model's tokenizer, only when it differs from the policy's.
        max_length: truncation length of re-encoded pairs (``truncate_pair``: the prompt loses its start first).
        apply_chat_template: wrap re-encoded prompts in the reward tokenizer's chat template; ``None`` = when it has
            one (``PreferenceDataModule``'s default). Set it as the reward model's training data was encoded.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        micro_batch_size: Optional[int] = None,
        tokenizer: Any = None,
        max_length: int = 2048,
        apply_chat_template: Optional[bool] = None,
    ) -> None:
        self.model = model
        self.micro_batch_size = micro_batch_size
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.needs_text = tokenizer is not None
        self.name = "reward model"
        self.encoder = None
        if tokenizer is not None:
            from lightning_rlhf.data.modules import _Encoder

            self.encoder = _Encoder(tokenizer, max_length, max_length, apply_chat_template)

    def encode(self, inp: RewardInput) -> tuple[torch.Tensor, torch.Tensor]:
        """``(input_ids, attention_mask)`` ``(B, T)`` the reward model scores (right-padded when re-encoded)."""
        if self.encoder is None:
            return inp.sequences, inp.attention_mask
        from lightning_rlhf.data.batches import pad_sequences
        from lightning_rlhf.data.modules import truncate_pair

        B = inp.sequences.shape[0]
        if len(inp.prompts) != B or len(inp.responses) != B:
            raise ValueError(f"ModelReward: a reward model with its own tokenizer needs {B} prompt and response texts, "
                             f"got {len(inp.prompts)} and {len(inp.responses)}")
        stopped = inp.extras.get("stopped_by_eos")
        ended = [True] * B if stopped is None else [bool(x) for x in torch.as_tensor(stopped).reshape(-1).tolist()]
        prompts = self.encoder.prompts(inp.prompts)
        responses = self.encoder.responses(inp.responses)  # each ends with the EOS id
        seqs = []
        for p, r, eos in zip(prompts, responses, ended):
            p, r = truncate_pair(p, r if eos else r[:-1], self.max_length)
            seqs.append(p + r)
        pad = self.tokenizer.pad_token_id
        device = inp.sequences.device
        input_ids = pad_sequences(seqs, pad, "right").to(device)
        attention_mask = pad_sequences([[1] * len(x) for x in seqs], 0, "right").to(device)
        return input_ids, attention_mask

    @torch.no_grad()
    def __call__(self, inp: RewardInput) -> torch.Tensor:
        """Score ``prompt + response`` (up to and including EOS) of every row."""
        input_ids, attention_mask = self.encode(inp)
        B = input_ids.shape[0]
        size = self.micro_batch_size or B
        was_training = self.model.training
        self.model.eval()
        try:
            scores = [self.model(input_ids[s : s + size], attention_mask[s : s + size]) for s in range(0, B, size)]
        finally:
            self.model.train(was_training)
        return torch.cat(scores).float()


def build_reward_source(
    tokenizer: Any,
    reward_model_name_or_path: Optional[str] = None,
    reward_fn: Optional[dict[str, Any]] = None,
    dtype: str = "float32",
    trust_remote_code: bool = False,
    micro_batch_size: Optional[int] = None,
    max_length: int = 2048,
    apply_chat_template: Optional[bool] = None,
) -> tuple[RewardSource, Optional[torch.nn.Module]]:
    """The reward source of an online-RL module, from exactly one of a reward-model path and a ``reward_fn`` spec.

    Args:
        tokenizer: The policy's tokenizer (a reward model with another vocabulary gets its pairs re-encoded, see
            :class:`ModelReward`).
        reward_model_name_or_path: Reward-model folder or hub id (``AutoModelForSequenceClassification``, one label).
        reward_fn: ``{class_path, init_args}`` of a :class:`RewardFunction`.
        dtype: Parameter dtype of the reward model.
        trust_remote_code: Allow repository code (off by default).
        micro_batch_size: Rows per reward-model forward pass.
        max_length: Truncation length of re-encoded pairs (reward model with its own tokenizer).
        apply_chat_template: Chat template on re-encoded prompts; ``None`` = when the reward tokenizer has one.

    Returns:
        ``(source, reward_model)``; ``reward_model`` is the frozen model (``None`` for a function).
    """
    if (reward_model_name_or_path is None) == (reward_fn is None):
        raise ValueError("exactly one reward source is needed: set model.reward_model_name_or_path OR model.reward_fn")
    if reward_model_name_or_path is None:
        source = FunctionReward(reward_fn)
        source.name = f"model.reward_fn ({type(source.fn).__module__}.{type(source.fn).__qualname__})"
        return source, None
    from lightning_rlhf.models.factory import load_tokenizer
    from lightning_rlhf.models.value import load_scalar_model

    rm_tokenizer = load_tokenizer(reward_model_name_or_path, trust_remote_code=trust_remote_code)
    same_vocab = rm_tokenizer.get_vocab() == tokenizer.get_vocab()
    reward_model = load_scalar_model(
        reward_model_name_or_path, dtype=dtype, trust_remote_code=trust_remote_code,
        pad_token_id=tokenizer.pad_token_id if same_vocab else rm_tokenizer.pad_token_id,
    )
    reward_model.requires_grad_(False).eval()
    source = ModelReward(reward_model, micro_batch_size=micro_batch_size, tokenizer=None if same_vocab else rm_tokenizer,
                         max_length=max_length, apply_chat_template=apply_chat_template)
    source.name = f"model.reward_model_name_or_path ({reward_model_name_or_path})"
    return source, reward_model
