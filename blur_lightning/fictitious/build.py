"""The fictitious benchmark's two models, built once and cached: the target and the retain oracle.

TOFU's forget quality compares an unlearned model with a model that never saw the forget set. Here
both come from the embedded SmolLM2-135M-Instruct and one recipe (`Recipe`), fine-tuned with
``blur-lightning finetune`` (blur_lightning.training.finetune: the project's module, data module, checkpoints
and CLI):

* the **target** on every fact (``full``): the model to unlearn;
* the **oracle** on ``oracle_retain`` only: the people in neither forget10 nor validation10.

A build writes, under ``<cache>/fictitious/<recipe key>/`` (``$BLUR_LIGHTNING_CACHE`` or
``~/.cache/blur_lightning``): ``data/`` (the splits, blur_lightning.data.fictitious_people), ``target/`` and
``oracle/`` (Hugging Face directories), ``oracle_truth_ratios/{forget01,forget05,forget10,
validation10}.json`` (the oracle's per-example truth ratios, saved once: forget quality of any model
is a KS test against them), the two fine-tune configs as run, and ``build.json`` (the recipe, the
time of each stage, and the calibration: target and oracle accuracy on forget10). Each stage is
skipped when its output exists; an interrupted fine-tune resumes from its last checkpoint.

One oracle for both forget10 and validation10, a documented choice: the exact oracle of forget10
alone would also have seen the validation people (and that of validation10 the forget10 people).
Ours saw neither, so one fine-tune serves both: the people whose truth ratios are compared are never
seen by it either way, and it lacks 10 % of the other people's facts (40 of 200 at the default size).

In a config, ``fictitious:NAME`` names a file of the default recipe's build (the CLI builds it on
first use; blur_lightning.cli): ``fictitious:target``, ``fictitious:oracle``,
``fictitious:data/forget10_perturbed.jsonl``, ``fictitious:oracle_truth_ratios/forget10.json``.
Other recipes: ``python -m blur_lightning.fictitious.build --people 100 --seed 1`` builds one and prints its
folder.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from blur_lightning.data import fictitious_people as fictitious
from blur_lightning.training.runs import write_json

__all__ = ["LARGE", "ORACLE_SPLITS", "PREFIX", "Recipe", "build", "build_dir", "main", "resolve", "resolve_names"]

PREFIX = "fictitious:"
VERSION = 1  # bump when a build's outputs change meaning: old builds are then not reused
ORACLE_SPLITS = ("forget01", "forget05", "forget10", "validation10")


@dataclasses.dataclass(frozen=True)
class Recipe:
    """What a build is made of; its `key` names the build folder.

    The default was chosen on this project's 2-core CPU (docs/FICTITIOUS.md has the calibration): 50
    people x 4 facts, AdamW at lr 2e-4 (no weight decay, constant), batch 8, answer tokens only, 10
    epochs (25 steps each). 8 epochs, the issue's calibration for 30 people, left the target at 85 % of
    the forget10 questions (17 of 20; paraphrases 65 %) and 100 % of validation10's (70 %): short of the
    90 % goal, so 10 epochs, which the issue measured at 93 % / 91 %.
    """

    people: int = 50
    seed: int = 0
    attributes: tuple[str, ...] = ("birthplace", "profession", "birth_year", "book")
    n_perturbed: int = fictitious.DEFAULT_PERTURBED
    base_model: str = "embedded:smollm2-135m-instruct"
    lr: float = 2e-4
    epochs: int = 10
    batch_size: int = 8
    max_length: int = 96
    model_dtype: str = "float32"
    # The share of people (percent) in each of the held-out splits forget{P} and validation{P}; 10 is TOFU's
    # forget10 beside our validation10. The larger benchmark (`LARGE`) takes 25 of 80 people: 80 questions
    # in each split at 1.3x the default build's fine-tune cost, where 200 people x 4 facts (80 questions in
    # TOFU's forget10) would cost 4x (docs/FICTITIOUS.md).
    heldout_percent: int = 10

    def __post_init__(self) -> None:
        if self.people < 3:
            raise ValueError(f"people: need at least 3 (forget, validation and oracle people), got {self.people}")
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected at least 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr: expected a positive number, got {self.lr}")
        fictitious.split_people(self.people, self.heldout_percent)  # a clear error for an impossible share
        object.__setattr__(self, "attributes", tuple(self.attributes))

    def key(self) -> str:
        fields = dataclasses.asdict(self) | {"version": VERSION}
        if self.heldout_percent == 10:  # the field came later: builds made before it keep their key
            del fields["heldout_percent"]
        digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:10]
        return f"p{self.people}-s{self.seed}-{digest}"

    @property
    def forget_split(self) -> str:
        """The held-out forget split the comparison reports on (forget10 by default)."""
        return f"forget{self.heldout_percent:02d}"

    @property
    def validation_split(self) -> str:
        """The split hyperparameters are chosen on (validation10 by default)."""
        return f"validation{self.heldout_percent:02d}"

    def oracle_splits(self) -> tuple[str, ...]:
        """The splits whose oracle truth ratios a build saves (`ORACLE_SPLITS` by default)."""
        if self.heldout_percent == 10:
            return ORACLE_SPLITS
        return ("forget01", "forget05", "forget10", self.forget_split, self.validation_split)


# The larger benchmark of issue 21 (benchmarks/oracle_comparison.py --recipe large): 80 people x 4 facts, the
# last 20 people forget25 (80 questions), the 20 before them validation25 (80), the first 40 the oracle's.
LARGE = Recipe(people=80, heldout_percent=25)


def build_dir(recipe: Recipe | None = None, root: str | os.PathLike | None = None) -> Path:
    """The folder of `recipe`'s build (built or not)."""
    from blur_lightning.models.loading import cache_dir

    recipe = recipe or Recipe()
    return (Path(root).expanduser() if root is not None else cache_dir() / "fictitious") / recipe.key()


