"""gradient_sync="per_step": under DDP and FSDP2 each side's gradient is reduced once per optimizer step.

Two gloo processes fit a tiny Llama (tests/dist_workers/blur_worker.py) and every rank's weights are
compared with one process fitting all ranks' micro-batches concatenated (test_fsdp.py's harness).
k = 3 over 7 micro-batches makes windows of 3, 3 and 1 (the epoch's last batch closes a short window,
which must reduce in its only micro-batch). The profiler counts the gradient-sized collectives of every
backward (blur_lightning.testing.collectives: DDP's bucket all-reduces, FSDP2's reduce-scatters; the
projection's 3-value all-reduce and the finiteness vote are too small to count):

    launch               cases
    counts, exactness    DDP, DDP gradient_as_bucket_view, FSDP2: per_step and per_micro_batch; FSDP2
                         with bf16 compute and fp32 reduce (FSDP2 then accumulates in a second slot)
    windows              a checkpoint inside a window (2 local micro-batches pending) and its resume,
                         DDP and FSDP2; k = 1; the fine-tuner (one side) under DDP and FSDP2

Before per_step every backward reduced: 2k reductions per step (the counts test fails on that code).
"""

from __future__ import annotations

import os
import sys
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "dist_workers"))

import blur_worker  # noqa: E402
from test_fsdp import ATOL, assert_moved, assert_same_weights, launch, load  # noqa: E402

K, MICRO_BATCHES = 3, 7
WINDOWS = [3, 3, 1]  # micro-batches of each optimizer step: the last is the epoch's short window
COMMON = dict(world=2, micro_batches=MICRO_BATCHES, accumulate=K, optimizer="sgd", lr=0.05, count_collectives=True)
MIXED = dict(param_dtype="bfloat16", reduce_dtype="float32")

_references: dict[tuple, dict] = {}


def single_process(case: dict) -> dict:
    """One process on all ranks' micro-batches (per_step there changes nothing), cached by what it depends on."""
    key = (case.get("module", "blur"), case["micro_batches"], case["accumulate"])
    if key not in _references:
        single = {**case, "layout": "single", "name": "single", "save_at": (), "ckpt_path": None,
                  "count_collectives": False}  # fmt: skip
        _references[key] = blur_worker.run_case(single, 0)
    return _references[key]


def reductions(backward_counts: list[int], windows: list[int], passes: int = 2) -> tuple[list[int], list[int]]:
    """(backward passes that reduced, gradient collectives) per optimizer step, from the per-backward counts."""
    steps, collectives, start = [], [], 0
    for size in windows:
        window = backward_counts[start : start + passes * size]
        steps.append(sum(c > 0 for c in window))
        collectives.append(sum(window))
        start += passes * size
    assert start == len(backward_counts), (windows, backward_counts)
    return steps, collectives


# --------------------------------------------------------------------------------------------
# launch 1: counts and exactness
# --------------------------------------------------------------------------------------------
def count_cases() -> dict[str, dict]:
    cases = [
        dict(name="ddp_per_step", layout="ddp", **COMMON),
        dict(name="ddp_per_micro_batch", layout="ddp", gradient_sync="per_micro_batch", **COMMON),
        dict(name="ddp_bucket_view_per_step", layout="ddp", bucket_view=True, **COMMON),
        dict(name="fsdp2_per_step", layout="fsdp2", **COMMON),
        dict(name="fsdp2_per_micro_batch", layout="fsdp2", gradient_sync="per_micro_batch", **COMMON),
        dict(name="fsdp2_mixed_per_step", layout="fsdp2", **MIXED, **COMMON),
        dict(name="fsdp2_mixed_per_micro_batch", layout="fsdp2", gradient_sync="per_micro_batch", **MIXED, **COMMON),
    ]
    return {c["name"]: c for c in cases}


def launch_cases(out: str, cases: dict[str, dict]) -> tuple[str, dict[str, dict]]:
    """Every case in one 2-process launch; (output folder, cases by name)."""
    start = time.monotonic()
    launch(list(cases.values()), nproc=2, out=out)
    print(f"2-process launch: {time.monotonic() - start:.1f}s for {len(cases)} fits")
    return out, cases


