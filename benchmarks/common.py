"""Benchmark helpers shared by the scripts in benchmarks/: timing, copy bandwidth, syncs, memory, CSV, tables.

Timing follows triton.testing.do_bench's habits (device events around each call, warm-up first,
median with p20/p80) but counts repetitions instead of milliseconds, so a 1-second reference
provider at 8B does not spend 5 calls estimating its own cost.
"""

from __future__ import annotations

import csv
import datetime as _dt
import os
import platform
import statistics
import subprocess
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent


@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    reps: int


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def git_commit() -> str:
    """Short commit (+ '-dirty' with uncommitted changes); env BLUR_COMMIT wins (a copy without .git)."""
    if os.environ.get("BLUR_COMMIT"):
        return os.environ["BLUR_COMMIT"]
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (commit or "unknown") + ("-dirty" if dirty and commit else "")


def today() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_it(
    fn: Callable[[], object], device: torch.device, *, warmup: int = 2, rep: int = 20, budget_s: float = 3.0
) -> Timing:
    """Median, p20 and p80 of `fn` in milliseconds: device events on CUDA, a host clock on CPU.

    The repetitions are min(rep, budget_s / first-call time), at least 3. Calls are queued back to
    back without a sync between them, so host overhead hides behind the device work where it can,
    as it would in training.
    """
    for _ in range(warmup):
        fn()
    synchronize(device)
    t0 = time.perf_counter()
    fn()
    synchronize(device)
    first = time.perf_counter() - t0
    reps = max(3, min(rep, int(budget_s / max(first, 1e-6))))
    times = []
    if device.type == "cuda":
        events = [
            (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)
        ]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        times = [start.elapsed_time(end) for start, end in events]
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    q = statistics.quantiles(times, n=10, method="inclusive") if len(times) > 1 else [times[0]] * 9
    return Timing(statistics.median(times), q[1], q[7], reps)


def count_host_syncs(fn: Callable[[], object], device: torch.device) -> int | None:
    """Synchronizing CUDA calls made by one call of `fn` (torch's sync debug mode); None on CPU."""
    if device.type != "cuda":
        return None
    synchronize(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    synchronize(device)
    return sum("synchroniz" in str(w.message) for w in caught)


def extra_memory(fn: Callable[[], object], device: torch.device) -> int | None:
    """Peak bytes allocated by one call of `fn` beyond what was allocated before it; None on CPU."""
    if device.type != "cuda":
        return None
    synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    result = fn()
    synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    del result
    return max(0, peak - before)


def copy_bandwidth(device: torch.device, nbytes: int = 2 << 30) -> tuple[float, Timing]:
    """Device-to-device copy of `nbytes`: (GB/s counting bytes read plus written, timing)."""
    if device.type == "cpu":
        nbytes = min(nbytes, 256 << 20)
    buffers = [torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()]
    buffers.append(torch.empty_like(buffers[0]))
    timing = time_it(lambda: buffers[1].copy_(buffers[0]), device, warmup=3, rep=30, budget_s=1.0)
    buffers.clear()
    return 2 * nbytes / timing.median_ms / 1e6, timing


def append_csv(path: Path, rows: Sequence[dict]) -> None:
    """Append rows; the header is written once and extended if new columns appear (rewriting the file)."""
    if not rows:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    old_rows: list[dict] = []
    fields: list[str] = []
    if path.exists():
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            fields = list(reader.fieldnames or [])
            old_rows = list(reader)
    new_fields = fields + [k for row in rows for k in row if k not in fields]
    new_fields = list(dict.fromkeys(new_fields))
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=new_fields)
        writer.writeheader()
        writer.writerows(old_rows)
        writer.writerows(rows)


def markdown_table(rows: Sequence[dict], columns: Sequence[tuple[str, str]]) -> str:
    """A GitHub table of `rows` with (key, header) columns; floats at 3 significant digits."""

    def fmt(value) -> str:
        if value is None or value == "":
            return ""
        if isinstance(value, float):
            if abs(value) >= 100:
                return f"{value:.0f}"
            return f"{value:.1f}" if abs(value) >= 10 else f"{value:.3g}"
        return str(value)

    lines = ["| " + " | ".join(h for _, h in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(row.get(k)) for k, _ in columns) + " |" for row in rows]
    return "\n".join(lines)


def write_markdown_section(path: Path, name: str, text: str) -> None:
    """Replace the text between `<!-- name:start -->` and `<!-- name:end -->` (append the block if absent)."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{text.rstrip()}\n{end}"
    old = path.read_text() if path.exists() else "# Benchmark results\n"
    if start in old and end in old:
        new = old[: old.index(start)] + block + old[old.index(end) + len(end) :]
    else:
        new = old.rstrip() + "\n\n" + block + "\n"
    path.write_text(new)
