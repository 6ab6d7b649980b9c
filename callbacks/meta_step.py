"""Which training steps take a meta step (MetaRM, spec 3) as a Lightning callback.

Step ``i`` (0-based count of training batches) is a meta step when ``i >= warmup_steps``, ``(i - warmup_steps)`` is a
multiple of ``every_n_steps``, and, with ``after_shift`` set, once the module's score spread on the meta batch has
fallen below ``after_shift`` on some scheduled step (from then on the condition stays met: the policy has shifted).
The paper runs the meta step on every step: ``every_n_steps=1, warmup_steps=0`` (the defaults). Works with any module
implementing :class:`callbacks.protocols.MetaStepScheduled`; the decision is the same on every rank and the counters
are saved in checkpoints, so a resumed run takes its meta steps on exactly the steps an uninterrupted run does.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

from callbacks.protocols import MetaStepScheduled, require_protocol


class MetaStepSchedule(Callback):
    """Sets the module's ``meta_step_enabled`` before every training step.

    Args:
        every_n_steps: A meta step every this many training steps (1 = every step, the paper).
        warmup_steps: Training steps without meta steps at the start (the first meta step is step ``warmup_steps``).
        after_shift: If set, meta steps run only once the module's score spread on the meta batch
            (``meta_score_spread``, e.g. the mean within-prompt score std) has fallen below this value on a scheduled
            step; it is measured (one extra forward pass over the meta batch) on scheduled steps until it first does.
            ``null``: no such condition.
    """

    def __init__(self, every_n_steps: int = 1, warmup_steps: int = 0, after_shift: Optional[float] = None) -> None:
        super().__init__()
        if every_n_steps < 1:
            raise ValueError(f"MetaStepSchedule: every_n_steps must be >= 1, got {every_n_steps}")
        if warmup_steps < 0:
            raise ValueError(f"MetaStepSchedule: warmup_steps must be >= 0, got {warmup_steps}")
        if after_shift is not None and not (after_shift > 0 and math.isfinite(after_shift)):
            raise ValueError(f"MetaStepSchedule: after_shift must be a positive number or null, got {after_shift}")
        self.every_n_steps = int(every_n_steps)
        self.warmup_steps = int(warmup_steps)
        self.after_shift = None if after_shift is None else float(after_shift)
        self.steps_seen = 0  # training steps whose decision was taken
        self.num_scheduled = 0  # of which meta steps
        self.shifted = after_shift is None  # whether the score spread has fallen below after_shift
        self.last_spread: Optional[float] = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(every_n_steps=self.every_n_steps, warmup_steps=self.warmup_steps,
                                        after_shift=self.after_shift)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Check the module implements ``MetaStepScheduled``."""
        require_protocol(pl_module, MetaStepScheduled, "MetaStepSchedule",
                         needs=" (a settable `meta_step_enabled: bool`, `meta_steps: int` and "
                               "`meta_score_spread(batch) -> float`)", advice=".")

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Validation before the first training step sees the schedule's state, not a stale one."""
        pl_module.meta_step_enabled = self.is_scheduled(self.steps_seen) and self.shifted

    def is_scheduled(self, step: int) -> bool:
        """Whether step ``step`` is a meta step by ``every_n_steps`` and ``warmup_steps`` alone."""
        return step >= self.warmup_steps and (step - self.warmup_steps) % self.every_n_steps == 0

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
                             ) -> None:
        """Decide whether this step is a meta step and tell the module."""
        scheduled = self.is_scheduled(self.steps_seen)
        spread = None
        if scheduled and not self.shifted:
            spread = float(pl_module.meta_score_spread(batch))  # collective, rank-averaged
            self.last_spread = spread
            if spread < self.after_shift:
                self.shifted = True
        decision = scheduled and self.shifted
        if trainer.world_size > 1:  # one decision for all ranks, whatever a module's spread does
            decision, self.shifted = trainer.strategy.broadcast((decision, self.shifted), src=0)
        pl_module.meta_step_enabled = decision
        self.steps_seen += 1
        self.num_scheduled += int(decision)
        pl_module.log("meta/scheduled", float(decision), on_step=True, on_epoch=False, batch_size=1)
        if spread is not None:
            pl_module.log("meta/score_spread", spread, on_step=True, on_epoch=False, batch_size=1)

    def state_dict(self) -> dict[str, Any]:
        """Counters and the shift latch, saved in checkpoints."""
        return {
            "steps_seen": self.steps_seen,
            "num_scheduled": self.num_scheduled,
            "shifted": self.shifted,
            "last_spread": self.last_spread,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.steps_seen = int(state_dict["steps_seen"])
        self.num_scheduled = int(state_dict.get("num_scheduled", 0))
        self.shifted = bool(state_dict.get("shifted", self.after_shift is None))
        self.last_spread = state_dict.get("last_spread")
