"""Adaptive KL controller (Ziegler et al. 2019; spec 1.5) as a Lightning callback.

``e = clip(KL / target - 1, -clip, clip)``, ``beta <- beta * (1 + e * n / horizon)``, where ``KL`` is the
rank-averaged KL of the rollouts since the last update, ``n`` the number of those sequences summed over ranks.
Fixed-KL training = no callback. Works with any module implementing :class:`callbacks.protocols.KLControlled`.
"""

from __future__ import annotations

import math
from typing import Any, Literal, Optional

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

from callbacks.protocols import KLControlled, require_protocol

KLUnit = Literal["seq_sum", "token_mean"]
_STAT_KEY = {"seq_sum": "kl_seq_sum", "token_mean": "kl_token_mean"}


class AdaptiveKLController(Callback):
    """Adapts the module's ``kl_coef`` towards a target KL after every training batch (= PPO iteration).

    Args:
        target: target KL in the unit given by ``kl_unit`` (6.0 nats per sequence as in Ziegler et al.).
        horizon: number of sequences over which a full proportional correction is applied (10000).
        kl_unit: ``seq_sum``: batch mean over sequences of the sum over response tokens of ``kl_t`` (the
            paper's unit); ``token_mean``: mean of ``kl_t`` over response tokens (set ``target`` in that unit).
        clip: bound of the proportional error ``e`` (0.2).
        init_kl_coef: initial ``beta``; ``None`` takes the module's ``kl_coef`` at setup. A checkpoint's saved
            ``beta`` always wins over both on resume.
    """

    def __init__(
        self,
        target: float = 6.0,
        horizon: int = 10000,
        kl_unit: KLUnit = "seq_sum",
        clip: float = 0.2,
        init_kl_coef: Optional[float] = None,
    ) -> None:
        super().__init__()
        if target <= 0:
            raise ValueError(f"AdaptiveKLController: target must be > 0, got {target}")
        if horizon <= 0:
            raise ValueError(f"AdaptiveKLController: horizon must be > 0, got {horizon}")
        if kl_unit not in _STAT_KEY:
            raise ValueError(f"AdaptiveKLController: kl_unit must be one of {sorted(_STAT_KEY)}, got {kl_unit!r}")
        if clip < 0:
            raise ValueError(f"AdaptiveKLController: clip must be >= 0, got {clip}")
        self.target = float(target)
        self.horizon = int(horizon)
        self.kl_unit: KLUnit = kl_unit
        self.clip = float(clip)
        self.init_kl_coef = init_kl_coef
        self.kl_coef: Optional[float] = None  # beta; set at setup or from a checkpoint
        self.num_updates = 0
        self.total_sequences = 0
        self.last_kl: Optional[float] = None
        self.last_error: Optional[float] = None
        self.last_iteration: Optional[float] = None  # the module's iteration of the last statistics used

    @property
    def state_key(self) -> str:
        """Key of this callback's state in checkpoints (distinguishes several controllers)."""
        return self._generate_state_key(target=self.target, horizon=self.horizon, kl_unit=self.kl_unit)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Check the module implements ``KLControlled`` and take the initial ``beta``."""
        require_protocol(pl_module, KLControlled, "AdaptiveKLController",
                         needs=" (a settable `kl_coef: float` and `last_rollout_stats() -> Mapping[str, float]`)",
                         advice=". Remove the callback for fixed-KL training.")
        if self.kl_coef is None:
            self.kl_coef = float(self.init_kl_coef if self.init_kl_coef is not None else pl_module.kl_coef)
        pl_module.kl_coef = self.kl_coef

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Re-apply ``beta`` after a checkpoint was restored (callback state loads after ``setup``)."""
        if self.kl_coef is not None:
            pl_module.kl_coef = self.kl_coef

    def update(self, kl: float, num_sequences: float) -> float:
        """Apply one controller step and return the new ``beta``.

        Args:
            kl: observed KL (rank-averaged, in ``kl_unit``).
            num_sequences: sequences behind that KL, summed over ranks.

        Returns:
            The updated coefficient.
        """
        if self.kl_coef is None:
            raise RuntimeError("AdaptiveKLController.update called before setup (no initial kl_coef)")
        error = min(max(kl / self.target - 1.0, -self.clip), self.clip)
        self.kl_coef = self.kl_coef * (1.0 + error * num_sequences / self.horizon)
        self.num_updates += 1
        self.total_sequences += int(num_sequences)
        self.last_kl = kl
        self.last_error = error
        return self.kl_coef

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Read the module's rank-reduced rollout stats, update ``beta``, set it on the module and log it."""
        stats = pl_module.last_rollout_stats()
        n = float(stats.get("num_sequences", 0.0)) if stats else 0.0
        if n <= 0:
            return
        iteration = stats.get("iteration")
        if iteration is not None:  # non-consuming statistics: update once per rollout
            if self.last_iteration is not None and float(iteration) == self.last_iteration:
                return
            self.last_iteration = float(iteration)
        key = _STAT_KEY[self.kl_unit]
        if key not in stats:
            raise KeyError(f"AdaptiveKLController: last_rollout_stats() has no {key!r} (kl_unit={self.kl_unit!r})")
        kl = float(stats[key])
        if not math.isfinite(kl):
            return  # keep beta rather than poisoning it
        pl_module.kl_coef = self.update(kl, n)
        # the coefficient for the NEXT rollout (a module logs the one it used as its own "kl_coef")
        pl_module.log("kl_ctl/next_kl_coef", self.kl_coef, on_step=True, on_epoch=False, prog_bar=False, batch_size=1)
        pl_module.log("kl_ctl/error", self.last_error, on_step=True, on_epoch=False, batch_size=1)

    def state_dict(self) -> dict[str, Any]:
        """``beta`` and counters, saved in checkpoints."""
        return {
            "kl_coef": self.kl_coef,
            "num_updates": self.num_updates,
            "total_sequences": self.total_sequences,
            "last_kl": self.last_kl,
            "last_iteration": self.last_iteration,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore ``beta`` and counters; ``on_fit_start`` then applies ``beta`` to the module."""
        self.kl_coef = state_dict["kl_coef"]
        self.num_updates = int(state_dict.get("num_updates", 0))
        self.total_sequences = int(state_dict.get("total_sequences", 0))
        self.last_kl = state_dict.get("last_kl")
        self.last_iteration = state_dict.get("last_iteration")
