"""A disk cache of evaluation results, keyed by what determines them: the weights, the rows, the settings.

The demo evaluates the base model before unlearning (393 questions, ~100 s on 2 CPU cores): the same
weights, questions and decoding every run. The key hashes the model's tensors (names, dtypes, shapes
and bytes: ~0.5 s for SmolLM2's 540 MB), the evaluated rows and the settings that change the numbers,
plus :data:`VERSION`, bumped whenever evaluation code changes what it computes. A changed weight,
question or setting is a different key, never a stale hit. Entries are JSON files written
atomically, one per key, under ``<cache_dir>/evals`` (``$BLUR_EVAL_CACHE`` overrides it).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from blur_lightning.models.loading import cache_dir

# Bump when an evaluation's numbers change for the same weights, rows and settings.
VERSION = 2  # 2: memorization and membership-attack results (evals.membership)


def model_fingerprint(model: torch.nn.Module) -> str:
    """A hex digest of every tensor in the model's state_dict: names, dtypes, shapes and values."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(model.state_dict().items()):
        if not isinstance(tensor, torch.Tensor):
            continue
        tensor = tensor.detach()
        if hasattr(tensor, "full_tensor"):  # a DTensor shard: the whole tensor (a collective: every rank calls)
            tensor = tensor.full_tensor()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        flat = tensor.contiguous().cpu().reshape(-1)
        # numpy has no bfloat16: hash the raw bytes through a same-width integer view
        digest.update(flat.view(torch.uint8).numpy() if flat.numel() else b"")  # the buffer itself: no copy
    return digest.hexdigest()


def content_fingerprint(value: Any) -> str:
    """A hex digest of JSON-serializable content (rows, settings), independent of dict key order."""
    text = json.dumps(value, sort_keys=True, default=str, ensure_ascii=False)
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def cache_key(model_digest: str, name: str, rows: Any, settings: Mapping[str, Any]) -> str:
    """The key of one evaluation: a benchmark/set name, its rows and settings, on one model."""
    return content_fingerprint(
        {"version": VERSION, "model": model_digest, "name": name, "rows": content_fingerprint(rows),
         "settings": dict(settings)}  # fmt: skip
    )


class EvalCache:
    """JSON entries under a folder; a missing or unreadable entry is a miss.

    Args:
        root: the folder (default: ``$BLUR_EVAL_CACHE``, else ``<blur_lightning cache_dir>/evals``).
    """

    def __init__(self, root: str | os.PathLike | None = None) -> None:
        root = root if root is not None else os.environ.get("BLUR_EVAL_CACHE")
        self.root = Path(root) if root else cache_dir() / "evals"

    def path(self, key: str) -> Path:
        return self.root / f"{key}.json"

    def get(self, key: str) -> Any | None:
        try:
            with self.path(key).open() as f:
                return json.load(f)["value"]
        except (OSError, ValueError, KeyError):
            return None  # absent, cut short or hand-edited: evaluate again

    def put(self, key: str, value: Any) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.root, suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump({"version": VERSION, "value": value}, f)
            os.replace(tmp, self.path(key))
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
