"""Every script in benchmarks/ run as a user runs it, at its smallest size, to the end.

Each test starts ``python benchmarks/NAME.py ...`` from the repository root in a subprocess: the script's
own ``sys.path`` (its folder first, not the root) and argument parsing are part of what is tested, as
they are what broke before. Outputs go to tmp_path; the `_results_untouched` fixture fails a test that
writes into benchmarks/results/, benchmarks/RESULTS.md or the shipped QA files. The Triton providers run
on CPU under TRITON_INTERPRET=1, at shapes that keep each kernel call under ~1M elements.

Models: a random tiny Llama (blur_lightning.testing.tiny) or one that answers every question with
ANSWER (`tiny_llama_answering`), so accuracies are known exactly: "Kabul", "Li" and "H" are correct,
everything else is not.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
BENCHMARKS = REPO / "benchmarks"
ASSETS = REPO / "blur_lightning" / "assets"
# One sentence holding three gold answers of the embedded QA sets: the capital of Afghanistan (line 1 of
# qa_forget.jsonl) and the chemical symbols of lithium and hydrogen. No spaces: the tiny tokenizer
# splits it into 11 distinct tokens (K a b u l ! L i ? H .), which the answering model needs.
ANSWER = "Kabul!Li?H."
KNOWN = {"Kabul", "Li", "H"}

# script -> its test below; test_every_script_has_a_smoke_test fails for a script missing here
SCRIPTS = {
    "bench_projection.py": "test_bench_projection",
    "bench_step.py": "test_bench_step",
    "bench_lora_step.py": "test_bench_lora_step",
    "bench_grad_sync.py": "test_bench_grad_sync",
    "memory_model.py": "test_memory_model",
    "relearning.py": "test_relearning",
    "unlearning_quality.py": "test_unlearning_quality",
    "curate_qa.py": "test_curate_qa",
    "oracle_comparison.py": "test_oracle_comparison",
    "results_page.py": "test_results_page",
    "metric_costs.py": "test_metric_costs",
    "fictitious_privacy.py": "test_fictitious_privacy",
    "projection_share.py": "test_projection_share",
}


def run_script(name: str, *args, timeout: float, env: dict[str, str] | None = None) -> str:
    """Run benchmarks/`name` from the repository root; its stdout (the output tail in the failure)."""
    full_env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "BLUR_BACKEND")}
    # One torch thread: two threads on two cores shared with other jobs spin-wait on each other (the
    # relearning smoke run took 130 s with two threads and 9 s with one while a test suite ran beside it).
    full_env["OMP_NUM_THREADS"] = "1"
    full_env.update(env or {})
    proc = subprocess.run(
        [sys.executable, f"benchmarks/{name}", *map(str, args)],
        cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
    tails = f"--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-6000:]}"
    assert proc.returncode == 0, f"benchmarks/{name} exited {proc.returncode}\n{tails}"
    return proc.stdout


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def read_jsonl(path: Path, limit: int | None = None) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()[:limit]]


def _snapshot() -> dict[str, tuple[int, int]]:
    paths = [*BENCHMARKS.joinpath("results").iterdir(), BENCHMARKS / "RESULTS.md", *ASSETS.glob("qa_*.jsonl")]
    return {str(p): (p.stat().st_mtime_ns, p.stat().st_size) for p in paths if p.is_file()}


@pytest.fixture(autouse=True)
def _results_untouched():
    before = _snapshot()
    yield
    assert _snapshot() == before, "a smoke run wrote into benchmarks/results, RESULTS.md or the QA assets"


@pytest.fixture(scope="module")
def random_model(tmp_path_factory) -> Path:
    from blur_lightning.testing.tiny import save_tiny_model

    return Path(save_tiny_model(tmp_path_factory.mktemp("tiny_random")))


@pytest.fixture(scope="module")
def answering_model(tmp_path_factory) -> Path:
    from blur_lightning.testing.tiny import tiny_llama_answering, tiny_tokenizer

    path = tmp_path_factory.mktemp("tiny_answering")
    tokenizer = tiny_tokenizer()
    tiny_llama_answering(ANSWER, tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_every_script_has_a_smoke_test():
    # helpers run through the scripts, and the AOT compile check, which tests/test_kernels_aot.py runs
    # and the intervals library the oracle comparison's summary uses (tests/test_intervals.py)
    covered_elsewhere = {"common.py", "authors_projection.py", "step_memory.py", "aot_compile.py", "intervals.py"}
    scripts = {p.name for p in BENCHMARKS.glob("*.py")} - covered_elsewhere
    assert scripts == set(SCRIPTS), "a script in benchmarks/ without its smoke test here (or a stale entry)"
    assert all(callable(globals().get(test)) for test in SCRIPTS.values())


@pytest.mark.timeout(300)
def test_bench_projection(tmp_path):
    # `tiny` is 205,120 elements in 21 tensors (embedding and head 1024 x 64 each, 2 layers of 36,992, the
    # final norm): one interpreted kernel call takes 0.07-0.3 s; 7 Triton providers x 2 dtypes x >= 6 calls
    # (2 warm-up, 1 to size the repetitions, >= 3 timed): 15-19 s measured on 2 cores with 5 providers; with 7,
    # 82 s while another test suite and a benchmark shared the cores (2026-12-05), hence the margin.
    out = run_script("bench_projection.py", "--models", "tiny", "--rep", 3, "--budget-s", 0.1, "--out", tmp_path,
                     timeout=280, env={"TRITON_INTERPRET": "1"})  # fmt: skip
    assert "the Triton providers run under the interpreter" in out
    rows = read_csv(tmp_path / "projection.csv")
    providers = ["reference", "torch", "triton", "triton_pass1", "triton_pass2", "triton_pass1_adam", "torch_adamw",
                 "triton_adamw", "triton_fused_adamw", "triton_fused_adamw_adam"]  # fmt: skip
    assert [(r["dtype"], r["provider"]) for r in rows] == [(d, p) for d in ("fp32", "bf16") for p in providers]
    for r in rows:
        assert (r["model"], r["n_params"], r["n_tensors"], r["note"]) == ("tiny", "205120", "21", "")
        assert float(r["median_ms"]) > 0 and int(r["reps"]) >= 3 and float(r["gbps"]) > 0
    assert all(float(r["speedup_vs_torch"]) == 1.0 for r in rows if r["provider"] in ("torch", "torch_adamw"))
    table = (tmp_path / "projection.md").read_text()
    assert table.count("\n| tiny |") == 20 and "| model | dtype | task | provider | median ms |" in table
    assert (tmp_path / "projection.png").stat().st_size > 0


@pytest.mark.timeout(120)
def test_bench_step(tmp_path):
    # The GPU's path on CPU: BLUR_BACKEND=triton sends the projection through the Triton kernels (the
    # interpreter), blur_fused through BLURFusedAdamW's. 'small' has 551,552 parameters (2 x 128,000 for
    # embedding and head, 2 layers of 147,712, the final norm): one kernel call stays under ~1M elements.
    # 2 steps per provider (1 warm-up, 1 timed): 9-20 s measured on 2 cores, most of it in the interpreter.
    out = run_script("bench_step.py", "--out", tmp_path, "--size", "small", "--steps", 1, "--warmup", 1,
                     timeout=110, env={"TRITON_INTERPRET": "1", "BLUR_BACKEND": "triton"})  # fmt: skip
    rows = read_csv(tmp_path / "bench_step.csv")
    assert [r["provider"] for r in rows] == ["weighted_sum", "blur", "blur_fused", "authors"]
    for r in rows:
        assert (r["size"], r["params"], r["steps"], r["warmup"], r["dtype"]) == ("small", "551552", "1", "1", "float32")
        assert float(r["ms_median"]) > 0
    host_reads = {r["provider"]: float(r["host_reads"]) for r in rows}
    # authors reads two sums per parameter tensor (.item()): 21 tensors -> 42; the BLUR steps read none
    assert host_reads == {"weighted_sum": 0, "blur": 0, "blur_fused": 0, "authors": 42}
    assert float(rows[0]["time_ratio"]) == 1.0
    table = (tmp_path / "bench_step.md").read_text()
    assert table.startswith("BLUR step benchmark: cpu") and table in out
    assert table.count("| blur") == 2 and "- blur_fused peak <= weighted_sum + 1 gradient buffer: n/a on CPU" in table


@pytest.mark.timeout(120)
def test_bench_lora_step(tmp_path):
    # 4 variants x 2 steps of the tiny Llama on the embedded QA data (the first step is dropped): 8-10 s
    out = run_script("bench_lora_step.py", "--out", tmp_path, "--size", "small", "--steps", 2, timeout=110)
    rows = {r["variant"]: r for r in read_csv(tmp_path / "bench_lora_step.csv")}
    assert list(rows) == ["full", "full_ac", "lora", "lora_ac"]
    # tiny_llama: 139,584 parameters. Rank 16 on the 7 linear layers of 2 decoder layers adds
    # 16 x (in + out) each: q, o 2 x 16 x 128, k, v 2 x 16 x 96, gate, up, down 3 x 16 x 192 = 16,384 a layer.
    for name, r in rows.items():
        lora = name.startswith("lora")
        assert (r["trainable"], r["total_params"]) == (("32768", "172352") if lora else ("139584", "139584"))
        assert r["steps_timed"] == "1" and float(r["median_ms"]) > 0 and r["size"] == "small"
        assert r["reference_copy"] == "False"  # NPO's reference: cached log-probs (full), disabled adapters (LoRA)
    assert float(rows["full"]["vs_full"]) == 1.0
    assert "| variant | ms/step | p20 | p80 | vs full | trainable | ref copy | peak MiB |" in out
    assert "| lora_ac |" in out


@pytest.mark.timeout(120)
def test_bench_grad_sync(tmp_path):
    # 2 gloo processes, k = 2, one counted and one timed step per layout and setting: 12-15 s on 2 cores
    out = run_script("bench_grad_sync.py", "--out", tmp_path, "--accumulate", 2, "--steps", 1, "--warmup", 1,
                     "--rounds", 1, timeout=110)  # fmt: skip
    rows = {(r["layout"], r["gradient_sync"]): r for r in read_csv(tmp_path / "bench_grad_sync.csv")}
    assert list(rows) == [(layout, sync) for layout in ("ddp", "fsdp2") for sync in ("per_step", "per_micro_batch")]
    # tiny_llama: 139,584 parameters in one DDP bucket; FSDP2 shards 2 decoder layers and the root: 3 groups.
    # per_step reduces each side once per step, per_micro_batch every backward (2 sides x k = 2 micro-batches)
    groups = {"ddp": 1, "fsdp2": 3}
    for (layout, sync), r in rows.items():
        reductions = 2 if sync == "per_step" else 4
        assert int(r["gradient_collectives"]) == reductions * groups[layout], (layout, sync, r)
        assert int(r["gradient_numel"]) == reductions * 139584 == reductions * int(r["params"])
        assert r["steps_timed"] == "1" and float(r["median_ms"]) > 0
    assert all(float(r["vs_per_micro_batch"]) == 1.0 for (_, sync), r in rows.items() if sync == "per_micro_batch")
    table = (tmp_path / "bench_grad_sync.md").read_text()
    assert table.startswith("Gradient sync benchmark: 2 x CPU") and table in out and table.count("| per_step |") == 2


@pytest.mark.timeout(60)
def test_memory_model(tmp_path):
    doc = tmp_path / "FSDP.md"
    begin = "<!-- memory_model:begin (generated by benchmarks/memory_model.py --write-doc docs/FSDP.md) -->"
    doc.write_text(f"# before\n\n{begin}\nstale\n<!-- memory_model:end -->\n\nafter\n")
    args = ["--models", "tiny-llama", "--gpus", 1, 2, "--batch", 2, "--seq", 16, "--write-doc", doc]
    out = run_script("memory_model.py", *args, timeout=50)
    text = doc.read_text()
    assert text.startswith(f"# before\n\n{begin}\n") and text.endswith("<!-- memory_model:end -->\n\nafter\n")
    assert "stale" not in text and out.strip() in text
    assert f"`python benchmarks/memory_model.py {' '.join(map(str, args))}`" in text
    assert "#### tiny-llama: 139,584 parameters" in text
    columns = [f"{kind}, FSDP2 {n} GPUs" for kind in ("full", "LoRA r=16") for n in (1, 2)]
    assert "| memory per GPU | " + " | ".join(columns) + " |" in text
    # fp32 master weights: 139,584 x 4 bytes = 545.25 KiB on one GPU, half of it on each of two
    assert "| parameters (sharded master) | 545.25 KiB | 272.62 KiB |" in text
    assert text.count("\n| ") == 2 + 13 + 6  # two table headers, 13 memory rows and 6 traffic rows (no clip row:
    # norm clipping comes from the projection's sums, no all-reduce of its own)


def _qa_before(answer_rows: list[dict]) -> float:
    """Accuracy of the answering model on rows: the share of gold answers it names."""
    return sum(r["answer"] in KNOWN for r in answer_rows) / len(answer_rows)


@pytest.mark.timeout(120)
def test_relearning(tmp_path, answering_model):
    # 3 methods x (2 unlearning steps + 2 x 2 probe steps + 7 evaluations of <= 32 questions): 9 s
    out = run_script("relearning.py", "--model", answering_model, "--steps", 2, "--probe-steps", 2,
                     "--max-questions", 8, "--threads", 1, "--out", tmp_path, "--no-results", timeout=110)  # fmt: skip
    assert "| method | forget | paraphrased | held-out retain | attack: relearned 4 |" in out
    rows = read_csv(tmp_path / "relearning.csv")
    assert [r["method"] for r in rows] == ["before", "blur", "npo_sum", "graddiff"]
    assert not (tmp_path / "relearning.partial.csv").exists()  # removed once the run finished
    forget = read_jsonl(ASSETS / "qa_forget.jsonl", 8)
    paraphrased = read_jsonl(ASSETS / "qa_forget_paraphrased.jsonl", 32)  # 4 x --max-questions
    before = rows[0]
    assert float(before["forget_acc"]) == _qa_before(forget) == 1 / 8  # Kabul: line 1
    assert float(before["paraphrased_acc"]) == pytest.approx(_qa_before(paraphrased), abs=1e-4)
    assert float(before["holdout_acc"]) == pytest.approx(_qa_before(read_jsonl(ASSETS / "qa_holdout.jsonl", 8)))
    # the probe relearns the even forget rows; paraphrases of their capitals are dropped from its probe set
    relearned = {r["answer"] for r in forget[0::2]}
    held_para = sum(r["answer"] not in relearned for r in paraphrased)
    for r in rows[1:]:
        assert (r["steps"], r["probe_steps"], r["held_back_n"]) == ("2", "2", "4")
        assert r["paraphrased_held_back_n"] == str(held_para)
        assert all(0 <= float(r[k]) <= 1 for k in r if k.endswith("_acc"))


@pytest.mark.timeout(120)
def test_unlearning_quality(tmp_path, answering_model):
    # 4 methods x 2 settings x 2 steps, <= 3 evaluations of 8 questions each: 10 s
    out = run_script("unlearning_quality.py", "--model", answering_model, "--steps", 2, "--max-questions", 8,
                     "--threads", 1, "--out", tmp_path, "--no-results", timeout=110)  # fmt: skip
    assert "| method | chosen setting | forget acc |" in out
    rows = read_csv(tmp_path / "unlearning_quality.csv")
    methods = ("blur", "graddiff", "npo_sum", "ga")
    assert [r["method"] for r in rows] == ["before"] + [m for m in methods for _ in range(2)]  # 2 settings each
    assert float(rows[0]["forget_acc"]) == 1 / 8  # the answering model names Kabul, line 1 of the 8
    runs = rows[1:]
    assert all(r["steps"] == "2" for r in runs)  # the Trainer took every step
    for method in methods:
        chosen = [r for r in runs if r["method"] == method and r["chosen"] == "1"]
        assert len(chosen) == 1 and chosen[0]["test_acc"] != ""  # the chosen run's test half is evaluated
    assert not (tmp_path / "unlearning_quality.partial.csv").exists()
    assert (tmp_path / "unlearning_quality.png").stat().st_size > 0


@pytest.mark.timeout(60)
def test_curate_qa(tmp_path, answering_model):
    # --limit 2: 2 capitals + 2 of each of the 9 other topics; the model says "Kabul!Li?H." to all
    out = run_script("curate_qa.py", "--model", answering_model, "--limit", 2, "--threads", 1, "--out", tmp_path,
                     timeout=50)  # fmt: skip
    assert "capitals              1 /    2 kept" in out and "chemical_symbols      2 /    2 kept" in out
    assert "authors               0 /    2 kept" in out
    forget = read_jsonl(tmp_path / "qa_forget.jsonl")
    assert [(r["question"], r["answer"], r["topic"]) for r in forget] == [
        ("What is the capital of Afghanistan?", "Kabul", "capitals")
    ]
    assert set(forget[0]) == {"question", "answer", "topic", "idk", "response"} and forget[0]["response"] == ANSWER
    # hydrogen and lithium dealt one to each split
    retain, holdout = read_jsonl(tmp_path / "qa_retain.jsonl"), read_jsonl(tmp_path / "qa_holdout.jsonl")
    assert sorted(r["answer"] for r in retain + holdout) == ["H", "Li"] and len(retain) == len(holdout) == 1
    paraphrased = read_jsonl(tmp_path / "qa_forget_paraphrased.jsonl")
    assert len(paraphrased) == 4 and {r["answer"] for r in paraphrased} == {"Kabul"}  # the 4 wordings of it


@pytest.fixture(scope="module")
def tiny_build(tmp_path_factory, random_model) -> Path:
    """A tiny fictitious build as tests/test_oracle.py makes it (2 fine-tuning steps each, 25 s)."""
    from blur_lightning.fictitious import build as oracle

    recipe = oracle.Recipe(base_model=str(random_model), people=20, epochs=1, batch_size=40, lr=3e-2, max_length=64)
    return oracle.build(recipe, tmp_path_factory.mktemp("builds"), quiet=True, calibrate=False)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_oracle_comparison(tmp_path, tiny_build):
    # The quick profile on the tiny build (19 s): 4 reference evaluations, 2 validation and 2 test runs of 4
    # steps, the probes; 45-70 s in all with the build.
    build = tiny_build
    files = ["--build", build, "--csv", tmp_path / "c.csv", "--runs-dir", tmp_path / "runs",
             "--plot", tmp_path / "p.png"]  # fmt: skip
    out = run_script("oracle_comparison.py", "--quick", *files, timeout=200)
    rows = read_csv(tmp_path / "c.csv")
    assert {r["recipe"] for r in rows} == {build.name} and {r["profile"] for r in rows} == {"quick"}
    assert [(r["stage"], r["split"], r["method"]) for r in rows] == [
        ("reference", "validation10", "target"), ("reference", "forget10", "target"),
        ("reference", "validation10", "oracle"), ("reference", "forget10", "oracle"),
        ("validation", "validation10", "blur"), ("validation", "validation10", "npo_sum"),
        ("test", "forget10", "blur"), ("test", "forget10", "npo_sum"),
    ]  # fmt: skip  (every validation, then the chosen settings' tests seed by seed across the methods)
    oracle_row = rows[3]
    assert float(oracle_row["forget_quality"]) == 1.0  # its truth ratios against its own saved ones: KS p = 1
    assert all(r["q4_acc"] != "" and r["relearn_acc_after"] != "" for r in rows if r["stage"] == "test")
    assert all(r["steps"] == "4" for r in rows[4:])
    assert "| BLUR (forget_lower, NPO + NLL) **(chosen)** | 0.3 | 3e-05 | 1 |" in out
    assert (tmp_path / "p.png").stat().st_size > 0
    # a rerun skips what the CSV holds; --summary reads the same build's rows
    run_script("oracle_comparison.py", "--quick", *files, timeout=60)
    assert len(read_csv(tmp_path / "c.csv")) == 8
    summary = run_script("oracle_comparison.py", "--quick", "--summary", *files, timeout=60)
    assert "| NPO + NLL weighted sum **(chosen)** | 1 | 3e-05 | 1 |" in summary


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_oracle_comparison_on_a_larger_heldout_share(tmp_path, random_model):
    # The large recipe's shape on the tiny model (20 people, 25 % held out: forget25 / validation25 of 5 people),
    # the quick_large profile: BLUR in both metrics and the NPO sum, their splits read from the build's record.
    from blur_lightning.fictitious import build as oracle

    recipe = oracle.Recipe(base_model=str(random_model), people=20, epochs=1, batch_size=40, lr=3e-2, max_length=64,
                           heldout_percent=25)  # fmt: skip
    build = oracle.build(recipe, tmp_path / "builds", quiet=True, calibrate=False)
    files = ["--build", build, "--csv", tmp_path / "c.csv", "--runs-dir", tmp_path / "runs",
             "--plot", tmp_path / "p.png"]  # fmt: skip
    out = run_script("oracle_comparison.py", "--quick", "--recipe", "large", *files, timeout=300)
    rows = read_csv(tmp_path / "c.csv")
    assert {r["profile"] for r in rows} == {"quick_large"}
    assert {r["split"] for r in rows} == {"validation25", "forget25"}
    assert [r["method"] for r in rows if r["stage"] == "test"] == ["blur", "blur_adam", "npo_sum"]
    config = yaml.safe_load((tmp_path / "runs" / "test_blur_adam_k1_lr0.0001_s0" / "config.yaml").read_text())
    assert config["model"]["projection_metric"] == "adam"
    assert config["data"]["forget_path"].endswith("forget25.jsonl")
    assert "BLUR in AdamW's metric (projection_metric adam) minus its weighted-sum twin" in out
    assert "Goals (issue 21), as measured:" in out
    # the projection's share of d, read from these runs' own logs (4 steps each)
    runs = [tmp_path / "runs" / f"test_{m}_k1_lr0.0001_s0" for m in ("blur", "blur_adam", "npo_sum")]
    run_script("projection_share.py", *runs, "--csv", tmp_path / "shares.csv", timeout=60)
    shares = {r["run"]: r for r in read_csv(tmp_path / "shares.csv")}
    assert [(shares[p.name]["mode"], shares[p.name]["steps"]) for p in runs] == [
        ("forget_lower", "4"), ("forget_lower", "4"), ("penalty", "4")]  # fmt: skip
    assert float(shares["test_npo_sum_k1_lr0.0001_s0"]["share_max"]) == 0.0
    # in the identity metric coef - gamma = -<g_r, g_f> / ||g_f||^2: the share from coef equals the one from dot_rf
    metrics = read_csv(runs[0] / "metrics.csv")
    from_dot = [abs(float(r["train/dot_rf"])) / float(r["train/sq_forget"]) ** 0.5 / float(r["train/direction_norm"])
                for r in metrics if r.get("train/coef")]  # fmt: skip
    assert float(shares[runs[0].name]["share_max"]) == pytest.approx(max(from_dot), rel=1e-4)


@pytest.mark.timeout(60)
def test_projection_share(tmp_path):
    # Two logged steps of a gamma-0.3 BLUR run: coef 0.4 with ||g_f|| 10 and ||d|| 2 is a correction of
    # 0.1 * 10 / 2 = 50 % of the step; coef 0.3 is none. An evaluation row (no train/coef) is skipped.
    head = "step,train/coef,train/sq_forget,train/sq_retain,train/direction_norm,train/cosine,fictitious/model_utility"
    run = tmp_path / "blur_run"
    run.mkdir()
    (run / "metrics.csv").write_text(f"{head}\n0,0.4,100,4,2,-0.5,\n1,0.3,100,1,3.1,0.0,\n1,,,,,,0.4\n")
    (run / "hparams.yaml").write_text("gamma: 0.3\nmode: forget_lower\n")
    out = run_script("projection_share.py", run, "--csv", tmp_path / "s.csv", timeout=50)
    (row,) = read_csv(tmp_path / "s.csv")
    shares = (float(row["share_median"]), float(row["share_max"]))
    assert row["steps"] == "2" and shares == (pytest.approx(0.25), pytest.approx(0.5))
    assert (float(row["gf_over_gr_median"]), float(row["coef_min"]), float(row["coef_max"])) == (7.5, 0.3, 0.4)
    assert "| blur_run | forget_lower | 0.3 | 2 | 0.3..0.4 | 7.5 | 25 % (50 %) | -0.25 |" in out
    # a folder without its hyperparameters: a clear error naming the file, no partial CSV
    (tmp_path / "bare").mkdir()
    (tmp_path / "bare" / "metrics.csv").write_text(head + "\n")
    proc = subprocess.run([sys.executable, "benchmarks/projection_share.py", tmp_path / "bare", "--csv",
                           tmp_path / "t.csv"], cwd=REPO, capture_output=True, text=True, timeout=50)  # fmt: skip
    assert proc.returncode != 0 and f"{tmp_path / 'bare' / 'hparams.yaml'}: not found" in proc.stderr
    assert not (tmp_path / "t.csv").exists()


@pytest.mark.timeout(60)
def test_results_page(tmp_path):
    # The committed CSVs in a copy, a finished demo run recorded into it, the page written to a scratch RESULTS.md
    for path in (BENCHMARKS / "results").glob("*.csv"):
        (tmp_path / path.name).write_bytes(path.read_bytes())
    demo_rows = len(read_csv(tmp_path / "demo.csv"))
    run = tmp_path / "run"
    run.mkdir()
    metrics = lambda acc: {"forget/accuracy": acc, "forget/answer_prob": 0.5}  # noqa: E731
    evaluations = [{"stage": "fit_start", "metrics": metrics(1.0)}, {"stage": "fit_end", "metrics": metrics(0.025)}]
    (run / "qa_eval.json").write_text(json.dumps({"evaluations": evaluations}))
    (run / "relearning.json").write_text(json.dumps({"results": {"held_back": {"accuracy_after": 0.5}}}))
    (run / "stage_times.json").write_text(json.dumps({"training (4 steps)": 12.0, "total": 20.0}))
    md = tmp_path / "RESULTS.md"
    md.write_text("# Benchmark results\n\nnotes that stay\n")
    page = ["--results-dir", tmp_path, "--results-md", md]
    out = run_script("results_page.py", *page, "--record-demo", run, "--label", "smoke", "--wall-s", 21, timeout=50)
    assert "rewritten" in out
    demo = read_csv(tmp_path / "demo.csv")
    assert len(demo) == demo_rows + 1 and demo[-1]["label"] == "smoke" and demo[-1]["commit"]
    text = md.read_text()
    assert text.startswith("# Benchmark results\n\n<!-- current:start -->\n## Current results")
    assert text.endswith("<!-- current:end -->\n\nnotes that stay\n")
    # its one stage is a new column after the committed runs' 5 (which it lacks: "-"); the table shows its accuracies
    assert "\n| smoke | 21 s | - | - | - | - | - | 12 s |\n" in text and "| forget | 100.0% | 2.5% |" in text
    for heading in ("### The main job", "### Fictitious forget10", "### Unlearning quality", "### Removed, or only",
                    "### Full step", "### Projection kernels"):  # fmt: skip
        assert heading in text, heading  # one section per committed CSV
    assert run_script("results_page.py", *page, "--check", timeout=50) == ""  # the page just written is current
    md.write_text(text.replace("| smoke | 21 s |", "| smoke | 22 s |"))
    proc = subprocess.run([sys.executable, "benchmarks/results_page.py", *map(str, page), "--check"], cwd=REPO,
                          capture_output=True, text=True, timeout=50)  # fmt: skip
    assert proc.returncode == 1 and "stale" in proc.stdout


@pytest.mark.timeout(120)
def test_metric_costs(random_model):
    # 4 questions, GradNorm on 2, one timed round on the tiny model: a few seconds
    out = run_script("metric_costs.py", "--model", random_model, "--rows", 4, "--gradnorm-rows", 2, "--repeats", 1,
                     "--batch-size", 4, timeout=110)  # fmt: skip
    rows = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith("| ") and "---" not in line]
    assert [r[0].strip() for r in rows[1:]] == [
        "answer probability forward (baseline)", "greedy answers, 16 tokens (QA accuracy)",
        "forward + vocab stats: LOSS, Min-K%, Min-K%++, EM, ES", "ZLib on top (decode + compress)",
        "Reference: the reference model's forward", "GradNorm: forward + backward per question",
    ]  # fmt: skip
    assert float(rows[1][2]) == 1.0 and all(float(r[1]) > 0 for r in rows[1:])


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_fictitious_privacy(tmp_path, tiny_build):
    # target, oracle and a 2-step BLUR run on the tiny build, with 2 invented holdout people (8 questions)
    run_script("fictitious_privacy.py", "--build", tiny_build, "--steps", 2, "--max-world", 4, "--holdout-people", 2,
               "--out", tmp_path, "--runs-dir", tmp_path / "runs", timeout=240)  # fmt: skip
    rows = read_csv(tmp_path / "fictitious_privacy.csv")
    assert [r["model"].split(" ")[0] for r in rows] == ["target", "oracle", "BLUR-NPO"]
    holdout = read_jsonl(tmp_path / "runs" / "holdout.jsonl")
    seen = {r["person"] for r in read_jsonl(tiny_build / "data" / "full.jsonl")}
    assert len({r["person"] for r in holdout}) == 2 and not {r["person"] for r in holdout} & seen
    for r in rows:
        for attack in ("loss", "zlib", "min_k", "min_k_plus_plus", "gradnorm", "reference"):
            assert 0.0 <= float(r[f"mia_{attack}"]) <= 1.0, (r["model"], attack)
        assert 0.0 <= float(r["exact_memorization"]) <= 1.0 and 0.0 <= float(r["extraction_strength"]) <= 1.0
    assert float(rows[1]["mia_reference"]) == 0.5  # the oracle against itself: every score difference is 0
    assert float(rows[1]["privleak"]) == 0.0
    assert "| model | forget quality |" in (tmp_path / "fictitious_privacy.md").read_text()
