"""Where a model meets the memorization metrics and the membership-inference attacks.

One teacher-forced forward per example (:func:`blur_lightning.evals.scoring.score_rows` with
``vocab_stats``, batched by length and sharded over ranks like every other score) gives everything but
GradNorm: the token log-probs (LOSS, ZLib, Min-K%, and the reference model's loss for the Reference
attack), each position's argmax hit (exact memorization, extraction strength) and the mean and
variance of log p(v) (Min-K%++). GradNorm needs each example's own gradient: one forward and backward
per example (:func:`gradient_norms`), about three forwards' time at batch size one, which is why the
benchmarks leave it off unless asked (docs/METRICS.md has the measured cost).

Definitions: :mod:`blur_lightning.evals.memorization` and :mod:`blur_lightning.evals.mia`. Rows are
encoded by the benchmark (``{"input_ids", "labels"}``, labels -100 outside the scored text), so each
benchmark decides what is scored: TOFU's answers, MUSE's texts, the demo's answers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

import torch
from torch import Tensor

from blur_lightning.data.encoding import pad_side
from blur_lightning.evals.memorization import NoMatch, drop_last_scored, exact_memorization, extraction_strength
from blur_lightning.evals.metric_classes import ExactMemorization, ExtractionStrength, MembershipAUC
from blur_lightning.evals.mia import (
    ATTACKS,
    MIA_NAMES,
    gradnorm_score,
    loss_scores,
    min_k_attack_scores,
    min_k_plus_plus_scores,
    privleak_from_auc,
    reference_scores,
    zlib_scores,
)
from blur_lightning.evals.scoring import _token_scores, model_device, score_rows
from blur_lightning.evals.sharding import GATHERED, gather_batch_results, is_sharded, process_world, rank_batches
from blur_lightning.losses.functional import IGNORE_INDEX
from blur_lightning.models.loading import pad_token_id
from blur_lightning.training.progress import progress

__all__ = [
    "DEFAULT_ATTACKS",
    "RUN_REFERENCE",
    "evaluate_memorization",
    "evaluate_mia",
    "evaluate_privacy",
    "gradient_norms",
    "load_reference_model",
    "privacy_options",
    "row_statistics",
    "scored_texts",
]

EncodedRow = dict[str, list[int]]
# The attacks run unless an evaluation's options say otherwise: all but GradNorm (a backward per example,
# docs/METRICS.md) and Reference (needs a reference model: on when one is named).
DEFAULT_ATTACKS = ("loss", "zlib", "min_k", "min_k_plus_plus")
# options.reference_model_path naming the run's own frozen reference copy (the evaluation callback hands it
# over): the Reference attack then measures the change from the model the run started from
RUN_REFERENCE = "run"
_STATISTICS = ("loss", "min_k", "min_k_plus_plus", "exact_memorization", "extraction_strength")


# ============================================================================ options
def privacy_options(options: Mapping[str, Any], *, has_holdout: bool) -> dict[str, Any]:
    """Pop the memorization / MIA options out of a benchmark's options, checked, with defaults.

    Keys (all optional): ``memorization`` (bool, default true: exact memorization and extraction
    strength on the forget set), ``mia_attacks`` (list of :data:`~blur_lightning.evals.mia.ATTACKS`;
    default :data:`DEFAULT_ATTACKS`, plus ``reference`` when a reference model is named; ``[]``: none;
    they run only with a holdout set), ``mia_k`` (0.4: Min-K% and Min-K%++), ``gradnorm_p`` (2),
    ``reference_model_path`` (a local model folder for the Reference attack, e.g. the retain model as in
    open-unlearning; ``run``: the run's frozen reference copy, the model before unlearning, which the
    evaluation callback hands over), ``privleak_ref_auc``
    (the retain model's ``mia_min_k`` AUC for PrivLeak; default: the retain log's when one is given,
    else open-unlearning's ``ref_value`` 0.5), ``extraction_no_match`` ("open-unlearning" or "zero",
    see evals.memorization), ``drop_last_token`` (true: open-unlearning leaves each text's last
    labelled token out of EM, ES, Min-K%, Min-K%++ and GradNorm).

    Args:
        options: the benchmark's options; the keys above are removed from it (a dict is modified).
        has_holdout: whether a holdout set is evaluated (the attacks need one).

    Returns:
        The checked options, every key present.
    """
    out = {
        "memorization": bool(options.pop("memorization", True)),
        "mia_k": float(options.pop("mia_k", 0.4)),
        "gradnorm_p": options.pop("gradnorm_p", 2),
        "reference_model_path": options.pop("reference_model_path", None),
        "reference_model": options.pop("reference_model", None),
        "privleak_ref_auc": options.pop("privleak_ref_auc", None),
        "extraction_no_match": options.pop("extraction_no_match", "open-unlearning"),
        "drop_last_token": bool(options.pop("drop_last_token", True)),
    }
    has_reference = out["reference_model_path"] is not None or out["reference_model"] is not None
    attacks = options.pop("mia_attacks", None)
    if attacks is None:
        attacks = [*DEFAULT_ATTACKS, *(["reference"] if has_reference else [])]
    if isinstance(attacks, str) or not all(isinstance(a, str) for a in attacks):
        raise ValueError(f"options.mia_attacks must be a list of attack names {list(ATTACKS)}, got {attacks!r}")
    unknown = [a for a in attacks if a not in ATTACKS]
    if unknown:
        raise ValueError(f"options.mia_attacks: unknown attacks {unknown}; expected any of {list(ATTACKS)}")
    if "reference" in attacks and not has_reference:
        raise ValueError("options.mia_attacks has 'reference' but no options.reference_model_path (the reference "
                         "model whose loss the attack subtracts, e.g. the retain model)")  # fmt: skip
    if out["gradnorm_p"] in ("inf", float("inf")):
        out["gradnorm_p"] = float("inf")
    if out["gradnorm_p"] not in (1, 2, float("inf")):
        raise ValueError(f"options.gradnorm_p must be 1, 2 or inf, got {out['gradnorm_p']!r}")
    if not 0.0 < out["mia_k"] <= 1.0:
        raise ValueError(f"options.mia_k must be in (0, 1], got {out['mia_k']}")
    if out["extraction_no_match"] not in ("open-unlearning", "zero"):
        raise ValueError(f"options.extraction_no_match must be 'open-unlearning' or 'zero', "
                         f"got {out['extraction_no_match']!r}")  # fmt: skip
    out["mia_attacks"] = list(dict.fromkeys(attacks)) if has_holdout else []
    return out


# ============================================================================ per-row statistics
def _reduce(logprobs: Tensor, mask: Tensor, stats: Mapping[str, Tensor], *, k: float, no_match: NoMatch,
            drop_last: bool) -> tuple[Tensor, ...]:  # fmt: skip
    """The per-row statistics of one scored batch, in the order of ``_STATISTICS``."""
    short = drop_last_scored(mask) if drop_last else mask
    return (
        loss_scores(logprobs, mask),
        min_k_attack_scores(logprobs, short, k),
        min_k_plus_plus_scores(logprobs, stats["vocab_mean"], stats["vocab_var"], short, k),
        exact_memorization(stats["hit"], short),
        extraction_strength(stats["hit"], short, no_match),
    )


def row_statistics(
    model: torch.nn.Module,
    tokenizer: Any,
    rows: Sequence[EncodedRow],
    *,
    k: float = 0.4,
    no_match: NoMatch = "open-unlearning",
    drop_last: bool = True,
    batch_size: int = 8,
    desc: str = "score",
    show_progress: bool = True,
) -> dict[str, Tensor]:
    """Per-row statistics from one forward each: "loss" (mean token loss over all labelled tokens),
    "min_k", "min_k_plus_plus" (attack scores), "exact_memorization", "extraction_strength"; each an
    (N,) float64 CPU tensor in row order (every rank gets all of them)."""
    if not rows:
        return {name: torch.empty(0, dtype=torch.float64) for name in _STATISTICS}
    values = score_rows(
        model, tokenizer, rows, reduce=partial(_reduce, k=k, no_match=no_match, drop_last=drop_last),
        batch_size=batch_size, desc=desc, show_progress=show_progress, vocab_stats=True,
    )  # fmt: skip
    return dict(zip(_STATISTICS, values))


def scored_texts(tokenizer: Any, rows: Sequence[EncodedRow]) -> list[str]:
    """Each row's labelled tokens decoded without special tokens (what ZLib compresses; open-unlearning's
    ``extract_target_texts_from_processed_data``)."""
    return [
        tokenizer.decode([t for t, label in zip(r["input_ids"], r["labels"]) if label != IGNORE_INDEX],
                         skip_special_tokens=True)  # fmt: skip
        for r in rows
    ]


def gradient_norms(
    model: torch.nn.Module,
    tokenizer: Any,
    rows: Sequence[EncodedRow],
    *,
    p: float = 2,
    drop_last: bool = True,
    desc: str = "gradnorm",
    show_progress: bool = True,
) -> Tensor:
    """GradNorm attack scores: per row, the mean over trainable parameter tensors of the p-norm of the
    gradient of the row's mean token loss (:func:`~blur_lightning.evals.mia.gradnorm_score`).

    One forward and backward per row, in eval mode (no dropout; open-unlearning switches to train mode,
    the same for models without dropout such as Llama's), rows dealt to ranks one at a time. The
    gradient comes from ``torch.autograd.grad``: no ``.grad`` is written or cleared (a training step's
    accumulated gradients survive), no optimizer is touched, parameters are not changed; memory is one
    gradient set at a time.

    Returns:
        (N,) float64 CPU tensor in row order.

    Raises:
        ValueError: a model without trainable parameters, or an FSDP2-sharded one (its backward
            reduce-scatters inside hooks that ``autograd.grad`` does not drive: not supported).
    """
    params = [param for param in model.parameters() if param.requires_grad]
    if not params:
        raise ValueError("gradnorm: the model has no trainable parameter (requires_grad) to take a gradient of")
    if is_sharded(model):
        raise ValueError("gradnorm: FSDP2-sharded models are not supported; leave 'gradnorm' out of mia_attacks")
    pad_id, device = pad_token_id(tokenizer), model_device(model)
    rank, world_size = process_world()
    local: list[tuple[list[int], Tensor]] = []
    was_training = model.training
    model.eval()
    try:
        for batch in progress(rank_batches([[i] for i in range(len(rows))], rank, world_size, pad=False),
                              desc=desc, enabled=show_progress):  # fmt: skip
            side = pad_side([rows[batch[0]]], pad_id)
            with torch.enable_grad():
                logprobs, mask, _, _ = _token_scores(
                    model, side["input_ids"].to(device), side["attention_mask"].to(device), side["labels"].to(device)
                )
                mask = drop_last_scored(mask) if drop_last else mask
                loss = -logprobs[mask].mean()
                grads = torch.autograd.grad(loss, params, allow_unused=True)
            local.append((batch, gradnorm_score([g for g in grads if g is not None], p).reshape(1).cpu()))
            del grads, loss, logprobs
    finally:
        model.train(was_training)
    out = torch.full((len(rows),), float("nan"), dtype=torch.float64)
    for batch, value in gather_batch_results(local):
        out[batch[0]] = value[0]
    return out


# ============================================================================ evaluations
def evaluate_memorization(
    stats: Mapping[str, Tensor], *, prefix: str = ""
) -> dict[str, Any]:
    """Exact memorization and extraction strength of a set from its :func:`row_statistics`.

    Returns:
        ``{prefix}exact_memorization`` and ``{prefix}extraction_strength`` (means over rows, NaN rows
        left out) and ``{prefix}memorization/per_example`` with both per-row lists.
    """
    em, es = ExactMemorization(**GATHERED), ExtractionStrength(**GATHERED)
    em.add_values(stats["exact_memorization"])
    es.add_values(stats["extraction_strength"])
    return {
        f"{prefix}exact_memorization": em.compute().item(),
        f"{prefix}extraction_strength": es.compute().item(),
        f"{prefix}memorization/per_example": {
            "exact_memorization": em.per_example().tolist(), "extraction_strength": es.per_example().tolist(),
        },
    }  # fmt: skip


def evaluate_mia(
    model: torch.nn.Module,
    tokenizer: Any,
    forget: tuple[Sequence[EncodedRow], Mapping[str, Tensor]],
    holdout: tuple[Sequence[EncodedRow], Mapping[str, Tensor]],
    *,
    attacks: Sequence[str],
    gradnorm_p: float = 2,
    drop_last: bool = True,
    reference_model: torch.nn.Module | None = None,
    privleak_ref_auc: float | None = 0.5,
    batch_size: int = 8,
    show_progress: bool = True,
    name: str = "mia",
) -> dict[str, Any]:
    """The membership-inference attacks on a forget set against a holdout set.

    Args:
        model: the evaluated causal LM.
        tokenizer: its tokenizer.
        forget: (encoded rows, their :func:`row_statistics`), the member candidates.
        holdout: the same for texts the model never saw.
        attacks: names of :data:`~blur_lightning.evals.mia.ATTACKS`.
        gradnorm_p: GradNorm's norm.
        drop_last: GradNorm leaves each row's last labelled token out (open-unlearning).
        reference_model: the Reference attack's model (same tokenizer).
        privleak_ref_auc: PrivLeak's reference ``mia_min_k`` AUC; None: no PrivLeak.
        batch_size: rows per forward (reference model).
        show_progress: show progress bars.
        name: the progress bars' label.

    Returns:
        ``mia_{attack}`` (AUC, open-unlearning's convention), ``privleak`` (with ``min_k`` and a
        reference AUC) and ``mia_{forget,holdout}/per_example``: {attack: per-row scores}.
    """
    results: dict[str, Any] = {}
    parts = {"forget": forget, "holdout": holdout}
    scores: dict[str, dict[str, Tensor]] = {"forget": {}, "holdout": {}}
    for part, (rows, stats) in parts.items():
        for attack in attacks:
            if attack in ("loss", "min_k", "min_k_plus_plus"):
                scores[part][attack] = stats[attack]
            elif attack == "zlib":
                scores[part][attack] = zlib_scores(stats["loss"], scored_texts(tokenizer, rows))
            elif attack == "gradnorm":
                scores[part][attack] = gradient_norms(model, tokenizer, rows, p=gradnorm_p, drop_last=drop_last,
                                                      desc=f"{name} {part}: gradnorm", show_progress=show_progress)
            elif attack == "reference":
                if reference_model is None:
                    raise ValueError("the reference attack needs a reference model")
                (reference_loss,) = score_rows(
                    reference_model, tokenizer, rows, reduce=loss_scores, batch_size=batch_size,
                    desc=f"{name} {part}: reference", show_progress=show_progress,
                )  # fmt: skip
                scores[part][attack] = reference_scores(stats["loss"], reference_loss)
    for attack in attacks:
        auc = MembershipAUC(**GATHERED)
        auc.update(forget_scores=scores["forget"][attack], holdout_scores=scores["holdout"][attack])
        results[MIA_NAMES[attack]] = auc.compute().item()
    if "min_k" in attacks and privleak_ref_auc is not None:
        results["privleak"] = privleak_from_auc(results["mia_min_k"], privleak_ref_auc).item()
    for part in parts:
        results[f"mia_{part}/per_example"] = {attack: values.tolist() for attack, values in scores[part].items()}
    return results


def load_reference_model(path: str, like: torch.nn.Module) -> torch.nn.Module:
    """The Reference attack's model from a local folder, in the evaluated model's dtype and device."""
    from transformers import AutoModelForCausalLM

    dtype = next(like.parameters()).dtype
    try:
        model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=dtype, local_files_only=True)
    except OSError as err:
        raise ValueError(f"options.reference_model_path {path!r}: no model there ({err})") from err
    return model.to(model_device(like)).eval()


def evaluate_privacy(
    model: torch.nn.Module,
    tokenizer: Any,
    forget_rows: Sequence[EncodedRow],
    holdout_rows: Sequence[EncodedRow] | None,
    options: Mapping[str, Any],
    *,
    batch_size: int = 8,
    show_progress: bool = True,
    name: str = "privacy",
    mia_forget_rows: Sequence[EncodedRow] | None = None,
) -> dict[str, Any]:
    """Memorization on the forget rows and the attacks on forget against holdout, as ``options``
    (:func:`privacy_options`) select; {} when nothing is selected.

    Args:
        model: the evaluated causal LM.
        tokenizer: its tokenizer.
        forget_rows: encoded forget rows (labels on the scored text).
        holdout_rows: encoded holdout rows; None: no attack.
        options: :func:`privacy_options`' output (``privleak_ref_auc`` None: no PrivLeak).
        batch_size: rows per forward.
        show_progress: show progress bars.
        name: the progress bars' label.
        mia_forget_rows: the attacks' member rows when they are not ``forget_rows`` (MUSE: the privleak
            texts, while memorization reads verbmem's).
    """
    attacks = list(options["mia_attacks"]) if holdout_rows else []
    memorization = bool(options["memorization"]) and bool(forget_rows)
    if not memorization and not attacks:
        return {}
    common = {
        "k": options["mia_k"], "no_match": options["extraction_no_match"], "drop_last": options["drop_last_token"],
        "batch_size": batch_size, "show_progress": show_progress,
    }  # fmt: skip
    results: dict[str, Any] = {}
    forget_stats = None
    if memorization or (attacks and mia_forget_rows is None):
        forget_stats = row_statistics(model, tokenizer, forget_rows, desc=f"{name} forget: score", **common)
    if memorization:
        results.update(evaluate_memorization(forget_stats))
    if attacks:
        members = forget_rows
        if mia_forget_rows is not None:
            members = mia_forget_rows
            forget_stats = row_statistics(model, tokenizer, members, desc=f"{name} mia forget: score", **common)
        holdout_stats = row_statistics(model, tokenizer, holdout_rows, desc=f"{name} holdout: score", **common)
        reference = options.get("reference_model")
        if reference is None and "reference" in attacks:
            reference = load_reference_model(options["reference_model_path"], model)
        results.update(evaluate_mia(
            model, tokenizer, (members, forget_stats), (holdout_rows, holdout_stats), attacks=attacks,
            gradnorm_p=options["gradnorm_p"], drop_last=options["drop_last_token"], reference_model=reference,
            privleak_ref_auc=options["privleak_ref_auc"], batch_size=batch_size, show_progress=show_progress,
            name=name,
        ))  # fmt: skip
    return results
