"""Every evaluation on 2 CPU processes (gloo), under DDP and FSDP2, gives one process's numbers.

One launch of tests/dist_workers/eval_worker.py runs a DDP and an FSDP2 fit (SGD at lr 0: the
weights never move) with the QA, TOFU, MUSE and WMDP evaluations and the relearning probe; one
process runs the same fit alone. Every rank must hold the single process's scalars and
per-example results (each rank scored only its share of the batches, then gathered).
"""

from __future__ import annotations

import json
import math
import os
import sys

import pytest

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(TESTS, "dist_workers", "eval_worker.py")
FIXTURES = os.path.join(TESTS, "fixtures")
sys.path.insert(0, TESTS)

from test_fsdp import LAUNCH_TIMEOUT, _base_env, _run_all, _with_free_port  # noqa: E402

pytestmark = pytest.mark.slow

LAYOUTS = ("ddp", "fsdp2")
ATOL = 1e-6  # CPU, the same batches as one process: measured 0 (bit-identical)


def launch(out: str, cases: list[dict], nproc: int) -> None:
    spec = os.path.join(out, "spec.json")
    with open(spec, "w") as f:
        json.dump({"out": out, "fixtures": FIXTURES, "cases": cases}, f)

    def run(port: str) -> None:
        commands = []
        for rank in range(nproc):
            env = _base_env()
            if nproc > 1:
                env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, WORLD_SIZE=str(nproc),
                           LOCAL_WORLD_SIZE=str(nproc), NODE_RANK="0", LOCAL_RANK=str(rank))  # fmt: skip
            commands.append(([sys.executable, WORKER, spec], env))
        _run_all(commands, out, LAUNCH_TIMEOUT)

    _with_free_port(run)


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[tuple[str, int], dict]:
    out = str(tmp_path_factory.mktemp("multiproc_eval"))
    launch(out, [{"name": "single", "layout": "single"}], nproc=1)
    launch(out, [{"name": layout, "layout": layout} for layout in LAYOUTS], nproc=2)
    found = {}
    for name, rank in [("single", 0)] + [(layout, r) for layout in LAYOUTS for r in (0, 1)]:
        with open(os.path.join(out, f"{name}.rank{rank}.json")) as f:
            found[(name, rank)] = json.load(f)
    return found


def assert_close(got, want, where: str) -> None:
    """Recursive comparison: floats within ATOL (NaN equals NaN), everything else equal."""
    if isinstance(want, dict):
        assert set(got) == set(want), f"{where}: keys {sorted(got)} != {sorted(want)}"
        for key in want:
            assert_close(got[key], want[key], f"{where}/{key}")
    elif isinstance(want, list):
        assert len(got) == len(want), f"{where}: {len(got)} entries != {len(want)}"
        for i, (g, w) in enumerate(zip(got, want)):
            assert_close(g, w, f"{where}[{i}]")
    elif isinstance(want, float) and not isinstance(want, bool):
        assert (math.isnan(got) and math.isnan(want)) or abs(got - want) <= ATOL, f"{where}: {got} != {want}"
    else:
        assert got == want, f"{where}: {got!r} != {want!r}"


@pytest.mark.timeout(2 * LAUNCH_TIMEOUT + 60)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("rank", [0, 1])
@pytest.mark.parametrize("benchmark", ["qa", "tofu", "muse", "wmdp"])
def test_evaluation_equals_one_process(results, layout, rank, benchmark):
    want = results[("single", 0)]["evaluations"][benchmark]
    got = results[(layout, rank)]["evaluations"][benchmark]
    assert want and [e["stage"] for e in got] == [e["stage"] for e in want]
    assert want[0]["metrics"], "no metric computed"
    assert_close(got, want, f"{layout} rank {rank} {benchmark}")


@pytest.mark.timeout(2 * LAUNCH_TIMEOUT + 60)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("rank", [0, 1])
def test_relearning_probe_equals_one_process(results, layout, rank):
    want = results[("single", 0)]["probe"]
    assert set(want) == {"relearn", "held_back"}
    # the probe trained its copy (lr 1e-2), so equal numbers are not those of an untouched model
    assert want["relearn"]["answer_prob_after"] > want["relearn"]["answer_prob_before"], want
    assert_close(results[(layout, rank)]["probe"], want, f"{layout} rank {rank} probe")


@pytest.mark.timeout(2 * LAUNCH_TIMEOUT + 60)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_each_rank_evaluates_its_share(results, layout):
    """The ranks split the rows: each scores and generates for well under all of them (one process
    doing everything on every rank would give the same numbers, at twice the cost)."""
    alone = results[("single", 0)]["work"]
    for rank in (0, 1):
        work = results[(layout, rank)]["work"]
        for kind in ("scored", "generated"):
            assert work[kind] < 0.75 * alone[kind], (layout, rank, kind, work, alone)


@pytest.mark.timeout(2 * LAUNCH_TIMEOUT + 60)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("rank", [0, 1])
def test_generation_with_uneven_stops_and_the_monitored_value(results, layout, rank):
    """Greedy answers where one rank decodes 8 steps and the other 1 (FSDP2 needs synced_gpus), and
    the value a ModelCheckpoint(monitor="qa/forget/answer_prob") reads at validation: one process's."""
    alone = results[("single", 0)]
    lengths = [len(text) for text in alone["uneven_stops"]]
    assert lengths[16] > max(lengths[:16]), lengths  # the premise: only the last question decodes on
    got = results[(layout, rank)]
    assert got["uneven_stops"] == alone["uneven_stops"]
    assert len(alone["monitored"]) == 1
    assert got["monitored"] == pytest.approx(alone["monitored"], abs=ATOL)
    assert alone["monitored"][0] == pytest.approx(alone["evaluations"]["qa"][1]["metrics"]["forget/answer_prob"])