# ============================================================================ the fine-tunes
def finetune_config(recipe: Recipe, train_file: Path, export_dir: Path, run_dir: Path) -> dict[str, Any]:
    """The `blur-lightning finetune` config of one of the two models (written beside the build)."""
    return {
        "seed_everything": recipe.seed,
        "trainer": {
            "accelerator": "auto",
            "devices": 1,
            "max_epochs": recipe.epochs,
            "max_steps": -1,
            "log_every_n_steps": 1,
            "limit_val_batches": 0,
            "num_sanity_val_steps": 0,
            "enable_model_summary": False,
            "default_root_dir": str(run_dir),
            "logger": {
                "class_path": "lightning.pytorch.loggers.CSVLogger",
                "init_args": {"save_dir": str(run_dir), "name": "", "version": ""},
            },
            "callbacks": [
                {  # an interrupted build resumes from here (each is 1.6 GB for SmolLM2: weights + AdamW)
                    "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {
                        "dirpath": str(run_dir / "checkpoints"),
                        "every_n_epochs": 2,
                        "save_last": True,
                        "save_top_k": 1,
                    },
                },  # fmt: skip
                {"class_path": "blur_lightning.training.stage_times.StageTimes"},
            ],
        },
        "model": {
            "model": recipe.base_model,
            "model_dtype": recipe.model_dtype,
            "export_dir": str(export_dir),
            "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": recipe.lr, "weight_decay": 0.0}},
        },
        "data": {
            "forget_path": None,
            "retain_path": str(train_file),
            "format": "qa",
            "answer_column": "answer",
            "max_length": recipe.max_length,
            "batch_size": recipe.batch_size,
            "seed": recipe.seed,
        },
    }


def _finetune(recipe: Recipe, folder: Path, role: str, train_split: str, quiet: bool) -> float:
    """Fine-tune one model into folder/role (through a temporary folder); returns the seconds taken."""
    run_dir = folder / f"{role}_run"
    partial = folder / f"{role}.partial"
    config = finetune_config(recipe, folder / "data" / f"{train_split}.jsonl", partial, run_dir)
    config_path = folder / f"{role}.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    command = [sys.executable, "-m", "blur_lightning.cli", "finetune", "--config", str(config_path)]
    if (run_dir / "checkpoints" / "last.ckpt").exists():
        command += ["--ckpt_path", str(run_dir / "checkpoints" / "last.ckpt")]
    print(f"[oracle] fine-tuning the {role} on {train_split} ({recipe.epochs} epochs): {' '.join(command)}", flush=True)
    start = time.perf_counter()
    out = subprocess.run(command, capture_output=quiet, text=True)
    if out.returncode != 0:
        tail = (out.stderr or "")[-3000:] if quiet else ""
        raise RuntimeError(f"fine-tuning the {role} failed (exit {out.returncode}); config {config_path}\n{tail}")
    if not (partial / "config.json").exists():
        raise RuntimeError(f"fine-tuning the {role} exported nothing to {partial}")
    os.replace(partial, folder / role)
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # 1.6 GB each; the model is exported
    return time.perf_counter() - start


