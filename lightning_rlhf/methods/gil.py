"""GIL: Group Invariant Learning (Zheng et al., arXiv 2310.11971; spec 2), PPO with an invariant policy objective.

A GIL run is this module plus two callbacks, in this order in ``trainer.callbacks``:

1. ``callbacks.group_inference.GroupInference``: infers groups of rollouts (no labels) by maximising the
   between-group variance of returns, and annotates each rollout with ``q(g | tau)`` (``group_posterior``) and
   ``g_high`` (spec 2a);
2. ``callbacks.adaptive_exploration.AdaptiveExploration`` (optional): a per-sample KL scale from ``q(g_high | tau)``,
   composed with ``kl_coef`` (and with ``AdaptiveKLController`` when present; spec 2c);

and this module trains the policy to do well on EVERY group (spec 2b), read top to bottom:

- one iteration is PPO's (``PPOModule.training_step``): rollout -> the callbacks' hooks (group head step,
  ``eta_i``) -> token rewards, GAE -> ``ppo_epochs x minibatches`` optimizer steps;
- before each optimizer step (:meth:`GILModule.prepare_minibatch`) the invariant objective enters as per-sample
  weights of PPO's token-mean policy loss, computed from the GLOBAL group statistics of the minibatch at the current
  parameters (``lightning_rlhf.losses.gil``): ``invariance: variance`` gives the gradient of
  ``L_pg + beta_policy * Var_g[J_g]``, ``invariance: worst_group`` that of ``-sum_g w_g J_g`` with Group-DRO weights
  ``w_g`` updated by exponentiated gradient each step. Exact under micro-batching and DDP: the only communication is
  one all-reduce of ``2M + 1`` numbers per optimizer step.

Cost: the surrogates ``J_i`` at the current parameters. At an iteration's first optimizer step the ratio is 1 and
``J_i`` is the token-mean of rollout ``i``'s advantages (free); every later step takes a no-grad policy forward over
the minibatch (``surrogate_prepass``), i.e. about one third of a policy forward+backward more per optimizer step
after the first. With ``ppo_epochs: 1`` and one minibatch per iteration GIL's update costs what PPO's does.
``surrogate_prepass: never`` keeps the coefficients of the first step for the whole iteration (a linearisation
at the rollout policy: no extra pass, not exact after the first step).

The group head inside the critic (``GroupInference(placement="critic")``, the paper's placement): this module
implements ``callbacks.protocols.GroupHeadHost``. The head is built with the critic (``build_models``), is a
submodule (``group_head``: in the state dict and checkpoints), and is trained by the critic's optimizer (its own
parameter group at the callback's ``lr``) with the critic loss ``vf_coef * L_value + critic_loss_weight * L_group``,
``L_group`` the callback's objective on the critic's last-token hidden state WITH grad (the separate critic's trunk,
or the shared policy trunk with ``critic: shared``). ``L_group`` couples the rows of a minibatch, so before each
optimizer step (:meth:`GILModule.prepare_critic_minibatch`) its value and ``dL_group/dq_i`` are computed on the
minibatch of all ranks at the current parameters (one all-gather of ``(B, M+1)`` numbers); each micro-batch adds
``sum_i c_i . q_i`` (exact under micro-batching and DDP). ``q`` at the current parameters: at an iteration's first
optimizer step the rollout's features (free), at later ones a no-grad critic forward over the minibatch.

Which parts are the paper's: a group-inference classifier maximising a variance objective (inside the critic with
``placement: critic``), binary groups, an invariance objective over the inferred groups, ``p(g_high)`` tightening the
KL. Our choices (spec 2): the V-REx form of the penalty, the Group-DRO option, the exact per-sample-weight
implementation, the separate group head (the default placement).
"""

from __future__ import annotations

from typing import Any, Callable, Literal, Optional

import torch
from torch import nn

from callbacks.group_inference import GROUP_HIGH, GROUP_POSTERIOR
from callbacks.protocols import SAMPLE_WEIGHT, GroupLoss
from lightning_rlhf.advantages import masked_mean
from lightning_rlhf.data.batches import PromptBatch
from lightning_rlhf.losses.gil import (
    Invariance,
    group_dro_update,
    group_means,
    group_statistics,
    group_objective_row_gradients,
    group_surrogates,
    hosted_group_surrogate,
    invariance_sample_weights,
    variance_penalty,
)
from lightning_rlhf.methods.base import check_choice
from lightning_rlhf.losses.ppo import policy_loss
from lightning_rlhf.methods.ppo import PPOModule
from lightning_rlhf.rollout.experience import Experience
from lightning_rlhf.rollout.maker import last_token_features, response_logits
from lightning_rlhf.rollout.scoring import token_logprobs

