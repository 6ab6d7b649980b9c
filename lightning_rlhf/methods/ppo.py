"""PPO for language models with PPO-max defaults (spec 1.4), as one LightningModule under manual optimization, and
the critic-free estimators (GRPO, RLOO, REINFORCE++) as options of the same iteration.

One ``training_step(prompt_batch)`` = one iteration, read top to bottom:

1. :meth:`PPOModule.make_experience` (no grad, eval mode; ``lightning_rlhf/rollout/maker.py``): sample
   ``n_samples_per_prompt`` responses per prompt, then micro-batched passes for old log-probs, reference log-probs,
   critic values (none with ``critic: none``) and the sequence scores; samples with a non-finite score are dropped.
2. :meth:`PPOModule.shape_scores`: ``transform_scores`` hook -> running reward normalisation -> no-EOS penalty.
3. :meth:`PPOModule.compute_advantages`: per-token KL, per-sample ``kl_coef`` (B,) after the callbacks' experience
   hooks (:meth:`PPOModule.annotate_experience`), token rewards, then the ``advantage`` estimator: GAE with whitening
   reduced across ranks, or a group / batch estimator from ``lightning_rlhf/advantages.py``.
4. :meth:`PPOModule.ppo_update`: ``ppo_epochs x minibatches x micro-batches`` of clipped policy (+ value, + KL,
   + ptx) losses, gradient accumulation over micro-batches, one optimizer step per minibatch.
5. Rank-reduced, detached statistics are logged and kept for callbacks (``last_rollout_stats``, ``rollout_view``).

``trainer.global_step`` counts optimizer steps (``ppo_epochs * ceil(rollout_batch / mini_batch_size)`` per
iteration); use ``model.max_iterations`` to stop after a number of PPO iterations.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Iterator, Literal, Mapping, Optional, Union

import torch
from torch import nn

from lightning_rlhf.advantages import ReduceFn, explained_variance, gae, grpo_advantages, masked_sum, masked_whiten
from lightning_rlhf.advantages import reinforce_pp_advantages, rloo_advantages
from lightning_rlhf.data.batches import PromptBatch, TokenBatch
from lightning_rlhf.losses.ppo import KLEstimator, PolicyLossOutput, entropy_from_logits, kl_penalty, policy_loss
from lightning_rlhf.losses.ppo import token_rewards, value_loss
from lightning_rlhf.losses.sft import masked_nll_sum
from lightning_rlhf.methods.base import RLHFModule, check_choice
from lightning_rlhf.methods.online_eval import OnlineEvaluator, RewardSpec
from lightning_rlhf.models.factory import load_causal_lm, load_reference
from lightning_rlhf.models.value import ScalarHeadModel, load_scalar_model
from lightning_rlhf.rewards import NonFiniteRewardPolicy, RewardSource, build_reward_source
from lightning_rlhf.rewards import check_scores, describe_reward_source
from callbacks.protocols import KL_SCALE
from lightning_rlhf.rollout.annotations import ExperienceHooks
from lightning_rlhf.rollout.experience import Experience
from lightning_rlhf.rollout.engine import StaticCacheGenerator, build_generator
from lightning_rlhf.rollout.generation import HFGenerator
from lightning_rlhf.rollout.maker import ExperienceMaker, FeatureSource, response_logits
from lightning_rlhf.rollout.reward_norm import REWARD_NORMS, RewardNorm, normalize_scores, update_moments
from lightning_rlhf.rollout.sample_log import log_sample_table, sample_table
from lightning_rlhf.rollout.scoring import token_logprobs


CriticKind = Literal["separate", "shared", "none"]
RolloutEngine = Literal["hf", "static"]
AdvantageEstimator = Literal["gae", "grpo", "rloo", "reinforce_pp"]
ScaleRewards = Literal["group", "batch", "none"]
KLPlacement = Literal["reward", "loss"]
LossAggregation = Literal["token_mean", "seq_mean_token_sum", "seq_mean_token_mean"]


@dataclass
class PPOForwardOutput:
    """Outputs of the policy/critic forward on one micro-batch during the update.

    Attributes:
        logprobs: ``(b, R)`` log-probs of the response tokens under the current policy (with grad).
        values: ``(b, R)`` current critic values (with grad); ``None`` without a critic.
        entropy: ``(b, R)`` per-token policy entropy (with grad only when ``ent_coef > 0``).
        policy: the :class:`PolicyLossOutput` of this micro-batch (``per_sample_surrogate`` for GIL-style losses);
            ``None`` during critic warm-up.
        critic_hidden: ``(b, P+R, H)`` the critic trunk's last hidden states (with grad; the policy's with a shared
            critic), when the module's ``needs_critic_hidden`` is on; else ``None`` (a shared critic always gives
            them).
    """

    logprobs: Optional[torch.Tensor]
    values: Optional[torch.Tensor]
    entropy: Optional[torch.Tensor]
    policy: Optional[PolicyLossOutput] = None
    critic_hidden: Optional[torch.Tensor] = None


class PPOModule(RLHFModule):
    """PPO (PPO-max defaults) with a frozen reference, a reward model or rule-based reward, and a critic.

    Implements ``callbacks.protocols.KLControlled`` (``kl_coef``, ``last_rollout_stats``) so
    ``callbacks.adaptive_kl.AdaptiveKLController`` can adapt the KL coefficient, and
    ``callbacks.protocols.ExperienceAnnotatable`` (``rollout_view``, ``register_experience_hook``) so callbacks can read
    every iteration's per-sample tensors and annotate the experience between the rollout and the advantages
    (a per-sample KL scale, per-sample loss weights; e.g. GIL's group inference and adaptive exploration).

    Hooks for methods built on PPO: :meth:`transform_scores` (score shaping before normalisation),
    :meth:`per_sample_kl_coef` (the base coefficients before the callbacks' scales), :meth:`prepare_minibatch`
    (per-minibatch loss weights), :meth:`extra_loss`, :meth:`prepare_critic_minibatch` and
    :meth:`critic_extra_loss` (a critic-side term, e.g. GIL's group head inside the critic; ``needs_critic_hidden``
    makes :meth:`forward_micro` return the critic trunk's hidden states).

    Logged every iteration (rank-reduced): ``iteration``, ``score/mean``, ``score/std``, ``score/shaped_mean``,
    ``kl`` (per-sequence sum), ``kl/token_mean``, ``kl_coef``, ``policy/loss``, ``policy/entropy``,
    ``policy/clip_frac``, ``policy/approx_kl``, ``value/loss``, ``value/clip_frac``, ``value/explained_var``,
    ``response/length``, ``response/no_eos_frac``, ``time/{generate,score,update}`` (s, this rank) and
    ``tokens_per_s/{generate,score,update}``; sample prompts/responses as a TensorBoard text table.
    On validation (every ``trainer.val_check_interval`` iterations, over the prompt module's validation split; see
    :mod:`lightning_rlhf.methods.online_eval`): ``val/score``, ``val/score/<domain>``, ``val/kl``,
    ``val/response_length``, ``val/no_eos_frac``, ``val/judge/<name>``.

    Args:
        model_name_or_path: Policy to train (usually an SFT export): hub id, folder, or ``builtin:tiny-llama``.
        ref_model_name_or_path: Frozen reference ``pi_ref``; default: the policy checkpoint.
        reward_model_name_or_path: Reward model folder (``RewardModelModule`` export or any HF
            sequence-classification model with one label). Exactly one of this and ``reward_fn``.
        reward_fn: Rule-based reward: ``{class_path: ..., init_args: {...}}`` of a callable
            ``fn(prompts, responses, **extras) -> list[float]``, e.g. ``lightning_rlhf.rewards.TokenCountReward``.
        on_nonfinite_reward: A NaN/inf score from the reward source is reported (count, rows, prompt ids) and the
            sample is left out of the update (``drop``; counted in ``reward/nonfinite_dropped``; a run that drops
            more than half of its samples fails at the end), or the run stops naming the source (``fail``).
        critic: ``separate`` (value head on its own backbone), ``shared`` (value head on the policy trunk) or ``none``
            (no value model is built: the critic-free estimators ``grpo``, ``rloo``, ``reinforce_pp`` need none).
        critic_model_name_or_path: Backbone of a separate critic; default: the reward model, else the policy.
        critic_lr: Learning rate of the critic parameter group (the policy group uses ``lr``).
        kl_coef: KL coefficient ``beta`` of the token rewards (adapted by ``AdaptiveKLController`` if present).
        kl_estimator: ``k1`` (``logp - logp_ref``) or ``k3`` (``exp(-d) - 1 + d``).
        advantage: ``gae`` (PPO with the critic) or a critic-free estimator (``lightning_rlhf/advantages.py``):
            ``grpo`` (group-mean baseline, scaled by ``scale_rewards``; Shao et al. 2024), ``rloo`` (leave-one-out mean;
            Ahmadian et al. 2024), ``reinforce_pp`` (batch-normalised returns-to-go of the token rewards; Hu 2025). The
            group estimators need ``n_samples_per_prompt >= 2`` and ``critic: none``; their sequence return is the
            shaped score minus ``kl_coef_i * sum_t kl_t`` when ``kl_in: reward``, the shaped score alone when ``kl_in:
            loss``. Their advantages are not whitened again (``whiten_advantages`` is for ``gae``).
        scale_rewards: ``grpo`` only: divide the centred return by the std of its ``group`` (the paper), of the whole
            ``batch`` (all ranks), or not at all (``none``, Dr. GRPO).
        kl_in: Where the KL to the reference enters: ``reward`` (``-kl_coef * kl_t`` token rewards, as PPO; with
            ``kl_estimator``) or ``loss`` (GRPO's ``kl_loss_coef * k3(pi, pi_ref)`` term on the current policy,
            aggregated like the policy loss; the rewards then carry no KL).
        kl_loss_coef: Weight of the KL loss term when ``kl_in: loss`` (GRPO: 0.04).
        loss_agg: How token terms become the loss: ``token_mean`` (sum over all tokens of the minibatch / their
            number), ``seq_mean_token_sum`` (sum over each sequence's tokens, mean over sequences) or
            ``seq_mean_token_mean`` (mean over each sequence's tokens, then over sequences; the GRPO paper). Counts
            are global over ranks and micro-batches.
        gamma: GAE discount.
        lam: GAE lambda.
        clip_eps: Policy ratio clip range (the lower one when ``clip_eps_high`` is set).
        clip_eps_high: Upper ratio clip range, ``[1 - clip_eps, 1 + clip_eps_high]`` (DAPO's clip-higher);
            ``null`` = ``clip_eps``.
        value_clip: Value clip range; ``null`` disables value clipping.
        vf_coef: Weight of the value loss.
        ent_coef: Weight of the entropy bonus.
        ppo_epochs: Passes over each rollout batch.
        mini_batch_size: Rollouts per optimizer step; ``null`` = the whole rollout batch.
        whiten_advantages: Whiten advantages over the rollout batch's response tokens (across ranks).
        reward_norm: ``none``, ``scale`` (divide by running std), ``norm`` (subtract running mean, divide by std)
            or ``norm_clip`` (``norm`` then clip to ``+-reward_clip``). Running moments are global over ranks
            and saved in checkpoints.
        reward_clip: Clip bound ``c`` of ``norm_clip``.
        no_eos_penalty: Subtracted from the shaped score of responses that hit ``max_new_tokens`` without EOS;
            ``null`` = off.
        critic_warmup_iters: First iterations that train only the critic.
        max_new_tokens: Response length cap.
        temperature: Sampling temperature (log-probs are computed on ``logits / temperature``).
        top_p: Nucleus sampling (1.0 = full distribution).
        top_k: Top-k sampling (0 = off).
        rollout_micro_batch_size: Rows per scoring forward pass during the rollout; default ``micro_batch_size``.
        n_samples_per_prompt: Responses sampled per prompt of a batch (rows of one prompt adjacent): a batch of
            ``B`` prompts gives ``B * n_samples_per_prompt`` rollouts.
        feature_source: Per-rollout features shown to callbacks that ask for them (``rollout_view()["features"]``):
            ``critic`` (the critic's last hidden state at the last response token; the policy's with a shared critic)
            or ``policy``. Computed only when a registered hook needs them.
        rollout_engine: ``hf`` (``model.generate``) or ``static`` (``lightning_rlhf.rollout.engine``: own decode
            loop without per-token host syncs, preallocated buffers, a static KV cache when compiled, rollout log-probs
            recorded; on the CPU 1.2x (batch 1) to 1.9x (batch 64) the tokens/s of ``hf`` with the tiny model, 1.0x
            to 1.06x with SmolLM2-135M; not yet measured on a GPU).
        rollout_compile: With ``rollout_engine: static``, compile the one-token decode step (``torch.compile``; CUDA
            graphs on a GPU). Costs one compilation per batch size and 64-column prompt bucket.
        reuse_rollout_logprobs: With ``rollout_engine: static`` and a ``separate`` critic, use the log-probs
            recorded while sampling as the old log-probs instead of a second policy forward pass. They equal the
            recomputed ones up to the rounding of the cached decode (about 1e-6 in fp32; larger in bf16, where the
            first PPO epoch's ratio then starts slightly off 1).
        ptx_coef: Weight of the SFT (pretraining-mix) NLL term; needs a ``ptx`` data stream
            (``MultiStreamDataModule`` with streams ``prompts`` and ``ptx``, see ``configs/ppo/tiny_ptx.yaml``). Each
            iteration's ptx batch is split into as many equal row slices as the iteration has minibatches; the
            optimizer step of minibatch ``i`` adds the token-mean NLL of slice ``i`` (every PPO epoch passes over the
            slices again, as over the rollouts), so the ptx batch needs at least that many rows.
        ptx_data: Removed: set it as a ``ptx`` data stream instead (a non-null value fails, naming the new way).
        max_iterations: Stop training after this many PPO iterations (``null``: the trainer's limits decide).
        seed: Base seed of rollout sampling and minibatch shuffling (per rank and iteration, resumable).
        log_samples_every_n: Log a text table of samples every N iterations (0 disables).
        num_logged_samples: Rows in that table.
        eval_rewards: Judges scored on the validation samples beside the training reward, never trained on:
            ``{name: reward model path | {class_path, init_args}}``, logged as ``val/judge/<name>``.
        val_greedy: Decode validation responses greedily (default: sample with the training settings).
        val_seed: Seed of validation sampling; with the prompt ids it fixes the samples of given weights.
        lr: Policy learning rate (PPO-max: 1e-6; raise it for small models).
        micro_batch_size: Rows per forward/backward micro-batch in the update (gradient accumulation).
    """

    frozen_modules = ("reference", "reward_model")
    lora_targets = ("policy",)

    def __init__(
        self,
        ref_model_name_or_path: Optional[str] = None,
        reward_model_name_or_path: Optional[str] = None,
        reward_fn: Optional[dict[str, Any]] = None,
        on_nonfinite_reward: NonFiniteRewardPolicy = "drop",
        critic: CriticKind = "separate",
        critic_model_name_or_path: Optional[str] = None,
        critic_lr: float = 5e-6,
        kl_coef: float = 0.05,
        kl_estimator: KLEstimator = "k1",
        advantage: AdvantageEstimator = "gae",
        scale_rewards: ScaleRewards = "group",
        kl_in: KLPlacement = "reward",
        kl_loss_coef: float = 0.0,
        loss_agg: LossAggregation = "token_mean",
        gamma: float = 1.0,
        lam: float = 0.95,
        clip_eps: float = 0.2,
        clip_eps_high: Optional[float] = None,
        value_clip: Optional[float] = 0.2,
        vf_coef: float = 0.5,
        ent_coef: float = 0.0,
        ppo_epochs: int = 1,
        mini_batch_size: Optional[int] = None,
        whiten_advantages: bool = True,
        reward_norm: RewardNorm = "norm_clip",
        reward_clip: float = 5.0,
        no_eos_penalty: Optional[float] = None,
        critic_warmup_iters: int = 0,
        max_new_tokens: int = 64,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        rollout_micro_batch_size: Optional[int] = None,
        n_samples_per_prompt: int = 1,
        feature_source: FeatureSource = "critic",
        rollout_engine: RolloutEngine = "hf",
        rollout_compile: bool = False,
        reuse_rollout_logprobs: bool = False,
        ptx_coef: float = 0.0,
        ptx_data: Optional[dict[str, Any]] = None,
        max_iterations: Optional[int] = None,
        seed: int = 0,
        log_samples_every_n: int = 10,
        num_logged_samples: int = 4,
        eval_rewards: Optional[dict[str, RewardSpec]] = None,
        val_greedy: bool = False,
        val_seed: int = 0,
        lr: float = 1e-6,
        **kwargs: Any,
    ) -> None:
        super().__init__(lr=lr, **kwargs)
        if (reward_model_name_or_path is None) == (reward_fn is None):
            raise ValueError("PPO needs exactly one reward source: set model.reward_model_name_or_path OR model.reward_fn")
        check_choice("critic", critic, ("separate", "shared", "none"))
        check_choice("advantage", advantage, ("gae", "grpo", "rloo", "reinforce_pp"))
        check_choice("scale_rewards", scale_rewards, ("group", "batch", "none"))
        check_choice("kl_in", kl_in, ("reward", "loss"))
        check_choice("loss_agg", loss_agg, ("token_mean", "seq_mean_token_sum", "seq_mean_token_mean"))
        if advantage == "gae" and critic == "none":
            raise ValueError("model.advantage: gae needs a critic; set model.critic: separate | shared, or a "
                             "critic-free model.advantage (grpo, rloo, reinforce_pp)")
        if advantage != "gae" and critic != "none":
            raise ValueError(f"model.advantage: {advantage} uses no value model; set model.critic: none (a "
                             f"{critic} critic would be built and trained for nothing)")
        if advantage in ("grpo", "rloo") and n_samples_per_prompt < 2:
            raise ValueError(f"model.advantage: {advantage} compares the samples of one prompt; set "
                             f"model.n_samples_per_prompt >= 2 (got {n_samples_per_prompt})")
        if critic == "none" and critic_warmup_iters > 0:
            raise ValueError("model.critic_warmup_iters > 0 needs a critic (model.critic: none has none)")
        if kl_in == "loss" and kl_loss_coef < 0:
            raise ValueError(f"model.kl_loss_coef must be >= 0, got {kl_loss_coef}")
        if clip_eps_high is not None and clip_eps_high <= 0:
            raise ValueError(f"model.clip_eps_high must be > 0 or null, got {clip_eps_high}")
        if reward_norm not in REWARD_NORMS:
            raise ValueError(f"model.reward_norm must be none|scale|norm|norm_clip, got {reward_norm!r}")
        check_choice("kl_estimator", kl_estimator, ("k1", "k3"))
        if ppo_epochs < 1:
            raise ValueError(f"model.ppo_epochs must be >= 1, got {ppo_epochs}")
        if mini_batch_size is not None and mini_batch_size < 1:
            raise ValueError(f"model.mini_batch_size must be >= 1 or null, got {mini_batch_size}")
        if ptx_data is not None:
            raise ValueError(
                "model.ptx_data was replaced by a `ptx` data stream (checkpointed, its own shuffled epochs): use "
                "data: {class_path: lightning_rlhf.data.MultiStreamDataModule, init_args: {streams: {prompts: "
                "{class_path: lightning_rlhf.data.PromptDataModule, init_args: {...}}, ptx: {class_path: "
                "lightning_rlhf.data.DemonstrationDataModule, init_args: <your ptx_data>}}}} (configs/ppo/tiny_ptx.yaml)"
            )
        if critic_lr <= 0:
            raise ValueError(f"model.critic_lr must be positive, got {critic_lr}")
        if temperature <= 0:
            raise ValueError(f"model.temperature must be > 0 (PPO samples its responses), got {temperature}")
        check_choice("on_nonfinite_reward", on_nonfinite_reward, ("drop", "fail"))
        self.on_nonfinite_reward: NonFiniteRewardPolicy = on_nonfinite_reward
        check_choice("rollout_engine", rollout_engine, ("hf", "static"))
        if (rollout_compile or reuse_rollout_logprobs) and rollout_engine != "static":
            raise ValueError("model.rollout_compile and model.reuse_rollout_logprobs need model.rollout_engine: static")
        if n_samples_per_prompt < 1:
            raise ValueError(f"model.n_samples_per_prompt must be >= 1, got {n_samples_per_prompt}")
        check_choice("feature_source", feature_source, ("critic", "policy"))
        self.ref_model_name_or_path = ref_model_name_or_path or self.model_name_or_path
        self.reward_model_name_or_path = reward_model_name_or_path
        self.reward_fn_spec = reward_fn
        self.critic_kind = critic
        self.critic_model_name_or_path = critic_model_name_or_path or reward_model_name_or_path or self.model_name_or_path
        self.critic_lr = critic_lr
        self.kl_coef = float(kl_coef)
        self.kl_estimator: KLEstimator = kl_estimator
        self.advantage: AdvantageEstimator = advantage
        self.scale_rewards: ScaleRewards = scale_rewards
        self.kl_in: KLPlacement = kl_in
        self.kl_loss_coef = kl_loss_coef
        self.loss_agg: LossAggregation = loss_agg
        self.gamma = gamma
        self.lam = lam
        self.clip_eps = clip_eps
        self.clip_eps_high = clip_eps_high
        self.value_clip = value_clip
        self.vf_coef = vf_coef
        self.ent_coef = ent_coef
        self.ppo_epochs = ppo_epochs
        self.mini_batch_size = mini_batch_size
        self.whiten_advantages = whiten_advantages
        self.reward_norm: RewardNorm = reward_norm
        self.reward_clip = reward_clip
        self.no_eos_penalty = no_eos_penalty
        self.critic_warmup_iters = critic_warmup_iters
        self.temperature = temperature
        self.rollout_micro_batch_size = rollout_micro_batch_size
        self.n_samples_per_prompt = n_samples_per_prompt
        self.feature_source: FeatureSource = feature_source
        self.ptx_coef = ptx_coef
        self.max_iterations = max_iterations
        self.seed = seed
        self.log_samples_every_n = log_samples_every_n
        self.num_logged_samples = num_logged_samples
        self.save_hyperparameters()
        self.rollout_engine = rollout_engine
        self.reuse_rollout_logprobs = reuse_rollout_logprobs
        self.generator: Union[HFGenerator, StaticCacheGenerator] = build_generator(
            rollout_engine, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
            do_sample=True, eos_token_id=self.tokenizer.eos_token_id, pad_token_id=self.tokenizer.pad_token_id,
            compile=rollout_compile,
        )
        #: hooks that callbacks register to annotate the experience (callbacks/protocols.py ExperienceAnnotatable)
        self.experience_hooks = ExperienceHooks()
        self._view: dict[str, torch.Tensor] = {}
        # running moments of the (transformed) scores, global over ranks, checkpointed as buffers
        self.register_buffer("reward_mean", torch.zeros((), dtype=torch.float64))
        self.register_buffer("reward_var", torch.ones((), dtype=torch.float64))
        self.register_buffer("reward_count", torch.zeros((), dtype=torch.float64))
        # samples scored / dropped for a non-finite score, all ranks (checkpointed; read by the end-of-run check)
        self.register_buffer("scored_samples", torch.zeros((), dtype=torch.float64))
        self.register_buffer("nonfinite_reward_samples", torch.zeros((), dtype=torch.float64))
        self._last_stats: dict[str, float] = {}
        self._ptx_batch: Optional[TokenBatch] = None  # this iteration's batch of the `ptx` data stream
        self.reward_source: Optional[RewardSource] = None
        self.experience_maker: Optional[ExperienceMaker] = None
        self.evaluator = OnlineEvaluator(eval_rewards, greedy=val_greedy, seed=val_seed)

    def is_logging_step(self) -> bool:
        """Always: a PPO training step is a whole iteration (its optimizer steps would not line up with Lightning's
        logging interval), and the per-call logging cost is negligible beside it."""
        return True

    # ------------------------------------------------------------------ models
    def build_models(self) -> None:
        """Policy, frozen reference, critic (separate backbone or a head on the policy), reward source."""
        self.policy = load_causal_lm(
            self.model_name_or_path, dtype=self.dtype_name, gradient_checkpointing=self.gradient_checkpointing,
            trust_remote_code=self.trust_remote_code, attn_implementation=self.attn_implementation,
        )
        self.reference = load_reference(self.ref_model_name_or_path, self.dtype_name, self.trust_remote_code)
        if self.critic_kind == "separate":
            self.critic: Optional[ScalarHeadModel] = load_scalar_model(
                self.critic_model_name_or_path, dtype=self.dtype_name,
                gradient_checkpointing=self.gradient_checkpointing, trust_remote_code=self.trust_remote_code,
                pad_token_id=self.tokenizer.pad_token_id,
            )
            self.value_head: Optional[nn.Linear] = None
        elif self.critic_kind == "none":
            self.critic = None
            self.value_head = None
        else:
            self.critic = None
            hidden = self.policy.config.get_text_config().hidden_size
            self.value_head = nn.Linear(hidden, 1)
            nn.init.normal_(self.value_head.weight, std=1.0 / math.sqrt(hidden + 1))
            nn.init.zeros_(self.value_head.bias)
        self.reward_source, self.reward_model = build_reward_source(
            self.tokenizer, self.reward_model_name_or_path, self.reward_fn_spec, dtype=self.dtype_name,
            trust_remote_code=self.trust_remote_code, micro_batch_size=self._rollout_micro(),
        )
        self.experience_maker = ExperienceMaker(
            self.generator, self.tokenizer, self.reward_source, n_samples_per_prompt=self.n_samples_per_prompt,
            micro_batch_size=self._rollout_micro(), temperature=self.temperature,
            reuse_rollout_logprobs=self.reuse_rollout_logprobs,
        )

    def export_model(self) -> nn.Module:
        """The policy (saved as a plain HF causal-LM folder at the end of ``fit``)."""
        return self.policy

    def _rollout_micro(self) -> Optional[int]:
        return self.rollout_micro_batch_size or self.micro_batch_size

    # ------------------------------------------------------------------ optimizer
    def _critic_named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        module = self.critic if self.critic is not None else self.value_head
        if module is None:  # critic: none
            return
        for name, p in module.named_parameters():
            if p.requires_grad:
                yield name, p

    def param_groups(self) -> list[dict[str, Any]]:
        """One optimizer, two parameter families: the policy at ``lr`` and the critic at ``critic_lr``."""
        policy = ((n, p) for n, p in self.policy.named_parameters() if p.requires_grad)
        return self.decay_groups(policy, self.lr) + self.decay_groups(self._critic_named_parameters(), self.critic_lr)

    def steps_per_iteration(self, rollout_batch_size: int) -> int:
        """Optimizer steps per PPO iteration: ``ppo_epochs * ceil(rollout_batch / mini_batch_size)``."""
        mbs = self.mini_batch_size or rollout_batch_size
        return self.ppo_epochs * math.ceil(rollout_batch_size / mbs)

    def total_optimizer_steps(self) -> int:
        """Optimizer steps of the run for the LR schedule (many per ``training_step``)."""
        if self._trainer is None:
            return 1
        dm = getattr(self.trainer, "datamodule", None)
        prompts = getattr(dm, "batch_size", None)
        rollouts = int(prompts) * self.n_samples_per_prompt if prompts else (self.mini_batch_size or 1)
        per_iter = self.steps_per_iteration(rollouts)
        if self.max_iterations:
            return self.max_iterations * per_iter
        if self.trainer.max_steps and self.trainer.max_steps > 0:
            return int(self.trainer.max_steps)
        return int(self.trainer.estimated_stepping_batches) * per_iter

    # ------------------------------------------------------------------ KLControlled protocol
    def last_rollout_stats(self) -> Mapping[str, float]:
        """Rank-reduced rollout statistics of the last iteration (``kl_seq_sum``, ``kl_token_mean``,
        ``num_sequences``, ``score_mean``, ``iteration``); not consumed by reading (every callback sees them)."""
        return MappingProxyType(self._last_stats)

    # ------------------------------------------------------------------ ExperienceAnnotatable protocol
    def rollout_view(self) -> Mapping[str, torch.Tensor]:
        """This iteration's per-sample tensors of all ranks (``callbacks.protocols.ExperienceAnnotatable``)."""
        return MappingProxyType(self._view)

    def register_experience_hook(self, name: str, hook: Any, needs_features: bool = False) -> None:
        """Register a hook that annotates every iteration's experience (see ``callbacks/protocols.py``)."""
        self.experience_hooks.register(name, hook, needs_features)

    # ------------------------------------------------------------------ hooks for derived methods
    def transform_scores(self, scores: torch.Tensor, experience: Experience) -> torch.Tensor:
        """Per-method transform of the raw scores ``(B,)`` before normalisation (e.g. a contrastive baseline).

        Identity here. ``experience.extras`` carries the prompt ids/texts/domains of the batch.
        """
        return scores

    def per_sample_kl_coef(self, experience: Experience) -> torch.Tensor:
        """``(B,)`` base KL coefficients before the experience hooks' ``kl_scale``: ``kl_coef`` everywhere here."""
        return torch.full((len(experience),), self.kl_coef, dtype=torch.float32, device=experience.device)

    def prepare_minibatch(self, minibatch: Experience, step: int) -> Experience:
        """Called before the micro-batches of each optimizer step that trains the policy (identity here); a method
        may set per-sample loss weights from statistics of the whole minibatch (e.g. GIL's invariance weights in
        ``extras["sample_weight"]``). ``step`` counts this iteration's optimizer steps (0: the parameters are still
        the rollout's). Collective under DDP when the method all-reduces: every rank calls it in step."""
        return minibatch

    def prepare_critic_minibatch(self, minibatch: Experience, step: int) -> Experience:
        """Called before the micro-batches of EVERY optimizer step when there is a critic (critic warm-up included;
        identity here): a method may put per-row coefficients of a critic-side term into ``extras`` (e.g. GIL's group
        head inside the critic). Collective under DDP when the method communicates: every rank calls it in step."""
        return minibatch

    #: :meth:`forward_micro` returns the critic trunk's hidden states (``PPOForwardOutput.critic_hidden``)
    needs_critic_hidden: bool = False

    def critic_extra_loss(self, micro: Experience, outputs: PPOForwardOutput) -> Optional[torch.Tensor]:
        """A term added AS IS to a micro-batch's loss when there is a critic (None here): the method makes the sum
        over micro-batches (and ranks, under DDP's gradient average) the term it means."""
        return None

    def extra_loss(self, minibatch: Experience, outputs: PPOForwardOutput) -> Optional[torch.Tensor]:
        """An additional loss for a micro-batch (None here). It is weighted by the micro-batch's share of the
        minibatch's rows, so a row-mean loss accumulates to the minibatch mean."""
        return None

    # ------------------------------------------------------------------ distributed helpers
    def reduce_fn(self) -> Optional[ReduceFn]:
        """Sum across ranks through the strategy (``None`` when not attached to a trainer)."""
        if self._trainer is None or self.trainer.world_size <= 1:
            return None
        strategy = self.trainer.strategy
        return lambda t: strategy.reduce(t, reduce_op="sum")

    def _global_sums(self, values: list[torch.Tensor]) -> list[float]:
        """Sum a list of scalar tensors across ranks in one all-reduce."""
        # CPU counts mix with device sums: stack them on the module's device
        t = torch.stack([v.detach().to(self.device, torch.float64).reshape(()) for v in values])
        fn = self.reduce_fn()
        if fn is not None:
            t = fn(t)
        return t.tolist()

    def _sync_time(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    # ------------------------------------------------------------------ forward passes (update phase)
    def _critic_values(self, sequences: torch.Tensor, attention_mask: torch.Tensor, prompt_length: int,
                       hidden: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``(B, R)`` values ``V_t`` of the state before response token ``t`` (``hidden``: the policy's last hidden
        states ``(B, P+R, H)`` for a shared critic)."""
        if self.critic is not None:
            return self.critic.token_values(sequences, attention_mask)[:, prompt_length - 1 : -1]
        assert hidden is not None and self.value_head is not None
        return self.value_head(hidden[:, prompt_length - 1 : -1]).squeeze(-1).float()

    # ------------------------------------------------------------------ 1. rollout
    def rollout_seed(self) -> int:
        """Seed of this iteration's sampling on this rank (same on resume)."""
        rank = self.global_rank if self._trainer is not None else 0
        return (self.seed * 1_000_003 + self.iteration * 7_919 + rank * 104_729) % (2**62)

    @torch.no_grad()
    def make_experience(self, batch: PromptBatch) -> Experience:
        """Sample ``n_samples_per_prompt`` responses per prompt and score them: old/ref log-probs, values, raw scores
        and, when a hook needs them, per-rollout features (spec 1.4 step 1; ``lightning_rlhf/rollout/maker.py``)."""
        assert self.experience_maker is not None, "build_models() was not called"
        maker = self.experience_maker
        t0 = self._sync_time()
        exp = maker.sample(self.policy, batch, seed=self.rollout_seed())
        t1 = self._sync_time()
        features = self.feature_source if self.experience_hooks.needs_features else None
        maker.forward_passes(exp, self.policy, self.reference, self.critic, self.value_head, features)
        exp.scores = self.score(exp)  # (B,)
        t2 = self._sync_time()
        exp.extras["_timing"] = {"generate": t1 - t0, "score": t2 - t1}
        return exp

    def score(self, exp: Experience) -> torch.Tensor:
        """``(B,)`` raw scores of the rollouts from the reward source (through the experience maker)."""
        assert self.experience_maker is not None, "build_models() was not called"
        return self.experience_maker.score(exp)

    def decode_responses(self, exp: Experience) -> list[str]:
        """Response texts up to and including EOS (special tokens skipped)."""
        assert self.experience_maker is not None, "build_models() was not called"
        return self.experience_maker.decode_responses(exp)

    def drop_nonfinite_rewards(self, exp: Experience) -> Experience:
        """Leave samples whose raw score is NaN/inf out of the update (``model.on_nonfinite_reward``).

        One process: those rows are removed (``exp.select``). Several ranks, or a group estimator (``grpo``,
        ``rloo``, which need every prompt's whole group): every rank must run the same number of minibatches and
        collectives, so the rows stay, with an empty response mask (no loss tokens, no score in the token rewards) and
        the score replaced by the mean finite score of all ranks (the running moments' mean is unchanged; in a group
        estimator that stand-in score enters its group's baseline). When no score of any rank is finite the batch is left as it is: the non-finite guard then skips the
        iteration's updates (``model.on_nonfinite``) and the running moments ignore the NaNs.
        """
        where = f"iteration {self.iteration}, rank {self.global_rank if self._trainer is not None else 0}"
        keep = check_scores(exp.scores, describe_reward_source(self.reward_source), self.on_nonfinite_reward,
                            exp.extras.get("prompt_ids"), where)
        finite = exp.scores[keep]
        n, n_bad, s = self._global_sums([torch.tensor(float(len(exp))), (~keep).sum(), finite.sum()])
        self.scored_samples += n
        self.nonfinite_reward_samples += n_bad
        self.log("reward/nonfinite_dropped", float(self.nonfinite_reward_samples), on_step=True, on_epoch=False,
                 batch_size=len(exp))
        if n_bad == 0 or n_bad == n:
            return exp
        world = self.trainer.world_size if self._trainer is not None else 1
        if world == 1 and self.advantage not in ("grpo", "rloo"):  # (group estimators need whole groups: masked)
            return exp.select(keep.nonzero().flatten().cpu())
        fill = s / max(n - n_bad, 1.0)
        exp.scores = torch.where(keep, exp.scores, torch.full_like(exp.scores, fill))
        dropped = ~keep.to(exp.action_mask.device)
        exp.action_mask = exp.action_mask.masked_fill(dropped[:, None], 0)
        exp.attention_mask[:, exp.prompt_length:] = exp.attention_mask[:, exp.prompt_length:].masked_fill(
            dropped[:, None], 0)
        for name in ("logprobs", "ref_logprobs", "values"):
            if getattr(exp, name) is not None:  # (no values without a critic)
                setattr(exp, name, getattr(exp, name) * exp.action_mask)
        return exp

    # ------------------------------------------------------------------ 2. score shaping
    def update_reward_moments(self, scores: torch.Tensor) -> None:
        """Fold this batch's scores (all ranks) into the running mean/variance (Chan's parallel update)."""
        scores = scores[torch.isfinite(scores)]  # a NaN/inf score must not poison the moments (its step is skipped)
        n, s, ss = self._global_sums([torch.tensor(float(scores.numel())), scores.sum(), (scores.double() ** 2).sum()])
        count, mean, var = update_moments(float(self.reward_count), float(self.reward_mean), float(self.reward_var),
                                          n, s, ss)
        self.reward_count.fill_(count)
        self.reward_mean.fill_(mean)
        self.reward_var.fill_(var)

    def normalize_scores(self, scores: torch.Tensor) -> torch.Tensor:
        """Running normalisation ``reward_norm`` (moments updated with this batch first)."""
        if self.reward_norm == "none":
            return scores
        self.update_reward_moments(scores)
        return normalize_scores(scores, float(self.reward_mean), float(self.reward_var), self.reward_norm,
                                self.reward_clip)

    def shape_scores(self, exp: Experience) -> torch.Tensor:
        """Spec 1.4 step 2: ``transform_scores`` -> running normalisation -> no-EOS penalty. Returns ``(B,)``."""
        shaped = self.transform_scores(exp.scores, exp)
        shaped = self.normalize_scores(shaped)
        if self.no_eos_penalty is not None:
            stopped = exp.extras["stopped_by_eos"].to(shaped.device)
            shaped = torch.where(stopped, shaped, shaped - self.no_eos_penalty)
        return shaped

    # ------------------------------------------------------------------ 3. rewards and advantages
    @torch.no_grad()
    def compute_advantages(self, exp: Experience) -> Experience:
        """Fill ``shaped_scores``, ``kl``, ``kl_coef`` (after the experience hooks), ``rewards``, ``advantages``,
        ``returns`` (steps 2-4)."""
        exp.shaped_scores = self.shape_scores(exp)
        mask = exp.action_mask
        exp.kl = kl_penalty(exp.logprobs, exp.ref_logprobs, self.kl_estimator) * mask  # (B, R)
        exp.kl_coef = self.per_sample_kl_coef(exp)  # (B,)
        self.annotate_experience(exp)  # the view; callbacks' kl_scale / sample_weight / other annotations
        # KL in the loss (GRPO): the rewards carry only the score
        reward_coef = exp.kl_coef if self.kl_in == "reward" else torch.zeros_like(exp.kl_coef)
        exp.rewards = token_rewards(exp.shaped_scores, exp.kl, reward_coef, mask)  # (B, R)
        if self.advantage == "gae":
            advantages, exp.returns = gae(exp.rewards, exp.values, mask, gamma=self.gamma, lam=self.lam)
            if self.whiten_advantages:
                advantages = masked_whiten(advantages, mask, reduce_fn=self.reduce_fn())
        elif self.advantage == "reinforce_pp":
            advantages, exp.returns = reinforce_pp_advantages(exp.rewards, mask, reduce_fn=self.reduce_fn())
        else:  # grpo / rloo: one advantage per rollout from its group, spread over its response tokens
            seq_returns = exp.rewards.sum(-1)  # (B,) shaped score - kl_coef_i * sum_t kl_t (KL in the reward)
            k = self.n_samples_per_prompt
            if self.advantage == "grpo":
                seq_adv = grpo_advantages(seq_returns, k, self.scale_rewards, reduce_fn=self.reduce_fn())
            else:
                seq_adv = rloo_advantages(seq_returns, k)
            advantages = seq_adv[:, None] * mask  # (B, R)
            exp.returns = seq_returns[:, None] * mask
        exp.advantages = advantages
        return exp

    def _gather_rows(self, t: torch.Tensor) -> torch.Tensor:
        """Rows of every rank in rank order (``(N, ...)`` from this rank's ``(B, ...)``); collective under DDP."""
        if self._trainer is None or self.trainer.world_size <= 1:
            return t
        return self.trainer.strategy.all_gather(t.contiguous()).flatten(0, 1)

    @torch.no_grad()
    def annotate_experience(self, exp: Experience) -> None:
        """Build the iteration's per-sample view over all ranks, run the experience hooks on it, and apply their
        annotations to this rank's rows: ``kl_coef *= kl_scale``, ``extras["sample_weight"]``, other keys into
        ``extras`` (``callbacks/protocols.py``, ``ExperienceAnnotatable``)."""
        B = len(exp)
        kl_seq = exp.kl.sum(-1)  # (B,)
        per_row = torch.stack([
            exp.scores.double(), exp.shaped_scores.double(), kl_seq.double(),
            exp.action_mask.sum(-1).double(), exp.extras["domain_ids"].to(exp.device).double(),
        ], dim=-1)  # (B, 5)
        rows = self._gather_rows(per_row)  # (N, 5)
        view: dict[str, torch.Tensor] = {
            "iteration": torch.tensor(self.iteration, dtype=torch.long),
            "scores": rows[:, 0].float(), "shaped_scores": rows[:, 1].float(), "kl": rows[:, 2].float(),
            "returns": (rows[:, 1] - self.kl_coef * rows[:, 2]).float(), "lengths": rows[:, 3].float(),
            "domain_ids": rows[:, 4].long(),
        }
        if "features" in exp.extras:
            view["features"] = self._gather_rows(exp.extras.pop("features"))
        rank = self.global_rank if self._trainer is not None else 0
        local = slice(rank * B, (rank + 1) * B)
        if len(self.experience_hooks):
            annotations = self.experience_hooks.run(view)
            for key, value in annotations.items():
                if key == KL_SCALE:
                    exp.kl_coef = exp.kl_coef * value[local].to(exp.kl_coef)
                else:
                    exp.extras[key] = value[local].to(exp.device)
        view["kl_coef"] = self._gather_rows(exp.kl_coef)
        self._view = view

    # ------------------------------------------------------------------ 4. update
    def forward_micro(self, micro: Experience, train_policy: bool, keep_policy_graph: bool = False) -> PPOForwardOutput:
        """Current log-probs, values and entropy of a micro-batch (with grad).

        With ``train_policy=False`` (critic warm-up) the policy forward is skipped for a separate critic, and the
        log-probs / shared trunk are detached, unless ``keep_policy_graph`` (DDP needs every parameter in the graph;
        the caller then adds ``0 * logprobs`` and drops the policy's gradients).
        """
        P = micro.prompt_length
        shared = self.critic_kind == "shared"
        logprobs = entropy = hidden = None
        if train_policy or shared or keep_policy_graph:
            logits, hidden = response_logits(self.policy, micro.sequences, micro.attention_mask, P, self.temperature,
                                             output_hidden_states=shared)
            logprobs = token_logprobs(logits, micro.responses)  # (b, R)
            if self.ent_coef > 0 and train_policy:
                entropy = entropy_from_logits(logits)
            else:
                with torch.no_grad():
                    entropy = entropy_from_logits(logits.detach())
            if not train_policy and not keep_policy_graph:
                logprobs = logprobs.detach()
                hidden = hidden.detach() if hidden is not None else None  # warm-up: no policy gradient
        values, critic_hidden = None, hidden
        if self.critic is not None and self.needs_critic_hidden:
            token_values, critic_hidden = self.critic.token_values(micro.sequences, micro.attention_mask,
                                                                   return_hidden=True)
            values = token_values[:, P - 1 : -1]
        elif self.critic_kind != "none":
            values = self._critic_values(micro.sequences, micro.attention_mask, P, hidden)
        return PPOForwardOutput(logprobs=logprobs, values=values, entropy=entropy, critic_hidden=critic_hidden)

    def loss_weights(self, micro: Experience) -> Optional[torch.Tensor]:
        """``(b,)`` per-rollout weights of the policy (and KL) loss terms: the ``loss_agg`` weight (``1 / length`` for
        ``seq_mean_token_mean``) times the callbacks' ``sample_weight``; ``None`` when both are 1."""
        weights = micro.extras.get("sample_weight")
        if self.loss_agg == "seq_mean_token_mean":
            inv_len = 1.0 / micro.action_mask.sum(-1).clamp_min(1).float()  # (b,)
            weights = inv_len if weights is None else weights * inv_len
        return weights

    def setup(self, stage: str) -> None:
        super().setup(stage)
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if stage == "fit" and self.ptx_coef > 0 and "ptx" not in (getattr(dm, "stream_names", None) or ()):
            self._ptx_slice(0, 1)  # raises: no ptx stream

    @property
    def required_streams(self) -> tuple[str, ...]:
        """Data streams a ``MultiStreamDataModule`` must provide: ``prompts``, and ``ptx`` when ``ptx_coef > 0``."""
        return ("prompts", "ptx") if self.ptx_coef > 0 else ("prompts",)

    def _ptx_slice(self, index: int, count: int) -> TokenBatch:
        """Slice ``index`` of ``count`` equal row slices of this iteration's ptx batch (minibatch ``index``'s share)."""
        batch = self._ptx_batch
        if batch is None:
            raise ValueError("model.ptx_coef > 0 needs a `ptx` data stream: data: {class_path: "
                             "lightning_rlhf.data.MultiStreamDataModule, init_args: {streams: {prompts: ..., ptx: "
                             "{class_path: lightning_rlhf.data.DemonstrationDataModule, ...}}}} "
                             "(configs/ppo/tiny_ptx.yaml)")
        n = len(batch)
        if n < count:
            raise ValueError(f"The ptx batch has {n} rows for {count} minibatches per iteration: raise "
                             "data.streams.ptx.init_args.batch_size to at least the number of minibatches "
                             "(rollout batch / model.mini_batch_size)")
        return batch.slice(index * n // count, (index + 1) * n // count)

    def ppo_update(self, exp: Experience) -> dict[str, float]:
        """``ppo_epochs x minibatches`` optimizer steps, each accumulated over micro-batches (step 5)."""
        train_policy = self.iteration >= self.critic_warmup_iters
        # DDP (find_unused_parameters=False) fails when the policy gets no gradient during critic warm-up: keep it in
        # the graph with a zero-weighted term and drop its gradients before the optimizer step
        anchor_policy = not train_policy and self._trainer is not None and self.trainer.world_size > 1
        self.policy.train()
        if self.critic is not None:
            self.critic.train()
        g = torch.Generator().manual_seed(self.rollout_seed())
        # statistics accumulate as device tensors (no host sync per micro-batch); read once at the end
        zero = torch.zeros((), dtype=torch.float64, device=self.device)
        keys = ("pg_loss", "v_loss", "entropy", "clip_frac", "approx_kl", "v_clip_frac", "ptx", "extra", "tokens",
                "grad_norm", "steps", "tokens_processed", "kl_loss")
        sums = {k: zero.clone() for k in keys}
        step = 0
        for _ in range(self.ppo_epochs):
            n_mb = math.ceil(len(exp) / (self.mini_batch_size or len(exp)))
            for mb_index, mb in enumerate(exp.minibatches(self.mini_batch_size or len(exp), shuffle=True, generator=g)):
                if train_policy:
                    mb = self.prepare_minibatch(mb, step)
                if self.critic_kind != "none":
                    mb = self.prepare_critic_minibatch(mb, step)
                step += 1
                # token-mean over the minibatch of ALL ranks: DDP averages gradients, so each rank divides its token
                # sum by (global tokens / world size); with unequal response lengths a per-rank mean would differ
                n_tokens = self.mean_over_ranks(mb.action_mask.sum()).clamp_min(1)
                # the policy (and KL) loss's normaliser: tokens (token_mean) or sequences of the minibatch, all ranks
                agg_norm = n_tokens if self.loss_agg == "token_mean" else self.mean_over_ranks(
                    torch.tensor(float(len(mb)), device=self.device)).clamp_min(1)
                micros = list(mb.minibatches(self.micro_batch_size or len(mb), shuffle=False))
                for i, micro in enumerate(micros):
                    out = self.forward_micro(micro, train_policy, keep_policy_graph=anchor_policy)
                    mask = micro.action_mask
                    loss = torch.zeros((), device=self.device)
                    v_loss = v_clip = None
                    if out.values is not None:
                        v_loss, v_clip = value_loss(out.values, micro.values, micro.returns, mask, self.value_clip,
                                                    n_tokens)
                        loss = loss + self.vf_coef * v_loss
                        critic_extra = self.critic_extra_loss(micro, out)
                        if critic_extra is not None:
                            loss = loss + critic_extra
                    if anchor_policy and out.logprobs is not None:
                        loss = loss + 0.0 * masked_sum(out.logprobs, mask)
                    if train_policy:
                        weights = self.loss_weights(micro)  # (b,) or None
                        out.policy = policy_loss(out.logprobs, micro.logprobs, micro.advantages, mask, self.clip_eps,
                                                 agg_norm, sample_weights=weights, clip_eps_high=self.clip_eps_high)
                        loss = loss + out.policy.loss
                        if self.kl_in == "loss" and self.kl_loss_coef > 0:
                            kl_tok = kl_penalty(out.logprobs, micro.ref_logprobs, "k3")  # (b, R), grad via logprobs
                            if weights is not None:
                                kl_tok = kl_tok * weights[:, None]
                            kl_loss = masked_sum(kl_tok, mask) / agg_norm
                            loss = loss + self.kl_loss_coef * kl_loss
                            sums["kl_loss"] += kl_loss.detach().double()
                        if self.ent_coef > 0:
                            loss = loss - self.ent_coef * masked_sum(out.entropy, mask) / n_tokens
                    extra = self.extra_loss(micro, out)
                    if extra is not None:
                        loss = loss + extra * (len(micro) / len(mb))
                        sums["extra"] += extra.detach().double() * len(micro) / len(mb)
                    if train_policy and self.ptx_coef > 0 and i == len(micros) - 1:
                        ptx = self._ptx_slice(mb_index, n_mb)
                        nll_sum, nll_n = masked_nll_sum(self.lm_forward(self.policy, ptx.input_ids, ptx.attention_mask),
                                                        ptx.input_ids, ptx.loss_mask)
                        # token mean over ALL ranks' ptx tokens (DDP averages the gradients of per-rank terms)
                        ptx_loss = nll_sum / self.mean_over_ranks(nll_n).clamp_min(1)
                        loss = loss + self.ptx_coef * ptx_loss
                        sums["ptx"] += ptx_loss.detach().double()
                    self.backward_micro(loss, sync=i == len(micros) - 1)
                    # token-weighted statistics (micro-batch quantities are over n_tokens of the minibatch)
                    m_tokens = mask.sum().double()
                    if v_loss is not None:
                        sums["v_loss"] += v_loss.detach().double()
                        sums["v_clip_frac"] += v_clip.double() * m_tokens
                    if out.entropy is not None:
                        sums["entropy"] += masked_sum(out.entropy.detach(), mask).double()
                    if out.policy is not None:
                        sums["pg_loss"] += out.policy.loss.detach().double()
                        sums["clip_frac"] += out.policy.clip_frac.double() * m_tokens
                        sums["approx_kl"] += out.policy.approx_kl.double() * m_tokens
                    sums["tokens"] += m_tokens
                    sums["tokens_processed"] += micro.attention_mask.sum().double()
                if not train_policy:
                    for p in self.policy.parameters():
                        p.grad = None  # critic warm-up: AdamW skips parameters without gradients
                sums["grad_norm"] += self.optimizer_update().double()
                sums["steps"] += 1
        vals = dict(zip(keys, torch.stack([sums[k] for k in keys]).tolist()))  # one host sync
        steps, toks = max(vals["steps"], 1.0), max(vals["tokens"], 1.0)
        out = {
            "policy/loss": vals["pg_loss"] / steps, "value/loss": vals["v_loss"] / steps,
            "policy/entropy": vals["entropy"] / toks, "policy/clip_frac": vals["clip_frac"] / toks,
            "policy/approx_kl": vals["approx_kl"] / toks, "value/clip_frac": vals["v_clip_frac"] / toks,
            "ptx/loss": vals["ptx"] / steps, "extra/loss": vals["extra"] / steps, "grad_norm": vals["grad_norm"] / steps,
            **({"kl/loss": vals["kl_loss"] / steps} if self.kl_in == "loss" else {}),
            "_tokens_processed": vals["tokens_processed"],
        }
        if self.critic_kind == "none":
            del out["value/loss"], out["value/clip_frac"]
        return out

    # ------------------------------------------------------------------ the iteration
    def training_step(self, batch: Union[PromptBatch, Mapping[str, Any]], batch_idx: int) -> dict[str, torch.Tensor]:
        """One PPO iteration: rollout -> scores/advantages -> PPO updates -> rank-reduced stats.

        ``batch`` is a ``PromptBatch``, or with a ``MultiStreamDataModule`` ``{"prompts": PromptBatch, "ptx":
        TokenBatch}`` (the ptx batch feeds the ptx term of this iteration's optimizer steps)."""
        if isinstance(batch, Mapping):
            batch, self._ptx_batch = batch["prompts"], batch.get("ptx")
        exp = self.drop_nonfinite_rewards(self.make_experience(batch))
        self.compute_advantages(exp)
        t0 = self._sync_time()
        upd = self.ppo_update(exp)
        t_update = self._sync_time() - t0
        stats = self.rollout_statistics(exp, upd, t_update)
        self._last_stats = {
            "kl_seq_sum": stats["kl"], "kl_token_mean": stats["kl/token_mean"],
            "num_sequences": stats["_num_sequences"], "score_mean": stats["score/mean"],
            "iteration": float(self.iteration),
        }
        self.iteration += 1
        logged = {k: v for k, v in stats.items() if not k.startswith("_")}
        prog = {"iteration", "score/mean", "kl"}
        self.log_dict({k: float(v) for k, v in logged.items() if k in prog}, prog_bar=True, on_step=True,
                      on_epoch=False, batch_size=len(exp))
        self.log_dict({k: float(v) for k, v in logged.items() if k not in prog}, on_step=True, on_epoch=False,
                      batch_size=len(exp))
        if self.log_samples_every_n and (self.iteration - 1) % self.log_samples_every_n == 0:
            self.log_samples(exp)
        if self.max_iterations is not None and self.iteration >= self.max_iterations:
            self.trainer.should_stop = True
        return {k: torch.tensor(float(v)) for k, v in logged.items()}

    def validation_step(self, batch: PromptBatch, batch_idx: int) -> None:
        """Held-out evaluation (:mod:`lightning_rlhf.methods.online_eval`): sample with fixed seeds, score, judge."""
        self.evaluator.validation_step(self, batch)

    def on_validation_epoch_end(self) -> None:
        self.evaluator.log(self)

    def rollout_statistics(self, exp: Experience, upd: dict[str, float], t_update: float) -> dict[str, float]:
        """Iteration statistics; sums and counts are reduced across ranks in one all-reduce."""
        mask = exp.action_mask.float()
        lengths = mask.sum(-1)  # (B,)
        kl_rows = exp.kl.sum(-1)  # (B,)
        stopped = exp.extras["stopped_by_eos"].float()
        passes = 1 + int("rollout_logprobs" not in exp.extras or not self.reuse_rollout_logprobs) \
            + int(self.critic_kind == "separate")  # reference, policy (unless reused), separate critic
        score_tokens = float(exp.attention_mask.sum()) * passes
        (n, s_sum, s_sq, sh_sum, kl_sum, kl_tok, n_tok, no_eos, len_sum, coef_sum, all_score_tok, all_upd_tok) = \
            self._global_sums([
                torch.tensor(float(len(exp))), exp.scores.sum(), (exp.scores.double() ** 2).sum(),
                exp.shaped_scores.sum(), kl_rows.sum(), exp.kl.sum(), mask.sum(), (1 - stopped).sum(), lengths.sum(),
                exp.kl_coef.sum(), torch.tensor(score_tokens), torch.tensor(float(upd["_tokens_processed"])),
            ])
        n_tok = max(n_tok, 1.0)
        mean = s_sum / n
        timing = exp.extras.get("_timing", {})
        stats = {
            "iteration": float(self.iteration),
            "score/mean": mean,
            "score/std": math.sqrt(max(s_sq / n - mean**2, 0.0) * n / max(n - 1, 1)),
            "score/shaped_mean": sh_sum / n,
            "kl": kl_sum / n,
            "kl/token_mean": kl_tok / n_tok,
            "kl_coef": self.kl_coef,
            "kl_coef/sample_mean": coef_sum / n,
            "response/length": len_sum / n,
            "response/no_eos_frac": no_eos / n,
            "time/generate": timing.get("generate", 0.0),
            "time/score": timing.get("score", 0.0),
            "time/update": t_update,
            # tokens of all ranks per second of this rank's phase time (the ranks run the phases in step)
            "tokens_per_s/generate": n_tok / max(timing.get("generate", 0.0), 1e-9),
            "tokens_per_s/score": all_score_tok / max(timing.get("score", 0.0), 1e-9),
            "tokens_per_s/update": all_upd_tok / max(t_update, 1e-9),
            "lr": self.current_lr(),
            "_num_sequences": n,
        }
        if exp.values is not None:  # (every rank has a critic or none: the collective below runs on all or none)
            stats["value/explained_var"] = float(explained_variance(exp.values, exp.returns, exp.action_mask,
                                                                    self.reduce_fn()))
        # update-phase averages are local per rank; average them too so every rank logs the same numbers
        keys = [k for k in upd if not k.startswith("_")]
        world = float(self.trainer.world_size) if self._trainer is not None else 1.0
        reduced = self._global_sums([torch.tensor(upd[k]) for k in keys])
        stats.update({k: v / world for k, v in zip(keys, reduced)})
        return stats

    def log_samples(self, exp: Experience) -> None:
        """A markdown table of a few prompts / responses / scores (TensorBoard ``add_text`` and the console log)."""
        if self._trainer is None or not self.trainer.is_global_zero:
            return
        k = min(self.num_logged_samples, len(exp))
        responses = exp.extras.get("responses") or self.decode_responses(exp.select(slice(0, k)))
        prompts = exp.extras.get("prompts") or [""] * k
        table = sample_table(prompts[:k], responses[:k], exp.scores[:k].tolist(), exp.shaped_scores[:k].tolist())
        log_sample_table(self.loggers, table, step=self.iteration)

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Drop frozen models (base), keep the iteration counter and ``kl_coef``."""
        super().on_save_checkpoint(checkpoint)
        checkpoint["kl_coef"] = self.kl_coef

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore the iteration counter and ``kl_coef``; frozen models are rebuilt from their paths."""
        super().on_load_checkpoint(checkpoint)
        self.kl_coef = float(checkpoint.get("kl_coef", self.kl_coef))
