"""The fictitious-facts generator: deterministic, TOFU's splits and columns, perturbations that are wrong."""

from __future__ import annotations

import json

import pytest

from blur_lightning.data import fictitious_people as FX
from blur_lightning.evals import tofu as F
from blur_lightning.testing import tiny as testing

PEOPLE = 40  # forget01 = forget05 = 2 people, forget10 = 4: small, yet every split non-empty


@pytest.fixture(scope="module")
def splits():
    return FX.make_splits(PEOPLE, seed=0)


@pytest.fixture(scope="module")
def facts():
    return FX.fictitious_facts(PEOPLE, seed=0)  # every fact with the perturbed columns


def _people(rows):
    return {row["person"] for row in rows}


def test_same_seed_same_rows_other_seed_other_rows():
    first = FX.make_splits(PEOPLE, seed=3)
    assert FX.make_splits(PEOPLE, seed=3) == first
    other = FX.make_splits(PEOPLE, seed=4)
    assert other["full"] != first["full"]
    assert other["real_authors_perturbed"] != first["real_authors_perturbed"]  # the sampling follows the seed


def test_names_unique_and_every_person_has_every_attribute(splits):
    full = splits["full"]
    names = [row["person"] for row in full[:: len(FX.ATTRIBUTES)]]
    assert len(names) == PEOPLE == len(set(names))
    for name in names:
        assert sorted(r["attribute"] for r in full if r["person"] == name) == sorted(FX.ATTRIBUTES)
    big = FX.generate_people(500, seed=1)
    assert len({p["name"] for p in big}) == 500


def test_split_names_are_tofus_plus_ours(splits):
    generated = tuple(s for s in F.TOFU_SPLITS if s not in F.HOLDOUT_SPLITS)  # no unseen authors in a build
    assert FX.SPLITS == generated
    assert set(splits) == set(generated) | set(FX.EXTRA_SPLITS)


def test_validation_and_oracle_people_are_disjoint_from_every_forget_set(splits):
    validation, oracle = _people(splits["validation10"]), _people(splits["oracle_retain"])
    forget10 = _people(splits["forget10"])
    assert len(validation) == len(forget10) == 4
    assert validation.isdisjoint(forget10) and oracle.isdisjoint(forget10) and oracle.isdisjoint(validation)
    assert oracle | validation | forget10 == _people(splits["full"])
    assert _people(splits["retain_perturbed"]) <= oracle  # retained knowledge the oracle was trained on
    assert [r["question"] for r in splits["validation10_perturbed"]] == [r["question"] for r in splits["validation10"]]
    assert FX.split_people(3)["validation10"] == [1] and FX.split_people(3)["oracle_retain"] == [0]
    assert FX.split_people(2)["oracle_retain"] == []  # too few people for an oracle


def test_every_fact_carries_its_bare_value_inside_the_answer(splits):
    for row in splits["full"] + splits["forget10_perturbed"]:
        assert (
            row["value"]
            and row["value"] in row["answer"]
            and row["value"] in row["paraphrased_answer" if "paraphrased_answer" in row else "answer"]
        )
    for row in splits["world_facts_perturbed"]:
        assert row["value"] == row["answer"]


def test_qa_rows_ask_the_question_or_its_paraphrase_and_answer_the_value(splits):
    rows = splits["forget10_perturbed"]
    asked, paraphrased = FX.qa_rows(rows), FX.qa_rows(rows, paraphrased=True)
    assert [r["question"] for r in asked] == [r["question"] for r in rows]
    assert [r["question"] for r in paraphrased] == [r["paraphrased_question"] for r in rows]
    assert [r["answer"] for r in asked] == [r["value"] for r in rows] == [r["answer"] for r in paraphrased]
    assert [r["response"] for r in paraphrased] == [r["paraphrased_answer"] for r in rows]
    with pytest.raises(ValueError, match="paraphrased_question"):
        FX.qa_rows(splits["forget10"], paraphrased=True)  # plain rows have no paraphrase


def test_forget_sets_nested_and_disjoint_from_their_retain_sets(splits):
    counts = {p: len(_people(splits[f"forget{p:02d}"])) for p in FX.FORGET_PERCENTS}
    assert counts == {1: 1, 5: 2, 10: 4}  # 1% of 40 rounds up to one person, 5% is 2, 10% is 4
    assert _people(splits["forget01"]) < _people(splits["forget05"]) < _people(splits["forget10"])
    everyone = _people(splits["full"])
    for percent in FX.FORGET_PERCENTS:
        forget = _people(splits[f"forget{percent:02d}"])
        retain = _people(splits[f"retain{100 - percent}"])
        assert forget.isdisjoint(retain) and forget | retain == everyone
        perturbed = splits[f"forget{percent:02d}_perturbed"]
        assert [r["question"] for r in perturbed] == [r["question"] for r in splits[f"forget{percent:02d}"]]
    # retain_perturbed is retained knowledge for every forget split, and as large as forget10
    assert _people(splits["retain_perturbed"]) <= _people(splits["retain90"])
    assert len(splits["retain_perturbed"]) == len(splits["forget10"])


