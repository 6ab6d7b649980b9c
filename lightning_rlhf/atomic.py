"""Atomic file replacement, shared by checkpoints and result files.

Write to a temporary file in the target's folder, fsync it, ``os.replace`` it over the target, fsync the folder: a
process killed at any point leaves either the previous complete file or the new one under the target's name, never
a truncated one. The temporary file lives next to the target because ``os.replace`` is atomic only within one file
system. No Lightning here.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator


def fsync_dir(directory: str | os.PathLike) -> None:
    """Persist a folder's entries (a rename) to disk; a no-op where folders cannot be opened or synced."""
    try:
        fd = os.open(os.fspath(directory), os.O_RDONLY)
    except OSError:  # e.g. Windows: folders cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write_path(path: str | os.PathLike, prefix: str = ".tmp-") -> Iterator[str]:
    """Yield a temporary path next to ``path`` for the caller to write; on success it is fsynced and renamed over
    ``path`` (and the folder fsynced), on any error it is removed and the error re-raised.

    Args:
        path: The file to (re)place.
        prefix: Name prefix of the temporary file (choose one that the folder's readers ignore).
    """
    path = os.path.abspath(os.fspath(path))
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f"{prefix}{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    fsync_dir(directory)