def _steps_taken(folder: Path, role: str) -> int | None:
    """Optimizer steps of a finished fine-tune, from its metrics.csv (logged every step)."""
    path = folder / f"{role}_run" / "metrics.csv"
    if not path.exists():
        return None
    lines = path.read_text().splitlines()
    steps = [int(line.split(",")[1]) for line in lines[1:] if line.split(",")[1].isdigit()]
    return max(steps) + 1 if steps else None


# ============================================================================ the oracle's truth ratios
def _save_oracle_truth_ratios(folder: Path, splits: Sequence[str] = ORACLE_SPLITS, batch_size: int = 32) -> None:
    from blur_lightning.data.rows import load_rows
    from blur_lightning.evals.tofu import prompt_template, truth_ratios
    from blur_lightning.models.loading import load_causal_lm, load_tokenizer

    model = load_causal_lm(str(folder / "oracle"))
    tokenizer = load_tokenizer(str(folder / "oracle"))
    model.eval()
    # The prompt the benchmark evaluates with (prompt_format "auto", the default): the same ratios, or the KS
    # test compares two different measurements.
    template = prompt_template(tokenizer)
    out = folder / "oracle_truth_ratios"
    out.mkdir(exist_ok=True)
    for split in splits:
        rows = load_rows(str(folder / "data" / f"{split}_perturbed.jsonl"))
        values = truth_ratios(model, tokenizer, rows, prompt_template=template, batch_size=batch_size,
                              show_progress=False).tolist()  # fmt: skip
        write_json(str(out / f"{split}.json"), {
            "truth_ratio": {str(i): v for i, v in enumerate(values)},
            "model": str(folder / "oracle"),
            "prompt_template": template,
            "perturbed_mean": "geometric",
        })  # fmt: skip


def _calibration(folder: Path, split: str = "forget10", batch_size: int = 32) -> dict[str, Any]:
    """Target and oracle on the forget10 facts: what the recipe must deliver (the target answers them,
    the oracle does not) and the forget quality of each against the oracle's file."""
    from blur_lightning.evals.base import EvalSettings
    from blur_lightning.evals.registry import evaluate_benchmark
    from blur_lightning.models.loading import load_causal_lm, load_tokenizer

    rows = evaluation_rows(folder, split)
    options = {"oracle_truth_ratios": str(folder / "oracle_truth_ratios" / f"{split}.json")}
    settings = EvalSettings(batch_size=batch_size, show_progress=False)
    keep = ("forget_quality", "model_utility", "forget/accuracy", "forget/paraphrased_accuracy", "forget/prob",
            "retain/accuracy", "real_authors/accuracy", "world_facts/accuracy")  # fmt: skip
    report = {}
    for role in ("target", "oracle"):
        model = load_causal_lm(str(folder / role))
        model.eval()
        results = evaluate_benchmark("fictitious", model, load_tokenizer(str(folder / role)), rows, settings, options)
        report[role] = {k: results[k] for k in keep if k in results}
    return report


def evaluation_rows(folder: Path, forget_split: str = "forget10", max_world: int | None = None) -> dict[str, list]:
    """The fictitious benchmark's four sets of a build: `forget_split` (forget10, validation10...), the
    retain set, real authors and world facts (the last two cut to `max_world` rows when given)."""
    from blur_lightning.data.rows import load_rows

    data = folder / "data"
    rows = {
        "forget": load_rows(str(data / f"{forget_split}_perturbed.jsonl")),
        "retain": load_rows(str(data / "retain_perturbed.jsonl")),
        "real_authors": load_rows(str(data / "real_authors_perturbed.jsonl")),
        "world_facts": load_rows(str(data / "world_facts_perturbed.jsonl")),
    }
    if max_world is not None:
        rows["real_authors"], rows["world_facts"] = rows["real_authors"][:max_world], rows["world_facts"][:max_world]
    return rows


