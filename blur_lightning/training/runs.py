"""Where a run writes its files, shared by every callback that writes some."""

from __future__ import annotations

import json
import os
from typing import Any

__all__ = ["log_dir", "write_json"]


def log_dir(trainer: Any) -> str:
    """The run's log directory (the logger's), or the trainer's root directory without a logger."""
    return trainer.log_dir or trainer.default_root_dir


def write_json(path: str, data: Any) -> None:
    """Write JSON through a temporary file and a rename, so a reader never sees half a file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, path)
