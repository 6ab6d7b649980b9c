"""A training sampler that resumes mid-epoch, and whose global order does not depend on the number of ranks.

Lightning restores the model, the optimizers and the loop counters from a checkpoint, but a plain ``DataLoader``
starts its epoch again from the first batch (and draws a new shuffle). :class:`ResumableSampler` makes the order a
pure function of ``(seed, epoch)`` and skips what the interrupted run already consumed:

* epoch ``e``'s global order is ``randperm(n)`` drawn from a generator seeded with ``seed + e`` (``0..n-1`` when
  not shuffling);
* rank ``r`` of ``R`` takes positions ``r, r + R, r + 2R, ...`` of it (``torch.utils.data.DistributedSampler``'s
  split, padded by repeating the head so that every rank gets the same count). With a per-rank batch of ``b``, batch
  ``i`` of all ranks together is exactly positions ``[i*R*b, (i+1)*R*b)`` of the global order: one process with
  batch ``R*b`` sees the same examples, step for step. With ``global_batch_size=R*b`` the tail that does not fill a
  whole global batch is dropped (what ``drop_last`` does for one process), so the epochs have the same length too;
* the owner (the data module) records how many samples of the epoch were consumed when a checkpoint is written
  (:meth:`ResumableSampler.state_dict`), and after :meth:`ResumableSampler.load_state_dict` the next pass over that
  same epoch starts right after them.

It subclasses ``DistributedSampler`` so that Lightning uses it as it is under DDP instead of wrapping it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sized
from typing import Any

import torch
from torch.utils.data import DistributedSampler

log = logging.getLogger(__name__)


class ResumableSampler(DistributedSampler):
    """Seeded per-epoch permutation split across ranks, with a resumable position inside the epoch.

    Args:
        dataset: Anything with ``len()`` (only its length is used).
        num_replicas: Number of ranks sharing the epoch.
        rank: This rank.
        shuffle: Draw a new permutation every epoch (``seed + epoch``); ``False`` keeps ``0..n-1``.
        seed: Base seed of the permutations; the same on every rank.
        drop_last: Drop the tail that does not divide evenly across ranks instead of padding it.
        global_batch_size: Drop the tail of every epoch's order that does not fill a whole batch of this many
            samples over all ranks (per-rank batch size x ranks); ``None`` keeps every sample.
    """

    def __init__(
        self,
        dataset: Sized,
        num_replicas: int = 1,
        rank: int = 0,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        global_batch_size: int | None = None,
    ) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last)
        n = len(dataset)
        self.global_batch_size = global_batch_size if global_batch_size and n >= global_batch_size else None
        if self.global_batch_size is not None:
            if self.global_batch_size % num_replicas:
                raise ValueError(f"global_batch_size={global_batch_size} is not a multiple of {num_replicas} ranks")
            self.total_size = n // self.global_batch_size * self.global_batch_size
            self.num_samples = self.total_size // num_replicas
        self._resume_epoch: int | None = None  # epoch in which the next pass starts at ``_resume_from``
        self._resume_from = 0  # global position (samples of the epoch's order already consumed on all ranks)

    def global_order(self, epoch: int | None = None) -> list[int]:
        """The epoch's order over all ranks (``len(dataset)`` indices, before padding)."""
        n = len(self.dataset)
        if not self.shuffle:
            return list(range(n))
        g = torch.Generator()
        g.manual_seed(self.seed + (self.epoch if epoch is None else epoch))
        return torch.randperm(n, generator=g).tolist()

    def __iter__(self) -> Iterator[int]:
        order = self.global_order()
        if self.global_batch_size is not None:
            order = order[: self.total_size]  # whole global batches only
        start = self._resume_from if self._resume_epoch == self.epoch else 0
        self._resume_epoch, self._resume_from = None, 0  # only the first pass after a restore is shortened
        rest = order[start:]
        if self.drop_last:
            rest = rest[: len(rest) - len(rest) % self.num_replicas]
        elif rest and len(rest) % self.num_replicas:
            pad = self.num_replicas - len(rest) % self.num_replicas
            rest = rest + (rest * math.ceil(pad / len(rest)))[:pad]
        return iter(rest[self.rank :: self.num_replicas])

    def state_dict(self, samples_consumed: int = 0) -> dict[str, Any]:
        """The position to resume from.

        Args:
            samples_consumed: Samples of the current epoch already used, summed over ranks (the owner knows this:
                the loader may have fetched ahead of what training consumed).
        """
        return {
            "epoch": int(self.epoch),
            "consumed": int(samples_consumed),
            "seed": int(self.seed),
            "shuffle": bool(self.shuffle),
            "dataset_len": len(self.dataset),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Make the next pass over ``state["epoch"]`` start after ``state["consumed"]`` samples of its order."""
        mismatch = {
            k: (state.get(k), v)
            for k, v in (("seed", self.seed), ("shuffle", self.shuffle), ("dataset_len", len(self.dataset)))
            if state.get(k) != v
        }
        if mismatch:
            log.warning(
                "Not resuming the data position mid-epoch: the sampler differs from the checkpoint's "
                "(saved, now): %s. The epoch restarts from its beginning.", mismatch,
            )
            return
        self.set_epoch(int(state["epoch"]))
        self._resume_epoch = int(state["epoch"])
        self._resume_from = min(int(state["consumed"]), len(self.dataset))
