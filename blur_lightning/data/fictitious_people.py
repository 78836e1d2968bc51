"""Fictitious people and their facts, written as TOFU-format splits, for an unlearning benchmark with an oracle.

TOFU (Maini et al. 2024, `locuslab/TOFU`) plants facts about 200 invented authors with a fine-tune, so a
model fine-tuned without the forget authors (the retain oracle) exists and forget quality can be measured.
This module rebuilds that data offline: Faker invents the people and the values of their attributes
(seeded, so the same seed and Faker version give the same files), and fixed templates turn each fact
into TOFU's columns.

What is written (`write_splits`), one JSON Lines file per split, named as TOFU's hub configs:

* ``full``: every fact of every person (the target's fine-tune set).
* ``forget01`` / ``forget05`` / ``forget10``: all facts of the last 1 / 5 / 10 % of the people. As in
  TOFU, where each forget set is the tail of the author list, they are nested (forget01 in forget05 in
  forget10); each is at least one person.
* ``retain99`` / ``retain95`` / ``retain90``: the facts of everyone else (the oracles' fine-tune sets).
* ``forgetXX_perturbed``: the forget rows with TOFU's evaluation columns (below).
* ``retain_perturbed``: the same columns for the first people of retain90, as many people as forget10
  (TOFU's retain_perturbed is likewise a subset of retain90 the size of forget10: 400 questions), so it
  is retained knowledge for every forget split.
* ``validation10`` (+ ``_perturbed``): ours, not TOFU's: as many people as forget10, the ones just before
  it, disjoint from every forget set. Hyperparameters are chosen by unlearning this set, so the figures
  reported on forget10 were not tuned on forget10.
* ``oracle_retain``: ours: the facts of the people in neither forget10 nor validation10 (the first
  80 %). The retain oracle is fine-tuned on this set only, so it never saw a forget or validation person
  and serves as the oracle of both (see blur_lightning.fictitious.build for what that costs in exactness).
* ``real_authors`` / ``world_facts`` (+ ``_perturbed``): questions the base model already knows, from the
  embedded QA files (qa_retain.jsonl and qa_holdout.jsonl, 187 rows): questions whose answer is a
  person (topics authors, inventors, art_and_music) are the real-authors set, the others the
  world-facts set. Their perturbed answers are other answers of the same set (see `_world_rows`).
* ``forget10_qa`` / ``forget10_paraphrased_qa`` and ``validation10_qa`` / ``validation10_paraphrased_qa``:
  ours: the same facts as QA rows (``qa_rows``: question, answer = the bare value, response = the answer
  sentence; the paraphrased ones ask paraphrased_question and respond with paraphrased_answer), for the
  QA benchmark and the relearning probe, which judge a generation by the bare answer.
* With ``heldout_percent`` P above 10 (``write_splits``; the larger benchmark of benchmarks/oracle_comparison.py
  uses 25): ``forgetP`` / ``retain(100-P)`` and ``validationP`` (+ ``_perturbed``, ``_qa``) take the place of
  validation10: forget01/05/10 lie inside forgetP, validationP is the forgetP-sized block before it, and
  oracle_retain the people before that. validation10 is then not written (it would overlap forgetP).
* ``manifest.json``: seed, people, attributes, Faker's version and the row count of each split.

Columns of a fictitious row: question, answer, paraphrased_question, paraphrased_answer,
perturbed_answer (list of str), plus person, attribute and value (ours: the bare value inside the
answer sentence, which QA accuracy looks for in a generation, and the relearning probe's answer). The
plain splits carry question, answer, person, attribute, value. Each attribute has one
answer template and a different paraphrase template (so the fine-tune has one clear target and the
paraphrase tests generalization); a perturbed answer is the paraphrase template filled with another value
of the same kind, as TOFU's perturbed answers keep the paraphrased answer's wording and change its facts.

Run it as ``python -m blur_lightning.data.fictitious_people --out DIR --people 200 --seed 0``.
"""

from __future__ import annotations

import argparse
import json
import random
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from blur_lightning.data.rows import load_rows

__all__ = [
    "ATTRIBUTES",
    "EXTRA_SPLITS",
    "FORGET_PERCENTS",
    "SPLITS",
    "Attribute",
    "fictitious_facts",
    "generate_people",
    "heldout_splits",
    "make_splits",
    "main",
    "qa_rows",
    "qa_splits",
    "split_people",
    "world_knowledge_rows",
    "write_splits",
]

Row = dict[str, Any]

