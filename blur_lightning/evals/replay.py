"""Greedy decoding read off a teacher-forced forward: accuracy without ``generate`` where it is implied.

Greedy decoding emits, at each step, the argmax of the next-token logits given the prompt and the
tokens emitted so far. A forward pass over ``prompt + target`` gives those same logits at every
target position at once (teacher forcing). So when the argmax at every target position *is* the
target token, greedy decoding would emit the target: up to its first stop token, or up to
``max_new_tokens``. The answer-probability forward of a QA evaluation already runs over
``prompt + the model's own answer sentence``; where the check passes, the generated text is known
and no ``generate`` call is needed. Before unlearning that is almost every question (the embedded
QA set was curated from the model's own greedy answers), so the before-evaluation becomes one forward
per question instead of a forward plus up to 16 decoding steps.

Exactness: the teacher-forced and the incremental (KV-cached, left-padded) logits are the same
function computed in a different order, equal to float rounding (~1e-5 in fp32 on CPU). A position
whose top-2 logits are closer than ``min_margin`` could flip between the two, so it does not count
as a match: that question is generated as before. A question that fails the check anywhere is
generated as before, so the texts equal ``generate``'s wherever this returns one.
"""

from __future__ import annotations

from collections.abc import Sequence

# Logit units. fp32 rounding between the two computation orders is ~1e-5 here; bf16/fp16 models
# round far more (~1e-2), so their evaluations should pass a larger margin or skip the replay.
DEFAULT_MIN_MARGIN = 1e-2


def replay(
    top_ids: Sequence[int],
    margins: Sequence[float],
    targets: Sequence[int],
    stop_ids: set[int] | frozenset[int],
    max_new_tokens: int,
    min_margin: float = DEFAULT_MIN_MARGIN,
) -> list[int] | None:
    """The tokens greedy decoding would emit, if a teacher-forced forward implies them; else None.

    Args:
        top_ids: the argmax at each target position (``top_ids[j]`` predicts ``targets[j]``).
        margins: top-1 minus top-2 logit at each target position.
        targets: the target continuation's token ids (e.g. the answer sentence and its end-of-turn).
        stop_ids: tokens that end decoding (emitted, then decoding stops).
        max_new_tokens: most tokens decoding emits.
        min_margin: a position whose margin is below this is not trusted (see the module docstring).

    Returns:
        The emitted tokens (ending with a stop token, or ``max_new_tokens`` long), or ``None`` when
        decoding would leave the target, might (a near tie), or would go on past its end.
    """
    for j in range(min(len(targets), max_new_tokens)):
        if top_ids[j] != targets[j] or margins[j] < min_margin:
            return None
        if targets[j] in stop_ids:
            return list(targets[: j + 1])
    if len(targets) >= max_new_tokens:
        return list(targets[:max_new_tokens])
    return None  # the target ends without a stop token: what decoding emits next is not known
