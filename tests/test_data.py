"""ForgetRetainDataModule: loading errors, the batch contract, pairing, order and exact resume."""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # conftest sets these too; kept for running this file alone
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from blur_lightning.data.datamodule import ForgetRetainDataModule  # noqa: E402
from blur_lightning.data.prompts import format_qa  # noqa: E402
from blur_lightning.data.rows import load_rows  # noqa: E402
from blur_lightning.data.rows import resolve_embedded as resolve_data_path  # noqa: E402
from blur_lightning.data.sampling import PairedDataset, PairSampler  # noqa: E402
from blur_lightning.losses.functional import IGNORE_INDEX  # noqa: E402
from blur_lightning.testing.tiny import tiny_tokenizer  # noqa: E402

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
TOKENIZER = os.path.join(FIXTURES, "tiny_tokenizer")
CAPITALS = [
    ("France", "Paris"),
    ("Japan", "Tokyo"),
    ("Italy", "Rome"),
    ("Peru", "Lima"),
    ("Kenya", "Nairobi"),
    ("Chile", "Santiago"),
    ("Egypt", "Cairo"),
    ("Spain", "Madrid"),
    ("Cuba", "Havana"),
    ("Iran", "Tehran"),
]


def qa_rows(n: int, prefix: str = "capital") -> list[dict]:
    return [
        {"question": f"What is the {prefix} of {c}? ({i})", "answer": a, "idk": "I'm not sure about that."}
        for i, (c, a) in enumerate((CAPITALS * (n // len(CAPITALS) + 1))[:n])
    ]


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def make_dm(tmp_path, n_forget=10, n_retain=3, **kwargs) -> ForgetRetainDataModule:
    forget = write_jsonl(tmp_path / "forget.jsonl", qa_rows(n_forget))
    retain = write_jsonl(tmp_path / "retain.jsonl", qa_rows(n_retain, prefix="largest city"))
    kwargs = {"tokenizer": TOKENIZER, "batch_size": 4, "max_length": 64, **kwargs}
    dm = ForgetRetainDataModule(forget_path=forget, retain_path=retain, **kwargs)
    dm.setup("fit")
    return dm


def first_token_keys(side: dict) -> list[tuple[int, ...]]:
    """Identify rows of a batch side by their real tokens."""
    return [tuple(ids[mask.bool()].tolist()) for ids, mask in zip(side["input_ids"], side["attention_mask"])]


def epoch_batches(loader, epoch: int) -> list[dict]:
    loader.sampler.set_epoch(epoch)
    return list(loader)


# ----- errors ------------------------------------------------------------------------------------


def test_missing_file_is_named(tmp_path):
    retain = write_jsonl(tmp_path / "retain.jsonl", qa_rows(3))
    dm = ForgetRetainDataModule(forget_path=str(tmp_path / "nope.jsonl"), retain_path=retain, tokenizer=TOKENIZER)
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        dm.setup("fit")


@pytest.mark.parametrize(
    "name, content", [("empty.jsonl", ""), ("blank.jsonl", "\n\n"), ("header.csv", "question,answer\n")]
)
def test_empty_set(tmp_path, name, content):
    (tmp_path / name).write_text(content)
    with pytest.raises(ValueError, match=f"{name}: the file is empty"):
        load_rows(str(tmp_path / name))


@pytest.mark.parametrize(
    "name, content, match",
    [
        ("cut.jsonl", '{"question": "a", "answer": "b"}\n{"question": "c", "answer": \n',
         r"cut.jsonl:2: not valid JSON \(Expecting value\)"),
        ("list.jsonl", '{"question": "a", "answer": "b"}\n["c", "d"]\n',
         "list.jsonl: expected a list of objects"),
        ("array.json", '[{"question": "a", "answer": "b"},\n {"question": "c" "answer": "d"}]\n',
         r"array.json:2: not valid JSON \(Expecting ',' delimiter at column 19\)"),
        ("quote.csv", 'question,answer\na,b\n"c,d\n', "quote.csv: could not be read as csv .*EOF inside string"),
        ("text.parquet", "not a parquet file", "text.parquet: could not be read as parquet .*magic bytes"),
    ],
)
def test_unreadable_file_names_the_file_and_line(tmp_path, name, content, match):
    (tmp_path / name).write_text(content)
    with pytest.raises(ValueError, match=match):
        load_rows(str(tmp_path / name))


@pytest.mark.parametrize(
    "cell, match",
    [(3, "column 'answer' must hold text; row 1 holds int 3"),
     (["x"], r"column 'answer' must hold text; row 1 holds list \['x'\]"),
     (None, r"column 'answer' is empty in 1 row\(s\), first row 1")],
)
def test_cells_that_are_not_text(tmp_path, cell, match):
    """A number or a list in a QA column would fail deep inside the chat template; None is empty."""
    rows = [{"question": "q", "answer": "a"}, {"question": "r", "answer": cell}]
    forget = write_jsonl(tmp_path / "forget.jsonl", rows)
    retain = write_jsonl(tmp_path / "retain.jsonl", qa_rows(3))
    dm = ForgetRetainDataModule(forget_path=forget, retain_path=retain, tokenizer=TOKENIZER)
    with pytest.raises(ValueError, match="forget.jsonl: " + match):
        dm.setup("fit")


def test_missing_columns_name_those_found(tmp_path):
    forget = write_jsonl(tmp_path / "forget.jsonl", [{"prompt": "q", "response": "a"}])
    retain = write_jsonl(tmp_path / "retain.jsonl", qa_rows(3))
    dm = ForgetRetainDataModule(forget_path=forget, retain_path=retain, tokenizer=TOKENIZER)
    with pytest.raises(
        ValueError,
        match=r"missing column\(s\) \['question', 'answer'\].*found columns: \['prompt', 'response'\]",
    ):
        dm.setup("fit")
    dm = ForgetRetainDataModule(forget_path=retain, retain_path=retain, tokenizer=TOKENIZER, idk_column="refusal")
    with pytest.raises(ValueError, match=r"missing column\(s\) \['refusal'\]"):
        dm.setup("fit")


def test_no_pad_token_pads_with_eos_and_warns(tmp_path):
    tiny_tokenizer(pad_token=False).save_pretrained(tmp_path / "nopad")
    with pytest.warns(UserWarning, match="no pad token; using its eos token '<|im_end|>'"):
        dm = make_dm(tmp_path, tokenizer=str(tmp_path / "nopad"))
    assert dm.tokenizer.pad_token == dm.tokenizer.eos_token
    batch = next(iter(dm.train_dataloader()))
    side = batch["forget"]
    # padding uses the eos id but is masked out of attention and loss all the same
    assert (side["input_ids"][side["attention_mask"] == 0] == dm.tokenizer.eos_token_id).all()
    assert (side["labels"][side["attention_mask"] == 0] == IGNORE_INDEX).all()


def test_answers_truncated_away_are_counted_and_skipped(tmp_path):
    rows = qa_rows(5)
    long_question = "Tell me, after a very long and winding preamble about many things, " * 4 + "what is it?"
    rows[1]["question"] = rows[3]["question"] = long_question
    forget = write_jsonl(tmp_path / "forget.jsonl", rows)
    retain = write_jsonl(tmp_path / "retain.jsonl", qa_rows(3))
    dm = ForgetRetainDataModule(forget_path=forget, retain_path=retain, tokenizer=TOKENIZER, max_length=40)
    with pytest.warns(UserWarning, match=r"2 of 5 forget rows have no answer token left within max_length=40"):
        dm.setup("fit")
    assert len(dm.forget_rows) == 3
    assert [r["answer"] for r in dm.qa_rows("forget")] == [rows[i]["answer"] for i in (0, 2, 4)]

    all_long = write_jsonl(tmp_path / "long.jsonl", [{**r, "question": long_question} for r in rows])
    dm = ForgetRetainDataModule(forget_path=all_long, retain_path=retain, tokenizer=TOKENIZER, max_length=40)
    with pytest.raises(ValueError, match="5 of 5 forget rows .* none left"):
        dm.setup("fit")


def test_bad_arguments():
    with pytest.raises(ValueError, match="format must be one of"):
        ForgetRetainDataModule(format="chat")
    with pytest.raises(ValueError, match="idk_column needs format='qa'"):
        ForgetRetainDataModule(format="text", idk_column="idk")


# ----- the batch contract ------------------------------------------------------------------------


@pytest.mark.parametrize("prompt_format", ["auto", "qa"])
def test_qa_labels_cover_exactly_the_answer_tokens(tmp_path, prompt_format):
    dm = make_dm(tmp_path, prompt_format=prompt_format, shuffle=False)
    tok = dm.tokenizer
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"forget", "retain"}
    for name, rows in (("forget", qa_rows(10)), ("retain", qa_rows(3, prefix="largest city"))):
        side = batch[name]
        numbered = {"example_index"} if name == "forget" else set()  # (B,): rows of forget_rows
        assert set(side) == {"input_ids", "attention_mask", "labels", "padded:attention_mask"} | numbered
        assert name != "forget" or side["example_index"].tolist() == [0, 1, 2, 3]  # unshuffled
        tensors = [t for k, t in side.items() if torch.is_tensor(t) and k not in numbered]
        assert all(t.dtype == torch.long and t.shape == side["input_ids"].shape for t in tensors)
        for i in range(4):
            row = rows[i % len(rows)]
            ids, mask, labels = side["input_ids"][i], side["attention_mask"][i], side["labels"][i]
            n = int(mask.sum())
            assert mask[:n].all() and not mask[n:].any(), "right padding"
            prompt, answer = format_qa(tok, row["question"], row["answer"], prompt_format=prompt_format)
            answered = labels != IGNORE_INDEX
            assert tok.decode(ids[answered]) == answer
            assert tok.decode(ids[:n][~answered[:n]]) == prompt
            assert torch.equal(labels[answered], ids[answered])
            assert not answered[n:].any()
    if prompt_format == "auto":
        assert answer == f"{row['answer']}<|im_end|>"
    else:
        assert answer == f" {row['answer']}<|im_end|>" and prompt.startswith("Question: ")


def test_idk_column_adds_alt_fields(tmp_path):
    dm = make_dm(tmp_path, idk_column="idk", shuffle=False)
    batch = next(iter(dm.train_dataloader()))
    forget = batch["forget"]
    assert {"alt_input_ids", "alt_attention_mask", "alt_labels"} <= set(forget)
    assert "alt_input_ids" not in batch["retain"]
    tok = dm.tokenizer
    for i in range(4):
        answered = forget["alt_labels"][i] != IGNORE_INDEX
        assert tok.decode(forget["alt_input_ids"][i][answered]) == "I'm not sure about that.<|im_end|>"
        # same question: the prompts agree token for token
        n_prompt = int((~answered & forget["alt_attention_mask"][i].bool()).sum())
        assert torch.equal(forget["alt_input_ids"][i][:n_prompt], forget["input_ids"][i][:n_prompt])


def test_text_format_chunks_documents(tmp_path):
    tok = tiny_tokenizer()
    docs = ["The quick brown fox jumps over the lazy dog. " * 6, "Short one.", "  "]
    write_jsonl(tmp_path / "text.jsonl", [{"text": d} for d in docs])
    dm = ForgetRetainDataModule(
        forget_path=str(tmp_path / "text.jsonl"),
        retain_path=str(tmp_path / "text.jsonl"),
        tokenizer=TOKENIZER,
        format="text",
        max_length=16,
        batch_size=64,
        shuffle=False,
    )
    dm.setup("fit")
    expected = []
    for doc in docs[:2]:
        ids = tok(doc)["input_ids"] + [tok.eos_token_id]
        expected += [ids[i : i + 16] for i in range(0, len(ids), 16) if len(ids[i : i + 16]) >= 2]
    assert [r["input_ids"] for r in dm.forget_rows] == expected
    assert sum(len(c) for c in expected[:-1]) == len(tok(docs[0])["input_ids"]) + 1
    side = next(iter(dm.train_dataloader()))["forget"]
    assert side["input_ids"].shape == (len(expected), 16)
    assert torch.equal(side["labels"], side["input_ids"].masked_fill(side["attention_mask"] == 0, IGNORE_INDEX))


def test_pad_to_multiple_of(tmp_path):
    dm = make_dm(tmp_path, pad_to_multiple_of=32)
    batch = next(iter(dm.train_dataloader()))
    assert batch["forget"]["input_ids"].shape[1] % 32 == 0 and batch["retain"]["labels"].shape[1] % 32 == 0


def test_collator_notes_padding_on_the_host():
    """pad_side stores "padded:<mask key>" (a Python bool) beside each mask: the model's SDPA forward
    then needs no read of the mask from the GPU (blur_lightning.models.attention)."""
    from blur_lightning.data.encoding import pad_side

    even = pad_side([{"input_ids": [1, 2], "labels": [1, 2]}] * 2, pad_token_id=0)
    uneven = pad_side([{"input_ids": [1, 2], "labels": [1, 2]}, {"input_ids": [3], "labels": [3]}], 0, prefix="alt_")
    padded_to_32 = pad_side([{"input_ids": [1, 2], "labels": [1, 2]}], 0, pad_to_multiple_of=32)
    assert even["padded:attention_mask"] is False and bool(even["attention_mask"].all())
    assert uneven["padded:alt_attention_mask"] is True
    assert padded_to_32["padded:attention_mask"] is True
    for side, key in ((even, "attention_mask"), (uneven, "alt_attention_mask"), (padded_to_32, "attention_mask")):
        assert side[f"padded:{key}"] == (not bool(side[key].all()))


# ----- pairing, order, resume --------------------------------------------------------------------


def test_retain_cycles_reshuffled_when_shorter():
    sampler = PairSampler(PairedDataset(range(10), range(3)), shuffle=True, seed=0)
    pairs = [p for epoch in range(3) for p in (sampler.set_epoch(epoch), list(sampler))[1]]
    assert len(pairs) == 30
    for epoch in range(3):
        assert sorted(f for f, _ in pairs[10 * epoch : 10 * epoch + 10]) == list(range(10))
    retain = [r for _, r in pairs]
    passes = [retain[i : i + 3] for i in range(0, 30, 3)]
    assert all(sorted(p) == [0, 1, 2] for p in passes), "every retain row once per pass"
    assert len({tuple(p) for p in passes}) > 1, "reshuffled between passes"


def test_longer_retain_is_walked_through_across_epochs():
    sampler = PairSampler(PairedDataset(range(4), range(10)), shuffle=False)
    seen = []
    for epoch in range(5):
        sampler.set_epoch(epoch)
        seen += [r for _, r in sampler]
    assert seen == list(range(10)) * 2


def test_pairing_in_batches(tmp_path):
    dm = make_dm(tmp_path, n_forget=10, n_retain=3, shuffle=False)
    batches = list(dm.train_dataloader())
    assert [b["forget"]["input_ids"].shape[0] for b in batches] == [4, 4, 2]
    retain_keys = [k for b in batches for k in first_token_keys(b["retain"])]
    row_keys = [tuple(r["input_ids"]) for r in dm.retain_rows]
    assert retain_keys == (row_keys * 4)[:10]


def test_order_is_a_function_of_seed_and_epoch(tmp_path):
    def order(seed: int, epoch: int) -> list:
        loader = make_dm(tmp_path, seed=seed).train_dataloader()
        return [(first_token_keys(b["forget"]), first_token_keys(b["retain"])) for b in epoch_batches(loader, epoch)]

    assert order(0, 0) == order(0, 0)
    assert order(0, 1) == order(0, 1)
    assert order(0, 0) != order(0, 1)
    assert order(0, 0) != order(1, 0)
    # the same loader object, iterated twice, gives the same epoch
    loader = make_dm(tmp_path).train_dataloader()
    assert [first_token_keys(b["forget"]) for b in epoch_batches(loader, 2)] == [
        first_token_keys(b["forget"]) for b in epoch_batches(loader, 2)
    ]


def test_shards_partition_the_epoch():
    dataset = PairedDataset(range(10), range(3))
    full = PairSampler(dataset, seed=3, num_replicas=1, rank=0)
    shards = [PairSampler(dataset, seed=3, num_replicas=2, rank=r) for r in range(2)]
    for s in [full, *shards]:
        s.set_epoch(1)
    merged = [p for pair in zip(*[list(s) for s in shards]) for p in pair]
    assert merged == list(full)
    uneven = [PairSampler(PairedDataset(range(5), range(3)), num_replicas=2, rank=r) for r in range(2)]
    assert [len(list(s)) for s in uneven] == [3, 3] and [len(s) for s in uneven] == [3, 3]


@pytest.mark.parametrize("consumed", [0, 1, 2, 3])
def test_loader_resumes_mid_epoch_exactly(tmp_path, consumed):
    reference = [
        first_token_keys(b["forget"]) + first_token_keys(b["retain"])
        for b in epoch_batches(make_dm(tmp_path, seed=5).train_dataloader(), 1)
    ]
    assert len(reference) == 3
    loader = make_dm(tmp_path, seed=5).train_dataloader()
    loader.sampler.set_epoch(1)
    iterator = iter(loader)
    for _ in range(consumed):
        next(iterator)
    state = loader.state_dict()
    assert state["epoch"] == 1 and state["batches"] == consumed

    resumed = make_dm(tmp_path, seed=5).train_dataloader()
    resumed.load_state_dict(state)
    rest = [first_token_keys(b["forget"]) + first_token_keys(b["retain"]) for b in epoch_batches(resumed, 1)]
    assert rest == reference[consumed:]
    assert len(resumed) == 3, "len() stays the full epoch, as Lightning expects"
    # the skip applies once: the next pass over the same epoch is whole again
    assert len(epoch_batches(resumed, 1)) == 3


def test_resume_state_of_other_data_restarts_the_epoch(tmp_path):
    loader = make_dm(tmp_path).train_dataloader()
    iterator = iter(loader)
    next(iterator)
    other = make_dm(tmp_path, n_forget=9).train_dataloader()
    with pytest.warns(UserWarning, match="training data changed since the checkpoint"):
        other.load_state_dict(loader.state_dict())
    assert len(list(other)) == len(other)


def test_lightning_mid_epoch_resume_sees_the_same_batches(tmp_path):
    """Through Lightning's own checkpoint/restore: the loader's state is saved and reloaded."""
    import warnings

    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint

    class Recorder(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))
            self.seen = []

        def training_step(self, batch, batch_idx):
            self.seen.append((self.current_epoch, first_token_keys(batch["forget"]), first_token_keys(batch["retain"])))
            return (self.weight * batch["forget"]["input_ids"].float().mean()).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    def trainer(root, **kwargs):
        return pl.Trainer(
            accelerator="cpu",
            max_epochs=2,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=root,
            **kwargs,
        )

    straight = Recorder()
    trainer(tmp_path / "a", enable_checkpointing=False).fit(straight, datamodule=make_dm(tmp_path, n_forget=10, seed=7))
    assert len(straight.seen) == 6

    ckpt_cb = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_top_k=-1, filename="{step}")
    trainer(tmp_path / "b", callbacks=[ckpt_cb]).fit(Recorder(), datamodule=make_dm(tmp_path, n_forget=10, seed=7))
    # 3 batches per epoch: step 2 and 4 are mid-epoch, step 3 is the last batch of epoch 0
    for step in (2, 3, 4):
        resumed = Recorder()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer(tmp_path / f"c{step}", enable_checkpointing=False).fit(
                resumed,
                datamodule=make_dm(tmp_path, n_forget=10, seed=7),
                ckpt_path=str(tmp_path / "ckpt" / f"step={step}.ckpt"),
            )
        assert not [w for w in caught if "not resumable" in str(w.message)]
        assert resumed.seen == straight.seen[step:], f"resumed from step {step}"


