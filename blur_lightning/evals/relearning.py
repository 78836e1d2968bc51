"""The relearning probe: was the knowledge removed, or only suppressed?

An unlearned model that answers 0% of the forget questions may still hold the facts, with only
the path to them blocked; then a little fine-tuning on *some* of the forgotten facts brings back
the *others* too (the relearning attacks of Hu et al. 2024 and Deeb & Roger 2024). The probe:

1. split the forget rows in two halves by position (even rows: `relearn`, odd rows: `held_back`);
2. fine-tune a copy of the model on the `relearn` half only (NLL on the answers, AdamW) for
   `steps` steps, as an attacker with part of the data would;
3. measure QA accuracy on the `held_back` half (never seen by the probe) and on any extra
   probe sets (e.g. paraphrased questions), before and after.

Knowledge that comes back on `held_back` was still in the weights. The copy is thrown away: the
model passed in is never changed. `relearn` accuracy after the probe says whether the attack
itself worked (if it did not, a low `held_back` figure proves nothing).
"""

from __future__ import annotations

import copy
import os
import random
import time
import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import torch

from blur_lightning.core.nonfinite import current_scale
from blur_lightning.core.step import apply_update, check_and_clip_
from blur_lightning.data.encoding import encode_qa_rows, pad_side
from blur_lightning.data.prompts import PromptFormat
from blur_lightning.data.rows import load_rows, require_columns
from blur_lightning.evals.qa import evaluate_qa, summarize
from blur_lightning.evals.scoring import AUTOCAST_DTYPES, autocast_for, model_device
from blur_lightning.evals.sharding import is_sharded
from blur_lightning.losses.functional import nll_loss
from blur_lightning.models import adapters
from blur_lightning.models.loading import pad_token_id
from blur_lightning.training.progress import progress
from blur_lightning.training.runs import log_dir, write_json
from blur_lightning.training.stage_times import stage as timed_stage

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

Rows = Sequence[Mapping[str, Any]]

__all__ = ["RelearningProbe", "relearning_probe", "split_halves", "trainable_copy"]


def split_halves(rows: Rows) -> tuple[list[Mapping[str, Any]], list[Mapping[str, Any]]]:
    """(relearn, held_back): even and odd positions, so both halves span the file's order."""
    return list(rows[0::2]), list(rows[1::2])