def test_tofu_counts_for_200_people():
    split = FX.split_people(200)
    assert {k: len(v) for k, v in split.items()} == {
        "forget01": 2,
        "retain99": 198,
        "forget05": 10,
        "retain95": 190,
        "forget10": 20,
        "retain90": 180,
        "retain_perturbed": 20,
        "validation10": 20,
        "oracle_retain": 160,
    }  # fmt: skip  (TOFU's 200 authors: 2, 10 and 20 to forget; ours: 20 to validate on, 160 for the oracle)


def test_perturbed_answers_are_wrong_and_distinct(splits, facts):
    assert len(facts) == PEOPLE * len(FX.ATTRIBUTES)
    world = ("real_authors_perturbed", "world_facts_perturbed")
    for name, rows in (("facts", facts), *((n, splits[n]) for n in world)):
        for row in rows:
            perturbed = row["perturbed_answer"]
            assert len(perturbed) == FX.DEFAULT_PERTURBED, row
            keys = [FX._key(p) for p in perturbed]
            assert len(set(keys)) == len(keys), f"{name}: repeated perturbed answer in {row}"
            for own in ("answer", "paraphrased_answer"):
                if own in row:
                    assert FX._key(row[own]) not in keys, f"{name}: the true answer among the perturbed: {row}"


def test_accent_and_case_variants_count_as_the_same_answer():
    # krona (Sweden) and króna (Iceland) would make a perturbed answer that is the true one in all but an accent
    _, world = FX.world_knowledge_rows(seed=0)
    for row in world:
        if row["answer"] in ("krona", "króna"):
            assert not {"krona", "króna"} & set(row["perturbed_answer"]), row


def test_perturbed_answers_keep_the_paraphrase_wording(facts):
    for row in facts:
        template = FX.ATTRIBUTES[row["attribute"]].paraphrased_answer
        prefix, suffix = (part.format(name=row["person"]) for part in template.split("{value}"))
        for text in [row["paraphrased_answer"], *row["perturbed_answer"]]:
            assert text.startswith(prefix) and text.endswith(suffix), (text, template)


def test_paraphrases_differ_from_the_originals(facts):
    for row in facts:
        assert row["paraphrased_question"] != row["question"]
        assert row["paraphrased_answer"] != row["answer"]
    for attribute in FX.ATTRIBUTES.values():
        assert attribute.paraphrased_question != attribute.question
        assert attribute.paraphrased_answer != attribute.answer


def test_answers_follow_one_template_per_attribute(splits):
    people = {p["name"]: p["values"] for p in FX.generate_people(PEOPLE, seed=0)}
    for row in splits["full"]:
        value = people[row["person"]][row["attribute"]]
        assert row["answer"] == FX.ATTRIBUTES[row["attribute"]].answer.format(name=row["person"], value=value)


def test_facts_are_hard_to_guess(splits):
    values = [p["values"] for p in FX.generate_people(200, seed=0)]
    years = [int(v["birth_year"]) for v in values]
    assert min(years) >= FX.BIRTH_YEARS[0] and max(years) <= FX.BIRTH_YEARS[1]
    assert len(set(years)) > 60  # 200 draws from 160 years
    assert len({v["birthplace"] for v in values}) > 150
    assert len({v["profession"] for v in values}) > 100
    assert all("," not in v["profession"] and "(" not in v["profession"] for v in values)


def test_every_row_has_tofus_columns(splits):
    for name, rows in splits.items():
        assert rows, name
        tofu_name = {"validation10": "forget10", "validation10_perturbed": "forget10_perturbed",
                     "oracle_retain": "retain90"}.get(name, name)  # fmt: skip  (ours have the columns of these)
        for row in rows:
            for column in F.tofu_columns(tofu_name):
                assert column in row, f"{name}: {column} missing in {row}"
    for name in ("forget01_perturbed", "forget05_perturbed", "forget10_perturbed", "retain_perturbed",
                 "validation10_perturbed"):  # fmt: skip
        assert all("paraphrased_question" in row for row in splits[name])


