"""What every launcher shares: input checks, the cached address tables, the grid, the launch.

A multi-tensor kernel gets a list of tensors through an address table instead of one launch per
tensor. For each dtype group (all tensors whose lists have the same dtypes) the table holds

    ptrs          int64 [n_lists, n_tensors]   the data_ptr of each tensor of each list
    sizes         int64 [n_tensors]            elements per tensor
    chunk_tensor  int64 [n_chunks]             which tensor a chunk belongs to
    chunk_start   int64 [n_chunks]             its first element

A persistent grid of `n_programs` programs walks the chunks with stride n_programs, so a list
with one 525M-element embedding and hundreds of 4096-element norms spreads evenly over the SMs.
Tables are built on the host and uploaded in one non-blocking copy from pinned memory (no host
sync), then cached by (pointer, size, dtype) of every tensor: in training the gradient and
optimizer-state buffers keep their addresses, so steady state builds nothing.
"""

from __future__ import annotations

import operator
import os
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}

# Tests set this to True: every buffer a kernel must fill starts as NaN, so an unwritten
# element cannot pass as a plausible value.
POISON = os.environ.get("BLUR_KERNELS_POISON", "") == "1"


@dataclass
class KernelConfig:
    """Launch parameters; fixed (no autotune: it needs a GPU per config and the interpreter has none).

    Attributes:
        block: elements per inner-loop iteration of one program (a power of 2).
        num_warps: warps per program; block / (32 * num_warps) elements per thread, 8 bf16 = one 16-byte load.
        programs_per_sm: persistent programs per SM (CUDA); 4 x 8 warps = half the warp slots,
            enough bytes in flight to cover DRAM latency.
        max_chunk: largest chunk in elements; smaller lists get smaller chunks (min_chunks_per_program
            chunks per program) so that the last wave is short.
        min_chunk: smallest chunk (a multiple of block).
        min_chunks_per_program: target chunks per program when the list is small.
        cpu_programs: programs on CPU tensors (the interpreter runs them one after another).
        cpu_block: block under the interpreter (its cost is per operation, not per element).
    """

    block: int = 2048
    num_warps: int = 8
    programs_per_sm: int = 4
    max_chunk: int = 65536
    min_chunk: int = 2048
    min_chunks_per_program: int = 16
    cpu_programs: int = 4
    cpu_block: int = 4096


CONFIG = KernelConfig()


def set_config(**changes) -> KernelConfig:
    """Change launch parameters (benchmark sweeps, tests); drops the cached tables. Returns the old config."""
    global CONFIG
    old = CONFIG
    CONFIG = KernelConfig(**{**old.__dict__, **changes})
    _TABLES.clear()
    return old


# --------------------------------------------------------------------------------------------
# interpreter or compiler: fixed per process when triton is imported
# --------------------------------------------------------------------------------------------
def interpreting() -> bool:
    """True when @triton.jit decorates for the interpreter: TRITON_INTERPRET=1 was set before the
    kernel modules were imported. CPU tensors then run the kernels in numpy (tests)."""
    return bool(triton.knobs.runtime.interpret)


_NEEDS_INTERPRETER = (
    "the Triton kernels got CPU tensors: they run on CPU only under the interpreter (set "
    "TRITON_INTERPRET=1 before blur_lightning.kernels is imported), else pass CUDA tensors or backend='torch'"
)


# --------------------------------------------------------------------------------------------
# address tables
# --------------------------------------------------------------------------------------------
@dataclass
class GroupTable:
    """One dtype group's table on the device (see the module docstring)."""

    dtypes: tuple[torch.dtype, ...]  # one per checked list
    ptrs: torch.Tensor  # int64 [n_rows, n_tensors]
    sizes: torch.Tensor  # int64 [n_tensors]
    chunk_tensor: torch.Tensor  # int64 [n_chunks]
    chunk_start: torch.Tensor  # int64 [n_chunks]
    n_tensors: int
    n_chunks: int
    n_elements: int
    chunk: int
    n_programs: int
    aligned: bool  # every address of every list 16-byte aligned (vector loads allowed)


