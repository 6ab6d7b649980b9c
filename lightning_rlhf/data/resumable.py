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

With ``lengths`` (length bucketing), the epoch's order is still a pure function of ``(seed, epoch)``: the random
permutation is cut into windows of ``bucket_window`` global batches, each window is sorted by length (longest first),
cut into global batches, and the global batches of the whole epoch are shuffled. A batch then holds examples of
similar length, so padding (which the collate function adds up to the batch's longest example) costs little, while
every example is still seen once per epoch and the batch order stays random. Since the unit is a global batch, the
equivalence of one process and ``R`` ranks above holds unchanged.

It subclasses ``DistributedSampler`` so that Lightning uses it as it is under DDP instead of wrapping it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence, Sized
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
        lengths: Length of every example (e.g. padded tokens it needs); given, batches group similar lengths
            (length bucketing, see the module docstring). Needs ``global_batch_size``.
        bucket_window: Global batches per window that is sorted by length: larger windows pad less but make the
            batches' composition less random.
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
        lengths: Sequence[int] | None = None,
        bucket_window: int = 32,
    ) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last)
        n = len(dataset)
        if lengths is not None and len(lengths) != n:
            raise ValueError(f"lengths has {len(lengths)} entries for a dataset of {n} examples")
        if bucket_window < 1:
            raise ValueError(f"bucket_window must be >= 1, got {bucket_window}")
        if lengths is not None and not global_batch_size:
            raise ValueError("length bucketing needs global_batch_size (the unit that is grouped by length)")
        self.lengths = None if lengths is None else [int(x) for x in lengths]
        self.bucket_window = bucket_window
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
            order = list(range(n))
            return order if self.lengths is None else self._bucketed(order, None)
        g = torch.Generator()
        g.manual_seed(self.seed + (self.epoch if epoch is None else epoch))
        order = torch.randperm(n, generator=g).tolist()
        return order if self.lengths is None else self._bucketed(order, g)

    def _bucketed(self, order: list[int], g: torch.Generator | None) -> list[int]:
        """``order`` regrouped into global batches of similar length, whole batches shuffled (unless ``g`` is None).
        The examples that do not fill a last global batch are taken from the random order (so which ones are dropped
        does not depend on length) and stay at the end, where ``global_batch_size`` drops them."""
        assert self.lengths is not None
        G = self.global_batch_size or len(order)
        full = len(order) // G * G
        head, tail = order[:full], order[full:]
        window = G * self.bucket_window
        regrouped: list[int] = []
        for start in range(0, full, window):  # windows hold whole global batches (window and full are multiples of G)
            regrouped += sorted(head[start : start + window], key=lambda i: -self.lengths[i])  # stable
        batches = [regrouped[i : i + G] for i in range(0, full, G)]
        if g is not None:
            batches = [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]
        return [i for b in batches for i in b] + tail

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
            "bucketed": self.lengths is not None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Make the next pass over ``state["epoch"]`` start after ``state["consumed"]`` samples of its order."""
        saved = {"bucketed": False, **state}  # checkpoints from before length bucketing existed were not bucketed
        mismatch = {
            k: (saved.get(k), v)
            for k, v in (("seed", self.seed), ("shuffle", self.shuffle), ("dataset_len", len(self.dataset)),
                         ("bucketed", self.lengths is not None))
            if saved.get(k) != v
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
