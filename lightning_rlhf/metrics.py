"""torchmetrics metrics used by the methods."""

from __future__ import annotations

import torch
from torchmetrics import Metric


class GroupedMean(Metric):
    """Mean of a per-sample value within each group (e.g. reward accuracy per domain), reduced across ranks.

    Args:
        num_groups: Number of groups; ``update`` takes group ids in ``[0, num_groups)``.
    """

    full_state_update = False

    def __init__(self, num_groups: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.num_groups = num_groups
        self.add_state("total", default=torch.zeros(num_groups, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.zeros(num_groups, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, values: torch.Tensor, group_ids: torch.Tensor) -> None:
        """Add ``values`` ``(N,)`` to the groups ``group_ids`` ``(N,)``."""
        values = values.detach().to(torch.float64).flatten()
        group_ids = group_ids.flatten().long()
        self.total.index_add_(0, group_ids, values)
        self.count.index_add_(0, group_ids, torch.ones_like(values))

    def compute(self) -> torch.Tensor:
        """``(num_groups,)`` means; NaN for groups that received nothing."""
        return self.total / self.count.clamp(min=1) + torch.where(self.count > 0, 0.0, float("nan"))
