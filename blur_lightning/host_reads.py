"""Count the host reads of device values that a piece of code makes.

On a GPU each such read (`.item()`, `bool(t)`, `float(t)`, `if t:`, a blocking copy to the CPU)
waits until the stream has run everything queued before it: the CPU stops running ahead and the
GPU then idles while the CPU launches what comes next. The BLUR step promises none when the
optimizer can skip a non-finite step on the device. This counter makes that promise testable on
a CPU, where the same operations pass through the same dispatcher entries:

    with HostReadCounter() as reads:
        trainer.fit(module, loader)
    assert reads.count == 0, reads.sites()

It counts `aten._local_scalar_dense` (what item/bool/float/int of a tensor run) and copies from a
non-CPU device to the CPU that are not `non_blocking`. `Tensor.tolist()` is not seen (it bypasses
the dispatcher), so code that is checked here must not use it on device values.
"""

from __future__ import annotations

import traceback
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_SCALAR_READ = torch.ops.aten._local_scalar_dense.default
_COPIES = (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default)


class HostReadCounter(TorchDispatchMode):
    """A dispatch mode that counts host reads and remembers where each came from.

    Attributes:
        count: host reads seen.
        stacks: one short traceback (innermost frames last) per read, for `sites()`.
    """

    def __init__(self, device_type: str | None = None, stack_depth: int = 6) -> None:
        """device_type: count only scalar reads of tensors on it ("cuda": the ones that stall a
        GPU); None counts every scalar read, the CPU stand-in for a GPU run of the same code."""
        super().__init__()
        self.count = 0
        self.stacks: list[str] = []
        self._device_type = device_type
        self._depth = stack_depth

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        scalar_read = func is _SCALAR_READ and (
            self._device_type is None or args[0].device.type == self._device_type
        )
        if scalar_read or (func in _COPIES and _is_blocking_device_to_host(func, args, kwargs)):
            self.count += 1
            frames = traceback.format_stack(limit=self._depth + 2)[:-2]
            self.stacks.append("".join(frames))
        return func(*args, **kwargs)

    def sites(self, top: int = 5) -> str:
        """The most frequent call sites, for an assertion message."""
        counts = Counter(self.stacks)
        return "\n".join(f"{n} x\n{stack}" for stack, n in counts.most_common(top)) or "(none)"


def _is_blocking_device_to_host(func, args, kwargs) -> bool:
    if func is torch.ops.aten._to_copy.default:
        src, device = args[0], kwargs.get("device")
        return (
            isinstance(src, torch.Tensor)
            and src.device.type != "cpu"
            and device is not None
            and torch.device(device).type == "cpu"
            and not kwargs.get("non_blocking", False)
        )
    dst, src = args[0], args[1]
    non_blocking = args[2] if len(args) > 2 else kwargs.get("non_blocking", False)
    return dst.device.type == "cpu" and src.device.type != "cpu" and not non_blocking