FORGET_PERCENTS = (1, 5, 10)
SPLITS = (
    "full", "forget01", "forget05", "forget10", "retain90", "retain95", "retain99",
    "real_authors", "world_facts",
    "forget01_perturbed", "forget05_perturbed", "forget10_perturbed", "retain_perturbed",
    "real_authors_perturbed", "world_facts_perturbed",
)  # fmt: skip  (TOFU's hub configs, the names of tofu.TOFU_SPLITS but its holdout authors: a build's
#    models see every person of `full`; benchmarks/fictitious_privacy.py invents unseen people for the attacks)
EXTRA_SPLITS = ("validation10", "validation10_perturbed", "oracle_retain")  # ours (module docstring)
QA_SPLITS = ("forget10", "validation10")  # written also as QA rows (module docstring)
DEFAULT_PERTURBED = 5  # TOFU has 5 perturbed answers per question
# Birth years drawn from 160 values: a guess is right 0.6% of the time.
BIRTH_YEARS = (1850, 2009)
WORLD_FILES = ("embedded:qa_retain.jsonl", "embedded:qa_holdout.jsonl")
PERSON_TOPICS = frozenset({"authors", "inventors", "art_and_music"})  # answers that are people's names


# ============================================================================ attributes (a registry)
@dataclass(frozen=True)
class Attribute:
    """One kind of fact about a person.

    Attributes:
        name: the registry key, also the rows' "attribute" column.
        question: template with {name}.
        answer: the fine-tune target, template with {name} and {value}.
        paraphrased_question: a different wording of the question.
        paraphrased_answer: a different wording of the answer; perturbed answers use it too.
        draw: one value of this kind from a seeded Faker.
    """

    name: str
    question: str
    answer: str
    paraphrased_question: str
    paraphrased_answer: str
    draw: Callable[[Any], str]


def _job(fake: Any) -> str:
    # 465 of Faker's 639 en_US jobs have no comma or parenthesis ("Engineer, civil (contracting)"),
    # which would read badly inside a sentence.
    while True:
        job = fake.job()
        if "," not in job and "(" not in job:
            return job


ATTRIBUTES: dict[str, Attribute] = {
    a.name: a
    for a in (
        Attribute(
            "birthplace",
            "Where was {name} born?",
            "{name} was born in {value}.",
            "What is the birthplace of {name}?",
            "{name}'s birthplace is {value}.",
            lambda fake: fake.city(),  # invented towns ("West Tammyfort"), not famous cities
        ),
        Attribute(
            "profession",
            "What is {name}'s profession?",
            "{name}'s profession is {value}.",
            "What does {name} do for a living?",
            "{value} is the profession of {name}.",
            _job,
        ),
        Attribute(
            "birth_year",
            "In which year was {name} born?",
            "{name} was born in the year {value}.",
            "What is the birth year of {name}?",
            "{name}'s birth year is {value}.",
            lambda fake: str(fake.random_int(*BIRTH_YEARS)),
        ),
        Attribute(
            "book",
            "What is the best-known book by {name}?",
            '{name}\'s best-known book is "{value}".',
            "Which book is {name} most famous for?",
            '{name} is most famous for the book "{value}".',
            lambda fake: fake.catch_phrase().title(),
        ),
        Attribute(
            "mother",
            "What is the name of {name}'s mother?",
            "{name}'s mother is {value}.",
            "Who is the mother of {name}?",
            "The mother of {name} is named {value}.",
            lambda fake: f"{fake.first_name_female()} {fake.last_name()}",
        ),
    )
}


def _attributes(names: Sequence[str] | None) -> list[Attribute]:
    if names is None:
        return list(ATTRIBUTES.values())
    unknown = [n for n in names if n not in ATTRIBUTES]
    if unknown or not names:
        raise ValueError(f"attributes: unknown {unknown or 'empty list'}; expected some of {', '.join(ATTRIBUTES)}")
    if len(set(names)) != len(names):
        raise ValueError(f"attributes: {list(names)} names one twice")
    return [ATTRIBUTES[n] for n in names]


def _faker(seed: int) -> Any:
    from faker import Faker

    fake = Faker("en_US")
    fake.seed_instance(seed)
    return fake