SurrogatePrepass = Literal["auto", "always", "never"]


class GILModule(PPOModule):
    """PPO with GIL's invariant policy objective over groups inferred by ``callbacks.group_inference.GroupInference``.

    Needs a ``GroupInference`` callback (it writes ``group_posterior``); ``AdaptiveExploration`` is optional. All of
    :class:`~lightning_rlhf.methods.ppo.PPOModule`'s arguments apply (``feature_source`` picks the features the
    group head sees: ``critic``, the default, or ``policy``).

    Logged every iteration, besides PPO's: ``gil/var_J`` (``Var_g[J_g]`` before each optimizer step, averaged),
    ``gil/J_g{g}``, ``gil/weight_min`` / ``gil/weight_max`` (of the per-sample loss weights), ``gil/dro_w{g}``
    (``worst_group``); ``gil/score_g{g}`` (posterior-weighted raw score per inferred group), ``gil/score_high`` /
    ``gil/score_low`` / ``gil/score_gap``, and per data domain ``score/domain_<name>`` and ``score/worst_domain``;
    with the group head in the critic (``GroupInference(placement="critic")``) ``gil/critic_group_loss`` (``L_group``
    before each optimizer step, averaged).

    Args:
        invariance: ``variance`` (``L_pg + beta_policy * Var_g[J_g]``, V-REx style) or ``worst_group`` (Group DRO:
            ``-sum_g w_g J_g``, ``w_g <- w_g exp(dro_step_size * (-J_g))``, normalised).
        beta_policy: Weight of the variance penalty (``variance``); 1.0 matches whitened advantages.
        num_groups: Number of groups ``M``; must equal the ``GroupInference`` callback's ``num_groups``.
        dro_step_size: Exponentiated-gradient step of the Group-DRO weights (``worst_group``).
        surrogate_prepass: How ``J_i`` at the current parameters is obtained: ``auto`` (the advantages' token-mean
            at an iteration's first optimizer step, a no-grad policy forward over the minibatch at later ones;
            exact), ``always`` (the forward at every step), ``never`` (first step's coefficients for every step;
            no extra pass, a linearisation).
    """

    def __init__(
        self,
        invariance: Invariance = "variance",
        beta_policy: float = 1.0,
        num_groups: int = 2,
        dro_step_size: float = 0.01,
        surrogate_prepass: SurrogatePrepass = "auto",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        check_choice("invariance", invariance, ("variance", "worst_group"))
        if beta_policy < 0:
            raise ValueError(f"model.beta_policy must be >= 0, got {beta_policy}")
        if num_groups < 2:
            raise ValueError(f"model.num_groups must be >= 2, got {num_groups}")
        if dro_step_size < 0:
            raise ValueError(f"model.dro_step_size must be >= 0, got {dro_step_size}")
        check_choice("surrogate_prepass", surrogate_prepass, ("auto", "always", "never"))
        if getattr(self, "kl_in", "reward") != "reward":
            raise ValueError("GILModule needs model.kl_in: reward (the KL enters the token rewards, where adaptive "
                             "exploration scales it; with kl_in: loss the invariance weights would also weight the "
                             "KL loss)")
        self.invariance: Invariance = invariance
        self.beta_policy = float(beta_policy)
        self.num_groups = int(num_groups)
        self.dro_step_size = float(dro_step_size)
        self.surrogate_prepass: SurrogatePrepass = surrogate_prepass
        # Group-DRO weights, global (identical on every rank), saved in checkpoints
        self.register_buffer("dro_weights", torch.full((num_groups,), 1.0 / num_groups, dtype=torch.float64))
        self._frozen_stats: Optional[torch.Tensor] = None  # surrogate_prepass: never
        self._gil_sums: dict[str, torch.Tensor] = {}
        # GroupHeadHost (GroupInference placement: critic): the head and how it is built and trained
        self.group_head: Optional[nn.Module] = None
        self._group_head_spec: Optional[tuple[Callable[[int], nn.Module], GroupLoss, float, Optional[float]]] = None

    # ------------------------------------------------------------------ the group head inside the critic
    def install_group_head(self, build_head: Callable[[int], nn.Module], loss_fn: GroupLoss, loss_weight: float,
                           lr: Optional[float] = None) -> None:
        """Host ``GroupInference``'s head in the critic (``callbacks.protocols.GroupHeadHost``; see the module
        docstring). Built now if the models exist, else with them (before checkpoints are restored)."""
        if self.critic_kind == "none":
            raise ValueError("GroupInference(placement='critic') puts the group head inside the critic, but "
                             "model.critic: none builds no critic: set model.critic: separate | shared, or use "
                             "GroupInference placement: separate")
        if self.feature_source != "critic":
            raise ValueError(f"GroupInference(placement='critic') reads the critic's hidden state; "
                             f"model.feature_source is {self.feature_source!r}: set model.feature_source: critic "
                             f"(or use GroupInference placement: separate)")
        first = self._group_head_spec is None
        self._group_head_spec = (build_head, loss_fn, float(loss_weight), lr)
        if self._models_built and (first or self.group_head is None):
            self._build_group_head()

    def _build_group_head(self) -> None:
        assert self._group_head_spec is not None
        config = self.critic.config if self.critic is not None else self.policy.config
        config = config.get_text_config() if hasattr(config, "get_text_config") else config
        head = self._group_head_spec[0](int(config.hidden_size))
        self.group_head = head.to(next(self.policy.parameters()).device)

    def build_models(self) -> None:
        """PPO's models, and the group head inside the critic when one was installed."""
        super().build_models()
        if self._group_head_spec is not None:
            self._build_group_head()

    @property
    def needs_critic_hidden(self) -> bool:  # type: ignore[override]
        """The update needs the critic's hidden states when it hosts the group head."""
        return self.group_head is not None

    def param_groups(self) -> list[dict[str, Any]]:
        """PPO's groups, plus the hosted group head's at its own learning rate (the critic's by default)."""
        groups = super().param_groups()
        if self.group_head is not None and self._group_head_spec is not None:
            lr = self._group_head_spec[3]
            named = ((f"group_head.{n}", p) for n, p in self.group_head.named_parameters() if p.requires_grad)
            groups += self.decay_groups(named, self.critic_lr if lr is None else lr)
        return groups

    @torch.no_grad()
    def annotate_experience(self, exp: Experience) -> None:
        """PPO's, keeping (hosted group head) this rank's rollout features and sequence returns for the critic's
        group term."""
        features = exp.extras.get("features")
        super().annotate_experience(exp)
        if self.group_head is not None:
            assert features is not None, "the module computes features when GroupInference registered its hook"
            exp.extras["group_features"] = features
            # the rollout view's returns (callbacks.protocols): shaped score - kl_coef * summed KL
            exp.extras["group_returns"] = (exp.shaped_scores.double() - self.kl_coef * exp.kl.sum(-1).double()).float()

    @torch.no_grad()
    def current_critic_features(self, minibatch: Experience) -> torch.Tensor:
        """``(B, H)`` the critic's last-token hidden state at the current parameters (no grad, micro-batched)."""
        out = []
        for micro in minibatch.minibatches(self.micro_batch_size or len(minibatch), shuffle=False):
            if self.critic is not None:
                _, hidden = self.critic.token_values(micro.sequences, micro.attention_mask, return_hidden=True)
            else:
                _, hidden = response_logits(self.policy, micro.sequences, micro.attention_mask, micro.prompt_length,
                                            self.temperature, output_hidden_states=True)
            out.append(last_token_features(hidden, micro.attention_mask))
        return torch.cat(out)

    def prepare_critic_minibatch(self, minibatch: Experience, step: int) -> Experience:
        """Hosted group head: ``extras["group_loss_coef"]`` ``(B, M)`` = ``critic_loss_weight * world_size *
        dL_group/dq`` of this rank's rows, ``L_group`` evaluated on the minibatch of all ranks (DDP averages the
        ranks' gradients, hence the world size)."""
        if self.group_head is None:
            return minibatch
        assert self._group_head_spec is not None
        _, loss_fn, weight, _ = self._group_head_spec
        with torch.no_grad():
            if step == 0:  # still the rollout's parameters: the rollout's features
                features = minibatch.extras["group_features"]
            else:
                features = self.current_critic_features(minibatch)
            head_param = next(self.group_head.parameters())
            q = torch.softmax(self.group_head(features.to(head_param.device, head_param.dtype)), dim=-1).float()
            returns = minibatch.extras["group_returns"].to(q.device, torch.float32)
            rows = self._gather_rows(torch.cat([q, returns[:, None]], dim=-1))  # (N, M + 1)
        loss, coef = group_objective_row_gradients(loss_fn, rows[:, -1], rows[:, :-1])
        world = self.trainer.world_size if self._trainer is not None else 1
        rank = self.global_rank if self._trainer is not None else 0
        B = len(minibatch)
        minibatch.extras["group_loss_coef"] = coef[rank * B:(rank + 1) * B] * (weight * world)
        s = self._gil_sums
        s["critic_group_loss"] = s.get("critic_group_loss", 0.0) + loss
        s["critic_steps"] = s.get("critic_steps", 0.0) + 1.0
        return minibatch

    def critic_extra_loss(self, micro: Experience, outputs: Any) -> Optional[torch.Tensor]:
        """Hosted group head: ``sum_i c_i . q_i`` of the micro-batch, ``q`` on the critic's hidden state with grad."""
        if self.group_head is None or "group_loss_coef" not in micro.extras:
            return None
        if outputs.critic_hidden is None:
            raise RuntimeError("GILModule: the hosted group head needs the critic's hidden states in the update")
        features = last_token_features(outputs.critic_hidden, micro.attention_mask, detach=False)
        head_param = next(self.group_head.parameters())
        q = torch.softmax(self.group_head(features.to(head_param.dtype)), dim=-1)
        return hosted_group_surrogate(q, micro.extras["group_loss_coef"])

    # ------------------------------------------------------------------ the invariant objective
    @torch.no_grad()
    def current_surrogates(self, minibatch: Experience) -> torch.Tensor:
        """``(B,)`` ``J_i`` at the current parameters: a no-grad policy forward, micro-batched like the update."""
        out = []
        for micro in minibatch.minibatches(self.micro_batch_size or len(minibatch), shuffle=False):
            logits, _ = response_logits(self.policy, micro.sequences, micro.attention_mask, micro.prompt_length,
                                        self.temperature)
            logprobs = token_logprobs(logits, micro.responses)
            out.append(policy_loss(logprobs, micro.logprobs, micro.advantages, micro.action_mask, self.clip_eps,
                                   clip_eps_high=getattr(self, "clip_eps_high", None)).per_sample_surrogate)
        return torch.cat(out)

    def policy_loss_rows(self, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """How PPO's policy loss weighs each row's ``J_i`` (``model.loss_agg``): ``(c_i (B,), this rank's part of D)``
        with ``L_pg = -sum_i c_i J_i / D`` (``lightning_rlhf.losses.gil.loss_gradient_to_sample_weights``)."""
        lengths = mask.sum(-1).double()  # (B,)
        agg = getattr(self, "loss_agg", "token_mean")
        coef = torch.ones_like(lengths) if agg == "seq_mean_token_mean" else lengths
        part = lengths.sum() if agg == "token_mean" else torch.tensor(float(len(lengths)), dtype=torch.float64,
                                                                         device=lengths.device)
        return coef, part

    def global_group_statistics(self, j: torch.Tensor, posterior: torch.Tensor,
                                mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(2, M)`` group sums and PPO's policy-loss normaliser ``D`` of the whole minibatch over ranks (one
        all-reduce of ``2M + 1`` numbers)."""
        _, part = self.policy_loss_rows(mask)
        packed = torch.cat([group_statistics(j.double(), posterior.double()).flatten(), part.reshape(1)])
        fn = self.reduce_fn()
        if fn is not None:
            packed = fn(packed)
        return packed[:-1].reshape(2, -1), packed[-1].clamp_min(1.0)

    @torch.no_grad()
    def prepare_minibatch(self, minibatch: Experience, step: int) -> Experience:
        """Set ``extras["sample_weight"]`` so that PPO's loss has the gradient of GIL's objective on the minibatch
        (multiplying any weight a callback set)."""
        q = minibatch.extras.get(GROUP_POSTERIOR)
        if q is None:
            raise RuntimeError("GILModule: the experience has no 'group_posterior'; add "
                               "callbacks.group_inference.GroupInference to trainer.callbacks")
        if q.shape[1] != self.num_groups:
            raise ValueError(f"model.num_groups={self.num_groups} but the group posterior has {q.shape[1]} groups "
                             f"(GroupInference num_groups)")
        mask = minibatch.action_mask
        if step == 0 or self.surrogate_prepass == "never":
            if self.surrogate_prepass == "always":
                j = self.current_surrogates(minibatch)
            else:  # the rollout's parameters: ratio 1, min(A r, A clip(r)) = A
                j = masked_mean(minibatch.advantages, mask, dim=-1)
        else:
            j = self.current_surrogates(minibatch)
        stats, normalizer = self.global_group_statistics(j, q, mask)
        j_g = group_surrogates(stats)
        if self.invariance == "worst_group":
            self.dro_weights.copy_(group_dro_update(self.dro_weights.double(), -j_g, self.dro_step_size))
        coef, _ = self.policy_loss_rows(mask)
        weights = invariance_sample_weights(self.invariance, q.double(), coef, stats, normalizer,
                                            self.beta_policy, self.dro_weights.double())
        if SAMPLE_WEIGHT in minibatch.extras:
            weights = weights * minibatch.extras[SAMPLE_WEIGHT].double()
        minibatch.extras[SAMPLE_WEIGHT] = weights.float()
        # statistics (global except the weight range, which is this rank's)
        s = self._gil_sums
        s["var_J"] = s.get("var_J", 0.0) + variance_penalty(j_g)
        s["J_g"] = s.get("J_g", 0.0) + j_g
        s["steps"] = s.get("steps", 0.0) + 1.0
        s["weight_min"] = torch.minimum(s.get("weight_min", weights.min()), weights.min())
        s["weight_max"] = torch.maximum(s.get("weight_max", weights.max()), weights.max())
        return minibatch

    def ppo_update(self, exp: Experience) -> dict[str, float]:
        """PPO's update (with the weights of :meth:`prepare_minibatch`) plus the invariance statistics."""
        self._gil_sums = {}
        upd = super().ppo_update(exp)
        s, self._gil_sums = self._gil_sums, {}
        if "critic_steps" in s:
            upd["gil/critic_group_loss"] = float(s["critic_group_loss"]) / float(s["critic_steps"])
        if "steps" in s:
            steps = float(s["steps"])
            upd["gil/var_J"] = float(s["var_J"]) / steps
            for g, v in enumerate((s["J_g"] / steps).tolist()):
                upd[f"gil/J_g{g}"] = v
            upd["gil/weight_min"], upd["gil/weight_max"] = float(s["weight_min"]), float(s["weight_max"])
        if self.invariance == "worst_group":
            for g, v in enumerate(self.dro_weights.tolist()):
                upd[f"gil/dro_w{g}"] = v
        return upd

    # ------------------------------------------------------------------ per-group logs
    def training_step(self, batch: PromptBatch, batch_idx: int) -> dict[str, torch.Tensor]:
        """PPO's iteration, then per-group and per-domain scores of the rollout (from the all-rank view)."""
        out = super().training_step(batch, batch_idx)
        view = self.rollout_view()
        metrics: dict[str, float] = {}
        scores = view["scores"].double()
        if GROUP_POSTERIOR in view:
            q = view[GROUP_POSTERIOR].double()
            per_group = group_means(scores, q)
            for g, v in enumerate(per_group.tolist()):
                metrics[f"gil/score_g{g}"] = v
            g_high = int(view[GROUP_HIGH][0]) if GROUP_HIGH in view else int(per_group.argmax())
            rest = torch.cat([q[:, :g_high], q[:, g_high + 1:]], dim=1).sum(-1, keepdim=True)
            metrics["gil/score_high"] = float(per_group[g_high])
            metrics["gil/score_low"] = float(group_means(scores, rest)[0])
            metrics["gil/score_gap"] = metrics["gil/score_high"] - metrics["gil/score_low"]
        domains = view["domain_ids"]
        names = self.domain_names()
        present = sorted(set(domains.tolist()))
        if len(present) > 1:
            per_domain = {d: float(scores[domains == d].mean()) for d in present}
            for d, v in per_domain.items():
                metrics[f"score/domain_{names[d] if d < len(names) else d}"] = v
            metrics["score/worst_domain"] = min(per_domain.values())
        if metrics:
            self.log_dict(metrics, on_step=True, on_epoch=False, batch_size=len(scores))
            out.update({k: torch.tensor(v) for k, v in metrics.items()})
        return out
