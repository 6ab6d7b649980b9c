"""GIL group inference (spec 2a): a small group head ``q_psi(g | tau)`` that splits rollouts into groups without labels.

Zheng et al., "Improving Generalization of Alignment with Human Preferences through Group Invariant Learning"
(arXiv 2310.11971). The head is trained each iteration to MAXIMISE the mass-weighted between-group variance of the
returns, so that one group collects the rollouts the policy already does well on ("easy", ``g_high``) and the others
the challenging ones. With ``q_ig = q(g | tau_i)``, ``R_i`` the sequence return (score minus ``kl_coef`` times the
summed KL):

``R_g = sum_i q_ig R_i / sum_i q_ig``, ``pi_g = mean_i q_ig``, ``Rbar = sum_g pi_g R_g``,
``J_var = sum_g pi_g (R_g - Rbar)^2``, ``L_group = -J_var - lambda_H * H(pi)``.

Which parts are the paper's: a classifier that infers (binary) groups by maximising a variance objective of the
returns. Our choices (the paper's exact form could not be read): the mass weighting ``pi_g`` (a group cannot win
by isolating one outlier), the entropy term on the group masses against collapse, and by default a head SEPARATE
from the critic on detached features (``placement: separate``). The paper's head sits inside the critic and is
trained adversarially with it: ``placement: critic`` (the head is hosted by the module's critic, see
:class:`GroupInference`).

The callback talks to the module only through :class:`callbacks.protocols.ExperienceAnnotatable`: it registers an
experience hook that needs ``features``; the hook sees the same global view on every rank, so the head's update, its
posterior and ``g_high`` are identical everywhere without communication. With ``placement: critic`` it also uses
:class:`callbacks.protocols.GroupHeadHost` (the module builds, saves and trains the head with its critic). Imports
only lightning, torch and stdlib.
The math is in pure functions here (re-exported by ``lightning_rlhf.losses.gil``).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Literal, Mapping, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from callbacks.protocols import ExperienceAnnotatable, GroupHeadHost, require_protocol

Placement = Literal["separate", "critic"]

#: annotation keys written by :class:`GroupInference` (read by ``AdaptiveExploration`` and ``GILModule``)
GROUP_POSTERIOR = "group_posterior"  # (N, M) q(g | tau_i)
GROUP_HIGH = "group_high"  # (N,) long, the index g_high repeated on every row


# ---------------------------------------------------------------------------------------------------------- math
def group_masses(posterior: torch.Tensor) -> torch.Tensor:
    """Group masses ``pi_g = mean_i q(g | tau_i)``.

    Args:
        posterior: ``(N, M)`` rows on the simplex.

    Returns:
        ``(M,)``, summing to 1.
    """
    return posterior.mean(dim=0)


def group_means(values: torch.Tensor, posterior: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Posterior-weighted group means ``V_g = sum_i q_ig v_i / sum_i q_ig``.

    Args:
        values: ``(N,)`` per-sample values (returns ``R_i``, surrogates ``J_i``, KL...).
        posterior: ``(N, M)``.
        eps: floor of a group's total weight (an empty group has mean 0).

    Returns:
        ``(M,)``.
    """
    weights = posterior.to(values.dtype)
    return (weights * values[:, None]).sum(0) / weights.sum(0).clamp_min(eps)


def between_group_variance(returns: torch.Tensor, posterior: torch.Tensor) -> torch.Tensor:
    """Mass-weighted between-group variance ``J_var = sum_g pi_g (R_g - Rbar)^2``, ``Rbar = sum_g pi_g R_g``.

    Args:
        returns: ``(N,)`` sequence returns ``R_i``.
        posterior: ``(N, M)`` ``q(g | tau_i)`` (differentiable).

    Returns:
        Scalar ``J_var``.
    """
    pi = group_masses(posterior.to(returns.dtype))  # (M,)
    r_g = group_means(returns, posterior)  # (M,)
    r_bar = (pi * r_g).sum()
    return (pi * (r_g - r_bar) ** 2).sum()