@pytest.fixture(scope="module")
def count_run(tmp_path_factory):
    return launch_cases(str(tmp_path_factory.mktemp("grad_sync_counts")), count_cases())


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    "name", ["ddp_per_step", "ddp_per_micro_batch", "ddp_bucket_view_per_step", "fsdp2_per_step",
             "fsdp2_per_micro_batch"],
)  # fmt: skip
def test_two_ranks_equal_one_process(count_run, name):
    out, cases = count_run
    want = single_process(cases[name])
    for rank in range(2):
        got = load(out, name, rank)
        assert got["global_step"] == want["global_step"] == len(WINDOWS)
        diff = assert_same_weights(got["state"], want["state"], ATOL, f"{name} rank {rank}")
    assert_moved(want["state"], cases[name])
    print(f"{name}: max abs diff {diff:.3g}")


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("layout", ["ddp", "ddp_bucket_view", "fsdp2"])
def test_one_reduction_per_side_per_step(count_run, layout):
    """per_step: the forget and the retain backward of each window's last micro-batch reduce, no other
    (2 per step); per_micro_batch: all 2k. Each reducing backward issues the same collectives (DDP: one
    per bucket, FSDP2: one reduce-scatter per fully_shard group), and the optimizer step none."""
    out, _ = count_run
    per_step = layout + "_per_step"
    per_micro = ("ddp" if layout == "ddp_bucket_view" else layout) + "_per_micro_batch"
    for rank in range(2):
        step = load(out, per_step, rank)["collectives"]
        micro = load(out, per_micro, rank)["collectives"]
        reducing, step_collectives = reductions(step["backward"], WINDOWS)
        assert reducing == [2, 2, 2], step["backward"]
        micro_reducing, micro_collectives = reductions(micro["backward"], WINDOWS)
        assert micro_reducing == [2 * w for w in WINDOWS], micro["backward"]
        per_backward = set(micro["backward"])
        assert len(per_backward) == 1 and per_backward.pop() > 0
        assert set(c for c in step["backward"] if c) == set(micro["backward"])
        assert [c * w for c, w in zip(step_collectives, WINDOWS)] == micro_collectives
        assert step["step"] == micro["step"] == [0] * len(WINDOWS)
    print(f"{layout}: collectives per step {step_collectives} (per_step) vs {micro_collectives} (per_micro_batch)")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_fsdp2_mixed_precision_per_step_equals_per_micro_batch(count_run):
    """bf16 compute, fp32 reduce: FSDP2 adds skipped backwards into its fp32 accumulation slot, which the
    forget and retain sides must not share. Both settings accumulate in fp32: equal to reduction order."""
    out, cases = count_run
    for rank in range(2):
        got = load(out, "fsdp2_mixed_per_step", rank)
        want = load(out, "fsdp2_mixed_per_micro_batch", rank)
        assert reductions(got["collectives"]["backward"], WINDOWS)[0] == [2, 2, 2]
        diff = assert_same_weights(got["state"], want["state"], ATOL, f"mixed precision rank {rank}")
    assert_moved(want["state"], cases["fsdp2_mixed_per_step"])
    print(f"fsdp2 bf16/fp32: max abs diff {diff:.3g}")


# --------------------------------------------------------------------------------------------
# launch 2: checkpoints inside a window, k = 1, the fine-tuner
# --------------------------------------------------------------------------------------------
SAVE_AT = 5  # the second micro-batch of window 2: two micro-batches of local sums pending


def window_cases(out: str) -> dict[str, dict]:
    ckpt_dir = os.path.join(out, "ckpt")
    os.makedirs(ckpt_dir, exist_ok=True)
    cases = []
    for layout in ("ddp", "fsdp2"):
        saved = os.path.join(ckpt_dir, f"{layout}_ckpt_full.micro{SAVE_AT}.ckpt")
        cases += [
            dict(name=f"{layout}_ckpt_full", layout=layout, save_at=[SAVE_AT], ckpt_dir=ckpt_dir, **COMMON),
            dict(name=f"{layout}_ckpt_resume", layout=layout, ckpt_path=saved, **COMMON),
            dict(name=f"{layout}_k1", layout=layout, **{**COMMON, "accumulate": 1, "micro_batches": 3}),
            dict(name=f"{layout}_finetune", layout=layout, module="finetune", **COMMON),
        ]
    return {c["name"]: c for c in cases}


@pytest.fixture(scope="module")
def window_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("grad_sync_windows"))
    return launch_cases(out, window_cases(out))


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("layout", ["ddp", "fsdp2"])
def test_checkpoint_inside_a_window_keeps_the_reduced_sums(window_run, layout):
    """The checkpoint holds reduced sums (rank 0's alone would be half the data under DDP); the run that
    saved and the run resumed from it both end at one process's weights."""
    import torch

    out, cases = window_run
    full, resumed = f"{layout}_ckpt_full", f"{layout}_ckpt_resume"
    ckpt = cases[full]["ckpt_dir"]
    path = os.path.join(ckpt, f"{full}.micro{SAVE_AT}.ckpt")
    meta = torch.load(os.path.join(path, "meta.pt") if os.path.isdir(path) else path, weights_only=False)
    assert meta["blur_accumulation"]["micro_step"] == SAVE_AT - K
    want = single_process(cases[full])
    for rank in range(2):
        got_full, got_resumed = load(out, full, rank), load(out, resumed, rank)
        assert got_full["global_step"] == got_resumed["global_step"] == len(WINDOWS)
        assert_same_weights(got_full["state"], want["state"], ATOL, f"{full} rank {rank}")
        assert_same_weights(got_resumed["state"], got_full["state"], 1e-7, f"{resumed} rank {rank}")
        # the windows after the resume still reduce each side once
        assert reductions(got_resumed["collectives"]["backward"], [K - (SAVE_AT - K), 1])[0] == [2, 2]


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("layout", ["ddp", "fsdp2"])
@pytest.mark.parametrize(
    "variant,windows,passes",
    [("k1", [1, 1, 1], 2), ("finetune", WINDOWS, 1)],  # k = 1: every backward reduces; the fine-tuner: one side
)
def test_each_side_reduces_once_per_step(window_run, layout, variant, windows, passes):
    out, cases = window_run
    name = f"{layout}_{variant}"
    want = single_process(cases[name])
    for rank in range(2):
        got = load(out, name, rank)
        assert reductions(got["collectives"]["backward"], windows, passes=passes)[0] == [passes] * 3
        assert_same_weights(got["state"], want["state"], ATOL, f"{name} rank {rank}")
    if variant == "finetune":
        assert_moved(want["state"], cases[name])


def test_gradient_sync_setting_is_checked():
    from blur_lightning.testing.tiny import tiny_llama_for_steps
    from blur_lightning.training.finetune import FineTuner
    from blur_lightning.training.unlearner import BLURUnlearner

    for cls in (BLURUnlearner, FineTuner):
        with pytest.raises(ValueError, match="gradient_sync='per_epoch': expected one of"):
            cls(tiny_llama_for_steps(), gradient_sync="per_epoch")