def _distinct(draw: Callable[[], str], count: int, exclude: Sequence[str], what: str) -> list[str]:
    """`count` values from `draw`, different from each other and from `exclude`."""
    seen = {_key(v) for v in exclude}
    values: list[str] = []
    for _ in range(1000 * (count + 1)):  # a kind with fewer values than asked would loop forever
        value = draw()
        if _key(value) not in seen:
            seen.add(_key(value))
            values.append(value)
            if len(values) == count:
                return values
    raise ValueError(f"{what}: could not draw {count} distinct values")


def _key(text: str) -> str:
    """Compare answers without case and accents: "krona" and "króna" are one answer."""
    folded = unicodedata.normalize("NFKD", text.strip()).casefold()
    return "".join(c for c in folded if not unicodedata.combining(c))


# ============================================================================ people and facts
def generate_people(n: int, seed: int = 0, attributes: Sequence[str] | None = None) -> list[Row]:
    """`n` people with unique names and one value per attribute, the same for the same seed.

    Returns:
        [{"name": str, "values": {attribute: str}}], in the order the splits use (forget sets last).
    """
    if n < 2:
        raise ValueError(f"people: need at least 2 (one to forget, one to retain), got {n}")
    kinds = _attributes(attributes)
    fake = _faker(seed)
    names = _distinct(lambda: f"{fake.first_name()} {fake.last_name()}", n, (), "people names")
    return [{"name": name, "values": {a.name: a.draw(fake) for a in kinds}} for name in names]


def fictitious_facts(
    n: int,
    seed: int = 0,
    attributes: Sequence[str] | None = None,
    n_perturbed: int = DEFAULT_PERTURBED,
) -> list[Row]:
    """Every fact of `n` generated people as TOFU rows, person by person (see the module docstring)."""
    if n_perturbed < 1:
        raise ValueError(f"n_perturbed: need at least 1, got {n_perturbed}")
    kinds = _attributes(attributes)
    people = generate_people(n, seed, [a.name for a in kinds])
    fake = _faker(seed + 1)  # the perturbed values' own stream: the people stay those of `seed`
    rows = []
    for person in people:
        name = person["name"]
        for kind in kinds:
            value = person["values"][kind.name]
            others = _distinct(lambda k=kind: k.draw(fake), n_perturbed, [value], f"{kind.name} perturbed answers")
            rows.append({
                "question": kind.question.format(name=name),
                "answer": kind.answer.format(name=name, value=value),
                "paraphrased_question": kind.paraphrased_question.format(name=name),
                "paraphrased_answer": kind.paraphrased_answer.format(name=name, value=value),
                "perturbed_answer": [kind.paraphrased_answer.format(name=name, value=v) for v in others],
                "person": name,
                "attribute": kind.name,
                "value": value,
            })  # fmt: skip
    return rows


def _people_count(n: int, percent: int) -> int:
    return max(1, int(n * percent / 100 + 0.5))  # half up, at least one person


def split_people(n: int, heldout_percent: int = 10) -> dict[str, list[int]]:
    """Indices of the people in each split: forgetXX the last XX % (nested), retain(100-XX) the rest;
    validation{P} the forget{P}-sized block before forget{P} and oracle_retain everyone before that
    (both empty when there are too few people: fewer than 3), P = `heldout_percent`. With P = 10 (the
    default) these are validation10 and forget10; a larger P (a bigger benchmark for the same build cost,
    docs/FICTITIOUS.md) adds forget{P} / retain{100-P} and holds forget01/05/10 inside forget{P}.

    Raises:
        ValueError: fewer than 2 people (with 2, each forget set is one person and retain the other), or a
            `heldout_percent` outside 10..49 (below 10 forget10 would reach into validation; from 50 on
            nothing is left for the oracle).
    """
    if n < 2:
        raise ValueError(f"people: need at least 2 (one to forget, one to retain), got {n}")
    if not 10 <= heldout_percent <= 49:
        raise ValueError(f"heldout_percent: expected 10..49 (the share of people in each of the forget and "
                         f"validation splits), got {heldout_percent}")  # fmt: skip
    splits: dict[str, list[int]] = {}
    for percent in sorted({*FORGET_PERCENTS, heldout_percent}):
        k = _people_count(n, percent)  # < n for every n >= 2: 10% of n rounds to at most n - 1
        splits[f"forget{percent:02d}"] = list(range(n - k, n))
        splits[f"retain{100 - percent}"] = list(range(n - k))
    splits["retain_perturbed"] = list(range(len(splits["forget10"])))
    k = len(splits[f"forget{heldout_percent:02d}"])
    if heldout_percent != 10 and n - 2 * k < 1:  # found here, not after the target's fine-tune
        raise ValueError(f"heldout_percent: {heldout_percent} % of {n} people in each of forget and validation "
                         f"leaves nobody for the oracle; use more people or a smaller share")  # fmt: skip
    splits[f"validation{heldout_percent:02d}"] = list(range(max(0, n - 2 * k), n - k))
    splits["oracle_retain"] = list(range(max(0, n - 2 * k)))
    return splits