@dataclass
class Tables:
    device: torch.device
    groups: list[GroupTable]
    partials: torch.Tensor | None = None  # float64 [3, sum of n_programs], reused by multi_tensor_dots

    @property
    def n_programs(self) -> int:
        return sum(g.n_programs for g in self.groups)


_DTYPE = operator.attrgetter("dtype")
_TABLES: OrderedDict[tuple, Tables] = OrderedDict()
_MAX_TABLES = 16
_SM_COUNT: dict[int, int] = {}


def _max_programs(device: torch.device) -> int:
    if device.type == "cpu":
        return CONFIG.cpu_programs
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNT[index] * CONFIG.programs_per_sm


def block_size(device: torch.device) -> int:
    return CONFIG.cpu_block if device.type == "cpu" else CONFIG.block


def get_tables(
    lists: Sequence[Sequence[torch.Tensor]],
    names: Sequence[str],
    scalar_lists: Sequence[Sequence[torch.Tensor]] = (),
    scalar_names: Sequence[str] = (),
) -> Tables:
    """The (cached) tables for element-aligned `lists`, plus per-tensor 0-dim float32 `scalar_lists`.

    Checks, with the offending list name and index in the message: equal lengths, equal numel at
    each index, one device, CUDA (or CPU for the interpreter), contiguity, and fp32/bf16/fp16.
    """
    n = len(lists[0])
    for name, lst in zip(names, lists):
        if len(lst) != n:
            raise ValueError(f"length mismatch: {names[0]} has {n} tensors, {name} has {len(lst)}")
    for name, lst in zip(scalar_names, scalar_lists):
        if len(lst) != n:
            raise ValueError(f"length mismatch: {names[0]} has {n} tensors, {name} has {len(lst)}")
    device = lists[0][0].device
    # The cache key: every address, size and dtype (map over C methods: ~0.1 us per tensor).
    key = [device]
    for name, lst in zip(names, lists):
        if not all(map(torch.Tensor.is_contiguous, lst)):
            i = next(i for i, t in enumerate(lst) if not t.is_contiguous())
            raise ValueError(
                f"{name}[{i}] is not contiguous (shape {tuple(lst[i].shape)}, strides {lst[i].stride()})"
            )
        key.append(tuple(map(torch.Tensor.data_ptr, lst)))
        key.append(tuple(map(torch.Tensor.numel, lst)))
        key.append(tuple(map(_DTYPE, lst)))
    for lst in scalar_lists:
        key.append(tuple(map(torch.Tensor.data_ptr, lst)))
    key = tuple(key)
    tables = _TABLES.get(key)
    if tables is not None:
        _TABLES.move_to_end(key)
        return tables
    _check(lists, names, scalar_lists, scalar_names, device)
    tables = _build(lists, scalar_lists, device)
    _TABLES[key] = tables
    while len(_TABLES) > _MAX_TABLES:
        _TABLES.popitem(last=False)
    return tables


def _check(lists, names, scalar_lists, scalar_names, device: torch.device) -> None:
    if device.type == "cpu" and not interpreting():
        raise ValueError(_NEEDS_INTERPRETER)
    if device.type not in ("cuda", "cpu"):
        raise ValueError(
            f"Triton kernels need CUDA tensors (or CPU tensors for the interpreter), got {device}"
        )
    for name, lst in zip(names, lists):
        for i, t in enumerate(lst):
            if t.device != device:
                raise ValueError(f"device mismatch: {name}[{i}] is on {t.device}, {names[0]}[0] on {device}")
            if t.dtype not in TL_DTYPES:
                raise ValueError(f"{name}[{i}] has dtype {t.dtype}: expected float32, bfloat16 or float16")
            if t.numel() != lists[0][i].numel():
                raise ValueError(
                    f"size mismatch at index {i}: {names[0]}[{i}] has {lists[0][i].numel()} elements, "
                    f"{name}[{i}] has {t.numel()}"
                )
    for name, lst in zip(scalar_names, scalar_lists):
        for i, t in enumerate(lst):
            if t.device != device or t.dtype != torch.float32 or t.numel() != 1:
                raise ValueError(
                    f"{name}[{i}] must be a one-element float32 tensor on {device}, "
                    f"got {t.dtype} {tuple(t.shape)} on {t.device}"
                )


