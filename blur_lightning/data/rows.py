"""The one reader of rows: local files, files shipped in the package, hub datasets, column checks.

Everything that reads a table of rows (the training sets, every benchmark's splits, the relearning
probe's sets) comes through :func:`load_rows`, so a bad file fails the same way wherever it is named:

* ``"embedded:NAME"``: a file shipped in ``blur_lightning/assets/`` (:func:`resolve_embedded`);
* a local ``.json`` / ``.jsonl`` / ``.csv`` / ``.parquet`` file (:func:`read_rows`), with the line of
  the first bad JSON record in the error;
* a local directory or a Hugging Face hub name (through ``datasets.load_dataset``);
* ``"hub:[OWNER/NAME:]CONFIG[:SPLIT]"``: a hub dataset written as one string, the form the
  benchmark configs use (:func:`parse_hub_spec`).

Rows are plain ``dict``s. This module knows nothing of tokenizers, models or benchmarks: it is the
lowest layer of the data and evaluation code.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

__all__ = [
    "EMBEDDED_PREFIX",
    "HUB_PREFIX",
    "Row",
    "check_strings",
    "is_local",
    "is_str_list",
    "load_rows",
    "parse_hub_spec",
    "read_rows",
    "require",
    "require_columns",
    "resolve_embedded",
]

Row = dict[str, Any]
PathLike = str | Path

EMBEDDED_PREFIX = "embedded:"
HUB_PREFIX = "hub:"
# suffix -> reader kind
_KINDS = {
    ".json": "json", ".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".parquet": "parquet", ".pq": "parquet",
}  # fmt: skip
_EXTENSIONS = tuple(_KINDS)


# ============================================================================ names -> files
def resolve_embedded(path: str) -> str:
    """Map ``"embedded:NAME.jsonl"`` to the file in ``blur_lightning/assets/``; pass others through.

    Raises:
        FileNotFoundError: no such embedded file (the message lists those that exist).
    """
    if not path.startswith(EMBEDDED_PREFIX):
        return path
    name = path[len(EMBEDDED_PREFIX) :]
    assets = resources.files("blur_lightning.assets")
    target = assets / name
    if not target.is_file():
        available = sorted(p.name for p in assets.iterdir() if p.name.endswith(_EXTENSIONS))
        raise FileNotFoundError(f"embedded data file {name!r} not found; available: {available}")
    return str(target)


def is_local(path: str) -> bool:
    """Whether a (resolved) name can only be a local path: it exists, has a file suffix or starts like a path."""
    return (
        os.path.exists(path) or Path(path).suffix.lower() in _KINDS or path.startswith(("/", "./", "../", "~", "."))
    )


def parse_hub_spec(
    spec: str, default_repo: str | None = None, default_split: str | None = None, *, owner: str = "this set"
) -> tuple[str, str | None, str]:
    """``"hub:[OWNER/NAME:]CONFIG[:SPLIT]"`` -> (repo, config, split), defaults filled in.

    Args:
        spec: the spec string, starting with ``"hub:"``.
        default_repo: the repository when the spec names none.
        default_split: the split when the spec names none.
        owner: who supplies the defaults, for the error message.

    Raises:
        ValueError: a malformed spec, or a part without a default.
    """
    parts = spec[len(HUB_PREFIX) :].split(":")
    if len(parts) == 3:
        repo, config, split = parts
    elif len(parts) in (1, 2):
        repo, config = default_repo, parts[0]
        split = parts[1] if len(parts) == 2 else default_split
    else:
        raise ValueError(f"{spec!r}: expected hub:CONFIG, hub:CONFIG:SPLIT or hub:OWNER/NAME:CONFIG:SPLIT")
    if not repo:
        raise ValueError(f"{spec!r}: {owner} has no default hub dataset; use hub:OWNER/NAME:CONFIG:SPLIT")
    if not split:
        raise ValueError(f"{spec!r}: {owner} needs a split: hub:CONFIG:SPLIT")
    return repo, (config or None), split


# ============================================================================ reading
def load_rows(
    spec: str,
    *,
    subset: str | None = None,
    split: str | None = "train",
    default_repo: str | None = None,
    limit: int | None = None,
    owner: str = "this set",
) -> list[Row]:
    """Rows of a set named by a local path, ``embedded:NAME``, ``hub:...`` or a hub dataset name.

    Args:
        spec: the name (see the module docstring).
        subset: dataset configuration of a hub dataset (e.g. ``"forget10"`` for TOFU).
        split: split of a hub dataset (also the default split of a ``hub:`` spec; None: a ``hub:``
            spec must name one, other hub names read "train").
        default_repo: repository of a ``hub:CONFIG`` spec that names none.
        limit: keep at most this many rows (None: all).
        owner: who supplies the ``hub:`` defaults, for error messages.

    Raises:
        FileNotFoundError: a local path that does not exist (named in the message).
        ValueError: an empty file or split, an unreadable file (with its line for JSON), an unknown suffix.
    """
    if spec.startswith(HUB_PREFIX):
        repo, config, hub_split = parse_hub_spec(spec, default_repo, split, owner=owner)
        rows = _load_dataset(repo, config, hub_split)
    else:
        resolved = resolve_embedded(spec)
        if is_local(resolved):
            local = Path(resolved).expanduser()
            if not local.exists():
                raise FileNotFoundError(f"data file not found: {local}")
            if not local.is_dir():
                rows = read_rows(local)
                if not rows:
                    raise ValueError(f"{local}: no rows")
                return rows[:limit] if limit else rows
            rows = _load_dataset(str(local), subset, split or "train")
        else:
            rows = _load_dataset(resolved, subset, split or "train")
    if not rows:
        raise ValueError(f"{spec}: empty set (0 rows in split {split!r})")
    return rows[:limit] if limit else rows


def _load_dataset(path: str, config: str | None, split: str) -> list[Row]:
    import datasets

    return datasets.load_dataset(path, config, split=split).to_list()


def read_rows(path: PathLike) -> list[Row]:
    """Rows of a local JSON, JSON Lines, CSV or Parquet file.

    JSON may hold a list of objects, a list of strings (returned as ``{"text": s}``), a columnar
    object ``{column: [equal-length lists]}`` or a single object (one row); a ``.json`` file with one
    object per line (as the TOFU hub files are) is read as JSON Lines. CSV cells that are empty come
    back as None.

    Raises:
        ValueError: unknown suffix, an empty file, unparsable content (JSON: with the line), or not a
            table of rows.
    """
    path = Path(path)
    kind = _KINDS.get(path.suffix.lower())
    if kind is None:
        raise ValueError(f"{path}: unsupported file type {path.suffix!r}; use one of {_EXTENSIONS}")
    if not _has_rows(path, kind):
        raise ValueError(f"{path}: the file is empty (no rows)")
    if kind == "jsonl":
        return _read_json_lines(path)
    if kind == "json":
        text = path.read_text(encoding="utf-8")
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            if text.lstrip().startswith("["):  # one document (a list of rows): its error has the line
                raise ValueError(f"{path}:{err.lineno}: not valid JSON ({err.msg} at column {err.colno})") from None
            return _read_json_lines(path)
        return _as_rows(data, path)
    try:
        if kind == "csv":
            import pandas as pd

            frame = pd.read_csv(path)
            return frame.astype(object).where(frame.notna(), None).to_dict("records")
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    except Exception as err:  # the parser's reason, first line, with the file named
        reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
        raise ValueError(f"{path}: could not be read as {kind} ({type(err).__name__}: {reason})") from err


def _has_rows(path: Path, kind: str) -> bool:
    """Cheap emptiness check, so an empty file says so instead of failing in a parser."""
    if kind == "parquet":
        return path.stat().st_size > 0
    with path.open(encoding="utf-8", errors="replace") as f:
        lines = 0
        for line in f:
            if line.strip():
                lines += 1
                if lines >= (2 if kind == "csv" else 1):  # a CSV needs a header and one row
                    return True
    return False


def _read_json_lines(path: Path) -> list[Row]:
    rows = []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{line_no}: not valid JSON ({err.msg})") from None
    return _as_rows(rows, path)


def _as_rows(data: Any, path: Path) -> list[Row]:
    if isinstance(data, dict):
        columns = list(data.values())
        if columns and all(isinstance(c, list) and len(c) == len(columns[0]) for c in columns):
            return [dict(zip(data, values)) for values in zip(*columns)]  # columnar {column: [values]}
        return [data]  # one row (a one-line JSON Lines file named .json)
    if isinstance(data, list):
        if all(isinstance(item, str) for item in data):
            return [{"text": item} for item in data]
        if all(isinstance(item, dict) for item in data):
            return data
    raise ValueError(f"{path}: expected a list of objects, a list of strings or a columnar object")


# ============================================================================ checks
def require_columns(rows: Sequence[Row], columns: Iterable[str], source: str, what: str | None = None) -> None:
    """Every row has every column.

    Raises:
        ValueError: naming `source`, the missing columns, the first row without them and the columns found.
    """
    if not rows:
        raise ValueError(f"{source}: no rows")
    columns = tuple(columns)
    for index, row in enumerate(rows):
        missing = [c for c in columns if c not in row]
        if missing:
            where = "" if index == 0 else f" (row {index})"
            needed = f" needed for {what}" if what else ""
            raise ValueError(
                f"{source}: missing column(s) {missing}{needed}{where}; found columns: {sorted(row)}"
            )


def require(rows: Sequence[Row], column: str, check: Callable[[Any], bool], what: str, source: str) -> None:
    """Every row's `column` passes `check`, else a ValueError naming the row and the value."""
    for index, row in enumerate(rows):
        if not check(row[column]):
            raise ValueError(f"{source}: row {index}: column {column!r} must be {what}, got {row[column]!r}")


def check_strings(rows: Sequence[Row], column: str, source: str) -> list[str]:
    """The column's cells, each checked to be a string (a number or a list would fail deep in a template).

    Raises:
        ValueError: naming the first empty (None) cell and how many there are, or the first non-string.
    """
    values = [row[column] for row in rows]
    for index, value in enumerate(values):
        if value is None:
            count = sum(v is None for v in values)
            raise ValueError(f"{source}: column {column!r} is empty in {count} row(s), first row {index}")
        if not isinstance(value, str):
            raise ValueError(
                f"{source}: column {column!r} must hold text; row {index} holds {type(value).__name__} {value!r:.80}"
            )
    return values


def is_str_list(value: Any) -> bool:
    """A non-empty list of strings (TOFU's perturbed answers, WMDP's choices)."""
    return isinstance(value, list) and len(value) > 0 and all(isinstance(v, str) for v in value)