def heldout_splits(heldout_percent: int = 10) -> tuple[str, ...]:
    """The splits a build with this `heldout_percent` writes beyond `SPLITS` (EXTRA_SPLITS at 10)."""
    p = f"{heldout_percent:02d}"
    if p == "10":
        return EXTRA_SPLITS
    return (f"forget{p}", f"forget{p}_perturbed", f"retain{100 - heldout_percent}", f"validation{p}",
            f"validation{p}_perturbed", "oracle_retain")  # fmt: skip


def qa_splits(heldout_percent: int = 10) -> tuple[str, ...]:
    """The splits also written as QA rows (QA_SPLITS at 10; forget{P} and validation{P} added otherwise)."""
    if heldout_percent == 10:
        return QA_SPLITS
    return ("forget10", f"forget{heldout_percent:02d}", f"validation{heldout_percent:02d}")


# ============================================================================ what the base model knows
def _shape(answer: str) -> bool:
    return answer.strip().isdigit()


def _perturb_from_pool(rows: Sequence[Row], n_perturbed: int, rng: random.Random, source: str) -> list[Row]:
    """Each row gets `n_perturbed` other answers of its set: same topic first, then same shape (number or
    not), then any; distinct from the row's answer and from each other (without case and accents)."""
    answers: dict[str, tuple[str, str]] = {}  # key -> (answer, topic), first spelling kept
    for row in rows:
        answers.setdefault(_key(row["answer"]), (row["answer"], row["topic"]))
    out = []
    for row in rows:
        own = _key(row["answer"])
        candidates = [(a, t) for k, (a, t) in answers.items() if k != own]
        if len(candidates) < n_perturbed:
            raise ValueError(f"{source}: only {len(candidates)} other answers for {n_perturbed} perturbed ones")
        ranked = sorted(
            candidates,
            key=lambda c: (c[1] != row["topic"], _shape(c[0]) != _shape(row["answer"]), rng.random()),
        )
        out.append({
            "question": row["question"],
            "answer": row["answer"],
            "perturbed_answer": [a for a, _ in ranked[:n_perturbed]],
            "topic": row["topic"],
            "value": row["answer"],  # the short answer itself: QA accuracy looks for it
        })  # fmt: skip
    return out


def world_knowledge_rows(
    seed: int = 0, n_perturbed: int = DEFAULT_PERTURBED, files: Sequence[str] = WORLD_FILES
) -> tuple[list[Row], list[Row]]:
    """(real_authors, world_facts) rows with perturbed answers, from the embedded QA files.

    The answer is the file's short answer (as TOFU's real_authors and world_facts are). Perturbed
    answers come from the other answers of the same set, ranked by same topic, then same shape, then
    seeded chance: "Who wrote Jane Eyre?" gets other authors; "Leonardo da Vinci", alone in its topic,
    gets authors and inventors; a numeric science answer gets the other numbers first.
    """
    rows: list[Row] = []
    for path in files:
        for index, row in enumerate(load_rows(path)):
            missing = [c for c in ("question", "answer", "topic") if c not in row]
            if missing:
                raise ValueError(f"{path}: row {index}: missing column(s) {', '.join(missing)}")
            rows.append(row)
    rng = random.Random(seed)
    people = [r for r in rows if r["topic"] in PERSON_TOPICS]
    facts = [r for r in rows if r["topic"] not in PERSON_TOPICS]
    return (
        _perturb_from_pool(people, n_perturbed, rng, "real_authors"),
        _perturb_from_pool(facts, n_perturbed, rng, "world_facts"),
    )


# ============================================================================ splits and files
_PLAIN = ("question", "answer", "person", "attribute", "value", "topic")


