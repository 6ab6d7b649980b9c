"""The command line: a LightningCLI in subclass mode for the method (``--model``) and the data (``--data``).

    python cli.py fit -c configs/dpo/tiny.yaml
    python cli.py fit -c configs/dpo/tiny.yaml --model.beta 0.2 --trainer.max_steps 50
    python cli.py fit --help                       # every method, data module and their arguments
    python cli.py fit --model.help DPOModule       # one method's arguments
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import lightning as L
from lightning.pytorch.cli import LightningCLI

# imported so that their classes are known to the CLI (``--model DPOModule`` / ``--data PreferenceDataModule``)
import lightning_rlhf.data  # noqa: F401
import lightning_rlhf.methods  # noqa: F401
from callbacks.preemption import CheckpointOnSigterm
from callbacks.rng_state import RNGStateCallback
from lightning_rlhf.methods.base import RLHFModule
from lightning_rlhf.models.factory import check_model_path


class RLHFCLI(LightningCLI):
    """LightningCLI with lightning-rlhf's defaults: TensorBoard logs under ``runs/``, config saved with the run.

    Fault-tolerance defaults: checkpoints are written atomically (``trainer.plugins`` defaults to
    :class:`~lightning_rlhf.checkpoint_io.AtomicCheckpointIO`), and unless ``trainer.callbacks`` already has one of
    them, :class:`callbacks.preemption.CheckpointOnSigterm` (SIGTERM -> checkpoint ``last.ckpt`` and stop) and
    :class:`callbacks.rng_state.RNGStateCallback` (RNG states in checkpoints, for exact resumes) are added.
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
        return trainer


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


def main(args: list[str] | None = None) -> RLHFCLI:
    """Entry point of ``python cli.py`` and of the ``lightning-rlhf`` console script."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode.*")  # frozen reference/reward models
    return RLHFCLI(args=args)
