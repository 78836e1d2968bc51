"""What a benchmark provides, and the settings every evaluation shares.

A benchmark is one file of :mod:`blur_lightning.evals` with a :class:`Benchmark` subclass and one
instance, listed once in :mod:`blur_lightning.evals.registry`. Its :meth:`Benchmark.evaluate` takes
the rows of every split explicitly and returns plain results (floats, and per-example lists that a
caller may gather across ranks or cache), so the callback never needs to know which benchmark runs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from blur_lightning.data.rows import Row, load_rows

__all__ = ["Benchmark", "EvalSettings", "Results", "before_after_table", "is_scalar", "load_source"]

Results = dict[str, Any]


@dataclass(frozen=True)
class EvalSettings:
    """Settings shared by every benchmark's evaluation.

    Attributes:
        batch_size: sequences per forward / ``generate`` call.
        max_new_tokens: generation length; None keeps each benchmark's own default.
        prompt_format: how questions become prompts, as in training (a name of
            :data:`blur_lightning.data.prompts.PROMPT_FORMATS`; benchmarks whose reference uses
            plain prompts, MUSE and WMDP, ignore it).
        show_progress: show progress bars (on a terminal only).
    """

    batch_size: int = 8
    max_new_tokens: int | None = None
    prompt_format: str = "auto"
    show_progress: bool = True


class Benchmark:
    """One benchmark: how its splits are named and loaded, and how a model is evaluated on them.

    Attributes:
        name: the registry key (``"qa"``, ``"tofu"``...).
        hub_repo: the hub dataset of ``hub:CONFIG`` specs (None: specs must name one).
        default_split: the split of ``hub:CONFIG`` specs without one (None: specs must name one).
    """

    name: str = ""
    hub_repo: str | None = None
    default_split: str | None = None

    def check_splits(self, names: Sequence[str], options: Mapping[str, Any]) -> None:
        """Raise ValueError when the split names do not fit the benchmark (default: any names)."""

    def repo(self, options: Mapping[str, Any]) -> str | None:
        """The hub dataset of ``hub:CONFIG`` specs, given the evaluation's options."""
        return self.hub_repo

    def load(self, name: str, spec: str, options: Mapping[str, Any], limit: int | None = None) -> list[Row]:
        """Rows of one split named by a local path, ``embedded:NAME`` or a ``hub:`` spec."""
        return load_rows(
            spec, split=self.default_split, default_repo=self.repo(options), limit=limit,
            owner=f"benchmark {self.name!r}",
        )  # fmt: skip

    def evaluate(
        self,
        model: Any,
        tokenizer: Any,
        rows: Mapping[str, Sequence[Row]],
        settings: EvalSettings,
        options: Mapping[str, Any],
    ) -> Results:
        """The benchmark's results for one model on the given rows (split name -> rows)."""
        raise NotImplementedError

    def describe(self, results: Results) -> list[str]:
        """One line per result, printed after an evaluation (default: every scalar)."""
        return [f"  {key}: {value:.4g}" for key, value in results.items() if is_scalar(value)]

    def report(
        self,
        before: Results | None,
        after: Results | None,
        sizes: Mapping[str, int],
        options: Mapping[str, Any] | None = None,
    ) -> str | None:
        """A before/after table printed at fit end and written beside the JSON (None: no table);
        `options` are the evaluation's (a reference log named there adds its column)."""
        return None

    def field_logs(self, results: Results, options: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
        """One evaluation's results (taken with ``options``) in the field's own files, file name -> JSON
        content (e.g. open-unlearning's ``TOFU_EVAL.json`` and ``TOFU_SUMMARY.json``); None: no such layout."""
        return None


def before_after_table(
    rows: Sequence[tuple[str, str, bool]],
    before: Results | None,
    after: Results | None,
    sizes: Mapping[str, int],
    reference: tuple[str, Mapping[str, float]] | None = None,
) -> str | None:
    """A markdown table of chosen results before and after unlearning, and of a reference model.

    Args:
        rows: (result key, label, shown as a percentage) per row; a row with no value anywhere is left out.
        before: the fit_start results (or None).
        after: the fit_end results (or None).
        sizes: split name -> rows evaluated, listed under the table.
        reference: (column title, results under the same keys), e.g. a retain model's own log.

    Returns:
        The table, or None with neither before nor after.
    """
    if before is None and after is None:
        return None
    columns = [before or {}, after or {}]
    titles = ["before", "after"]
    if reference is not None:
        titles.append(reference[0])
        columns.append(reference[1])
    lines = ["| metric | " + " | ".join(titles) + " |", "|---|" + "---:|" * len(titles)]
    for key, label, percent in rows:
        cells = []
        for results in columns:
            value = results.get(key)
            cells.append("-" if not is_scalar(value) else f"{100 * value:.1f}%" if percent else f"{value:.4g}")
        if any(cell != "-" for cell in cells):
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    counts = ", ".join(f"{name} {n}" for name, n in sizes.items())
    return "\n".join(lines) + f"\n\nrows: {counts}"


def is_scalar(value: Any) -> bool:
    """A number to log (bool excluded)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def load_source(path: str | Path | None, hub_id: str, config: str | None, split: str) -> tuple[list[Row], str]:
    """Rows and a name for error messages: the local file, or ``hub_id[config]:split``."""
    if path is not None:
        return load_rows(str(path)), str(path)
    return load_rows(hub_id, subset=config, split=split), f"{hub_id}[{config}]:{split}"