def _build(lists, scalar_lists, device: torch.device) -> Tables:
    # Group tensor indices by their dtypes, in order of first appearance (a fixed order for a
    # given list: the dots kernel sums the groups' partials in it).
    groups: dict[tuple, list[int]] = {}
    for i in range(len(lists[0])):
        groups.setdefault(tuple(lst[i].dtype for lst in lists), []).append(i)
    max_programs = _max_programs(device)
    block = block_size(device)
    out = []
    for dtypes, index in groups.items():
        sizes = [lists[0][i].numel() for i in index]
        n_elements = sum(sizes)
        # Chunk: big enough to amortize the 3 table loads per chunk, small enough that each program
        # gets >= min_chunks_per_program of them (a short last wave on small models).
        target = -(-n_elements // (max_programs * CONFIG.min_chunks_per_program))
        chunk = min(CONFIG.max_chunk, max(CONFIG.min_chunk, block, triton.next_power_of_2(max(target, 1))))
        chunk = -(-chunk // block) * block
        chunk_tensor, chunk_start = [], []
        for j, size in enumerate(sizes):
            starts = range(0, size, chunk)
            chunk_tensor.extend([j] * len(starts))
            chunk_start.extend(starts)
        n_chunks = len(chunk_start)
        rows = [[lst[i].data_ptr() for i in index] for lst in lists]
        rows += [[lst[i].data_ptr() for i in index] for lst in scalar_lists]
        host = [p for row in rows for p in row] + sizes + chunk_tensor + chunk_start
        flat = _upload(host, device)
        n_t, n_rows = len(index), len(rows)
        o = n_rows * n_t
        out.append(
            GroupTable(
                dtypes=dtypes,
                ptrs=flat[:o].view(n_rows, n_t),
                sizes=flat[o : o + n_t],
                chunk_tensor=flat[o + n_t : o + n_t + n_chunks],
                chunk_start=flat[o + n_t + n_chunks :],
                n_tensors=n_t,
                n_chunks=n_chunks,
                n_elements=n_elements,
                chunk=chunk,
                n_programs=max(1, min(n_chunks, max_programs)),
                aligned=all(p % 16 == 0 for row in rows[: len(lists)] for p in row),
            )
        )
    return Tables(device=device, groups=out)


def _upload(values: list[int], device: torch.device) -> torch.Tensor:
    host = torch.tensor(values, dtype=torch.int64)
    if device.type == "cpu":
        return host
    # Pinned + non_blocking: the copy is queued on the stream, the host never waits. The caching
    # host allocator keeps the pinned block alive until the copy has run.
    return host.pin_memory().to(device, non_blocking=True)


def clear_tables() -> None:
    """Forget every cached address table (they are rebuilt on the next call)."""
    _TABLES.clear()


def scalar_arg(value, device: torch.device, name: str) -> torch.Tensor:
    """A number or one-element tensor as a one-element float32 tensor on `device`, with no host sync.

    torch.full on CUDA is a fill kernel with the value as its argument: no host-to-device copy.
    """
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must have one element, got shape {tuple(value.shape)}")
        if value.device != device:
            raise ValueError(f"{name} is on {value.device}, the tensors on {device}")
        return value if value.dtype == torch.float32 else value.float()
    return torch.full((), float(value), dtype=torch.float32, device=device)


def new_buffer(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    buf = torch.empty(shape, dtype=dtype, device=device)
    if POISON:
        buf.fill_(float("nan"))
    return buf


def launch(kernel, tables: Tables, grid: int, *args, **kwargs) -> None:
    """Launch on the tables' device (the current device must be it for Triton on multi-GPU hosts)."""
    if tables.device.type == "cuda":
        with torch.cuda.device(tables.device):
            kernel[(grid,)](*args, num_warps=CONFIG.num_warps, **kwargs)
        return
    from triton.runtime.interpreter import InterpretedFunction

    if not isinstance(kernel, InterpretedFunction):  # TRITON_INTERPRET set after the import
        raise ValueError(_NEEDS_INTERPRETER)
    kernel[(grid,)](*args, **kwargs)