# ----- sources -----------------------------------------------------------------------------------


@pytest.mark.parametrize("ext", ["jsonl", "json", "csv", "parquet"])
def test_file_formats_load_the_same_rows(tmp_path, ext):
    import pandas as pd

    rows = qa_rows(5)
    frame = pd.DataFrame(rows)
    path = tmp_path / f"forget.{ext}"
    if ext == "jsonl":
        write_jsonl(path, rows)
    elif ext == "json":
        path.write_text(json.dumps(rows))
    elif ext == "csv":
        frame.to_csv(path, index=False)
    else:
        frame.to_parquet(path)
    (tmp_path / "ref").mkdir()
    reference = make_dm(tmp_path / "ref", n_forget=5)
    dm = ForgetRetainDataModule(forget_path=str(path), retain_path=str(path), tokenizer=TOKENIZER, max_length=64)
    dm.setup("fit")
    assert dm.forget_rows == reference.forget_rows


def test_unsupported_extension(tmp_path):
    (tmp_path / "rows.xml").write_text("<rows/>")
    with pytest.raises(ValueError, match="unsupported file type '.xml'"):
        load_rows(str(tmp_path / "rows.xml"))


def test_hub_names_go_to_load_dataset(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(path, name=None, split=None, **kwargs):
        calls.append((path, name, split))
        return datasets.Dataset.from_list(qa_rows(3))

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    ds = load_rows("locuslab/TOFU", subset="forget10", split="train")
    assert calls == [("locuslab/TOFU", "forget10", "train")] and len(ds) == 3
    dm = ForgetRetainDataModule(
        forget_path="locuslab/TOFU",
        retain_path="locuslab/TOFU",
        tokenizer=TOKENIZER,
        forget_subset="forget10",
        retain_subset="retain90",
    )
    dm.prepare_data()
    assert calls[1:] == [("locuslab/TOFU", "forget10", "train"), ("locuslab/TOFU", "retain90", "train")]


def test_embedded_paths(tmp_path):
    path = resolve_data_path("embedded:qa_forget.jsonl")
    assert os.path.isfile(path) and path.endswith(os.path.join("assets", "qa_forget.jsonl"))
    with pytest.raises(FileNotFoundError, match=r"'nope.jsonl' not found; available: \[.*'qa_forget.jsonl'"):
        resolve_data_path("embedded:nope.jsonl")
    dm = ForgetRetainDataModule(
        forget_path="embedded:qa_forget.jsonl",
        retain_path="embedded:qa_retain.jsonl",
        eval_path="embedded:qa_holdout.jsonl",
        tokenizer=TOKENIZER,
        idk_column="idk",
    )
    dm.setup("fit")
    assert len(dm.forget_rows) >= 60 and len(dm.retain_rows) >= 60 and len(dm.eval_rows) >= 60
    assert dm.val_loader_names == ["forget", "eval"]
    forget_loader, eval_loader = dm.val_dataloader()
    side = next(iter(eval_loader))
    assert set(side) == {"input_ids", "attention_mask", "labels", "padded:attention_mask"}
    assert sum(b["input_ids"].shape[0] for b in forget_loader) == len(dm.forget_rows)


def test_embedded_qa_set_is_well_formed():
    sets = {}
    for name in ("forget", "retain", "holdout"):
        with open(resolve_data_path(f"embedded:qa_{name}.jsonl"), encoding="utf-8") as f:
            sets[name] = [json.loads(line) for line in f]
        for row in sets[name]:
            assert set(row) == {"question", "answer", "topic", "idk", "response"}, row
            assert all(isinstance(v, str) and v.strip() for v in row.values()), row
    assert 60 <= len(sets["forget"]) <= 150 and {r["topic"] for r in sets["forget"]} == {"capitals"}
    for name in ("retain", "holdout"):
        assert 60 <= len(sets[name]) <= 120
        assert "capitals" not in {r["topic"] for r in sets[name]} and len({r["topic"] for r in sets[name]}) >= 5
    questions = [{r["question"] for r in rows} for rows in sets.values()]
    assert sum(map(len, questions)) == len(set().union(*questions)), "the three files are disjoint"


def test_workers_collate_in_subprocesses(tmp_path):
    dm = make_dm(tmp_path, num_workers=1, shuffle=False)
    with_workers = [first_token_keys(b["forget"]) for b in dm.train_dataloader()]
    dm.num_workers = 0
    assert with_workers == [first_token_keys(b["forget"]) for b in dm.train_dataloader()]
