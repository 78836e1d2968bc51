"""Which implementation runs the projection's passes, and a DTensor's local shard.

The lowest layer of the training core: projection.py and kernels/ both import it, and it imports
neither (kernels/ may need to pick a backend or unwrap a DTensor; importing projection.py for it
made the cycle projection -> kernels -> kernels.adamw -> projection).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

BACKENDS = ("auto", "torch", "triton")
BACKEND_ENV = "BLUR_BACKEND"  # overrides backend="auto" (tests force "triton" on CPU this way)


def resolve_backend(backend: str, tensors: Sequence[torch.Tensor]) -> str:
    """'auto' picks Triton for CUDA tensors when it imports, else PyTorch; BLUR_BACKEND overrides 'auto'.

    Raises:
        ValueError: an unknown backend name (argument or environment variable).
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}: expected one of {BACKENDS}")
    if backend == "auto":
        backend = os.environ.get(BACKEND_ENV, "auto").strip().lower() or "auto"
        if backend not in BACKENDS:
            raise ValueError(f"{BACKEND_ENV}={backend!r}: expected one of {BACKENDS}")
    if backend != "auto":
        return backend
    if tensors and all(t.is_cuda for t in tensors) and triton_available():
        return "triton"
    return "torch"


def triton_available() -> bool:
    """Whether triton imports (the kernels need nothing else)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (a view: writing it writes the DTensor); any other tensor as it is."""
    to_local = getattr(t, "to_local", None)
    return to_local() if to_local is not None else t