# ============================================================================ the build
@contextlib.contextmanager
def _locked(folder: Path):
    """One builder at a time per folder (ranks of one job, or two jobs, starting together)."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def build(
    recipe: Recipe | None = None, root: str | os.PathLike | None = None, *, quiet: bool = False,
    calibrate: bool = True,
) -> Path:  # fmt: skip
    """Build (or find) `recipe`'s data, target, oracle and oracle truth ratios; returns the folder.

    Args:
        recipe: what to build (None: the default `Recipe`).
        root: the folder holding builds (None: ``<cache>/fictitious``).
        quiet: capture the fine-tunes' output (shown only when one fails).
        calibrate: evaluate target and oracle on forget10 into build.json (about a minute each).
    """
    recipe = recipe or Recipe()
    folder = build_dir(recipe, root)
    summary_path = folder / "build.json"
    if summary_path.exists():
        return folder
    with _locked(folder):
        if summary_path.exists():  # another process finished it while this one waited
            return folder
        times: dict[str, float] = {}
        start = time.perf_counter()
        if not (folder / "data" / "manifest.json").exists():
            fictitious.write_splits(folder / "data", recipe.people, recipe.seed, recipe.attributes, recipe.n_perturbed,
                                    recipe.heldout_percent)  # fmt: skip
        times["data_s"] = time.perf_counter() - start
        for role, split in (("target", "full"), ("oracle", "oracle_retain")):
            if not (folder / role / "config.json").exists():
                times[f"{role}_s"] = _finetune(recipe, folder, role, split, quiet)
        start = time.perf_counter()
        if not all((folder / "oracle_truth_ratios" / f"{s}.json").exists() for s in recipe.oracle_splits()):
            _save_oracle_truth_ratios(folder, recipe.oracle_splits())
        times["oracle_truth_ratios_s"] = time.perf_counter() - start
        summary: dict[str, Any] = {
            "recipe": dataclasses.asdict(recipe), "version": VERSION, "times": times,
            "steps": {role: _steps_taken(folder, role) for role in ("target", "oracle")},
        }  # fmt: skip
        if calibrate:
            start = time.perf_counter()
            summary["calibration"] = _calibration(folder, recipe.forget_split)
            times["calibration_s"] = time.perf_counter() - start
        write_json(str(summary_path), summary)
    return folder


def resolve(name: str, recipe: Recipe | None = None, root: str | os.PathLike | None = None) -> str:
    """The path a ``fictitious:NAME`` stands for, building the recipe first when needed.

    Raises:
        ValueError: not a ``fictitious:`` name, or one naming nothing a build holds.
    """
    if not name.startswith(PREFIX):
        raise ValueError(f"{name!r}: not a {PREFIX}NAME")
    rest = name[len(PREFIX) :].strip("/")
    top = rest.split("/", 1)[0]
    known = ("target", "oracle", "data", "oracle_truth_ratios")
    if top not in known or ".." in rest.split("/"):
        raise ValueError(f"{name!r}: expected {PREFIX}NAME with NAME under one of {known}")
    path = build(recipe, root) / rest
    if not path.exists():
        raise ValueError(f"{name!r}: the build at {path.parent} has no {path.name}")
    return str(path)


def resolve_names(config: Any, resolver: Callable[[str], str] | None = None) -> Any:
    """Replace every ``fictitious:`` string inside `config` (a jsonargparse Namespace, dict or list,
    nested) by its path (`resolver`, default `resolve`), in place where the container allows; returns
    the config."""
    resolver = resolver or resolve  # the module's `resolve` at call time (tests swap it)
    if isinstance(config, str):
        return resolver(config) if config.startswith(PREFIX) else config
    if isinstance(config, list):
        config[:] = [resolve_names(v, resolver) for v in config]
        return config
    if isinstance(config, dict):
        for key, value in config.items():
            config[key] = resolve_names(value, resolver)
        return config
    if hasattr(config, "__dict__") and type(config).__name__ == "Namespace":
        for key, value in vars(config).items():
            setattr(config, key, resolve_names(value, resolver))
    return config


def main(argv: Sequence[str] | None = None) -> Path:
    """``python -m blur_lightning.fictitious.build [--people N] [--seed S] ...``: build a recipe, print its folder."""
    defaults = Recipe()
    parser = argparse.ArgumentParser(
        prog="python -m blur_lightning.fictitious.build", description=__doc__.split("\n")[0]
    )
    for field in ("people", "seed", "epochs", "batch_size", "heldout_percent"):
        parser.add_argument(f"--{field.replace('_', '-')}", type=int, default=getattr(defaults, field))
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--attributes", default=",".join(defaults.attributes))
    parser.add_argument("--base-model", default=defaults.base_model)
    parser.add_argument("--root", default=None, help="folder of builds (default <cache>/fictitious)")
    parser.add_argument("--no-calibration", action="store_true",
                        help="skip evaluating target and oracle into build.json (the comparison's reference stage "
                             "measures the same)")  # fmt: skip
    args = parser.parse_args(argv)
    recipe = Recipe(
        people=args.people, seed=args.seed, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
        attributes=tuple(a.strip() for a in args.attributes.split(",") if a.strip()), base_model=args.base_model,
        heldout_percent=args.heldout_percent,
    )  # fmt: skip
    folder = build(recipe, args.root, calibrate=not args.no_calibration)
    print(folder)
    print((folder / "build.json").read_text())
    return folder


if __name__ == "__main__":
    main()
