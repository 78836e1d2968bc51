"""What each memorization / membership-inference metric costs on the demo model, per 100 questions.

SmolLM2-135M-Instruct (the embedded model) on the embedded QA forget set, each question's scored text
rendered as the demo's QA benchmark scores it (chat template, the ``response`` sentence). One run, one
table: seconds per 100 questions and the ratio to the answer-probability forward the QA benchmark
already runs, so the ratios hold on another machine even where the seconds do not.

    python benchmarks/metric_costs.py                 # CPU, 1 thread
    python benchmarks/metric_costs.py --threads 2 --rows 40

Rows timed: the answer-probability forward (the baseline), greedy answers (QA accuracy, 16 tokens),
the one forward with vocabulary statistics that gives LOSS, Min-K%, Min-K%++, exact memorization and
extraction strength together, ZLib's extra decode and compress, GradNorm (a forward and backward per
question) and the Reference attack's forward of a second model.
"""

from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Callable

import torch

from blur_lightning.data.rows import load_rows
from blur_lightning.evals.membership import gradient_norms, row_statistics, scored_texts
from blur_lightning.evals.mia import loss_scores, zlib_scores
from blur_lightning.evals.qa import QABenchmark, greedy_answers
from blur_lightning.evals.scoring import score_rows, sequence_scores
from blur_lightning.models.loading import load_causal_lm, load_tokenizer

MODEL = "embedded:smollm2-135m-instruct"


def _interleaved_min(timed: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Least wall time of each callable over `rounds` rounds, each round calling every one once in turn
    (after one warm-up round): on a CPU shared with other jobs the least time is the one least disturbed,
    and interleaving spreads a busy spell over every row instead of one."""
    for fn in timed.values():
        fn()
    best = {name: float("inf") for name in timed}
    for _ in range(rounds):
        for name, fn in timed.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=MODEL, help="model and tokenizer (default: the embedded SmolLM2)")
    parser.add_argument("--rows", type=int, default=40, help="questions timed (of the 80 of qa_forget.jsonl)")
    parser.add_argument("--gradnorm-rows", type=int, default=10, help="questions GradNorm is timed on")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=32, help="as configs/demo.yaml")
    parser.add_argument("--repeats", type=int, default=4, help="timed rounds (after a warm-up round)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    model, tokenizer = load_causal_lm(args.model).eval(), load_tokenizer(args.model)
    rows = load_rows("embedded:qa_forget.jsonl")[: args.rows]
    encoded = QABenchmark._scored_rows(tokenizer, rows, "question", "answer", "response", "auto")
    reference = copy.deepcopy(model)
    bs = args.batch_size
    quiet = {"show_progress": False}
    stats = row_statistics(model, tokenizer, encoded, batch_size=bs, **quiet)
    texts = scored_texts(tokenizer, encoded)
    few = encoded[: args.gradnorm_rows]

    timed = {
        "answer probability forward (baseline)": (
            lambda: sequence_scores(model, tokenizer, encoded, batch_size=bs, **quiet), len(encoded)),
        "greedy answers, 16 tokens (QA accuracy)": (
            lambda: greedy_answers(model, tokenizer, [r["question"] for r in rows], 16, bs, **quiet), len(rows)),
        "forward + vocab stats: LOSS, Min-K%, Min-K%++, EM, ES": (
            lambda: row_statistics(model, tokenizer, encoded, batch_size=bs, **quiet), len(encoded)),
        "ZLib on top (decode + compress)": (
            lambda: zlib_scores(stats["loss"], scored_texts(tokenizer, encoded)), len(encoded)),
        "Reference: the reference model's forward": (
            lambda: score_rows(reference, tokenizer, encoded, reduce=loss_scores, batch_size=bs, **quiet),
            len(encoded)),
        "GradNorm: forward + backward per question": (
            lambda: gradient_norms(model, tokenizer, few, **quiet), len(few)),
    }  # fmt: skip
    del texts
    seconds = _interleaved_min({name: fn for name, (fn, _) in timed.items()}, args.repeats)
    results = {name: seconds[name] / n * 100 for name, (_, n) in timed.items()}
    base = results["answer probability forward (baseline)"]
    print(f"{args.model}, CPU, {args.threads} thread(s), batch {bs}, {len(encoded)} questions "
          f"(GradNorm: {len(few)}), least of {args.repeats} interleaved rounds\n")  # fmt: skip
    print("| metric | s / 100 questions | x baseline |\n|---|---:|---:|")
    for name, seconds in results.items():
        print(f"| {name} | {seconds:.3g} | {seconds / base:.3g} |")


if __name__ == "__main__":
    main()
