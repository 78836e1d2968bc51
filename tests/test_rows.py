"""The one reader of rows: embedded names, file formats and their errors, hub specs, column checks."""

from __future__ import annotations

import json

import pytest

from blur_lightning.data.rows import check_strings, load_rows, parse_hub_spec, read_rows, require_columns


def test_load_rows_errors_name_the_file_and_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="data file not found: .*missing.jsonl"):
        load_rows(str(tmp_path / "missing.jsonl"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answer": "a"}\n{oops\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not valid JSON"):
        load_rows(str(bad))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="empty.jsonl: the file is empty"):
        load_rows(str(empty))
    (tmp_path / "none.json").write_text("[]")
    with pytest.raises(ValueError, match="none.json: no rows"):
        load_rows(str(tmp_path / "none.json"))
    with pytest.raises(FileNotFoundError, match=r"embedded data file 'nope.jsonl' not found; available: \[.*qa_forget"):
        load_rows("embedded:nope.jsonl")


def test_every_format_reads_the_same_rows(tmp_path):
    pd = pytest.importorskip("pandas")
    rows = [{"question": f"q{i}", "answer": f"a{i}"} for i in range(4)]
    (tmp_path / "r.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "r.json").write_text(json.dumps(rows))
    (tmp_path / "c.json").write_text(json.dumps({k: [r[k] for r in rows] for k in rows[0]}))  # columnar
    pd.DataFrame(rows).to_csv(tmp_path / "r.csv", index=False)
    pd.DataFrame(rows).to_parquet(tmp_path / "r.parquet")
    for name in ("r.jsonl", "r.json", "c.json", "r.csv", "r.parquet"):
        assert read_rows(tmp_path / name) == rows, name
    assert load_rows(str(tmp_path / "r.csv"), limit=2) == rows[:2]
    (tmp_path / "gap.csv").write_text("question,answer\nq,\n")
    assert read_rows(tmp_path / "gap.csv") == [{"question": "q", "answer": None}]  # an empty cell is None


def test_embedded_rows_and_hub_specs(monkeypatch):
    assert len(load_rows("embedded:qa_forget.jsonl")) == 80
    assert parse_hub_spec("hub:cfg", "org/set", "train") == ("org/set", "cfg", "train")
    assert parse_hub_spec("hub:cfg:test", "org/set") == ("org/set", "cfg", "test")
    assert parse_hub_spec("hub:a/b:c:d") == ("a/b", "c", "d")
    with pytest.raises(ValueError, match="'hub:cfg': this set needs a split"):
        parse_hub_spec("hub:cfg", "org/set")
    import datasets

    calls = []
    monkeypatch.setattr(
        datasets, "load_dataset",
        lambda path, name=None, split=None: calls.append((path, name, split)) or datasets.Dataset.from_list([{"a": 1}]),
    )  # fmt: skip
    assert load_rows("hub:cfg", default_repo="org/set") == [{"a": 1}]
    assert load_rows("org/other", subset="x", split="test") == [{"a": 1}]
    assert calls == [("org/set", "cfg", "train"), ("org/other", "x", "test")]


def test_column_checks():
    rows = [{"q": "a", "n": 1}, {"q": None, "n": 2}]
    expected = r"src: missing column\(s\) \['x'\] needed for qa; found columns: \['n', 'q'\]"
    with pytest.raises(ValueError, match=expected):
        require_columns(rows, ["q", "x"], "src", "qa")
    with pytest.raises(ValueError, match=r"src: column 'q' is empty in 1 row\(s\), first row 1"):
        check_strings(rows, "q", "src")
    with pytest.raises(ValueError, match="src: column 'n' must hold text; row 0 holds int 1"):
        check_strings(rows, "n", "src")
