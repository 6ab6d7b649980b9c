"""Protocols a LightningModule implements so that the callbacks in this folder can talk to it.

Callbacks import only ``lightning``, ``torch`` and the standard library; they never import ``lightning_rlhf``.
A module opts in by providing the members below (structural typing: no base class needed), and a callback
checks ``isinstance(pl_module, Protocol)`` in ``setup`` and raises a ``TypeError`` naming what is missing.
"""

from __future__ import annotations

from typing import Callable, Mapping, Optional, Protocol, runtime_checkable

import torch
from torch import nn


@runtime_checkable
class KLControlled(Protocol):
    """A module with a scalar KL coefficient that a controller may adapt (e.g. PPO's ``beta``).

    Attributes:
        kl_coef: the KL coefficient used in the next rollout's token rewards; settable.
    """

    kl_coef: float

    def last_rollout_stats(self) -> Mapping[str, float]:
        """Statistics of the latest rollout, ALREADY averaged across ranks.

        The same values must be returned on every rank (so ranks that adapt a coefficient stay identical).
        Reading does not consume them: several callbacks may read the same iteration's statistics. A module that
        returns an ``iteration`` key lets a reader tell a new rollout from one it has already seen (the
        ``AdaptiveKLController`` updates once per ``iteration`` value); without that key, a module must return an
        empty mapping (or ``num_sequences == 0``) when there was no rollout since the previous call.

        Returns:
            A mapping with at least:

            - ``kl_seq_sum``: mean over sequences of the sum over response tokens of ``kl_t``;
            - ``kl_token_mean``: mean of ``kl_t`` over all response tokens;
            - ``num_sequences``: number of sequences of that rollout, summed over ranks;
            - ``iteration`` (optional): the iteration the statistics belong to.
        """
        ...


def missing_members(obj: object, protocol: type) -> list[str]:
    """Names of the members of ``protocol`` that ``obj`` lacks (for error messages).

    Args:
        obj: the object to check (usually the LightningModule).
        protocol: a ``typing.Protocol`` class.

    Returns:
        Sorted member names; empty when ``obj`` implements the protocol.
    """
    names = set(getattr(protocol, "__annotations__", {}))
    names |= {n for n, v in vars(protocol).items() if callable(v) and not n.startswith("_")}
    return sorted(n for n in names if not hasattr(obj, n))


def require_protocol(obj: object, protocol: type, user: str, needs: str = "", advice: str = "") -> None:
    """Raise a ``TypeError`` naming ``user``, ``protocol`` and the members ``obj`` lacks unless ``obj`` implements it.

    The check every callback's ``setup`` makes before it talks to the module.

    Args:
        obj: the object to check (usually the LightningModule).
        protocol: a ``runtime_checkable`` ``typing.Protocol`` class of this module.
        user: who needs it, e.g. ``"AdaptiveKLController"``.
        needs: what the protocol asks for, in words (``" (a settable `kl_coef` ...)"``), placed after its name.
        advice: text after the list of missing members (what to do instead).
    """
    if not isinstance(obj, protocol):
        missing = ", ".join(missing_members(obj, protocol)) or "?"
        raise TypeError(f"{user} needs a LightningModule implementing callbacks.protocols.{protocol.__name__}{needs}; "
                        f"{type(obj).__name__} lacks: {missing}{advice}")


# ---------------------------------------------------------------------------------------------------------------
# The contract of methods that act in the middle of an iteration (GIL's group inference and adaptive exploration,
# anything a user writes): a non-consuming view of the iteration's per-sample tensors, and hooks that annotate the
# experience between the rollout and the advantages.
# ---------------------------------------------------------------------------------------------------------------

#: ``hook(view) -> annotations``: see :class:`ExperienceAnnotatable`.
ExperienceHook = Callable[[Mapping[str, torch.Tensor]], Mapping[str, torch.Tensor]]

#: annotation keys the module itself acts on; any other key is stored and shown to later hooks and the method
KL_SCALE = "kl_scale"
SAMPLE_WEIGHT = "sample_weight"


