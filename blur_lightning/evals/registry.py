"""The benchmarks, by name: adding one is one file (a :class:`~blur_lightning.evals.base.Benchmark`
and its instance) and one entry below."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from blur_lightning.data.rows import Row
from blur_lightning.evals import fictitious, muse, qa, tofu, wmdp
from blur_lightning.evals.base import Benchmark, EvalSettings, Results

__all__ = ["BENCHMARKS", "evaluate_benchmark", "get_benchmark"]

BENCHMARKS: dict[str, Benchmark] = {
    b.name: b for b in (qa.BENCHMARK, tofu.BENCHMARK, muse.BENCHMARK, wmdp.BENCHMARK, fictitious.BENCHMARK)
}


def get_benchmark(name: str) -> Benchmark:
    """The registered benchmark `name`.

    Raises:
        ValueError: an unknown name (the message lists the known ones).
    """
    if name not in BENCHMARKS:
        raise ValueError(f"benchmark={name!r}: expected one of {tuple(BENCHMARKS)}")
    return BENCHMARKS[name]


def evaluate_benchmark(
    name: str,
    model: Any,
    tokenizer: Any,
    rows: Mapping[str, Sequence[Row]],
    settings: EvalSettings,
    options: Mapping[str, Any] | None = None,
) -> Results:
    """One benchmark's results for one model: the single function every caller goes through, so a
    cache of results (keyed by model, rows and settings) or a sharded run can wrap it."""
    return get_benchmark(name).evaluate(model, tokenizer, rows, settings, dict(options or {}))
