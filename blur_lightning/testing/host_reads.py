"""Count the host reads of device values that a piece of code makes.

On a GPU each such read (`.item()`, `bool(t)`, `float(t)`, `if t:`, a blocking copy to the CPU)
waits until the stream has run everything queued before it: the CPU stops running ahead and the
GPU then idles while the CPU launches what comes next. The BLUR step promises none when the
optimizer can skip a non-finite step on the device. This counter makes that promise testable on
a CPU, where the same operations pass through the same dispatcher entries:

    with HostReadCounter() as reads:
        trainer.fit(module, loader)
    assert reads.count == 0, reads.sites()

It counts three kinds of read:

- `aten._local_scalar_dense`: what item/bool/float/int of a tensor run;
- copies from a non-CPU device to the CPU that are not `non_blocking`;
- ops whose output size depends on the values (nonzero, boolean-mask indexing, masked_select,
  unique, repeat_interleave without `output_size`, bincount, ...) and ops that return a Python
  bool (equal, allclose): on CUDA each copies a count or a flag back inside the kernel call, the
  same stall as `.item()`, while on the CPU nothing in them looks like a read. Counting them
  here makes the CPU check as strict as `torch.cuda.set_sync_debug_mode("error")` on a GPU.

With ``host_data=True`` it also counts tensors made from Python data (``torch.tensor(x)``,
``aten.lift_fresh``): made on, or moved to, a GPU that is a blocking host-to-device copy, which
waits for the stream to drain like a read. On the CPU nothing tells where such a tensor goes, so
this is opt-in, for code that should make none.

`Tensor.tolist()` is not seen (it bypasses the dispatcher), so code that is checked here must not
use it on device values.
"""

from __future__ import annotations

import traceback
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_aten = torch.ops.aten
_SCALAR_READ = _aten._local_scalar_dense.default
_COPIES = (_aten._to_copy.default, _aten.copy_.default)
# The output's size (or a Python bool) comes from the values: CUDA reads them back in the call.
_VALUE_SHAPED = frozenset(
    getattr(getattr(_aten, name), overload)
    for name, overload in (
        ("nonzero", "default"), ("masked_select", "default"), ("_unique", "default"),
        ("_unique2", "default"), ("unique_dim", "default"), ("unique_consecutive", "default"),
        ("unique_dim_consecutive", "default"), ("bincount", "default"), ("histc", "default"),
        ("equal", "default"), ("allclose", "default"), ("is_nonzero", "default"),
    )
    if hasattr(_aten, name)
)
_REPEAT_INTERLEAVE = (_aten.repeat_interleave.Tensor, _aten.repeat_interleave.self_Tensor)
_HOST_DATA = _aten.lift_fresh.default
_INDEX = _aten.index.Tensor
_INDEX_PUT = (_aten.index_put_.default, _aten.index_put.default, _aten._index_put_impl_.default)


class HostReadCounter(TorchDispatchMode):
    """A dispatch mode that counts host reads and remembers where each came from.

    Attributes:
        count: host reads seen.
        ops: how many of them each op made (`"_local_scalar_dense"`, `"nonzero"`, `"copy_"`...).
        stacks: one short traceback (innermost frames last) per read, for `sites()`.
    """

    def __init__(self, device_type: str | None = None, stack_depth: int = 6, host_data: bool = False) -> None:
        """device_type: count only scalar reads of tensors on it ("cuda": the ones that stall a
        GPU); None counts every scalar read, the CPU stand-in for a GPU run of the same code.
        host_data: also count tensors made from Python data (see the module doc)."""
        super().__init__()
        self._host_data = host_data
        self.count = 0
        self.ops: Counter[str] = Counter()
        self.stacks: list[str] = []
        self._device_type = device_type
        self._depth = stack_depth

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _COPIES:
            read = _is_blocking_device_to_host(func, args, kwargs)
        elif func is _HOST_DATA:
            read = self._host_data
        else:
            read = _reads_values(func, args, kwargs) and (
                self._device_type is None or args[0].device.type == self._device_type
            )
        if read:
            self.count += 1
            self.ops[func.__name__.split(".")[0]] += 1
            frames = traceback.format_stack(limit=self._depth + 2)[:-2]
            self.stacks.append("".join(frames))
        return func(*args, **kwargs)

    def sites(self, top: int = 5) -> str:
        """The most frequent call sites, for an assertion message."""
        counts = Counter(self.stacks)
        return "\n".join(f"{n} x\n{stack}" for stack, n in counts.most_common(top)) or "(none)"


def _reads_values(func, args, kwargs) -> bool:
    """A scalar read, or an op that must look at the values to size its output."""
    if func is _SCALAR_READ or func in _VALUE_SHAPED:
        return True
    if func in _REPEAT_INTERLEAVE:
        return kwargs.get("output_size") is None
    if func is _INDEX or func in _INDEX_PUT:
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        if not any(_is_mask(index) for index in indices):
            return False
        # x[mask] = scalar becomes masked_fill on CUDA (no read); a tensor of values does not
        values = args[2] if len(args) > 2 else kwargs.get("values")
        return func is _INDEX or values is None or values.numel() != 1
    return False


def _is_mask(index) -> bool:
    return isinstance(index, torch.Tensor) and index.dtype in (torch.bool, torch.uint8)


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
