"""Checkpoints written atomically: a crash mid-write never leaves a truncated file behind.

Lightning's own local save goes through an fsspec transaction whose temporary file lives in the
system temp dir; when that is another filesystem the final move is a copy, which is not atomic.
Here the temporary file sits beside the target and is renamed over it with os.replace.
"""

from __future__ import annotations

import os
import tempfile
import zipfile
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save to a temp file in the target's directory, fsync, then os.replace onto `path`."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.basename(path), dir=directory)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a checkpoint reads like any other file
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def damaged_checkpoint(path: str | os.PathLike) -> str | None:
    """Why a local file cannot be a complete torch.save checkpoint, or None when it can be.

    torch.save writes a zip archive; a truncated or overwritten file fails the zip's own checks
    (central directory, CRC of each member). torch.load alone reports such a file as a
    `weights_only` refusal and suggests loading it unsafely, which would not help."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        return f"not a torch.save archive ({err})"
    return f"member {bad!r} is corrupt (CRC mismatch)" if bad is not None else None


_VERIFIED: set[tuple[str, int, int]] = set()  # (real path, size, mtime_ns) of files found whole


def verify_checkpoint(path: str | os.PathLike, what: str = "checkpoint") -> None:
    """Raise ValueError naming `path` when it is damaged; each unchanged file is checked once."""
    stat = os.stat(path)
    key = (os.path.realpath(path), stat.st_size, stat.st_mtime_ns)
    if key in _VERIFIED:
        return
    reason = damaged_checkpoint(path)
    if reason is not None:
        raise ValueError(
            f"{what} {os.fspath(path)!r} is damaged: {reason}; resume from an earlier one (checkpoints "
            f"written by this package are renamed into place whole: this file was cut short or changed "
            f"by something else)"
        )
    _VERIFIED.add(key)


class AtomicCheckpointIO(TorchCheckpointIO):
    """TorchCheckpointIO whose save is atomic on local paths (remote paths: Lightning's save), and
    whose load first checks a local file whole (a flipped bit would otherwise load silently)."""

    def load_checkpoint(self, path, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        if "://" not in str(path) and os.path.isfile(path):
            verify_checkpoint(path)
        kwargs = {"weights_only": weights_only}
        if map_location is not None:
            kwargs["map_location"] = map_location
        return super().load_checkpoint(path, **kwargs)

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_torch_save(checkpoint, path)
