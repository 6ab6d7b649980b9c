"""A callback written as a user of the package would write one: it imports only lightning and torch and talks to the
module through the ``ExperienceAnnotatable`` / ``KLControlled`` protocols (duck-typed: nothing from this package)."""

from __future__ import annotations

from typing import Any, Mapping

import lightning.pytorch as pl
import torch


class ScaleKLByRank(pl.Callback):
    """Scales the KL coefficient of rollout ``i`` (of all ranks) by ``1 + (i mod 3)`` and records what it read."""

    def __init__(self) -> None:
        self.views: list[dict[str, torch.Tensor]] = []
        self.stats_read: list[dict[str, float]] = []

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        pl_module.register_experience_hook("scale_kl_by_rank", self.hook)

    def hook(self, view: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
        self.views.append({k: v.clone() for k, v in view.items()})
        n = view["scores"].shape[0]
        return {"kl_scale": 1.0 + (torch.arange(n) % 3).float(), "note": view["scores"] * 2}

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.stats_read.append(dict(pl_module.last_rollout_stats()))
