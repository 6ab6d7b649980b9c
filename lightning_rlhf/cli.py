"""The command line: a LightningCLI in subclass mode for the method (``--model``) and the data (``--data``).

    python cli.py fit -c configs/dpo/tiny.yaml
    python cli.py fit -c configs/dpo/tiny.yaml --model.beta 0.2 --trainer.max_steps 50
    python cli.py fit --help                       # every method, data module and their arguments
    python cli.py fit --model.help DPOModule       # one method's arguments
    python cli.py fit -c configs/dpo/tiny.yaml --ckpt_path last           # resume the run's last checkpoint
    python cli.py fit -c configs/dpo/tiny.yaml --ckpt_path last_or_fresh  # ... or start a new run if there is none
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar
from lightning.pytorch.cli import LightningCLI

# imported so that their classes are known to the CLI (``--model DPOModule`` / ``--data PreferenceDataModule``)
import lightning_rlhf.data  # noqa: F401
import lightning_rlhf.methods  # noqa: F401
from callbacks.preemption import CheckpointOnSigterm
from callbacks.progress import RunProgressBar
from callbacks.rng_state import RNGStateCallback
from lightning_rlhf.checkpoint_io import verify_checkpoint
from lightning_rlhf.methods.base import RLHFModule
from lightning_rlhf.models.factory import check_model_path


class RLHFCLI(LightningCLI):
    """LightningCLI with lightning-rlhf's defaults: TensorBoard logs under ``runs/``, config saved with the run.

    Fault-tolerance defaults: checkpoints are written atomically (``trainer.plugins`` defaults to
    :class:`~lightning_rlhf.checkpoint_io.AtomicCheckpointIO`), and unless ``trainer.callbacks`` already has one of
    them, :class:`callbacks.preemption.CheckpointOnSigterm` (SIGTERM -> checkpoint ``last.ckpt`` and stop) and
    :class:`callbacks.rng_state.RNGStateCallback` (RNG states in checkpoints, for exact resumes) are added.

    Resuming: ``--ckpt_path last`` resumes the newest ``last*.ckpt`` of the same run (:func:`resolve_resume`: the
    ``ModelCheckpoint`` folder if the config names one, else ``<save_dir>/<name>/version_*/checkpoints`` of the
    logger), logs into that run's version folder, and prints one line naming the checkpoint; with no checkpoint it
    stops with :class:`NothingToResumeError`. ``--ckpt_path last_or_fresh`` starts a new run instead (saying so).
    Every local checkpoint is verified against its stored checksums before it is read
    (:func:`lightning_rlhf.checkpoint_io.verify_checkpoint`).

    Start-time checks: a ``*_name_or_path`` argument that looks like a local folder and does not exist fails naming
    the flag; an error raised while building the model or data module is re-raised as it is (not inside
    jsonargparse's dump of every argument). Lightning's progress bar is replaced by
    :class:`callbacks.progress.RunProgressBar` (one bar per run, with the run's total).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("parser_kwargs", {"parser_mode": "omegaconf"} if _has_omegaconf() else {})
        kwargs.setdefault("auto_configure_optimizers", False)
        super().__init__(
            RLHFModule,
            L.LightningDataModule,
            *args,
            subclass_mode_model=True,
            subclass_mode_data=True,
            **kwargs,
        )

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.set_defaults(
            {
                "trainer.logger": {
                    "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                    "init_args": {"save_dir": "runs", "name": "default"},
                },
                "trainer.log_every_n_steps": 1,
                # --- fault tolerance: atomic checkpoint files ---
                "trainer.plugins": [{"class_path": "lightning_rlhf.checkpoint_io.AtomicCheckpointIO"}],
            }
        )

    # --- resume: --ckpt_path last finds the run's last checkpoint; checkpoints are verified before anything reads them
    def _parse_ckpt_path(self) -> None:
        subcommand = self.config.get("subcommand")
        if subcommand:
            config = self.config[subcommand]
            ckpt_path = config.get("ckpt_path")
            if ckpt_path in RESUME_VALUES:
                # the command line is the same as the interrupted run's: its hyperparameters are not re-read from the
                # checkpoint (as with Lightning's own "last")
                config.ckpt_path = resolve_resume(config, ckpt_path)
                if config.ckpt_path and Path(config.ckpt_path).is_file():
                    verify_checkpoint(str(config.ckpt_path))
                return
            if ckpt_path and Path(ckpt_path).is_file():
                verify_checkpoint(str(ckpt_path))  # before LightningCLI unpickles its hyperparameters
        super()._parse_ckpt_path()

    # --- start-time checks: paths named by their flag, construction errors not buried ---
    def _subcommand_config(self) -> Any:
        return self.config[self.subcommand] if self.subcommand else self.config

    def before_instantiate_classes(self) -> None:
        """Every ``*_name_or_path`` argument of the model and data that looks like a local folder must exist: a typo
        fails now, naming the flag, instead of being tried as a hub id (a minute of retries)."""
        config = self._subcommand_config()
        for group in ("model", "data"):
            init_args = _get(config, f"{group}.init_args")
            if init_args is None:
                continue
            for key in sorted(dict(vars(init_args)) if hasattr(init_args, "__dict__") else init_args):
                value = _get(init_args, key)
                if key.endswith("_name_or_path") and isinstance(value, str):
                    check_model_path(value, f"{group}.{key}")

    def instantiate_classes(self) -> None:
        """jsonargparse reports an error raised while building the model or data module inside a dump of every
        argument ("Does not validate against any of the Union subtypes ... Given value: Namespace(...)"); re-raise the
        error itself instead."""
        try:
            super().instantiate_classes()
        except Exception as e:
            root = _root_cause(e)
            if root is e:
                raise
            raise root from None

    # --- fault tolerance: default callbacks ---
    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        for cls in (CheckpointOnSigterm, RNGStateCallback):
            if not any(isinstance(cb, cls) for cb in trainer.callbacks):
                trainer.callbacks.append(cls())
        # Lightning's default bar (per epoch) -> one bar for the whole run with its true total (callbacks/progress.py)
        for i, cb in enumerate(trainer.callbacks):
            if type(cb) in (TQDMProgressBar, RichProgressBar):  # Lightning's default (Rich when rich is installed)
                trainer.callbacks[i] = RunProgressBar(refresh_rate=getattr(cb, "refresh_rate", 1) or 1)
        return trainer


RESUME_VALUES = ("last", "last_or_fresh")


class NothingToResumeError(FileNotFoundError):
    """``--ckpt_path last`` found no checkpoint of the run."""


def _class_name(spec: Any) -> str:
    return str(_get(spec, "class_path") or "").rpartition(".")[2]


def _checkpoint_dirpaths(config: Any) -> list[str]:
    """``dirpath`` of every ``ModelCheckpoint`` in ``trainer.callbacks`` that sets one."""
    callbacks = _get(config, "trainer.callbacks") or []
    callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
    return [str(_get(cb, "init_args.dirpath")) for cb in callbacks
            if _class_name(cb) == "ModelCheckpoint" and _get(cb, "init_args.dirpath")]


def _run_logger(config: Any) -> Any:
    """The ``trainer.logger`` spec when it is one TensorBoard or CSV logger (versioned ``save_dir/name/version_N``)."""
    logger = _get(config, "trainer.logger")
    logger = logger[0] if isinstance(logger, list) and len(logger) == 1 else logger
    if _class_name(logger) in ("TensorBoardLogger", "CSVLogger"):
        return logger
    return None


def _newest(paths: list[Path]) -> Path | None:
    return max(paths, key=lambda p: (p.stat().st_mtime_ns, str(p))) if paths else None


def _last_checkpoints(folder: Path) -> list[Path]:
    """``last.ckpt`` and ``last-v1.ckpt``... in a checkpoint folder (temporary files are dot-files: ignored)."""
    return [p for p in folder.glob("last*.ckpt") if p.is_file()] if folder.is_dir() else []


def resolve_resume(config: Any, mode: str) -> str | None:
    """The checkpoint file ``--ckpt_path last`` / ``last_or_fresh`` means, and the logger pointed at its run.

    * A ``ModelCheckpoint`` with an explicit ``dirpath`` in ``trainer.callbacks``: the newest ``last*.ckpt`` there.
    * Otherwise, with a TensorBoard or CSV logger (the default): the newest ``last*.ckpt`` in
      ``<save_dir>/<name>/version_*/checkpoints`` (or in the logger's fixed ``version``), and the logger's ``version``
      is set to that folder's, so the resumed run logs, checkpoints and exports in the same run folder.
    * Without a logger: ``<trainer.default_root_dir>/checkpoints``.

    One line names the checkpoint. With no checkpoint, ``last`` raises :class:`NothingToResumeError` (a resume that
    silently started from step 0 would train again and overwrite the run's outputs); ``last_or_fresh`` says so and
    returns ``None`` (start from scratch), for job scripts that always pass the same command.
    """
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    def say(message: str) -> None:
        if rank_zero_only.rank == 0:
            print(message, flush=True)

    dirpaths = _checkpoint_dirpaths(config)
    logger = _run_logger(config)
    found: Path | None = None
    if dirpaths:
        where = " or ".join(dirpaths)
        found = _newest([p for d in dirpaths for p in _last_checkpoints(Path(d))])
    elif logger is not None:
        init = _get(logger, "init_args")
        save_dir = _get(init, "save_dir") or "."
        name = _get(init, "name")
        name = "lightning_logs" if name is None else str(name)
        version = _get(init, "version")
        run_root = Path(save_dir) / name if name else Path(save_dir)
        if version is not None:
            folders = [run_root / (version if isinstance(version, str) else f"version_{version}")]
        else:
            folders = [p for p in run_root.glob("version_*") if p.is_dir()]
        where = str(run_root / ("version_*" if version is None else folders[0].name) / "checkpoints")
        found = _newest([p for f in folders for p in _last_checkpoints(f / "checkpoints")])
        if found is not None and version is None:
            folder = found.parent.parent.name  # version_N
            number = folder[len("version_"):]
            init.version = int(number) if number.isdigit() else folder
    else:  # no logger: Lightning's default checkpoint folder is <default_root_dir>/checkpoints
        folder = Path(_get(config, "trainer.default_root_dir") or ".") / "checkpoints"
        where = str(folder)
        found = _newest(_last_checkpoints(folder))
    if found is None:
        message = f"--ckpt_path {mode}: no last.ckpt in {where}: nothing to resume."
        if mode == "last":
            raise NothingToResumeError(
                f"{message} Run without --ckpt_path to start a new run (or with --ckpt_path last_or_fresh to resume "
                "when there is a checkpoint and start fresh otherwise)."
            )
        say(f"{message} Starting a new run (--ckpt_path last_or_fresh).")
        return None
    step = _checkpoint_step(found)
    say(f"Resuming from {found}" + (f" (global step {step})" if step is not None else "")
        + (f"; logging into {found.parent.parent}" if not dirpaths and logger is not None else ""))
    return str(found)


def _checkpoint_step(path: Path) -> int | None:
    """The ``global_step`` stored in a checkpoint, read without loading it (``None`` when unknown)."""
    try:
        import torch

        verify_checkpoint(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return int(state.get("global_step"))
    except Exception:
        return None


def _get(namespace: Any, dotted: str) -> Any:
    """``namespace.a.b`` for a dotted key of a jsonargparse Namespace or dict (``None`` when missing)."""
    value = namespace
    for part in dotted.split("."):
        if value is None:
            return None
        value = value.get(part) if isinstance(value, dict) else getattr(value, part, None)
    return value


def _root_cause(error: BaseException) -> BaseException:
    """The exception at the end of ``error``'s ``__cause__`` chain: what the constructor raised, below jsonargparse's
    union-validation wrapper (which keeps it as ``__cause__``)."""
    seen = {id(error)}
    while error.__cause__ is not None and id(error.__cause__) not in seen:
        error = error.__cause__
        seen.add(id(error))
    return error


def _has_omegaconf() -> bool:
    try:
        import omegaconf  # noqa: F401
    except ImportError:
        return False
    return True


class _DropLightningTips(logging.Filter):
    """Lightning's "💡 Tip: try installing litlogger / litmodels" lines."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith("💡 Tip")


def quiet_libraries(lightning_info: bool = True) -> None:
    """Less noise on a run's console: no tqdm bars of weight loading / downloads (transformers, huggingface_hub) and
    no Lightning tips; with ``lightning_info=False`` (the pipeline) also none of Lightning's info lines
    (``GPU available: ...``, ``Seed set to ...``) and transformers' messages at error level only. Errors and warnings
    of this package and of Lightning still show."""
    tips = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _DropLightningTips) for f in tips.filters):
        tips.addFilter(_DropLightningTips())
    if not lightning_info:
        for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.seed",
                     "lightning.fabric.utilities.rank_zero"):
            logging.getLogger(name).setLevel(logging.WARNING)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        if not lightning_info:
            hf_logging.set_verbosity_error()
    except ImportError:
        pass
    try:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    except ImportError:
        pass
    try:  # "tokenizing prompts" / "Flattening the indices" bars of the data modules' datasets.map calls
        from datasets.utils.logging import disable_progress_bar as disable_datasets_bars

        disable_datasets_bars()
    except ImportError:
        pass


def main(args: list[str] | None = None) -> RLHFCLI:
    """Entry point of ``python cli.py`` and of the ``lightning-rlhf`` console script."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode.*")  # frozen reference/reward models
    warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\).*")  # torch/Lightning internals
    quiet_libraries()
    return RLHFCLI(args=args)


if __name__ == "__main__":  # python -m lightning_rlhf.cli fit -c ... (from any folder)
    main()
