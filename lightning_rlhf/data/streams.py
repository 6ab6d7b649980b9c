"""Several data streams in one run: :class:`MultiStreamDataModule`.

A method that learns from more than one kind of data (PPO's prompts plus a pretraining-mix ``ptx`` set, MetaRM's
preferences plus policy samples, ...) gets one training batch per step that is a ``dict`` from stream name to that
stream's batch, e.g. ``{"prompts": PromptBatch, "ptx": TokenBatch}``. Each stream is one of the package's data
modules, declared in the YAML::

    data:
      class_path: lightning_rlhf.data.MultiStreamDataModule
      init_args:
        streams:
          prompts: {class_path: lightning_rlhf.data.PromptDataModule, init_args: {batch_size: 8}}
          ptx: {class_path: lightning_rlhf.data.DemonstrationDataModule, init_args: {batch_size: 4, seed: 1}}

How the streams advance:

* The **primary** stream (``primary``, default: the first one) defines the epoch: one epoch = one pass over it,
  ``len(primary loader)`` steps, exactly as when it is the only data module (Lightning sets its epoch, its
  :class:`~lightning_rlhf.data.resumable.ResumableSampler` shuffles with ``seed + epoch``).
* Every other stream gives one batch per step and keeps **its own epoch counter**: when it runs out it starts its
  next epoch (a new shuffle, ``its seed + its epoch``) regardless of the primary's epoch; a longer stream simply
  continues where it was at the next primary epoch.
* Checkpoints hold every stream's position: the primary's as its data module saves it, each other stream's
  ``(epoch, batches consumed in that epoch)``, counted when a batch is handed to ``training_step`` (not when the
  loader fetches ahead). A run killed and resumed from a checkpoint sees the same batches of every stream.

Why not Lightning's ``CombinedLoader`` modes directly: ``max_size_cycle`` lets the longest stream define the epoch and
restarts a shorter one with the same order (no per-stream epoch), ``min_size`` ends the epoch with the shortest.
The loader returned here is one iterable (Lightning wraps it in a ``CombinedLoader`` as usual) whose length is the
primary's.

Methods declare the streams they need with a class attribute or property ``required_streams`` (e.g.
``("prompts", "ptx")``); :meth:`MultiStreamDataModule.setup` fails naming the missing stream, and refuses a module
without ``required_streams`` (it expects one batch type, not a dict). Validation uses the ``val_stream``'s own
validation split, as plain batches of that stream (the method's usual ``validation_step``).
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Iterator, Mapping
from typing import Any, Optional

import lightning as L
from torch.utils.data import DataLoader

from lightning_rlhf.data.modules import _TextDataModule
from lightning_rlhf.data.resumable import ResumableSampler

log = logging.getLogger(__name__)

DEFAULT_STREAMS: dict[str, dict[str, Any]] = {"prompts": {"class_path": "lightning_rlhf.data.PromptDataModule"}}


def _import_class(path: str, where: str) -> type:
    module_name, _, name = path.rpartition(".")
    if not module_name:
        raise ValueError(f"{where}: {path!r} is not a dotted class path (e.g. lightning_rlhf.data.PromptDataModule)")
    try:
        cls = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"{where}: cannot import {path!r} ({e})") from None
    return cls


def build_stream(name: str, spec: Any) -> _TextDataModule:
    """Instantiate the data module of stream ``name`` from ``{class_path, init_args}`` (or take an instance: the
    CLI parses and instantiates the streams itself, checking the classes and arguments at parse time).

    Raises:
        ValueError: naming ``data.streams.<name>`` and the field at fault.
    """
    where = f"data.streams.{name}"
    if isinstance(spec, _TextDataModule):
        return spec
    if not isinstance(spec, Mapping) or "class_path" not in spec:
        raise ValueError(f"{where}: expected {{class_path: ..., init_args: {{...}}}}, got {spec!r:.80}")
    unknown = set(spec) - {"class_path", "init_args"}
    if unknown:
        raise ValueError(f"{where}: unknown keys {sorted(unknown)} (expected class_path and init_args)")
    cls = _import_class(str(spec["class_path"]), f"{where}.class_path")
    if not (isinstance(cls, type) and issubclass(cls, _TextDataModule)):
        raise ValueError(f"{where}.class_path: {spec['class_path']!r} is not one of lightning_rlhf's data modules "
                         "(PromptDataModule, DemonstrationDataModule, PreferenceDataModule, SampleSetDataModule, ...)")
    init_args = spec.get("init_args") or {}
    if not isinstance(init_args, Mapping):
        raise ValueError(f"{where}.init_args: expected a mapping, got {init_args!r:.80}")
    try:
        return cls(**init_args)
    except TypeError as e:
        raise ValueError(f"{where}.init_args: {e}") from None
    except ValueError as e:  # a data module names its own flags data.<field>: here they are the stream's
        msg = str(e)
        raise ValueError(f"{where}: {msg[len('data.'):] if msg.startswith('data.') else msg}") from None


class _StreamCursor:
    """Position of a non-primary stream: its epoch and the batches of that epoch consumed by training steps."""

    def __init__(self, epoch: int = 0, position: int = 0) -> None:
        self.epoch = epoch
        self.position = position

    def advance(self, batches_per_epoch: int) -> None:
        self.position += 1
        if self.position >= batches_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0


def _cycle(loader: DataLoader, sampler: ResumableSampler, world_batch: int, epoch: int, position: int
           ) -> Iterator[Any]:
    """Batches of ``loader`` forever from ``(epoch, position)``: each pass is the sampler's next epoch."""
    while True:
        sampler.set_epoch(epoch)
        if position:  # skip the batches of this epoch that training already consumed
            sampler.load_state_dict(sampler.state_dict(samples_consumed=position * world_batch))
        yield from loader
        epoch, position = epoch + 1, 0