@runtime_checkable
class ExperienceAnnotatable(Protocol):
    """A module whose iterations show callbacks their per-sample rollout tensors and take per-sample annotations.

    The view (``rollout_view()``) is a mapping of detached tensors over the rollouts of ALL ranks, in rank order
    (``N`` = sum over ranks of the rank's rollouts), identical on every rank, so a callback that computes something
    from it (a group head step, a per-sample coefficient) decides the same on every rank without communicating.
    Reading it does not consume it: any number of callbacks may read it, and it stays until the next iteration's
    rollout replaces it (``view["iteration"]`` says which iteration it belongs to).

    Keys of the view, all with first dimension ``N`` unless said otherwise:

    - ``iteration``: 0-dim long tensor, the module's iteration counter of the rollout;
    - ``scores``: ``(N,)`` raw sequence scores from the reward source;
    - ``shaped_scores``: ``(N,)`` scores after the method's transform, normalisation and penalties;
    - ``kl``: ``(N,)`` per-sequence sum over response tokens of ``kl_t`` (the unit of ``kl_coef``);
    - ``returns``: ``(N,)`` sequence return ``shaped_scores - kl_coef * kl`` with the module's scalar ``kl_coef``;
    - ``lengths``: ``(N,)`` response lengths in tokens;
    - ``domain_ids``: ``(N,)`` long, index of the data's ``domain`` column (0 when the data has none);
    - ``features``: ``(N, H)`` float32 per-rollout features (e.g. a hidden state at the last response token); only
      present when a hook was registered with ``needs_features=True``;
    - after the hooks ran: every annotation they returned, and ``kl_coef``: ``(N,)`` the per-sample coefficient used.

    Hooks run once per iteration, after the scores are shaped and the per-token KL is known and before the token
    rewards and advantages, in registration order; each sees the view updated with the annotations of the hooks
    before it. A hook returns a mapping of ``(N, ...)`` tensors. Keys the module acts on:

    - ``kl_scale`` (:data:`KL_SCALE`): ``(N,)`` multiplies the per-sample KL coefficient. The coefficient of sample
      ``i`` is ``kl_coef * prod_hooks kl_scale_i``, where ``kl_coef`` is the module's scalar coefficient (the one an
      adaptive-KL controller sets; composition, never replacement);
    - ``sample_weight`` (:data:`SAMPLE_WEIGHT`): ``(N,)`` multiplies sample ``i``'s term of the policy loss (weights of
      several hooks multiply).

    Any other key (e.g. ``group_posterior`` ``(N, M)``) is kept in the view and in the experience's extras (this
    rank's rows) for the method and for later hooks.
    """

    def rollout_view(self) -> Mapping[str, torch.Tensor]:
        """The current iteration's per-sample view (see the class docstring); empty before the first rollout."""
        ...

    def register_experience_hook(self, name: str, hook: ExperienceHook, needs_features: bool = False) -> None:
        """Register ``hook`` under ``name`` (registering a name again replaces that hook, keeping its place).

        Args:
            name: a unique name, e.g. the callback's class name.
            hook: called once per iteration with the view; returns per-sample annotations.
            needs_features: the module must then compute and add ``features`` to the view.
        """
        ...


#: ``loss_fn(returns (N,), posterior (N, M)) -> scalar``: the group objective a hosted head is trained to minimise
GroupLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@runtime_checkable
class GroupHeadHost(Protocol):
    """A module that hosts a group head ``q(g | tau)`` INSIDE its critic (GIL's ``placement: critic``): the head is one
    of the critic's modules, saved in the module's state and trained by the critic's optimizer together with the
    critic, on the critic's (not detached) last-token hidden state, with the critic loss
    ``L_critic = L_value + loss_weight * loss_fn(returns, q)``.

    ``loss_fn`` is a batch objective (e.g. a variance of returns between groups): the host evaluates it on the whole
    minibatch of ALL ranks (its value and its gradient with respect to every row's ``q``), so the update is the same
    with any micro-batching and number of ranks. ``returns`` are the sequence returns of the rollout view
    (``shaped_scores - kl_coef * kl``, see :class:`ExperienceAnnotatable`).

    Attributes:
        group_head: the hosted head (``None`` until the critic is built); ``group_head(features)`` gives ``(N, M)``
            logits from ``(N, H)`` features of the kind the host puts in the rollout view's ``features`` (the critic's
            last-token hidden state), so the posterior of the view's rollouts is ``softmax(group_head(features))``.
    """

    group_head: Optional[nn.Module]

    def install_group_head(self, build_head: Callable[[int], nn.Module], loss_fn: GroupLoss, loss_weight: float,
                           lr: Optional[float] = None) -> None:
        """Host a head built as ``build_head(feature_dim)`` (now if the critic exists, else when it is built; before
        the optimizer is configured and a checkpoint is restored). Raises ``ValueError`` when the module has no
        critic features (e.g. no critic) or shows other features to the hooks.

        Args:
            build_head: creates the head for ``feature_dim``-dimensional features (deterministic: the same head on
                every rank).
            loss_fn: the head's objective (returns, posterior) -> scalar, minimised by the critic's optimizer.
            loss_weight: its weight in the critic loss.
            lr: learning rate of the head's parameters (a parameter group of the critic's optimizer); ``None``: the
                critic's.
        """
        ...


# ---------------------------------------------------------------------------------------------------------------
# Meta-step schedules (MetaRM): a callback decides, step by step, whether the module's next training step takes its
# meta step.
# ---------------------------------------------------------------------------------------------------------------


@runtime_checkable
class MetaStepScheduled(Protocol):
    """A module whose training steps may include a meta step that a schedule switches on and off (e.g. MetaRM's
    gradient-ascent step on the difference loss of policy samples before the reward-model update).

    Attributes:
        meta_step_enabled: whether the NEXT training step takes the meta step; settable (the schedule sets it before
            every step, the same value on every rank).
        meta_steps: number of meta steps taken so far (read-only for callbacks; saved in the module's checkpoints).
    """

    meta_step_enabled: bool
    meta_steps: int

    def meta_score_spread(self, batch: object) -> float:
        """The module's score spread on the meta batch inside ``batch`` (the training batch about to be used), e.g.
        the mean over prompts of the standard deviation of the scores of their sampled responses: small when the model
        no longer tells the samples apart. ALREADY averaged over ranks (collective: called on every rank, the same
        value returned everywhere); ``inf`` when ``batch`` has no meta batch.
        """
        ...
