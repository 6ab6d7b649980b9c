"""Model roles beyond "trained" and "frozen, rebuilt from its path".

A method's models each play one role:

* **trained** by the main optimizer (the policy): the default for every parameter with ``requires_grad``.
* **frozen, rebuilt from a path** (reference, fixed reward model): listed in ``RLHFModule.frozen_modules``, kept out of
  checkpoints and loaded again from their path on resume.
* **snapshot** (:class:`Snapshot`): a frozen copy of a trained model taken at a point in training and refreshed on a
  schedule, e.g. SPIN's / Self-Play AIHF's opponent ``pi_t`` (the policy at the start of the current round). Declared
  in ``RLHFModule.snapshot_roles`` (``{"opponent": "policy"}``): the base module builds it after the source (and its
  LoRA adapters) exists. Its weights cannot be rebuilt from a path (the policy moved on since it was taken), so
  **they are saved in checkpoints** (the module's ``state_dict`` holds them under ``<name>.model.``) together with the
  step they were taken at (``<name>.taken_at``); a resume restores them exactly. The cost is one more copy of the
  source's weights in every checkpoint. Kept out of every optimizer (``requires_grad=False``) and always in eval mode.
* **a trainable second model with its own optimizer** (:class:`OptimizerRole`): e.g. AIHF's reward model, trained
  inside the RL loop at its own learning rate and schedule. A method returns one role per optimizer from
  ``RLHFModule.optimizer_roles``; ``configure_optimizers`` builds one AdamW and one LR schedule per role, and
  ``RLHFModule.optimizer_update(..., role=name)`` clips, steps and schedules that role's optimizer only. Under
  DeepSpeed (one optimizer per engine) several roles are refused at start.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn

from lightning_rlhf.models.factory import freeze


class Snapshot(nn.Module):
    """A frozen copy of ``source`` (same architecture, dtype and device), refreshed on demand.

    The copy's parameters never require gradients and the module stays in eval mode whatever ``train()`` is called
    with (``forward`` also re-enters eval mode, since Lightning restores recorded modes on submodules directly); call
    the snapshot itself (``snapshot(input_ids=...)``) rather than ``snapshot.model`` for the forward pass.
    ``taken_at`` (a buffer, so it is
    checkpointed with the weights) records the training step of the last :meth:`refresh` (-1: the initial copy).

    Args:
        source: The model to copy (e.g. the policy, with its LoRA adapters if any).
    """

    def __init__(self, source: nn.Module) -> None:
        super().__init__()
        self.model = freeze(copy.deepcopy(source))
        self.register_buffer("taken_at", torch.full((), -1, dtype=torch.long))
        self.train(False)

    def train(self, mode: bool = True) -> "Snapshot":
        """Always eval mode (no dropout): a snapshot is a fixed function until refreshed."""
        return super().train(False)

    @torch.no_grad()
    def refresh(self, source: nn.Module, step: int) -> None:
        """Copy ``source``'s current weights and buffers into the snapshot (in place: no new allocation).

        Args:
            source: The model the snapshot was taken of (same parameter names and shapes).
            step: The training step the copy is taken at (stored in ``taken_at``).
        """
        mine = self.model.state_dict(keep_vars=True)
        theirs = source.state_dict(keep_vars=True)
        if mine.keys() != theirs.keys():
            missing = sorted(set(theirs) ^ set(mine))[:5]
            raise ValueError(f"Snapshot.refresh: the source's state differs from the snapshot's (e.g. {missing})")
        for key, value in theirs.items():
            mine[key].copy_(value.detach())
        self.taken_at.fill_(int(step))

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The copy's forward, in eval mode (Lightning may restore a recorded train mode on submodules directly)."""
        if self.model.training:
            self.train(False)
        return self.model(*args, **kwargs)


@dataclass
class OptimizerRole:
    """One optimizer of a module that trains several models separately (e.g. AIHF's policy and reward model).

    Args:
        name: The role's name (``policy``, ``reward``): ``optimizer_update(role=name)`` steps it, and its learning rate
            is logged as ``train/lr`` (first role) or ``train/lr_<name>``.
        param_groups: AdamW parameter groups (e.g. ``RLHFModule.decay_groups(...)``), each with its ``lr``.
        lr: Peak learning rate of the role (the groups' ``lr`` is multiplied by the schedule).
        total_steps: Optimizer steps of this role over the run (the decay horizon); ``None``: the module's
            ``total_optimizer_steps()``.
        warmup_steps: Linear warm-up steps; ``None``: the module's ``warmup_steps``.
        schedule: ``constant`` | ``linear`` | ``cosine``; ``None``: the module's ``lr_schedule``.
    """

    name: str
    param_groups: list[dict[str, Any]] = field(default_factory=list)
    lr: float = 1e-4
    total_steps: Optional[int] = None
    warmup_steps: Optional[int] = None
    schedule: Optional[str] = None


def named_trainable(module: Optional[nn.Module]) -> list[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` of ``module``'s parameters that require gradients (empty for ``None``)."""
    if module is None:
        return []
    return [(n, p) for n, p in module.named_parameters() if p.requires_grad]


__all__ = ["OptimizerRole", "Snapshot", "named_trainable"]