class MultiStreamLoader:
    """The training loader of :class:`MultiStreamDataModule`: for every batch of the primary loader, a dict with it
    and the next batch of every other stream (in the order the streams are declared).

    ``len()`` and ``sampler`` are the primary's, so Lightning counts the epoch's steps and sets the epoch of the
    primary's sampler as it does for a single data module.
    """

    def __init__(self, names: list[str], primary: str, loader: DataLoader, others: dict[str, Iterator[Any]]) -> None:
        self.names = names
        self.primary = primary
        self.loader = loader
        self.others = others

    @property
    def sampler(self) -> Any:
        return self.loader.sampler

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for batch in self.loader:
            yield {name: batch if name == self.primary else next(self.others[name]) for name in self.names}


class MultiStreamDataModule(L.LightningDataModule):
    """Named data streams combined into one training loader whose batches are ``{stream name: batch}``.

    See the module docstring for how the streams advance and resume. Each stream is a full data module (its own
    files, tokenisation, batch size, ``seed``, splits and resumable sampler); they share the training module's
    tokenizer unless a stream sets ``tokenizer_name_or_path``.

    Args:
        streams: Stream name -> data module (``{class_path: ..., init_args: {...}}`` in the YAML; one field of a
            stream from the command line: ``--data.init_args.streams.ptx.init_args.batch_size=8``), e.g. ``prompts`` (a
            ``PromptDataModule``), ``ptx`` / ``demonstrations`` (``DemonstrationDataModule``), ``preferences``
            (``PreferenceDataModule``), ``samples`` (``SampleSetDataModule``). Default: ``{prompts:
            PromptDataModule}`` with its defaults (the built-in HH-RLHF prompts).
        primary: The stream whose epoch is the run's epoch; default: the first stream.
        val_stream: The stream whose validation split feeds validation (plain batches of that stream); default: the
            primary. A stream without a validation split gives no validation batches.
    """

    def __init__(
        self,
        streams: Optional[dict[str, _TextDataModule]] = None,
        primary: Optional[str] = None,
        val_stream: Optional[str] = None,
    ) -> None:
        super().__init__()
        specs = dict(DEFAULT_STREAMS if streams is None else streams)
        if not specs:
            raise ValueError("data.streams is empty: name at least one stream, e.g. {prompts: {class_path: "
                             "lightning_rlhf.data.PromptDataModule}}")
        self.streams: dict[str, _TextDataModule] = {name: build_stream(name, spec) for name, spec in specs.items()}
        names = list(self.streams)
        self.primary = primary if primary is not None else names[0]
        if self.primary not in self.streams:
            raise ValueError(f"data.primary={primary!r} is not one of data.streams ({', '.join(names)})")
        self.val_stream = val_stream if val_stream is not None else self.primary
        if self.val_stream not in self.streams:
            raise ValueError(f"data.val_stream={val_stream!r} is not one of data.streams ({', '.join(names)})")
        self._cursors: dict[str, _StreamCursor] = {n: _StreamCursor() for n in names if n != self.primary}
        self._batches_per_epoch: dict[str, int] = {}

    # ------------------------------------------------------------------ what the training module sees
    @property
    def stream_names(self) -> list[str]:
        return list(self.streams)

    @property
    def batch_size(self) -> int:
        """The primary stream's batch size (e.g. PPO's rollout batch per rank)."""
        return self.streams[self.primary].batch_size

    @property
    def domain_names(self) -> list[str]:
        """The primary stream's domain labels."""
        return self.streams[self.primary].domain_names

    def set_tokenizer(self, tokenizer: Any) -> None:
        """Use this tokenizer in every stream that has none of its own."""
        for dm in self.streams.values():
            if dm.tokenizer_name_or_path is None:
                dm.set_tokenizer(tokenizer)

    def check_required_streams(self, module: Any) -> None:
        """Fail, naming what is missing, when ``module`` does not take streams or needs a stream not declared."""
        required = getattr(module, "required_streams", None)
        if required is None:
            raise ValueError(f"{type(module).__name__} takes one batch type, not several data streams: use one data "
                             f"module (e.g. data.streams.{self.primary}'s class) as `data`, not MultiStreamDataModule")
        missing = [s for s in required if s not in self.streams]
        if missing:
            raise ValueError(f"{type(module).__name__} needs the data stream(s) {missing}, but data.streams has only "
                             f"{self.stream_names}: add e.g. data.streams.{missing[0]}: {{class_path: ..., "
                             "init_args: {...}}")

    # ------------------------------------------------------------------ setup
    def setup(self, stage: Optional[str] = None) -> None:
        trainer = getattr(self, "trainer", None)
        module = getattr(trainer, "lightning_module", None) if trainer is not None else None
        if module is not None and stage in (None, "fit"):
            self.check_required_streams(module)
        for dm in self.streams.values():
            dm.trainer = trainer  # each stream resolves the module's tokenizer and its rank share through it
            dm.setup(stage)

    def teardown(self, stage: Optional[str] = None) -> None:
        for dm in self.streams.values():
            dm.teardown(stage)

    # ------------------------------------------------------------------ loaders
    def train_dataloader(self) -> MultiStreamLoader:
        """The primary's resumable loader, with every other stream cycled from its saved ``(epoch, position)``."""
        trainer = getattr(self, "trainer", None)
        world = trainer.world_size if trainer is not None else 1
        others: dict[str, Iterator[Any]] = {}
        for name, dm in self.streams.items():
            if name == self.primary:
                continue
            loader = dm.train_dataloader()
            n = len(loader)
            if n < 1:
                raise ValueError(f"data.streams.{name}: no training batch (fewer rows than data.streams.{name}."
                                 "init_args.batch_size x ranks)")
            cursor = self._cursors[name]
            if name in self._batches_per_epoch and self._batches_per_epoch[name] != n:
                log.warning("data.streams.%s has %d batches per epoch, the checkpoint's had %d: it restarts its epoch "
                            "%d from the beginning", name, n, self._batches_per_epoch[name], cursor.epoch)
                cursor.position = 0
            self._batches_per_epoch[name] = n
            assert isinstance(loader.sampler, ResumableSampler)
            others[name] = _cycle(loader, loader.sampler, dm.batch_size * world, cursor.epoch, cursor.position)
        return MultiStreamLoader(self.stream_names, self.primary, self.streams[self.primary].train_dataloader(),
                                 others)

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Count the training batch handed to ``training_step``: every non-primary stream advances one batch."""
        trainer = getattr(self, "trainer", None)
        if trainer is not None and trainer.training and isinstance(batch, dict):
            for name, cursor in self._cursors.items():
                cursor.advance(self._batches_per_epoch[name])
        return batch

    def val_dataloader(self) -> Any:
        return self.streams[self.val_stream].val_dataloader()

    def predict_dataloader(self) -> Any:
        """The primary stream's rows in order (offline passes)."""
        return self.streams[self.primary].predict_dataloader()

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The primary's data-module state, and every other stream's epoch and position."""
        state: dict[str, Any] = {"primary": self.primary, "streams": {}}
        for name, dm in self.streams.items():
            if name == self.primary:
                state["streams"][name] = dm.state_dict()
            else:
                c = self._cursors[name]
                state["streams"][name] = {"epoch": c.epoch, "position": c.position,
                                          "batches_per_epoch": self._batches_per_epoch.get(name),
                                          "domain_names": list(dm.domain_names)}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("streams", {})
        for name, dm in self.streams.items():
            if name not in saved:
                log.warning("data.streams.%s is not in the checkpoint: it starts from its beginning", name)
                continue
            if name == self.primary:
                dm.load_state_dict(saved[name])
            else:
                s = saved[name]
                self._cursors[name] = _StreamCursor(int(s["epoch"]), int(s["position"]))
                if s.get("batches_per_epoch") is not None:
                    self._batches_per_epoch[name] = int(s["batches_per_epoch"])
        if state_dict.get("primary", self.primary) != self.primary:
            log.warning("data.primary is %r, the checkpoint's was %r", self.primary, state_dict.get("primary"))
