"""Checkpoint files that are never half-written.

:class:`AtomicCheckpointIO` is Lightning's checkpoint I/O for every checkpoint a run writes
(``last.ckpt``, the epoch checkpoints, SLURM's ``hpc_ckpt_<N>.ckpt``, the preemption save).
Lightning's own writer serialises the whole checkpoint into memory, writes it to a temporary file
in the system's temp folder and moves it over the target: where the two are on different file
systems the move is a copy that truncates the old checkpoint first, so a full disk or a kill
during the copy leaves neither the old checkpoint nor the new one. Here the new checkpoint is
streamed into a temporary file beside the target, flushed to the disk and renamed over the old
one, which stays complete and readable until the rename: a crash, a kill or a full disk at any
moment leaves the previous checkpoint or the new one, never a broken file.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO


class CheckpointWriteError(OSError):
    """A checkpoint could not be written; the message says why and that the previous one is
    intact."""


def atomic_torch_save(obj: Any, path: str | os.PathLike[str]) -> None:
    """``torch.save(obj, path)`` through a temporary file in ``path``'s folder, fsync'ed and
    renamed over ``path``: readers see the old file or the new one, never a partial one.

    Raises:
        CheckpointWriteError: the folder cannot be created or written (a full disk, no
            permission, a read-only file system); ``path`` is left as it was.
    """
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    except OSError as error:
        raise _write_error(target, error) from error
    try:
        with os.fdopen(handle, "wb") as file:
            torch.save(obj, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, target)
    except BaseException as error:  # also KeyboardInterrupt: never leave the temporary behind
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        if isinstance(error, OSError):
            raise _write_error(target, error) from error
        raise
    _fsync_directory(target.parent)  # the rename itself survives a power cut


def _fsync_directory(directory: Path) -> None:
    with contextlib.suppress(OSError):  # not every file system lets a directory be opened
        descriptor = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def _write_error(target: Path, error: OSError) -> CheckpointWriteError:
    reason = error.strerror or str(error)
    if error.errno == errno.ENOSPC:
        advice = f"free space on the disk of {target.parent}"
    elif error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        advice = f"make {target.parent} writable or choose another run directory (run_dir=...)"
    else:
        advice = f"check {target.parent}"
    kept = (
        f"the previous {target.name} there is intact"
        if target.is_file()
        else f"no earlier {target.name} existed"
    )
    failure = CheckpointWriteError(
        f"could not write checkpoint {target}: {reason}; {kept}; {advice}"
    )
    failure.errno = error.errno
    return failure


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint I/O that writes every checkpoint with :func:`atomic_torch_save`."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO.save_checkpoint takes no storage_options")
        atomic_torch_save(checkpoint, path)
