"""Checkpoint and stop cleanly when the process receives SIGTERM (preemption, ``scancel``, a spot instance reclaimed).

Lightning only checkpoints on a signal under SLURM auto-requeue; elsewhere its own SIGTERM handler just stops the run.
:class:`CheckpointOnSigterm` replaces that handler while training runs: the handler only sets a flag (nothing unsafe
happens inside a signal handler), and at the next ``on_train_batch_end`` the ranks agree (one all-reduce: a signal
to any rank counts), all of them call ``trainer.save_checkpoint`` together (rank 0 writes the file; sharded strategies
need every rank), and training stops through ``trainer.should_stop``, so ``fit`` returns and the process exits with
status 0. Resume with ``--ckpt_path last`` (the file is ``last.ckpt`` in the checkpoint folder by default) or the path.
"""

from __future__ import annotations

import logging
import os
import signal
from types import FrameType
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint

log = logging.getLogger(__name__)


class CheckpointOnSigterm(L.Callback):
    """On SIGTERM: save a checkpoint after the current training step on all ranks, then stop training.

    Args:
        dirpath: Folder of the checkpoint; default: the ``ModelCheckpoint`` callback's folder, else
            ``<log dir or default_root_dir>/checkpoints``.
        filename: File name inside ``dirpath``. The default ``last.ckpt`` is what ``--ckpt_path last`` picks up.
        signals: Signal numbers that trigger it (default: SIGTERM only).
    """

    def __init__(self, dirpath: str | None = None, filename: str = "last.ckpt", signals: list[int] | None = None):
        self.dirpath = dirpath
        self.filename = filename
        self.signals = [int(s) for s in (signals or [signal.SIGTERM])]
        self.received = False  # set by the signal handler
        self.preempted = False  # a checkpoint was saved and training stopped because of a signal
        self.saved_path: str | None = None
        self._previous: dict[int, Any] = {}

    # ------------------------------------------------------------------ signal handling
    def _handler(self, signum: int, frame: FrameType | None) -> None:
        self.received = True

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning installs its SIGTERM handler just before training; ours replaces it while training runs
        self.received = False
        for signum in self.signals:
            try:
                self._previous[signum] = signal.signal(signum, self._handler)
            except ValueError:  # not the main thread: signals cannot be handled here
                log.warning("CheckpointOnSigterm: not in the main thread; signal %d is not handled.", signum)

    def _uninstall(self) -> None:
        for signum, previous in self._previous.items():
            try:
                if signal.getsignal(signum) == self._handler:
                    signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
            except ValueError:
                pass
        self._previous = {}

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._uninstall()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._uninstall()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._uninstall()

    # ------------------------------------------------------------------ checkpoint and stop
    def checkpoint_path(self, trainer: L.Trainer) -> str:
        dirpath = self.dirpath
        if dirpath is None:
            ckpt = trainer.checkpoint_callback
            dirpath = getattr(ckpt, "dirpath", None) if ckpt is not None else None
        if dirpath is None:
            dirpath = os.path.join(trainer.log_dir or trainer.default_root_dir, "checkpoints")
        return os.path.join(dirpath, self.filename)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any, **kwargs: Any) -> None:
        if self.preempted:
            return
        # collective on every step (one boolean all-reduce) so that a signal received by any rank stops them all
        if not trainer.strategy.reduce_boolean_decision(self.received, all=False):
            return
        path = self.checkpoint_path(trainer)
        trainer.save_checkpoint(path)  # every rank calls it; rank 0 writes
        self.preempted, self.saved_path = True, path
        # ModelCheckpoint callbacks would save again at this step when the epoch ends early: mark it as saved
        for cb in trainer.checkpoint_callbacks:
            if isinstance(cb, ModelCheckpoint):
                cb._last_global_step_saved = trainer.global_step
        trainer.should_stop = True
        if trainer.is_global_zero:
            log.warning("Signal received: saved %s at step %d; stopping.", path, trainer.global_step)

    def state_dict(self) -> dict[str, Any]:
        return {}
