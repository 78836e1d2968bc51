"""Where a model meets text: token and sequence log-probs, continuation scores, greedy generation.

Every evaluation of the package scores or generates through this file, and pads through one
routine (:func:`blur_lightning.data.encoding.pad_side`: right padding to score, left to generate). Rows
are batched by length (less padding) and results come back in the input order, as CPU tensors or
lists with one entry per example. Under DDP and FSDP2 each rank runs its share of the batches and
every rank gets all results (:mod:`blur_lightning.evals.sharding`): the callers are unchanged.

Everything runs under ``torch.no_grad`` with the model in eval mode (its mode restored afterwards).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from blur_lightning.data.encoding import pad_side
from blur_lightning.evals.mia import log_prob_moments
from blur_lightning.evals.sharding import gather_batch_results, lockstep, process_world, rank_batches
from blur_lightning.losses.functional import IGNORE_INDEX
from blur_lightning.models.loading import pad_token_id
from blur_lightning.training.progress import progress

__all__ = [
    "AUTOCAST_DTYPES",
    "END_OF_TURN",
    "autocast_for",
    "eval_mode",
    "generate_greedy",
    "greedy_continuations",
    "length_batches",
    "model_device",
    "score_rows",
    "sequence_scores",
    "sequence_scores_with_top2",
    "stop_token_ids",
    "token_scores",
    "VOCAB_STATS",
]

# End-of-turn tokens of common chat formats: generation stops at any of them, not only at eos.
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>")

EncodedRow = dict[str, list[int]]
# What score_rows(vocab_stats=True) reads off a forward per scored position: whether the argmax is the
# label, and the mean and variance of log p(v) under the model's next-token distribution.
VOCAB_STATS = ("hit", "vocab_mean", "vocab_var")


# Lightning's mixed precisions -> their autocast dtype ("-true" ones: the weights are already in it)
AUTOCAST_DTYPES = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


def autocast_for(precision: str | None, device: torch.device) -> contextlib.AbstractContextManager:
    """The autocast of a Lightning mixed precision ("bf16-mixed", "16-mixed"), as its training steps
    run; a no-op for the others. ("-true" precisions also change torch's default dtype in Lightning's
    own context, which an evaluation's float64 metrics must not inherit.)"""
    dtype = AUTOCAST_DTYPES.get(precision or "32-true")
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a model without parameters)."""
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


@contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """``torch.no_grad`` and eval mode for the block; the model's mode is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        model.train(was_training)


def length_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Row indices grouped by similar length (less padding), as batches of ``batch_size``."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


# ============================================================================ scoring
def token_scores(
    model: torch.nn.Module, input_ids: Tensor, attention_mask: Tensor, labels: Tensor
) -> tuple[Tensor, Tensor]:
    """Per-token log p(token_t | tokens_<t) on the labelled positions.

    Args:
        model: a causal LM returning ``.logits`` (B, T, V).
        input_ids: (B, T) token ids.
        attention_mask: (B, T), 1 on real tokens.
        labels: (B, T) token ids, ``-100`` where nothing is scored.

    Returns:
        ``(logprobs, mask)``: (B, T-1) float32 log-probs of tokens 1..T-1 (0 where not scored) and the
        (B, T-1) bool mask. The log-softmax is taken on the scored positions only: a few answer
        tokens per row instead of the whole prompt, at V = 49k columns each.
    """
    logprobs, mask, _, _ = _token_scores(model, input_ids, attention_mask, labels)
    return logprobs, mask


