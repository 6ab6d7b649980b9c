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

    # --- fault tolerance: default callbacks ---
    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        for cls in (CheckpointOnSigterm, RNGStateCallback):
            if not any(isinstance(cb, cls) for cb in trainer.callbacks):
                trainer.callbacks.append(cls())
        return trainer


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
