"""EleutherAI's lm-evaluation-harness as a second multiple-choice scorer (WMDP, MMLU, any of its tasks).

:func:`evaluate_lm_eval` hands the in-memory model to lm-eval's HF wrapper (``HFLM(pretrained=<the
model>)``) and runs ``lm_eval.simple_evaluate`` on the named tasks; its ``acc`` / ``acc_norm`` and
their standard errors come back under our result keys (``{split}/accuracy``...). The WMDP benchmark
calls it with ``options: {scorer: lm_eval}`` (:mod:`blur_lightning.evals.wmdp`).

What differs from our own scorer (measured in tests/evals/test_harness.py and docs/METRICS.md): the
WMDP and MMLU task YAMLs of lm-eval 0.4.13 build the same text as :func:`~blur_lightning.evals.wmdp.wmdp_prompt`
(description line, stripped question, "A. ..." lines, "Answer:", targets " A".." D"), and both
prepend the tokenizer's own special tokens. lm-eval tokenizes prompt and answer together and cuts
at the prompt's own token count, where we tokenize them apart; with a tokenizer that merges across
"Answer:" | " A" the scored tokens differ (SmolLM2's and the test tokenizer do not): the WMDP benchmark
warns then (:func:`~blur_lightning.evals.wmdp.letter_split_mismatch`). lm-eval also reports ``acc_norm``
(log-likelihood per character of the answer) on tasks that list it; WMDP and MMLU list only ``acc``.

Precision: HFLM's forward runs in its own autocast, disabled unless given a dtype, which would switch
off the callback's; we hand it the autocast in force and a float32 log-softmax, as our scorer.

Supported models: any ``transformers`` causal LM in one process, a peft model included (HFLM reads
``.config`` and ``.device``, which peft forwards to the base model, and calls the adapted forward).
Several processes (DDP, FSDP) are refused: HFLM given a model instance evaluates it in one process as
a whole, and a sharded model would need its full weights on one rank; evaluate such a run with
``blur-lightning test`` on one device, or with our scorer, which shards the batches across ranks.

lm-eval is an optional dependency: ``pip install blur-lightning[lmeval]``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from blur_lightning.evals.base import Results
from blur_lightning.evals.scoring import eval_mode, model_device
from blur_lightning.evals.sharding import process_world

__all__ = ["LM_EVAL_METRICS", "evaluate_lm_eval", "lm_eval_results"]

# lm-eval's metric name -> our result name (the "none" filter: multiple-choice tasks have no other)
LM_EVAL_METRICS = {"acc": "accuracy", "acc_norm": "accuracy_norm"}


def _import_lm_eval() -> Any:
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as err:
        raise ImportError(
            "wmdp option scorer: lm_eval needs lm-evaluation-harness: pip install 'blur-lightning[lmeval]' "
            f"(lm-eval >= 0.4.13) ({err})"
        ) from err
    return lm_eval, HFLM, TaskManager


def evaluate_lm_eval(
    model: torch.nn.Module,
    tokenizer: Any,
    tasks: Mapping[str, str],
    *,
    limit: int | float | None = None,
    num_fewshot: int | None = 0,
    batch_size: int = 8,
    include_path: str | None = None,
    include_defaults: bool = True,
    per_example: bool = False,
) -> Results:
    """lm-eval's results on its tasks, under our keys.

    Args:
        model: a causal LM (transformers, or peft over one), in this process.
        tokenizer: its tokenizer.
        tasks: our split name -> lm-eval task or group name ("wmdp_bio", "mmlu", a local task's name).
        limit: at most this many documents per task (a float in (0, 1): that share); None: all.
        num_fewshot: examples in the prompt (0, as the WMDP paper; None: each task's own default).
        batch_size: requests per forward.
        include_path: a folder of task YAMLs lm-eval also reads (local tasks over local files).
        include_defaults: also index lm-eval's own tasks (14k YAML files, ~10 s on one CPU core);
            False with only local tasks skips that.
        per_example: also return each document's choice log-likelihoods, target, prompt and scored
            continuations under ``{split}/per_example`` (tasks only, not groups).

    Returns:
        ``{split}/accuracy``, ``{split}/accuracy_stderr`` (and ``accuracy_norm`` where the task lists
        ``acc_norm``), ``{split}/n`` for tasks, and with `per_example` the per-document lists.

    Raises:
        RuntimeError: several processes (see the module docstring).
        ValueError: a task lm-eval does not know, or one without an ``acc`` metric.
    """
    _, world_size = process_world()
    if world_size > 1:
        raise RuntimeError(
            f"wmdp option scorer: lm_eval runs in one process (HFLM evaluates a whole model instance); this run "
            f"has {world_size} processes: evaluate with `blur-lightning test` on one device, or use scorer: ours"
        )
    lm_eval, HFLM, TaskManager = _import_lm_eval()
    names = list(dict.fromkeys(tasks.values()))
    manager = TaskManager(include_path=include_path, include_defaults=include_defaults)
    missing = [t for t in names if t not in manager.all_tasks]
    if missing:
        where = f"include_path {include_path!r} read" if include_path else "set lm_eval.include_path for local ones"
        raise ValueError(f"wmdp option lm_eval.tasks: lm-eval knows no task {missing} ({where})")
    pad = tokenizer.pad_token
    try:
        with eval_mode(model):
            lm = HFLM(
                pretrained=model, tokenizer=tokenizer, batch_size=batch_size,
                # HFLM wraps each forward in its own autocast, disabled unless given a dtype, which
                # switches off the callback's (bf16-mixed: measured 1.3e-3 nats off our scorer on
                # the tiny Llama): hand it the autocast in force here
                mixed_precision_dtype=_autocast_dtype(model),
                # our scorer's log-softmax is float32 whatever the logits' dtype (bf16-true weights)
                softmax_dtype=torch.float32,
            )  # fmt: skip
            output = lm_eval.simple_evaluate(
                model=lm, tasks=names, num_fewshot=num_fewshot, limit=limit, task_manager=manager,
                log_samples=per_example,
                # lm-eval reseeds python, numpy and torch by default: inside a training run that would
                # replace the run's RNG state at every evaluation
                random_seed=None, numpy_random_seed=None, torch_random_seed=None,
            )  # fmt: skip
    finally:
        if pad is None:  # HFLM gives a tokenizer without one its unk or eos as pad: the run's tokenizer keeps none
            tokenizer.pad_token = None
    return lm_eval_results(output, tasks)


def _autocast_dtype(model: torch.nn.Module) -> torch.dtype | None:
    """The dtype of the autocast enabled on the model's device, or None."""
    device = model_device(model).type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None


def lm_eval_results(output: Mapping[str, Any], tasks: Mapping[str, str]) -> Results:
    """``simple_evaluate``'s output under our keys (see :func:`evaluate_lm_eval`)."""
    results: Results = {}
    for split, task in tasks.items():
        found = output["results"].get(task)
        if found is None or "acc,none" not in found:
            raise ValueError(f"lm-eval task {task!r} (split {split!r}) reported no 'acc': {sorted(found or {})}")
        for metric, ours in LM_EVAL_METRICS.items():
            if f"{metric},none" in found:
                results[f"{split}/{ours}"] = float(found[f"{metric},none"])
                stderr = found.get(f"{metric}_stderr,none")
                if isinstance(stderr, (int, float)):  # "N/A" for a single document
                    results[f"{split}/{ours}_stderr"] = float(stderr)
        counted = output.get("n-samples", {}).get(task)
        if counted is not None:  # a group has none of its own
            results[f"{split}/n"] = float(counted["effective"])
        samples = output.get("samples", {}).get(task)
        if samples is not None:
            samples = sorted(samples, key=lambda s: s["doc_id"])
            results[f"{split}/per_example"] = {
                "loglik": [[float(r[0]) for r in s["filtered_resps"]] for s in samples],
                "target": [int(s["target"]) for s in samples],
                "prompt": [s["arguments"][0][0] for s in samples],  # the text before every choice
                "choices": [[a[1] for a in s["arguments"]] for s in samples],  # as scored: " A", " B"...
            }
    return results
