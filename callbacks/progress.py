"""One progress bar per training run, counting what the run is limited by, with the run's total.

Lightning's bar restarts every epoch and counts the batches of that epoch: a run limited by ``trainer.max_steps``
or by a module's own iteration limit reads ``Epoch 0/-2`` or stops at ``20/74`` with an ETA though it has finished.
:class:`RunProgressBar` shows one bar for the whole ``fit``:

* a module with a ``max_iterations`` limit and an ``iteration`` counter (PPO: one training step = one iteration):
  ``iteration / max_iterations``;
* otherwise the optimizer steps: ``trainer.global_step / trainer.max_steps`` (or the estimated steps of the run
  when ``max_steps`` is not set), which is also the training-step count of one-step-per-batch methods.

A resumed run starts at the restored count. The bar shows the metrics logged with ``prog_bar=True`` (no ``v_num``),
is not cleared at the end, and validation / sanity-check passes get no bar of their own. Test and predict bars are
Lightning's. Imports only lightning and the standard library.
"""

from __future__ import annotations

import math
import sys
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm


class RunProgressBar(TQDMProgressBar):
    """A whole-run training progress bar (see the module docstring).

    Args:
        refresh_rate: Update the bar every this many training steps.
        description: Text before the bar; default: the module's class name.
    """

    BAR_FORMAT = "{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}]{postfix}"

    def __init__(self, refresh_rate: int = 1, description: str | None = None) -> None:
        super().__init__(refresh_rate=refresh_rate, leave=True)
        self.description = description
        self._unit = "step"

    # ------------------------------------------------------------------ what the run counts
    def run_total(self, trainer: L.Trainer, pl_module: L.LightningModule) -> int | None:
        """The count at which this ``fit`` ends (``None`` if unknown)."""
        max_iterations = getattr(pl_module, "max_iterations", None)
        if max_iterations:
            self._unit = "it"
            return int(max_iterations)
        if hasattr(pl_module, "max_iterations"):  # iteration-counted module without a limit: epochs x batches
            self._unit = "it"
            batches, epochs = trainer.num_training_batches, trainer.max_epochs
            if epochs is None or epochs < 0 or not math.isfinite(batches):
                return None
            return int(batches * epochs)
        self._unit = "step"
        if trainer.max_steps and trainer.max_steps > 0:
            return int(trainer.max_steps)
        try:
            total = trainer.estimated_stepping_batches
        except Exception:  # e.g. an infinite dataloader
            return None
        return int(total) if math.isfinite(total) else None

    def run_position(self, trainer: L.Trainer, pl_module: L.LightningModule) -> int:
        if self._unit == "it":
            return int(getattr(pl_module, "iteration", 0))
        return int(trainer.global_step)

    # ------------------------------------------------------------------ bars
    def init_sanity_tqdm(self) -> Tqdm:
        return Tqdm(disable=True)

    def init_validation_tqdm(self) -> Tqdm:
        return Tqdm(disable=True)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        total = self.run_total(trainer, pl_module)
        self.train_progress_bar = Tqdm(
            desc=self.description or type(pl_module).__name__, total=total, initial=self.run_position(trainer, pl_module),
            unit=self._unit, position=2 * self.process_position, disable=self.is_disabled, leave=True,
            dynamic_ncols=True, file=sys.stdout, smoothing=0, bar_format=self.BAR_FORMAT,
        )

    def on_train_epoch_start(self, trainer: L.Trainer, *_: Any) -> None:
        pass  # one bar for the whole run: nothing restarts with an epoch

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        bar = self._train_progress_bar
        if bar is None or bar.disable:
            return
        n = self.run_position(trainer, pl_module)
        if n % self.refresh_rate == 0 or (bar.total is not None and n >= bar.total) or trainer.should_stop:
            bar.n = n
            bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)
            bar.refresh()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pass

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        bar = self._train_progress_bar
        if bar is not None and not bar.disable:
            bar.n = self.run_position(trainer, pl_module)
            bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)
            bar.close()

    def on_validation_batch_start(self, *args: Any, **kwargs: Any) -> None:
        pass

    def on_validation_batch_end(self, *args: Any, **kwargs: Any) -> None:
        pass

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pass

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        bar = self._train_progress_bar if trainer.state.fn == "fit" else None
        if bar is not None and not bar.disable:
            bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=True)

    def on_sanity_check_start(self, *_: Any) -> None:
        pass

    def on_sanity_check_end(self, *_: Any) -> None:
        pass

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        metrics.pop("iteration", None)  # the bar's count
        return metrics
