"""GIL adaptive exploration (spec 2c): a per-sample KL coefficient from the inferred group posterior.

Rollouts the policy already does well on (a high ``q(g_high | tau_i)``, see ``callbacks/group_inference.py``) are held
closer to the reference; challenging ones may move further. The callback returns a per-sample ``kl_scale``; the
module multiplies its scalar ``kl_coef`` (the one ``AdaptiveKLController`` adapts) by it, so the coefficient of
sample ``i`` is ``eta_i = kl_coef * scale_i`` (composition, never replacement; callbacks.protocols).

- ``form: paper`` (default; the paper's form): ``scale_i = q(g_high | tau_i)``, i.e. ``eta_i = eta * q_high``.
- ``form: mean_preserving`` (ours): ``scale_i = eta_min + (eta_max - eta_min) * q(g_high | tau_i)`` with ``eta_min``,
  ``eta_max`` multiples of ``kl_coef`` (0.5 and 1.5: an undecided ``q_high = 0.5`` keeps ``kl_coef``, and the
  coefficient never drops to 0, unlike the paper's form on rollouts sure to be challenging).

Imports only lightning, torch and stdlib; works with any module implementing
:class:`callbacks.protocols.ExperienceAnnotatable` whose view carries ``group_posterior`` and ``group_high`` (a
``GroupInference`` callback placed BEFORE this one in ``trainer.callbacks``, or any hook that writes them).
"""

from __future__ import annotations

from typing import Any, Literal, Mapping, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from callbacks.group_inference import GROUP_HIGH, GROUP_POSTERIOR, group_means
from callbacks.protocols import KL_SCALE, ExperienceAnnotatable, require_protocol

ExplorationForm = Literal["paper", "mean_preserving"]


def exploration_kl_scale(
    q_high: torch.Tensor, form: ExplorationForm = "paper", eta_min: float = 0.5, eta_max: float = 1.5
) -> torch.Tensor:
    """Per-sample KL scale from ``q(g_high | tau_i)``.

    Args:
        q_high: ``(N,)`` posterior of the high-return ("easy") group.
        form: ``paper``: ``scale = q_high``; ``mean_preserving``: ``eta_min + (eta_max - eta_min) * q_high``.
        eta_min: scale at ``q_high = 0`` (``mean_preserving`` only).
        eta_max: scale at ``q_high = 1`` (``mean_preserving`` only).

    Returns:
        ``(N,)`` scales (the per-sample coefficient is ``kl_coef * scale``).
    """
    if form == "paper":
        return q_high.clone()
    if form == "mean_preserving":
        return eta_min + (eta_max - eta_min) * q_high
    raise ValueError(f"exploration_kl_scale: form must be 'paper' or 'mean_preserving', got {form!r}")


class AdaptiveExploration(Callback):
    """Sets a per-sample KL scale from the group posterior every iteration (GIL, spec 2c).

    Logged each iteration (``on_train_batch_end``, from the module's view after the hooks ran): ``explore/eta_g{g}``
    and ``explore/kl_g{g}``, the posterior-weighted mean of the per-sample coefficient actually used (``kl_coef``
    of the view, adaptive KL included) and of the per-sequence KL in group ``g``; ``explore/eta_high`` and
    ``explore/eta_low`` (the same for ``g_high`` and the posterior-weighted rest); ``explore/scale_mean``.

    Args:
        form: ``paper`` (``eta_i = kl_coef * q_high``, the paper's form) or ``mean_preserving``
            (``eta_i = kl_coef * (eta_min + (eta_max - eta_min) * q_high)``, ours).
        eta_min: Lower end of the scale, a multiple of ``kl_coef`` (``mean_preserving`` only).
        eta_max: Upper end of the scale, a multiple of ``kl_coef`` (``mean_preserving`` only).
    """

    def __init__(self, form: ExplorationForm = "paper", eta_min: float = 0.5, eta_max: float = 1.5) -> None:
        super().__init__()
        if form not in ("paper", "mean_preserving"):
            raise ValueError(f"AdaptiveExploration: form must be 'paper' or 'mean_preserving', got {form!r}")
        if eta_min < 0 or eta_max < eta_min:
            raise ValueError(f"AdaptiveExploration: need 0 <= eta_min <= eta_max, got eta_min={eta_min}, "
                             f"eta_max={eta_max}")
        self.form: ExplorationForm = form
        self.eta_min = float(eta_min)
        self.eta_max = float(eta_max)
        self.last_logged_iteration: Optional[int] = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Check the protocol and register the hook (after the group inference's, by callback order)."""
        require_protocol(pl_module, ExperienceAnnotatable, "AdaptiveExploration")
        pl_module.register_experience_hook(type(self).__name__, self.annotate, needs_features=False)

    def annotate(self, view: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The experience hook: ``kl_scale`` ``(N,)`` from ``group_posterior`` and ``group_high``."""
        if GROUP_POSTERIOR not in view or GROUP_HIGH not in view:
            raise KeyError(
                f"AdaptiveExploration: the rollout view has no {GROUP_POSTERIOR!r}/{GROUP_HIGH!r}; put a GroupInference "
                f"callback BEFORE AdaptiveExploration in trainer.callbacks (hooks run in registration order)"
            )
        q = view[GROUP_POSTERIOR]
        g_high = int(view[GROUP_HIGH][0]) if view[GROUP_HIGH].numel() else 0
        return {KL_SCALE: exploration_kl_scale(q[:, g_high].float(), self.form, self.eta_min, self.eta_max)}

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Log per-group coefficients and KL of the iteration that just ran (once per iteration)."""
        view = pl_module.rollout_view()
        if not view or GROUP_POSTERIOR not in view:
            return
        iteration = int(view["iteration"]) if "iteration" in view else None
        if iteration is not None and iteration == self.last_logged_iteration:
            return
        self.last_logged_iteration = iteration
        metrics = self.group_metrics(view)
        if metrics:
            pl_module.log_dict(metrics, on_step=True, on_epoch=False, batch_size=1)

    def group_metrics(self, view: Mapping[str, torch.Tensor]) -> dict[str, float]:
        """Posterior-weighted per-group means of the coefficient used and of the per-sequence KL."""
        q = view[GROUP_POSTERIOR].double()
        g_high = int(view[GROUP_HIGH][0]) if GROUP_HIGH in view and view[GROUP_HIGH].numel() else 0
        scale = view.get(KL_SCALE)
        out: dict[str, float] = {}
        if scale is not None:
            out["explore/scale_mean"] = float(scale.double().mean())
        low = torch.ones(q.shape[1], dtype=torch.bool)
        low[g_high] = False
        q_low = q[:, low.to(q.device)].sum(-1, keepdim=True)  # (N, 1) posterior of "not g_high"
        for key, name in (("kl_coef", "eta"), ("kl", "kl")):
            if key not in view:
                continue
            values = view[key].double().reshape(-1)
            per_group = group_means(values, q)
            for g in range(q.shape[1]):
                out[f"explore/{name}_g{g}"] = float(per_group[g])
            out[f"explore/{name}_high"] = float(per_group[g_high])
            out[f"explore/{name}_low"] = float(group_means(values, q_low)[0])
        return out

    def state_dict(self) -> dict[str, Any]:
        """The iteration last logged (the scale itself is a function of each iteration's posterior)."""
        return {"last_logged_iteration": self.last_logged_iteration}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the iteration last logged."""
        self.last_logged_iteration = state_dict.get("last_logged_iteration")