def trainable_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A plain copy of `model` to fine-tune and throw away: ``copy.deepcopy``, or, for an FSDP2 model
    (DTensor parameters), a whole unsharded copy rebuilt from ``model.config`` on every rank.

    Under FSDP2 the probe gathers the full weights on every rank (a collective: all ranks call
    this) and each rank trains its own whole copy on the same batches, so the copies stay equal
    and the evaluation after the probe shards over ranks as usual. Memory per rank: the full model
    twice while copying, then the copy and its AdamW state (3x the full model in all), what one
    process pays; a model too big for that needs the probe run on the exported checkpoint instead.

    Raises:
        ValueError: an FSDP2 model without a transformers ``config`` to rebuild it from.
    """
    if not is_sharded(model):
        return copy.deepcopy(model)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import FSDPModule

    config = getattr(model, "config", None)
    if config is None:
        raise ValueError("relearning probe under FSDP2: the model has no `config` to rebuild an unsharded copy from")
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    plain_class = next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))  # fully_shard's subclass off
    first = next(iter(full.values()))
    with torch.device(first.device):
        attacker = plain_class(config).to(first.dtype)
    attacker.load_state_dict(full)
    del full
    trainable = {name: p.requires_grad for name, p in model.named_parameters()}
    for name, p in attacker.named_parameters():
        p.requires_grad_(trainable.get(name, True))
    return attacker


def relearning_probe(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    forget_rows: Rows,
    *,
    probe_sets: Mapping[str, Rows] | None = None,
    steps: int = 10,
    lr: float = 1e-5,
    batch_size: int = 8,
    train_column: str = "response",
    answer_column: str = "answer",
    prob_column: str | None = "response",
    max_length: int = 96,
    max_new_tokens: int = 16,
    eval_batch_size: int = 32,
    seed: int = 0,
    prompt_format: str | PromptFormat = "auto",
    train_rows: Rows | None = None,
    show_progress: bool = True,
    known_before: Mapping[tuple[str, str, str], tuple[bool, float]] | None = None,
    precision: str | None = None,
    gradient_clip_val: float | None = None,
    gradient_clip_algorithm: str = "norm",
) -> dict[str, dict[str, float]]:
    """Fine-tune a copy of `model` on half of the forget rows; measure the other half.

    Args:
        model: the (unlearned) causal LM; not modified.
        tokenizer: its tokenizer.
        forget_rows: QA rows of the forget set (question, answer and `train_column`).
        probe_sets: more sets to measure before and after, name -> rows (e.g. paraphrases of the
            held-back questions). Rows whose answer is a `relearn` answer are dropped from them,
            so every probe measures facts the probe never trained on.
        steps: optimizer steps of the probe (batches of `batch_size` relearn rows, reshuffled
            each pass).
        lr: AdamW learning rate (no weight decay).
        batch_size: rows per step.
        train_column: the column trained on (the model's own answer sentences by default).
        answer_column: the gold answer, for accuracy.
        prob_column: the column whose probability is reported (None: `answer_column`).
        max_length: tokens per training row (prompt + answer).
        max_new_tokens: greedy tokens per answer in the accuracy check.
        eval_batch_size: rows per forward / generate call in the evaluation.
        seed: the order of the relearn batches.
        prompt_format: as in training (a name of :data:`blur_lightning.data.prompts.PROMPT_FORMATS`).
        train_rows: fine-tune on these rows instead of the relearn half: the control of the
            probe (facts unrelated to the forget set bring back only what any fine-tuning would).
        show_progress: show progress bars (on a terminal).
        known_before: per-question results of `model` already measured with the same settings
            (``(question, answer, scored text) -> (correct, answer prob)``, e.g. the fit-end QA
            evaluation's): a set whose every question is in it is not measured again "before".
        precision: the training run's Lightning precision ("32-true", "bf16-mixed", "16-mixed", ...):
            the probe's forwards run under the same autocast, and "16-mixed" gets a GradScaler of the
            probe's own. None: float32.
        gradient_clip_val: clip the probe's gradient (None or 0: no clipping), as training does.
        gradient_clip_algorithm: "norm" or "value", as training's.

    Returns:
        ``{set name: {"accuracy_before", "accuracy_after", "answer_prob_before",
        "answer_prob_after", "n"}}`` for ``relearn``, ``held_back`` and every probe set.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if len(forget_rows) < 2:
        raise ValueError(f"the relearning probe needs at least 2 forget rows, got {len(forget_rows)}")
    relearn, held_back = split_halves(forget_rows)
    relearned_answers = {str(row[answer_column]) for row in relearn}
    sets: dict[str, list[Mapping[str, Any]]] = {"relearn": relearn, "held_back": held_back}
    for name, rows in (probe_sets or {}).items():
        kept = [row for row in rows if str(row[answer_column]) not in relearned_answers]
        if not kept:
            raise ValueError(f"probe set {name!r}: no row left once the relearned answers are dropped")
        sets[name] = kept

    def measure(m: torch.nn.Module, when: str, which: Mapping[str, Rows]) -> dict[str, dict[str, float]]:
        kwargs = {
            "answer_column": answer_column, "prob_column": prob_column, "max_new_tokens": max_new_tokens,
            "batch_size": eval_batch_size, "prompt_format": prompt_format, "show_progress": show_progress,
        }
        with autocast_for(precision, model_device(m)):  # measured in the precision it was trained in
            return {
                name: evaluate_qa(m, tokenizer, rows, name=f"probe {name} {when}", **kwargs)
                for name, rows in which.items()
            }

    scored = prob_column or answer_column
    memo = known_before or {}
    keys = {name: [(str(r["question"]), str(r[answer_column]), str(r[scored])) for r in rows]
            for name, rows in sets.items()}  # fmt: skip
    reused = {name: summarize({"correct": [memo[k][0] for k in ks], "answer_prob": [memo[k][1] for k in ks]})
              for name, ks in keys.items() if all(k in memo for k in ks)}  # fmt: skip
    missing = {name: rows for name, rows in sets.items() if name not in reused}
    before = {**reused, **(measure(model, "before", missing) if missing else {})}
    attacker = trainable_copy(model)
    skipped = _fine_tune(
        attacker, tokenizer, relearn if train_rows is None else train_rows, steps=steps, lr=lr,
        batch_size=batch_size, column=train_column,
        max_length=max_length, seed=seed, prompt_format=prompt_format, show_progress=show_progress,
        precision=precision, gradient_clip_val=gradient_clip_val, gradient_clip_algorithm=gradient_clip_algorithm,
    )
    if skipped:
        warnings.warn(f"relearning probe: {skipped} of {steps} steps skipped (non-finite loss or gradient)",
                      RuntimeWarning, stacklevel=2)  # fmt: skip
    after = measure(attacker, "after", sets)
    del attacker
    return {
        name: {
            "accuracy_before": before[name]["accuracy"],
            "accuracy_after": after[name]["accuracy"],
            "answer_prob_before": before[name]["answer_prob"],
            "answer_prob_after": after[name]["answer_prob"],
            "n": before[name]["n"],
        }
        for name in sets
    }


def _trained_format(trainer: pl.Trainer) -> str:
    """The data module's prompt format (the probe asks as training did); "auto" without one."""
    return getattr(trainer.datamodule, "prompt_format", None) or "auto"


def _fine_tune(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    rows: Rows,
    *,
    steps: int,
    lr: float,
    batch_size: int,
    column: str,
    max_length: int,
    seed: int,
    prompt_format: str | PromptFormat,
    show_progress: bool = True,
    precision: str | None = None,
    gradient_clip_val: float | None = None,
    gradient_clip_algorithm: str = "norm",
) -> int:
    """Plain NLL fine-tuning on the answers of `rows`, in place; returns the number of skipped steps.

    Each step ends as the training steps do (`core.step`): a non-finite step is skipped (and still
    counts), the true gradient is clipped, and under "16-mixed" a GradScaler of the probe's own
    scales the loss, unscales for the clip and backs off on overflow.
    """
    encoded, _ = encode_qa_rows(
        tokenizer, [str(r["question"]) for r in rows], [str(r[column]) for r in rows],
        max_length=max_length, prompt_format=prompt_format,
    )
    encoded = [row for row in encoded if row is not None]
    if not encoded:
        raise ValueError(f"no relearn row has an answer token within max_length={max_length}")
    pad_id = pad_token_id(tokenizer)
    device = model_device(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    scaler = torch.amp.GradScaler(device.type) if AUTOCAST_DTYPES.get(precision or "") == torch.float16 else None
    step = (lambda: (scaler.step(optimizer), scaler.update())) if scaler is not None else None
    rng = random.Random(seed)
    order: list[int] = []
    skipped = torch.zeros((), dtype=torch.long, device=device)
    was_training = model.training
    model.train()
    try:
        for _ in progress(range(steps), desc="probe: relearn", enabled=show_progress):
            if len(order) < batch_size:  # a fresh shuffled pass once the current one runs short
                order += rng.sample(range(len(encoded)), len(encoded))
            batch = pad_side([encoded[i] for i in order[:batch_size]], pad_id)
            del order[:batch_size]
            with autocast_for(precision, device):
                logits = model(
                    input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
                ).logits
                loss = nll_loss(logits, batch["labels"].to(device))
            (scaler.scale(loss) if scaler is not None else loss).backward()
            grads = [p.grad for p in params if p.grad is not None]
            scale = current_scale(scaler)  # a device tensor: no host read
            finite = check_and_clip_(loss.detach(), grads, max_value=gradient_clip_val,
                                     algorithm=gradient_clip_algorithm, scale=scale)  # fmt: skip
            skipped += (~finite).long()
            apply_update(optimizer, finite, grads, scale=scale, step=step)
            optimizer.zero_grad(set_to_none=True)
    finally:
        model.train(was_training)
    return int(skipped)


class RelearningProbe(pl.Callback):
    """At fit end, test whether the forgotten facts were removed or only suppressed.

    A throwaway copy of the unlearned model is fine-tuned on half of the forget set (even rows)
    and the other half (odd rows, never seen by the probe) is measured before and after, with any
    extra probe sets (paraphrased questions); see :func:`relearning_probe`. The trained
    model and its export are not touched. Writes ``relearning.json`` and ``relearning.md`` in the
    log directory. Under DDP and FSDP2 every rank trains its own whole copy on the same batches
    (see :func:`trainable_copy`) and the evaluations shard over ranks: one process's numbers.
    Runs in ``on_train_end``, while the model is still on its device and sharded (Lightning's
    ``on_fit_end`` runs after the strategy's teardown moved it to the CPU).

    Args:
        forget_path: the forget QA file (question, answer, `train_column`).
        probe_sets: more sets to measure, name -> QA file (rows whose answer the probe relearns
            are dropped from them).
        steps: optimizer steps of the probe.
        lr: its AdamW learning rate.
        batch_size: rows per probe step.
        train_column: the column the probe trains on.
        max_length: tokens per probe training row.
        max_new_tokens: greedy tokens per answer in the accuracy check.
        eval_batch_size: rows per evaluation forward / generate call.
        seed: the order of the probe's batches.
    """

    def __init__(
        self,
        forget_path: str,
        probe_sets: dict[str, str] | None = None,
        steps: int = 10,
        lr: float = 1e-5,
        batch_size: int = 8,
        train_column: str = "response",
        max_length: int = 96,
        max_new_tokens: int = 16,
        eval_batch_size: int = 32,
        seed: int = 0,
    ) -> None:
        if steps < 1:
            raise ValueError(f"RelearningProbe: steps must be >= 1, got {steps}")
        self._forget = load_rows(forget_path)
        require_columns(self._forget, ("question", "answer", train_column), f"RelearningProbe: {forget_path}")
        self._probe_sets = {name: load_rows(path) for name, path in (probe_sets or {}).items()}
        for name, rows in self._probe_sets.items():
            require_columns(rows, ("question", "answer"), f"RelearningProbe: probe set {name!r} ({probe_sets[name]})")
        self.steps, self.lr, self.batch_size, self.seed = steps, lr, batch_size, seed
        self.train_column, self.max_length = train_column, max_length
        self.max_new_tokens, self.eval_batch_size = max_new_tokens, eval_batch_size
        self.results: dict[str, dict[str, float]] = {}

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if pl_module.tokenizer is None:
            raise ValueError("RelearningProbe needs the module's tokenizer (load the model by name)")
        t0 = time.perf_counter()
        model = pl_module.model
        if adapters.has_adapters(model):  # the attacker fine-tunes every weight, not only the adapters
            model = adapters.cpu_copy(model).merge_and_unload().to(pl_module.device)
        with timed_stage(trainer, "relearning probe"):
            self.results = relearning_probe(
                model, pl_module.tokenizer, self._forget, probe_sets=self._probe_sets, steps=self.steps,
                lr=self.lr, batch_size=self.batch_size, train_column=self.train_column,
                prob_column=self.train_column, max_length=self.max_length, max_new_tokens=self.max_new_tokens,
                eval_batch_size=self.eval_batch_size, seed=self.seed, prompt_format=_trained_format(trainer),
                show_progress=trainer.progress_bar_callback is not None, known_before=self._known(trainer),
                # the training run's precision and clip: the probe's steps end as the training steps do
                precision=str(trainer.precision), gradient_clip_val=pl_module.hparams.get("gradient_clip_val"),
                gradient_clip_algorithm=pl_module.hparams.get("gradient_clip_algorithm", "norm"),
            )  # fmt: skip
        out_dir = log_dir(trainer)  # on every rank: trainer.log_dir is a broadcast under DDP / FSDP
        if not trainer.is_global_zero:
            return  # every rank holds the same results
        table = self.table()
        print(f"\nRelearning probe ({time.perf_counter() - t0:.0f} s)\n{table}", flush=True)
        hp = pl_module.hparams
        settings = {"steps": self.steps, "lr": self.lr, "batch_size": self.batch_size, "seed": self.seed,
                    "precision": str(trainer.precision), "gradient_clip_val": hp.get("gradient_clip_val"),
                    "gradient_clip_algorithm": hp.get("gradient_clip_algorithm", "norm")}  # fmt: skip
        write_json(os.path.join(out_dir, "relearning.json"), {"settings": settings, "results": self.results})
        with open(os.path.join(out_dir, "relearning.md"), "w") as f:
            f.write(table + "\n")

    def _known(self, trainer: pl.Trainer) -> dict:
        """The fit-end QA evaluation's per-question results of this model, when taken with this probe's
        settings at this step (a callback with ``qa_memo``: EvaluationCallback): not measured twice."""
        for callback in trainer.callbacks:
            if not hasattr(callback, "qa_memo"):
                continue
            settings, memo = callback.qa_memo("fit_end")
            wanted = {"max_new_tokens": self.max_new_tokens, "prompt_format": _trained_format(trainer),
                      "step": trainer.global_step}  # fmt: skip
            if memo and settings == wanted:
                return memo
        return {}

    def table(self) -> str:
        after = f"after {self.steps} relearning steps"
        lines = [
            f"| set | n | accuracy | {after} | answer prob | {after} |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for name, r in self.results.items():
            lines.append(
                f"| {name} | {r['n']:.0f} | {r['accuracy_before']:.1%} | {r['accuracy_after']:.1%}"
                f" | {r['answer_prob_before']:.3f} | {r['answer_prob_after']:.3f} |"
            )
        return "\n".join(lines)