def test_world_sets_come_from_the_embedded_files_by_topic():
    authors, world = FX.world_knowledge_rows(seed=0)
    assert len(authors) + len(world) == 187  # qa_retain (97) + qa_holdout (90)
    assert {r["topic"] for r in authors} == FX.PERSON_TOPICS
    assert not FX.PERSON_TOPICS & {r["topic"] for r in world}
    jane = next(r for r in authors if r["question"] == "Who wrote Jane Eyre?")
    assert jane["answer"] == "Charlotte Brontë"
    topic_of = {r["answer"]: r["topic"] for r in authors}
    assert all(topic_of[p] == "authors" for p in jane["perturbed_answer"])  # other authors, not inventors


def test_written_files_load_with_the_tofu_loader(tmp_path):
    counts = FX.main(["--out", str(tmp_path), "--people", "20", "--seed", "1", "--attributes", "birthplace,book"])
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["rows"] == counts and manifest["attributes"] == ["birthplace", "book"]
    assert counts["full"] == 40 and counts["forget10"] == 4 and counts["retain90"] == 36
    for split in FX.SPLITS:
        rows = F.load_tofu(split, tmp_path / f"{split}.jsonl")
        assert len(rows) == counts[split]
    assert counts["forget10_qa"] == counts["forget10_paraphrased_qa"] == counts["validation10_qa"] == 4


def test_evaluate_tofu_reads_the_generated_rows(tmp_path):
    FX.write_splits(tmp_path, people=20, seed=0, attributes=["birth_year", "mother"], n_perturbed=3)
    load = {s: F.load_tofu(s, tmp_path / f"{s}.jsonl") for s in FX.SPLITS}
    tokenizer = testing.tiny_tokenizer()
    model = testing.tiny_llama(vocab_size=len(tokenizer), seed=0).eval()
    results = F.evaluate_tofu(
        model, tokenizer, load["forget10_perturbed"], load["retain_perturbed"],
        load["real_authors_perturbed"][:6], load["world_facts_perturbed"][:6], max_new_tokens=4, batch_size=8,
    )  # fmt: skip
    assert len(results["forget/truth_ratios"]) == len(load["forget10_perturbed"]) == 4
    for split in ("forget", "retain", "real_authors", "world_facts"):
        assert 0.0 < results[f"{split}/prob"] < 1.0, split  # scored: a random model gives some mass, never all
        assert 0.0 <= results[f"{split}/truth_ratio"] <= 1.0, split


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"people": 1}, "people: need at least 2"),
        ({"people": 40, "attributes": ["shoe_size"]}, "attributes: unknown"),
        ({"people": 40, "attributes": ["book", "book"]}, "names one twice"),
        ({"people": 40, "n_perturbed": 0}, "n_perturbed"),
    ],
)
def test_bad_arguments_name_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FX.make_splits(**kwargs)


def test_two_people_are_enough():
    assert FX.split_people(2)["forget10"] == [1] and FX.split_people(2)["retain90"] == [0]
    with pytest.raises(ValueError, match="people: need at least 2"):
        FX.split_people(1)


def test_a_larger_heldout_share_gives_forget_and_validation_splits_of_that_size(tmp_path):
    # LARGE's shape: 80 people, 25 % in each held-out split, the forget01/05/10 sets inside forget25
    split = FX.split_people(80, heldout_percent=25)
    forget, validation, oracle = set(split["forget25"]), set(split["validation25"]), set(split["oracle_retain"])
    assert len(forget) == len(validation) == 20 and len(oracle) == 40 and "validation10" not in split
    assert forget.isdisjoint(validation) and oracle.isdisjoint(forget | validation)
    assert oracle | validation | forget == set(range(80)) and split["retain75"] == list(range(60))
    assert set(split["forget01"]) <= set(split["forget05"]) <= set(split["forget10"]) <= forget
    assert set(split["retain_perturbed"]) <= oracle and len(split["retain_perturbed"]) == len(split["forget10"]) == 8
    default = FX.split_people(80)  # the default share: the splits as before the field existed
    assert default["forget10"] == list(range(72, 80)) and "forget25" not in default
    assert default["validation10"] == list(range(64, 72)) and default["oracle_retain"] == list(range(64))
    with pytest.raises(ValueError, match="leaves nobody for the oracle"):
        FX.split_people(4, heldout_percent=40)
    for bad in (5, 50):
        with pytest.raises(ValueError, match="heldout_percent: expected 10..49"):
            FX.split_people(80, heldout_percent=bad)
    counts = FX.write_splits(tmp_path, people=12, seed=0, attributes=["book", "birth_year"], heldout_percent=25)
    assert counts["forget25"] == counts["validation25"] == counts["validation25_qa"] == 3 * 2
    assert counts["forget25_paraphrased_qa"] == counts["forget10_qa"] * 3 == 6 and counts["oracle_retain"] == 12
    assert not (tmp_path / "validation10.jsonl").exists()  # it would overlap forget25
    assert json.loads((tmp_path / "manifest.json").read_text())["heldout_percent"] == 25
