"""Validation metrics shared by the pairwise methods (reward model, DPO, AIHF): accuracy overall and per domain."""

from __future__ import annotations

import torch
from torch import nn
from torchmetrics import MeanMetric

from lightning_rlhf.metrics import GroupedMean


class PairwiseMetrics(nn.Module):
    """Accumulates pairwise accuracy ``mean(margin > 0)``, mean margin, and per-domain accuracy over an epoch.

    Args:
        domain_names: Labels of the domain ids found in batches.
        prefix: Metric name prefix, e.g. ``val``.
    """

    def __init__(self, domain_names: list[str], prefix: str = "val") -> None:
        super().__init__()
        self.domain_names = list(domain_names)
        self.prefix = prefix
        self.accuracy = MeanMetric()
        self.margin = MeanMetric()
        self.per_domain = GroupedMean(len(self.domain_names))

    def update(self, margins: torch.Tensor, domain_ids: torch.Tensor) -> None:
        """``margins`` ``(B,)``: ``r_w - r_l`` (or DPO's ``h``); ``domain_ids`` ``(B,)``."""
        correct = (margins > 0).float()
        self.accuracy.update(correct)
        self.margin.update(margins.float())
        self.per_domain.update(correct, domain_ids)

    def compute_and_reset(self) -> dict[str, float]:
        """Reduced across ranks; returns ``{prefix/accuracy, prefix/margin, prefix/accuracy/<domain>, ...}``."""
        out = {f"{self.prefix}/accuracy": float(self.accuracy.compute()), f"{self.prefix}/margin": float(self.margin.compute())}
        per = self.per_domain.compute()
        counts = self.per_domain.count
        for name, acc, n in zip(self.domain_names, per.tolist(), counts.tolist()):
            if n > 0:
                out[f"{self.prefix}/accuracy/{name}"] = acc
        for m in (self.accuracy, self.margin, self.per_domain):
            m.reset()
        return out