def group_inference_loss(returns: torch.Tensor, posterior: torch.Tensor, entropy_coef: float = 0.01) -> torch.Tensor:
    """The group head's loss ``L_group = -J_var - lambda_H * H(pi)`` (spec 2a), minimised by the head.

    ``H(pi) = -sum_g pi_g log pi_g`` is the entropy of the group masses: it is largest when the groups are equally
    large, so ``lambda_H > 0`` keeps the head from putting every rollout into one group.

    Args:
        returns: ``(N,)`` sequence returns (no grad needed).
        posterior: ``(N, M)`` ``q(g | tau_i)`` (with grad).
        entropy_coef: ``lambda_H``.

    Returns:
        Scalar loss.
    """
    pi = group_masses(posterior.to(returns.dtype))
    entropy = -(pi * torch.log(pi.clamp_min(1e-12))).sum()
    return -between_group_variance(returns, posterior) - entropy_coef * entropy


def adjusted_rand_index(labels_a: torch.Tensor, labels_b: torch.Tensor) -> float:
    """Adjusted Rand index (Hubert & Arabie 1985) between two labelings of the same ``N`` items.

    With the contingency table ``n_ij``, row sums ``a_i``, column sums ``b_j`` and ``C(x) = x (x - 1) / 2``:
    ``ARI = (sum C(n_ij) - E) / (0.5 (sum C(a_i) + sum C(b_j)) - E)``, ``E = sum C(a_i) sum C(b_j) / C(N)``.
    1 for identical partitions (up to renaming), about 0 for independent ones. When both labelings put everything
    in one cluster (or every item alone) the denominator is 0 and the index is 1 (scikit-learn's convention).

    Args:
        labels_a: ``(N,)`` integer labels.
        labels_b: ``(N,)`` integer labels.

    Returns:
        The index as a float.
    """
    a = torch.unique(labels_a.reshape(-1).cpu(), return_inverse=True)[1]
    b = torch.unique(labels_b.reshape(-1).cpu(), return_inverse=True)[1]
    if a.numel() != b.numel():
        raise ValueError(f"adjusted_rand_index: {a.numel()} vs {b.numel()} labels")
    n = a.numel()
    table = torch.zeros(int(a.max()) + 1 if n else 1, int(b.max()) + 1 if n else 1, dtype=torch.float64)
    table.index_put_((a, b), torch.ones(n, dtype=torch.float64), accumulate=True)

    def comb2(x: torch.Tensor) -> torch.Tensor:
        return (x * (x - 1) / 2).sum()

    index = comb2(table)
    sum_a, sum_b = comb2(table.sum(1)), comb2(table.sum(0))
    expected = sum_a * sum_b / max(n * (n - 1) / 2, 1.0)
    maximum = 0.5 * (sum_a + sum_b)
    if float(maximum - expected) == 0.0:
        return 1.0
    return float((index - expected) / (maximum - expected))


