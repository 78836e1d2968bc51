"""Removal probes on the fictitious benchmark: is the knowledge gone, or only hidden?

Two attacks, each run on an unlearned model and on the retain oracle the same way, so that what the
oracle shows (a model that never saw the facts) is the floor and only the gap above it is knowledge left
in the weights:

* :func:`fictitious_relearning`: the relearning probe (evals/relearning.py) on the forget facts as QA
  rows: fine-tune a copy on every other fact (half of each forget person's attributes), measure the
  other half and their paraphrases. A model that never saw the people can only guess the held-back
  facts, whatever it relearns.
* :func:`quantization_probe`: weight-only round-to-nearest at 8 and 4 bits (blur_lightning.models.quantize,
  torchao), then the forget questions again (Zhang et al., ICLR 2025: 4 bits undid most of gradient
  unlearning). Read the probabilities and truth ratios beside the accuracy: a 135M model sits close
  to its decision margins (quantize.py), and the quantized oracle moves too.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from blur_lightning.data.fictitious_people import qa_rows
from blur_lightning.data.rows import Row
from blur_lightning.evals.metrics import forget_quality
from blur_lightning.evals.qa import evaluate_qa
from blur_lightning.evals.relearning import relearning_probe
from blur_lightning.evals.tofu import prompt_template, truth_ratios

__all__ = ["fictitious_relearning", "forget_facts", "quantization_probe"]


def forget_facts(
    model: Any, tokenizer: Any, rows: Sequence[Row], *, batch_size: int = 32, max_new_tokens: int = 32,
    reference_ratios: Sequence[float] | torch.Tensor | None = None, show_progress: bool = False,
) -> dict[str, Any]:  # fmt: skip
    """What `model` knows of the forget facts (fictitious *_perturbed rows): accuracy and answer
    probability on the questions and their paraphrases, the per-example truth ratios, and the forget
    quality against `reference_ratios` when given."""
    kwargs = {"prob_column": "response", "max_new_tokens": max_new_tokens, "batch_size": batch_size,
              "show_progress": show_progress}  # fmt: skip
    asked = evaluate_qa(model, tokenizer, qa_rows(rows), name="forget facts", **kwargs)
    paraphrased = evaluate_qa(model, tokenizer, qa_rows(rows, paraphrased=True), name="forget paraphrased", **kwargs)
    ratios = truth_ratios(model, tokenizer, rows, prompt_template=prompt_template(tokenizer), batch_size=batch_size,
                          show_progress=show_progress)  # fmt: skip
    out: dict[str, Any] = {
        "accuracy": asked["accuracy"],
        "answer_prob": asked["answer_prob"],
        "paraphrased_accuracy": paraphrased["accuracy"],
        "paraphrased_prob": paraphrased["answer_prob"],
        "truth_ratios": ratios.tolist(),
    }
    if reference_ratios is not None:
        reference = torch.as_tensor(reference_ratios, dtype=torch.float64)
        out["forget_quality"] = float(forget_quality(ratios, reference))
    return out


def quantization_probe(
    model: Any, tokenizer: Any, rows: Sequence[Row], *, bits: Sequence[int] = (8, 4),
    reference_ratios: Mapping[int, Sequence[float]] | None = None, batch_size: int = 32,
    show_progress: bool = False,
) -> dict[int, dict[str, Any]]:  # fmt: skip
    """:func:`forget_facts` of `model` quantized to each of `bits` (weight-only, blur_lightning.models.quantize).

    A LoRA model is merged before rounding; each result says so (``"merged_adapters"``).

    Args:
        reference_ratios: bits -> the quantized oracle's per-example truth ratios (this function's
            "truth_ratios" on the oracle); each bit width's forget quality is taken against its own.
    """
    from blur_lightning.models import adapters
    from blur_lightning.models.quantize import quantize_weights

    merged = adapters.has_adapters(model)
    results = {}
    for b in bits:
        quantized = quantize_weights(model, b)
        reference = (reference_ratios or {}).get(b)
        results[b] = forget_facts(quantized, tokenizer, rows, batch_size=batch_size, reference_ratios=reference,
                                  show_progress=show_progress)  # fmt: skip
        results[b]["merged_adapters"] = merged
        del quantized
    return results


def fictitious_relearning(
    model: Any, tokenizer: Any, rows: Sequence[Row], *, steps: int = 10, lr: float = 1e-4, batch_size: int = 8,
    seed: int = 0, show_progress: bool = False,
) -> dict[str, dict[str, float]]:  # fmt: skip
    """The relearning probe on fictitious forget facts (*_perturbed rows, person by person).

    Even rows are relearned, odd rows held back (relearning.split_halves): with a person's attributes in
    a fixed order, each forget person has half of their facts in each half. The paraphrased questions of
    the held-back facts are measured too. Returns relearning_probe's table: relearn, held_back, paraphrased.
    """
    return relearning_probe(
        model, tokenizer, qa_rows(rows), probe_sets={"paraphrased": qa_rows(rows, paraphrased=True)}, steps=steps,
        lr=lr, batch_size=batch_size, train_column="response", answer_column="answer", prob_column="response",
        max_new_tokens=32, seed=seed, show_progress=show_progress,
    )  # fmt: skip
