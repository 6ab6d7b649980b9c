"""Crash-safe checkpoint files: write to a temporary file in the same folder, fsync, then rename over the target.

A process killed while writing (preemption, OOM killer, node failure) leaves either the previous complete file or
the new complete file under the checkpoint's name, never a truncated one, so ``--ckpt_path last`` always resumes.
``os.replace`` is atomic within one file system, which is why the temporary file lives next to the target; the
folder is fsynced after the rename so that the new name survives a power loss too. Remote paths (``s3://`` ...)
keep Lightning's own handling.

:class:`AtomicCheckpointIO` is the default ``trainer.plugins`` of the command line (``lightning_rlhf.cli``).
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import TorchCheckpointIO

from lightning_rlhf.atomic import atomic_write_path

TMP_PREFIX = ".tmp-ckpt-"  # never starts with "last" nor ends in ".ckpt": checkpoint discovery ignores it


def _is_local(path: str) -> bool:
    from fsspec.implementations.local import LocalFileSystem

    return isinstance(get_filesystem(path), LocalFileSystem)


def atomic_torch_save(obj: Any, path: str) -> None:
    """``torch.save(obj, path)`` that never leaves a partial file at ``path``."""
    with atomic_write_path(path, prefix=TMP_PREFIX) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)  # a file object: torch.save(path) derives its archive name from the dot-file's name


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local saves are atomic (temporary file + fsync + ``os.replace``).

    Loading is unchanged (``torch.load``, ``weights_only`` as the Trainer asks).
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take `storage_options`.")
        if not _is_local(str(path)):
            super().save_checkpoint(checkpoint, path)
            return
        atomic_torch_save(checkpoint, str(path))