def _token_scores(
    model: torch.nn.Module, input_ids: Tensor, attention_mask: Tensor, labels: Tensor, top2: bool = False,
    vocab_stats: bool = False,
) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor] | None, dict[str, Tensor] | None]:
    """:func:`token_scores`, plus (with `top2`) the argmax and top-1 minus top-2 logit margin at each
    scored position, flattened row-major (what :func:`blur_lightning.evals.replay.replay` reads), and
    (with `vocab_stats`) :data:`VOCAB_STATS` as (B, T-1) tensors (0 where not scored)."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits  # (B, T, V)
    targets = labels[:, 1:]  # (B, T-1): token t is predicted at position t-1
    mask = targets != IGNORE_INDEX
    scored = logits[:, :-1][mask].float()  # (n scored, V)
    logprobs = torch.zeros(targets.shape, dtype=torch.float32, device=logits.device)
    logprobs[mask] = -F.cross_entropy(scored, targets[mask], reduction="none")
    tops = None
    if top2:
        top = scored.topk(2, dim=-1)
        tops = (top.indices[:, 0], top.values[:, 0] - top.values[:, 1])
    stats = None
    if vocab_stats:
        stats = {name: torch.zeros(targets.shape, dtype=torch.float64, device=logits.device) for name in VOCAB_STATS}
        stats["hit"] = torch.zeros(targets.shape, dtype=torch.bool, device=logits.device)
        stats["hit"][mask] = scored.argmax(dim=-1) == targets[mask]
        means, variances = [], []
        # float64: the variance E[l^2] - mu^2 cancels, float32 moved Min-K%++ by 2e-5 relative on the tiny
        # model; in chunks of 256 positions, 100 MB at V = 49k instead of 6 GB for a batch of 2048-token texts
        for chunk in scored.split(256):
            mu, var = log_prob_moments(F.log_softmax(chunk.double(), dim=-1))
            means.append(mu)
            variances.append(var)
        if means:
            stats["vocab_mean"][mask] = torch.cat(means)
            stats["vocab_var"][mask] = torch.cat(variances)
    return logprobs, mask, tops, stats


def score_rows(
    model: torch.nn.Module,
    tokenizer: Any,
    rows: Sequence[EncodedRow],
    *,
    reduce: Callable[..., Tensor | tuple[Tensor, ...]],
    batch_size: int,
    desc: str = "score",
    show_progress: bool = True,
    vocab_stats: bool = False,
) -> tuple[Tensor, ...]:
    """Score encoded rows (``{"input_ids", "labels"}``) with the model, one reduction per row.

    Args:
        model: a causal LM.
        tokenizer: its tokenizer (for the pad id).
        rows: the encoded rows.
        reduce: ``(logprobs (B, T-1), mask (B, T-1)) -> (B,) tensor or tuple of (B,) tensors``; with
            ``vocab_stats``, ``(logprobs, mask, stats)``, stats the (B, T-1) tensors of :data:`VOCAB_STATS`.
        batch_size: rows per forward.
        desc: the progress bar's label.
        show_progress: show a progress bar (on a terminal).
        vocab_stats: also read each position's argmax hit and the mean and variance of log p(v) off the
            same forward (memorization and Min-K%++: evals.memorization, evals.mia).

    Returns:
        The reductions of all rows, each an (N,) CPU tensor in the input order.
    """
    local: list[tuple[list[int], tuple[Tensor, ...]]] = []
    for batch, logprobs, mask, _, stats in _scored_batches(
        model, tokenizer, rows, batch_size, desc, show_progress, vocab_stats=vocab_stats
    ):
        reduced = reduce(logprobs, mask, stats) if vocab_stats else reduce(logprobs, mask)
        reduced = reduced if isinstance(reduced, tuple) else (reduced,)
        if batch is not None:
            local.append((batch, tuple(values.detach().cpu() for values in reduced)))
    gathered = gather_batch_results(local)  # every rank's batches (this rank's alone in one process)
    if not gathered:
        return (torch.empty(0), torch.empty(0))
    outputs = [torch.empty(len(rows), dtype=r.dtype) for r in gathered[0][1]]
    for batch, reduced in gathered:
        index = torch.tensor(batch)
        for out, values in zip(outputs, reduced):
            out[index] = values
    return tuple(outputs)


def sequence_scores(
    model: torch.nn.Module,
    tokenizer: Any,
    rows: Sequence[EncodedRow],
    *,
    batch_size: int,
    desc: str = "score",
    show_progress: bool = True,
) -> tuple[Tensor, Tensor]:
    """(sum of scored-token log-probs, number of scored tokens) per row: two (N,) float32 tensors."""
    total, count = score_rows(
        model, tokenizer, rows, reduce=lambda lp, m: (lp.sum(dim=1), m.sum(dim=1).float()),
        batch_size=batch_size, desc=desc, show_progress=show_progress,
    )  # fmt: skip
    return total, count


def _scored_batches(
    model: torch.nn.Module,
    tokenizer: Any,
    rows: Sequence[EncodedRow],
    batch_size: int,
    desc: str,
    show_progress: bool,
    top2: bool = False,
    vocab_stats: bool = False,
) -> Iterator[tuple[list[int] | None, Tensor, Tensor, tuple[Tensor, Tensor] | None, dict[str, Tensor] | None]]:
    """(row indices, logprobs, mask, tops) per length-sorted, right-padded batch of this rank's share,
    in eval mode; row indices None for a dummy batch (FSDP2 keeps every rank's forwards in lockstep)."""
    pad_id = pad_token_id(tokenizer)
    device = model_device(model)
    batches = length_batches([len(r["input_ids"]) for r in rows], batch_size)
    rank, world_size = process_world()
    with eval_mode(model):
        for batch in progress(rank_batches(batches, rank, world_size, pad=lockstep(model)), desc=desc,
                              enabled=show_progress):  # fmt: skip
            side = pad_side([rows[i] for i in (batch or batches[0])], pad_id)  # None: a dummy forward (FSDP2)
            logprobs, mask, tops, stats = _token_scores(
                model, side["input_ids"].to(device), side["attention_mask"].to(device), side["labels"].to(device),
                top2=top2, vocab_stats=vocab_stats,
            )  # fmt: skip
            yield batch, logprobs, mask, tops, stats


def sequence_scores_with_top2(
    model: torch.nn.Module,
    tokenizer: Any,
    rows: Sequence[EncodedRow],
    *,
    batch_size: int,
    desc: str = "score",
    show_progress: bool = True,
) -> tuple[Tensor, Tensor, list[tuple[list[int], list[float]]]]:
    """:func:`sequence_scores` plus, per row, the argmax and the top-2 margin at each scored position
    (lists in position order), read off the same forward: what a greedy decoder would emit there."""
    local: list[tuple[list[int], tuple[list[float], list[float], list[tuple[list[int], list[float]]]]]] = []
    for batch, logprobs, mask, tops, _ in _scored_batches(
        model, tokenizer, rows, batch_size, desc, show_progress, top2=True
    ):
        if batch is None:
            continue
        ids, margins = tops[0].cpu().tolist(), tops[1].cpu().tolist()
        counts = mask.sum(dim=1).tolist()
        per_row, start = [], 0
        for n in counts:  # tops are row-major over the scored positions
            per_row.append((ids[start : start + n], margins[start : start + n]))
            start += n
        local.append((batch, (logprobs.sum(dim=1).cpu().tolist(), [float(n) for n in counts], per_row)))
    total = torch.empty(len(rows), dtype=torch.float32)
    count = torch.empty(len(rows), dtype=torch.float32)
    tops_per_row: list[tuple[list[int], list[float]]] = [([], [])] * len(rows)
    for batch, (sums, counts, per_row) in gather_batch_results(local):
        for i, row_sum, row_count, row_tops in zip(batch, sums, counts, per_row):
            total[i], count[i], tops_per_row[i] = row_sum, row_count, row_tops
    return total, count, tops_per_row


# ============================================================================ generation
def stop_token_ids(tokenizer: Any, model: Any) -> list[int]:
    """eos of the tokenizer and of the model's generation config, and any end-of-turn token of the vocabulary."""
    stop = set()
    if tokenizer.eos_token_id is not None:
        stop.add(tokenizer.eos_token_id)
    model_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if model_eos is not None:
        stop.update([model_eos] if isinstance(model_eos, int) else model_eos)
    vocab = tokenizer.get_vocab()
    stop.update(vocab[t] for t in END_OF_TURN if t in vocab)
    return sorted(stop)


def greedy_continuations(
    model: torch.nn.Module,
    tokenizer: Any,
    prompt_ids: Sequence[Sequence[int]],
    max_new_tokens: int,
    batch_size: int,
    *,
    stop_ids: Sequence[int] | None = None,
    desc: str = "generate",
    show_progress: bool = True,
) -> list[str]:
    """Greedy continuations of tokenized prompts, the new tokens decoded without special tokens (not stripped).

    Args:
        model: a causal LM with ``generate``.
        tokenizer: its tokenizer, for the pad token and decoding.
        prompt_ids: one list of token ids per prompt.
        max_new_tokens: most tokens generated per prompt.
        batch_size: prompts per ``generate`` call (left-padded batches of similar length).
        stop_ids: token ids that end a continuation (None: the model's generation config).
        desc: the progress bar's label.
        show_progress: show a progress bar (on a terminal).

    Returns:
        One continuation per prompt, in the input order.
    """
    from transformers import GenerationConfig

    if not prompt_ids:
        return []
    pad_id = pad_token_id(tokenizer)
    stop = list(stop_ids) if stop_ids is not None else getattr(model.generation_config, "eos_token_id", None)
    config = GenerationConfig(
        do_sample=False, num_beams=1, max_new_tokens=max_new_tokens, pad_token_id=pad_id, eos_token_id=stop
    )
    device = model_device(model)
    texts: list[str] = [""] * len(prompt_ids)
    batches = length_batches([len(p) for p in prompt_ids], batch_size)
    rank, world_size = process_world()
    synced = lockstep(model)  # FSDP2: the same generate calls, and decoding steps, on every rank
    local: list[tuple[list[int], list[str]]] = []
    with eval_mode(model):
        for batch in progress(rank_batches(batches, rank, world_size, pad=synced), desc=desc, enabled=show_progress):
            side = pad_side([{"input_ids": list(prompt_ids[i])} for i in (batch or batches[0])], pad_id, left=True)
            width = side["input_ids"].shape[1]
            out = model.generate(
                input_ids=side["input_ids"].to(device),
                attention_mask=side["attention_mask"].to(device),
                generation_config=config,
                synced_gpus=synced,
            )
            if batch is not None:
                local.append((batch, tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)))
    for batch, decoded in gather_batch_results(local):
        for i, text in zip(batch, decoded):
            texts[i] = text
    return texts


def generate_greedy(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    max_new_tokens: int = 32,
    batch_size: int = 8,
    *,
    desc: str = "generate",
    show_progress: bool = True,
    add_special_tokens: bool = True,
) -> list[str]:
    """Greedy continuations of raw-text prompts (tokenized with the tokenizer's special tokens unless
    ``add_special_tokens`` is False: text a chat template rendered), stopping at the model's eos; see
    :func:`greedy_continuations`."""
    prompt_ids = tokenizer(list(prompts), add_special_tokens=add_special_tokens)["input_ids"] if prompts else []
    return greedy_continuations(
        model, tokenizer, prompt_ids, max_new_tokens, batch_size, desc=desc, show_progress=show_progress
    )