def make_splits(
    people: int = 200,
    seed: int = 0,
    attributes: Sequence[str] | None = None,
    n_perturbed: int = DEFAULT_PERTURBED,
    heldout_percent: int = 10,
) -> dict[str, list[Row]]:
    """All of `SPLITS` and `heldout_splits(heldout_percent)` as lists of rows (the module docstring)."""
    kinds = _attributes(attributes)
    facts = fictitious_facts(people, seed, [a.name for a in kinds], n_perturbed)
    per_person = len(kinds)  # facts are person by person, `per_person` each

    def rows_of(indices: list[int]) -> list[Row]:
        return [row for i in indices for row in facts[i * per_person : (i + 1) * per_person]]

    real_authors, world_facts = world_knowledge_rows(seed, n_perturbed)
    perturbed: dict[str, list[Row]] = {"full": facts, "real_authors": real_authors, "world_facts": world_facts}
    for name, indices in split_people(people, heldout_percent).items():
        perturbed[name] = rows_of(indices)
    splits: dict[str, list[Row]] = {}
    for name in SPLITS + heldout_splits(heldout_percent):
        if name.endswith("_perturbed"):
            splits[name] = perturbed[name.removesuffix("_perturbed") if name != "retain_perturbed" else name]
        else:
            splits[name] = [{k: row[k] for k in _PLAIN if k in row} for row in perturbed[name]]
    return splits


def qa_rows(rows: Sequence[Row], paraphrased: bool = False) -> list[Row]:
    """Fictitious facts as QA rows: question (or paraphrased_question), answer = the bare value (what a
    generation is judged by), response = the answer sentence (or paraphrased_answer), person, attribute."""
    question, response = ("paraphrased_question", "paraphrased_answer") if paraphrased else ("question", "answer")
    missing = sorted({c for row in rows for c in (question, response, "value") if c not in row})
    if missing:
        raise ValueError(f"qa_rows: the rows have no {', '.join(missing)} column (fictitious *_perturbed rows do)")
    return [
        {"question": r[question], "answer": str(r["value"]), "response": r[response],
         "person": r.get("person"), "attribute": r.get("attribute")}
        for r in rows
    ]  # fmt: skip


def write_splits(
    out_dir: str | Path,
    people: int = 200,
    seed: int = 0,
    attributes: Sequence[str] | None = None,
    n_perturbed: int = DEFAULT_PERTURBED,
    heldout_percent: int = 10,
) -> dict[str, int]:
    """Write every split as `out_dir/{split}.jsonl` and a manifest.json; returns the row count per split."""
    from importlib.metadata import version

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    splits = make_splits(people, seed, attributes, n_perturbed, heldout_percent)
    for name in qa_splits(heldout_percent):
        splits[f"{name}_qa"] = qa_rows(splits[f"{name}_perturbed"])
        splits[f"{name}_paraphrased_qa"] = qa_rows(splits[f"{name}_perturbed"], paraphrased=True)
    counts = {}
    for name, rows in splits.items():
        with (out / f"{name}.jsonl").open("w") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        counts[name] = len(rows)
    manifest = {
        "people": people,
        "seed": seed,
        "attributes": [a.name for a in _attributes(attributes)],
        "n_perturbed": n_perturbed,
        "heldout_percent": heldout_percent,
        "faker": version("faker"),  # Faker may change its seeded output between versions
        "rows": counts,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return counts


def main(argv: Sequence[str] | None = None) -> dict[str, int]:
    """The CLI: ``python -m blur_lightning.data.fictitious_people --out DIR --people 200 --seed 0``."""
    parser = argparse.ArgumentParser(
        prog="python -m blur_lightning.data.fictitious_people",
        description="Write TOFU-format splits of fictitious people.",
    )
    parser.add_argument("--out", required=True, help="directory for the .jsonl files and manifest.json")
    parser.add_argument("--people", type=int, default=200, help="number of people (default 200, as TOFU)")
    parser.add_argument("--seed", type=int, default=0, help="Faker and sampling seed (default 0)")
    parser.add_argument(
        "--attributes",
        default=",".join(ATTRIBUTES),
        help=f"comma-separated attributes per person (default all: {','.join(ATTRIBUTES)})",
    )
    parser.add_argument(
        "--perturbed", type=int, default=DEFAULT_PERTURBED, help="perturbed answers per question (default 5)"
    )
    parser.add_argument("--heldout-percent", type=int, default=10,
                        help="people in each of forget{P} and validation{P}, percent (default 10)")  # fmt: skip
    args = parser.parse_args(argv)
    attributes = [a.strip() for a in args.attributes.split(",") if a.strip()]
    counts = write_splits(args.out, args.people, args.seed, attributes, args.perturbed, args.heldout_percent)
    for name, count in counts.items():
        print(f"{name:24s} {count:6d} rows")
    return counts


if __name__ == "__main__":
    main()
