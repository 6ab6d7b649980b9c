"""A one-line summary of a training run: steps, step time, peak memory and the last logged metrics.

Works with any LightningModule (no protocol needed). Each training step's wall time is measured from
``on_train_batch_start`` to ``on_train_batch_end`` (after a device synchronisation, so queued GPU work is counted);
the first ``warmup_steps`` steps are left out of the median. Peak memory is the CUDA allocator's peak on a GPU
(``torch.cuda.max_memory_allocated``, the largest over ranks) and the process's peak resident set size on CPU
(``VmHWM``).

The logged metrics are read after the first step and at the end. At the end of ``fit`` rank 0 prints one line
starting with ``run_summary`` and, when ``path`` is set, writes the same record as JSON (atomically). The step time
and peak memory are also logged every step as ``perf/step_time_s`` and ``perf/peak_mem_gib``.

Imports only lightning, torch and the standard library.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from typing import Any

import lightning as L
import torch


def peak_memory_gib(device: torch.device) -> float:
    """Peak memory of this process in GiB: the CUDA allocator's peak on ``device`` if it is a GPU, else the peak
    resident set size (``VmHWM`` on Linux; ``ru_maxrss`` elsewhere, which on Linux would also count a parent's peak
    from before ``exec``)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**20  # kB
    except OSError:
        pass
    try:
        import resource

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
        return rss / (2**30 if sys.platform == "darwin" else 2**20)
    except (ImportError, OSError):  # no resource module (Windows)
        return float("nan")


class RunSummary(L.Callback):
    """Measure step time and peak memory; print (and optionally save) a summary at the end of ``fit``.

    Args:
        path: Also write the summary as JSON to this file (rank 0); ``null`` = only log it.
        warmup_steps: Training steps left out of the median step time (compilation, allocator warm-up).
        metrics: Names of logged metrics to include; empty = every scalar in ``trainer.callback_metrics``.
    """

    def __init__(self, path: str | None = None, warmup_steps: int = 1, metrics: list[str] | None = None) -> None:
        if warmup_steps < 0:
            raise ValueError(f"RunSummary.warmup_steps must be >= 0, got {warmup_steps}")
        self.path = path
        self.warmup_steps = warmup_steps
        self.metrics = list(metrics or [])
        self.step_times: list[float] = []
        self._t0: float | None = None
        self.first_metrics: dict[str, float] = {}
        self.summary: dict[str, Any] = {}

    def _sync(self, pl_module: L.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    def _scalars(self, trainer: L.Trainer) -> dict[str, float]:
        out = {}
        for name, value in trainer.callback_metrics.items():
            if self.metrics and name not in self.metrics:
                continue
            if isinstance(value, torch.Tensor) and value.numel() == 1:
                out[name] = round(float(value), 6)
        return dict(sorted(out.items()))

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.step_times = []
        self.first_metrics = {}
        if pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        self._sync(pl_module)
        self._t0 = time.perf_counter()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._t0 is None:
            return
        self._sync(pl_module)
        dt = time.perf_counter() - self._t0
        self._t0 = None
        self.step_times.append(dt)
        pl_module.log_dict({"perf/step_time_s": dt, "perf/peak_mem_gib": peak_memory_gib(pl_module.device)},
                           on_step=True, on_epoch=False, batch_size=1, rank_zero_only=True)
        if len(self.step_times) == 1:
            self.first_metrics = self._scalars(trainer)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        peak = torch.tensor(peak_memory_gib(pl_module.device), device=pl_module.device)
        if trainer.world_size > 1:
            peak = trainer.strategy.reduce(peak, reduce_op="max")
        timed = self.step_times[self.warmup_steps:] or self.step_times
        self.summary = {
            "model": type(pl_module).__name__,
            "strategy": type(trainer.strategy).__name__,
            "precision": str(trainer.precision),
            "world_size": trainer.world_size,
            "device": torch.cuda.get_device_name(pl_module.device) if pl_module.device.type == "cuda" else "cpu",
            "steps": len(self.step_times),
            "global_step": trainer.global_step,
            "median_step_s": round(statistics.median(timed), 4) if timed else None,
            "peak_mem_gib": round(float(peak), 3),
            "first_metrics": self.first_metrics,
            "metrics": self._scalars(trainer),
        }
        if not trainer.is_global_zero:
            return
        line = json.dumps(self.summary)
        print(f"run_summary {line}", flush=True)
        if self.path:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            tmp = f"{self.path}.tmp"
            with open(tmp, "w") as f:
                f.write(line + "\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
