"""Crash-safe checkpoint files: write to a temporary file in the same folder, fsync, then rename over the target.

A process killed while writing (preemption, OOM killer, node failure) leaves either the previous complete file or
the new complete file under the checkpoint's name, never a truncated one, so ``--ckpt_path last`` always resumes.
``os.replace`` is atomic within one file system, which is why the temporary file lives next to the target; the
folder is fsynced after the rename so that the new name survives a power loss too. Remote paths (``s3://`` ...)
keep Lightning's own handling.

Checkpoints are verified before they are loaded. ``torch.save`` writes a zip archive that stores a CRC-32 checksum
of every record (each tensor's storage, the pickled structure) next to it, but ``torch.load`` never checks them: a
checkpoint with a few KB overwritten by a disk or copy error loads silently with garbage weights. Before loading,
:func:`verify_checkpoint` reads the archive once and checks every record against its checksum (``zipfile``'s
``testzip``, about 1 GB/s); a mismatch, a truncated or empty file, or a file that is not a ``torch.save`` archive
is refused with :class:`CorruptCheckpointError` naming the file. The checksums are part of the file, so they are
written in the same atomic rename as the checkpoint (a separate checksum file could be left out of step with it by a
crash between two renames).

:class:`AtomicCheckpointIO` is the default ``trainer.plugins`` of the command line (``lightning_rlhf.cli``).
"""

from __future__ import annotations

import os
import zipfile
from typing import Any, Callable

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


#: (absolute path, size, mtime) of files verified in this process: a file is read for verification once
_VERIFIED: set[tuple[str, int, int]] = set()


class CorruptCheckpointError(RuntimeError):
    """A checkpoint file is empty, truncated, or fails the checksums stored in it. The message names the file."""


def verify_checkpoint(path: str) -> None:
    """Check a local ``torch.save`` checkpoint against the CRC-32 checksums stored in it, without unpickling it.

    Args:
        path: The checkpoint file.

    Raises:
        CorruptCheckpointError: naming ``path``, when the file is empty, truncated, not a ``torch.save`` zip archive
            (e.g. the legacy pre-1.6 format), or when one of its records does not match its checksum.
    """
    stat = os.stat(path)
    key = (os.path.abspath(path), stat.st_size, stat.st_mtime_ns)
    if key in _VERIFIED:  # the command line reads a checkpoint's hyperparameters before the Trainer loads it
        return
    hint = ("Refusing to load it: resume from another checkpoint in that folder (or the previous one), or start "
            "without --ckpt_path.")
    size = os.path.getsize(path)
    if size == 0:
        raise CorruptCheckpointError(f"Checkpoint {path} is empty (0 bytes). {hint}")
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, NotImplementedError) as e:
        raise CorruptCheckpointError(
            f"Checkpoint {path} ({size} bytes) is truncated or corrupt: it is not a readable torch.save archive "
            f"({type(e).__name__}: {e}). {hint}"
        ) from e
    if bad is not None:
        raise CorruptCheckpointError(
            f"Checkpoint {path} ({size} bytes) fails its checksum: record {bad!r} does not match the CRC-32 stored "
            f"with it (the file was damaged after it was written). {hint}"
        )
    _VERIFIED.add(key)


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local saves are atomic (temporary file + fsync + ``os.replace``) and whose local
    loads are verified first (:func:`verify_checkpoint`: every record against its stored CRC-32).

    Loading is otherwise unchanged (``torch.load``, ``weights_only`` as the Trainer asks).
    """

    def load_checkpoint(self, path: Any, map_location: Callable | Any = lambda storage, loc: storage,
                        weights_only: bool | None = None) -> dict[str, Any]:
        if _is_local(str(path)) and os.path.isfile(str(path)):
            verify_checkpoint(str(path))
        return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take `storage_options`.")
        if not _is_local(str(path)):
            super().save_checkpoint(checkpoint, path)
            return
        atomic_torch_save(checkpoint, str(path))