# ---------------------------------------------------------------------------------------------------------- callback
class GroupInference(Callback):
    """Infers groups of rollouts every iteration and annotates them with ``q(g | tau)`` and ``g_high`` (GIL, spec 2a).

    Each iteration, in the module's experience hook (after the rollout, before the advantages): the head takes
    ``group_steps`` optimizer steps on the fresh rollout's features and returns to minimise
    :func:`group_inference_loss`, then annotates every rollout with ``group_posterior`` ``(N, M)`` (``q`` after the
    steps, detached) and ``group_high`` ``(N,)`` (the index of the group with the larger ``R_g``, repeated). The head
    is a linear layer (or a one-hidden-layer MLP) on the view's ``features``, which the module computes (its own
    option says which: e.g. the critic's or the policy's last-token hidden state); features are standardised with the
    batch's mean and std per dimension unless ``standardize_features`` is off. The head's weights are drawn from a
    generator seeded with ``seed`` when the first features arrive, so every rank holds the same head, and every rank
    makes the same update (they see the same view).

    ``placement: critic`` (the paper's placement): the head lives INSIDE the module's critic
    (:class:`callbacks.protocols.GroupHeadHost`): the module builds it with this callback's seeded initialisation, keeps
    it in its state dict (checkpoints) and trains it with the critic's optimizer, in a parameter group of its own at
    ``lr``, on the critic's NOT detached last-token hidden state: the critic loss becomes ``L_value +
    critic_loss_weight * L_group`` (:func:`group_inference_loss` on the minibatch), so the critic's trunk also learns
    features that separate the groups, adversarially to the policy's invariance penalty, which shrinks the spread
    between them. The hook then takes no steps of its own: it annotates the posterior of the hosted head (as trained
    up to the previous iteration) on the rollout's features. Features are not standardised in this placement (a batch
    standardisation would make each rollout's posterior, and the critic's gradient, depend on the other rollouts);
    ``group_steps`` and ``standardize_features`` apply to ``separate`` only.

    Logged each iteration (from ``on_train_batch_end``): ``group/mass_g{g}``, ``group/return_g{g}`` (``R_g``),
    ``group/g_high``, ``group/return_gap`` (``R_high`` minus the mass-weighted mean of the other groups' ``R_g``),
    ``group/g_high_flips`` (times ``g_high`` changed since the start of training), ``group/objective`` (``J_var``
    after the steps), ``group/loss``; ``group/ari_domain`` (adjusted Rand index of ``argmax_g q`` against
    ``domain_ids``) when the batch holds more than one domain.

    Args:
        num_groups: Number of groups ``M`` (the paper uses 2).
        entropy_coef: ``lambda_H``, weight of the entropy of the group masses (keeps groups from collapsing to one).
        group_steps: Optimizer steps of the head per PPO iteration.
        lr: Learning rate of the head's Adam optimizer (``placement: critic``: of the head's parameter group in the
            module's optimizer).
        hidden_size: Width of a hidden layer (tanh) before the group logits; 0 = a linear head.
        standardize_features: Standardise each feature dimension with the batch's mean and std before the head.
        placement: ``separate`` (a head of its own on detached features, trained here; ours) or ``critic`` (the
            paper's: a head inside the module's critic, trained with the critic's loss; needs a module with a critic,
            see above).
        seed: Seed of the head's initial weights (identical on every rank).
        critic_loss_weight: ``placement: critic`` only: weight of ``L_group`` in the critic's loss.
    """

    def __init__(
        self,
        num_groups: int = 2,
        entropy_coef: float = 0.01,
        group_steps: int = 1,
        lr: float = 1e-2,
        hidden_size: int = 0,
        standardize_features: bool = True,
        placement: Placement = "separate",
        seed: int = 0,
        critic_loss_weight: float = 1.0,
    ) -> None:
        super().__init__()
        if num_groups < 2:
            raise ValueError(f"GroupInference: num_groups must be >= 2, got {num_groups}")
        if entropy_coef < 0:
            raise ValueError(f"GroupInference: entropy_coef must be >= 0, got {entropy_coef}")
        if group_steps < 0:
            raise ValueError(f"GroupInference: group_steps must be >= 0, got {group_steps}")
        if lr <= 0:
            raise ValueError(f"GroupInference: lr must be > 0, got {lr}")
        if hidden_size < 0:
            raise ValueError(f"GroupInference: hidden_size must be >= 0, got {hidden_size}")
        if critic_loss_weight < 0:
            raise ValueError(f"GroupInference: critic_loss_weight must be >= 0, got {critic_loss_weight}")
        if placement not in ("separate", "critic"):
            raise ValueError(f"GroupInference: placement must be 'separate' or 'critic', got {placement!r}")
        self.num_groups = int(num_groups)
        self.entropy_coef = float(entropy_coef)
        self.group_steps = int(group_steps)
        self.lr = float(lr)
        self.hidden_size = int(hidden_size)
        self.standardize_features = bool(standardize_features)
        self.placement: Placement = placement
        self.seed = int(seed)
        self.critic_loss_weight = float(critic_loss_weight)
        self._host: Optional[GroupHeadHost] = None  # placement: critic, the module hosting the head
        self.head: Optional[nn.Module] = None  # placement: separate
        self.optimizer: Optional[torch.optim.Optimizer] = None
        self._pending_state: Optional[dict[str, Any]] = None  # a checkpoint's head, loaded when the head is built
        self.g_high: Optional[int] = None
        self.g_high_flips = 0
        self.num_updates = 0
        self.last_iteration: Optional[int] = None
        self._metrics: dict[str, float] = {}

    @property
    def state_key(self) -> str:
        """Key of this callback's state in checkpoints."""
        return self._generate_state_key(num_groups=self.num_groups, seed=self.seed)

    # ------------------------------------------------------------------ wiring
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Check the protocol and register the hook (it needs the module's per-rollout ``features``)."""
        require_protocol(pl_module, ExperienceAnnotatable, "GroupInference",
                         needs=" (`rollout_view()` and `register_experience_hook(name, hook, needs_features)`)")
        if self.placement == "critic":
            require_protocol(pl_module, GroupHeadHost, "GroupInference(placement='critic')",
                             needs=" (`group_head`, `install_group_head(build_head, loss_fn, loss_weight, lr)`) to host "
                                   "the head in its critic", advice=" (use placement='separate')")
            loss_fn = functools.partial(group_inference_loss, entropy_coef=self.entropy_coef)
            pl_module.install_group_head(self.new_head, loss_fn, self.critic_loss_weight, self.lr)
            self._host = pl_module
        pl_module.register_experience_hook(type(self).__name__, self.annotate, needs_features=True)

    # ------------------------------------------------------------------ the head
    def new_head(self, feature_dim: int) -> nn.Module:
        """A fresh head for ``feature_dim`` features, its weights drawn from a generator seeded with ``seed`` (the
        same head on every rank; the global RNG is left alone). Linear, or Linear-tanh-Linear with ``hidden_size``."""
        gen = torch.Generator().manual_seed(self.seed)
        layers: list[nn.Module] = []
        width = feature_dim
        # nn.Linear draws its default init from the global RNG: fork it so that building the head (at the first
        # rollout, or later after a resume) never shifts the run's other random numbers
        with torch.random.fork_rng(devices=[]):
            if self.hidden_size:
                layers += [nn.Linear(feature_dim, self.hidden_size), nn.Tanh()]
                width = self.hidden_size
            layers.append(nn.Linear(width, self.num_groups))
        head = nn.Sequential(*layers)
        with torch.no_grad():  # PyTorch's default Linear init, drawn from our generator
            for layer in head:
                if isinstance(layer, nn.Linear):
                    bound = 1.0 / math.sqrt(layer.in_features)
                    layer.weight.copy_(torch.empty_like(layer.weight).uniform_(-bound, bound, generator=gen))
                    layer.bias.copy_(torch.empty_like(layer.bias).uniform_(-bound, bound, generator=gen))
        return head

    def build_head(self, feature_dim: int, device: torch.device) -> None:
        """``placement: separate``: create the head (seeded) and its optimizer; apply a checkpoint's state if one is
        pending."""
        self.head = self.new_head(feature_dim).to(device)
        self.optimizer = torch.optim.Adam(self.head.parameters(), lr=self.lr)
        if self._pending_state is not None:
            state, self._pending_state = self._pending_state, None
            if state["feature_dim"] != feature_dim:
                raise ValueError(f"GroupInference: the checkpoint's head takes {state['feature_dim']} features, the "
                                 f"module now gives {feature_dim}")
            self.head.load_state_dict(state["head"])
            self.optimizer.load_state_dict(state["optimizer"])
        self._feature_dim = feature_dim

    def prepare_features(self, features: torch.Tensor) -> torch.Tensor:
        """``(N, H)`` float32 features, standardised per dimension over the batch when asked."""
        x = features.detach().float().clone()  # a normal tensor even if the view was made under inference mode
        if self.standardize_features and x.shape[0] > 1:
            x = (x - x.mean(0)) / x.std(0).clamp_min(1e-6)
        return x

    def posterior(self, features: torch.Tensor) -> torch.Tensor:
        """``(N, M)`` ``q(g | tau)`` of prepared features (with grad through the head)."""
        head = self.head if self._host is None else self._host.group_head
        assert head is not None, "GroupInference.posterior before the head was built"
        return torch.softmax(head(features), dim=-1)

    # ------------------------------------------------------------------ the experience hook
    def annotate(self, view: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The experience hook: head steps on this rollout, then ``group_posterior`` and ``group_high``."""
        if "features" not in view:
            raise KeyError("GroupInference: the rollout view has no 'features' (the module must add them for hooks "
                           "registered with needs_features=True)")
        loss = torch.zeros(())
        if self._host is not None:  # placement: critic, the critic's optimizer trains the hosted head
            if self._host.group_head is None:
                raise RuntimeError("GroupInference(placement='critic'): the module has not built the group head (its "
                                   "install_group_head must build it with the critic)")
            head_param = next(self._host.group_head.parameters())
            x = view["features"].detach().to(head_param.device, head_param.dtype).clone()  # (N, H), not standardised
            returns = view["returns"].detach().to(x.device, torch.float32)  # (N,)
        else:
            x = self.prepare_features(view["features"])  # (N, H)
            returns = view["returns"].detach().to(x.device, torch.float32)  # (N,)
            if self.head is None:
                self.build_head(x.shape[1], x.device)
            assert self.head is not None and self.optimizer is not None
            with torch.enable_grad():
                for _ in range(self.group_steps):
                    self.optimizer.zero_grad(set_to_none=True)
                    loss = group_inference_loss(returns, self.posterior(x), self.entropy_coef)
                    loss.backward()
                    self.optimizer.step()
        with torch.no_grad():
            q = self.posterior(x).float()  # (N, M), after the steps
            if self._host is not None:
                loss = group_inference_loss(returns, q, self.entropy_coef)
            r_g = group_means(returns, q)
            pi = group_masses(q)
            g_high = int(torch.argmax(r_g))
            if self.g_high is not None and g_high != self.g_high:
                self.g_high_flips += 1
            self.g_high = g_high
            self.num_updates += 1
            others = torch.ones_like(pi, dtype=torch.bool)
            others[g_high] = False
            gap = r_g[g_high] - (pi[others] * r_g[others]).sum() / pi[others].sum().clamp_min(1e-12)
            metrics = {
                "group/g_high": float(g_high), "group/g_high_flips": float(self.g_high_flips),
                "group/objective": float(between_group_variance(returns, q)), "group/return_gap": float(gap),
                "group/loss": float(loss),
            }
            for g in range(self.num_groups):
                metrics[f"group/mass_g{g}"] = float(pi[g])
                metrics[f"group/return_g{g}"] = float(r_g[g])
            domains = view.get("domain_ids")
            if domains is not None and torch.unique(domains).numel() > 1:
                metrics["group/ari_domain"] = adjusted_rand_index(q.argmax(-1), domains)
        it = view.get("iteration")
        self.last_iteration = int(it) if it is not None else None
        self._metrics = metrics
        n = q.shape[0]
        return {GROUP_POSTERIOR: q.detach(), GROUP_HIGH: torch.full((n,), g_high, dtype=torch.long, device=q.device)}

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Log the metrics of this iteration's hook call (once per iteration)."""
        metrics, self._metrics = self._metrics, {}
        if metrics:
            pl_module.log_dict(metrics, on_step=True, on_epoch=False, batch_size=1)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The head's weights and its optimizer's state (once built; ``placement: separate``: with ``critic`` they
        are in the module's state and its optimizer's), ``g_high`` and counters."""
        state: dict[str, Any] = {
            "g_high": self.g_high, "g_high_flips": self.g_high_flips, "num_updates": self.num_updates,
            "last_iteration": self.last_iteration,
        }
        if self.head is not None and self.optimizer is not None:
            state["feature_dim"] = self._feature_dim
            state["head"] = {k: v.detach().cpu().clone() for k, v in self.head.state_dict().items()}
            state["optimizer"] = _to_cpu(self.optimizer.state_dict())
        elif self._pending_state is not None:  # restored but not used yet: keep it
            state.update(self._pending_state)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore counters; the head is rebuilt (same seed) and loaded when the first features arrive."""
        self.g_high = state_dict.get("g_high")
        self.g_high_flips = int(state_dict.get("g_high_flips", 0))
        self.num_updates = int(state_dict.get("num_updates", 0))
        self.last_iteration = state_dict.get("last_iteration")
        if "head" in state_dict:
            self._pending_state = {k: state_dict[k] for k in ("feature_dim", "head", "optimizer")}
            if self.head is not None:  # already built (a load into a live callback): apply now
                feature_dim, device = self._pending_state["feature_dim"], next(self.head.parameters()).device
                self.head = None
                self.build_head(feature_dim, device)


def _to_cpu(obj: Any) -> Any:
    """A copy of a (nested) optimizer state with every tensor on the CPU."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().clone()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj
