"""BLUR across processes on CPU (gloo): FSDP2, HSDP, DDP and a 2-node torchrun give one process's weights.

Each launch runs tests/dist_workers/blur_worker.py in N processes; every rank saves its gathered
weights and the per-step BLUR sums, which are compared with ONE process fitting the same
micro-batches of all ranks concatenated (the sharded/replicated gradient is the mean over ranks,
which is the gradient of the concatenated batch for per-sequence mean losses).

    launch                                         cases
    2 processes (one launch, module fixture)        FSDP2 forget_lower (vocab 101: uneven shards, AdamW,
                                                    export), FSDP2 rmu (vocab 100, loaded by path on the
                                                    meta device, SGD, clipping), DDP, FSDP2 with activation
                                                    checkpointing, FSDP2 LoRA (by path, NPO + KL references
                                                    from the adapters disabled, checkpointing, merged
                                                    export), DDP LoRA, sharded checkpoint at step 2 and
                                                    inside window 3, and both resumes
    2 processes (mode pdu)                          DDP and FSDP2: one lambda on both ranks, one process's;
                                                    its sharded-checkpoint resume
    2 processes (projection_metric adam)            FSDP2 and DDP, AdamW: the coefficients from the 6 sums,
                                                    the logged sums and the weights are one process's
    4 processes                                     HSDP on a 2x2 mesh
    torchrun --nnodes 2 --nproc-per-node 1          HSDP across two "nodes" on 127.0.0.1

The fast reduction-group and FSDP1 bookkeeping tests are in test_distributed.py.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "dist_workers", "blur_worker.py")
sys.path.insert(0, os.path.join(HERE, "dist_workers"))

import blur_worker  # noqa: E402

pytestmark = pytest.mark.slow

ATOL = 1e-6  # fp32 weights after 3 BLUR steps, sharded vs one process
LAUNCH_TIMEOUT = 240  # seconds for one multi-process launch; pytest-timeout is set above it


# --------------------------------------------------------------------------------------------
# launching
# --------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_all(commands: list[tuple[list[str], dict]], log_dir: str, timeout: float) -> None:
    """Start every command in its own session; wait; on failure or timeout kill them all and show logs."""
    procs, logs = [], []
    for i, (cmd, env) in enumerate(commands):
        log = open(os.path.join(log_dir, f"proc{i}.log"), "w")
        logs.append(log)
        procs.append(
            subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        )
    deadline = time.monotonic() + timeout
    failed = None
    try:
        for i, p in enumerate(procs):
            try:
                rc = p.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                failed = f"process {i} still running after {timeout:.0f}s"
                break
            if rc != 0:
                failed = f"process {i} exited with {rc}"
                break
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)  # the session we started: the worker and its children
                p.wait()
        for log in logs:
            log.close()
    if failed:
        tails = []
        for i in range(len(procs)):
            with open(os.path.join(log_dir, f"proc{i}.log")) as f:
                tails.append(f"--- process {i} ---\n" + "".join(f.readlines()[-25:]))
        pytest.fail(f"{failed}\n" + "\n".join(tails))


_LAUNCH_VARS = (
    "RANK", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
)


def _base_env() -> dict:
    """The test's environment without any rank variables (torchrun or our launcher sets them)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for key in _LAUNCH_VARS:
        env.pop(key, None)
    return env


def _with_free_port(run) -> None:
    """run(port) on a free port; once more on a new port if the first was taken in between (the
    free-port idiom releases the port before the workers bind it: another process may get it)."""
    for attempt in range(2):
        try:
            return run(str(free_port()))
        except pytest.fail.Exception as err:
            if attempt == 1 or "address already in use" not in str(err).lower():
                raise


def launch(cases: list[dict], nproc: int, out: str) -> None:
    """nproc worker processes on one node, ranks given by LOCAL_RANK (Lightning's own launcher does this)."""
    spec = os.path.join(out, "spec.json")
    with open(spec, "w") as f:
        json.dump({"out": out, "cases": cases}, f)

    def run(port: str) -> None:
        commands = []
        for rank in range(nproc):
            env = _base_env()
            env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, WORLD_SIZE=str(nproc),
                       LOCAL_WORLD_SIZE=str(nproc), NODE_RANK="0", LOCAL_RANK=str(rank))
            commands.append(([sys.executable, WORKER, spec], env))
        _run_all(commands, out, LAUNCH_TIMEOUT)

    _with_free_port(run)


def launch_torchrun_nodes(cases: list[dict], nnodes: int, out: str) -> None:
    """`torchrun --nnodes N --nproc-per-node 1 --node-rank i` for each i, all on 127.0.0.1."""
    spec = os.path.join(out, "spec.json")
    with open(spec, "w") as f:
        json.dump({"out": out, "cases": cases}, f)
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")

    def run(port: str) -> None:
        commands = []
        for node in range(nnodes):
            cmd = [torchrun, "--nnodes", str(nnodes), "--nproc-per-node", "1", "--node-rank", str(node),
                   "--master-addr", "127.0.0.1", "--master-port", port, WORKER, spec]
            commands.append((cmd, _base_env()))
        _run_all(commands, out, LAUNCH_TIMEOUT)

    _with_free_port(run)


def distcp_files(checkpoint_dir: str) -> list[str]:
    """A sharded checkpoint's per-rank files."""
    return sorted(f for f in os.listdir(checkpoint_dir) if f.endswith(".distcp"))


def load(out: str, name: str, rank: int) -> dict:
    return torch.load(os.path.join(out, f"{name}.rank{rank}.pt"), weights_only=False)


# --------------------------------------------------------------------------------------------
# comparing
# --------------------------------------------------------------------------------------------
_references: dict[str, dict] = {}


def single_process(case: dict) -> dict:
    """The case fitted by one process on all ranks' micro-batches concatenated (cached per case)."""
    if case["name"] not in _references:
        # no side effects on the sharded run's files: no export, no checkpoints
        single = {**case, "layout": "single", "export_dir": None, "save_at": (), "ckpt_path": None}
        _references[case["name"]] = blur_worker.run_case(single, 0)
    return _references[case["name"]]


def max_abs_diff(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> tuple[float, str]:
    """(max |got - want| over all tensors, where: 'key[index] got=.. want=..')."""
    assert got.keys() == want.keys(), sorted(set(got) ^ set(want))
    worst, where = 0.0, ""
    for key, w in want.items():
        d = (got[key].double() - w.double()).abs()
        if d.numel() and d.max().item() > worst:
            i = int(d.argmax())
            idx = tuple(int(x) for x in torch.unravel_index(torch.tensor(i), d.shape))
            worst = d.max().item()
            got_i, want_i = got[key].flatten()[i].item(), w.flatten()[i].item()
            where = f"{key}{list(idx)} got={got_i:.9g} want={want_i:.9g}"
    return worst, where


def assert_same_weights(got: dict, want: dict, atol: float, label: str) -> float:
    diff, where = max_abs_diff(got, want)
    assert diff <= atol, f"{label}: max abs diff {diff:.3g} > {atol:g} at {where}"
    return diff


def assert_moved(state: dict, case: dict, at_least: float = 1e-4) -> None:
    """The comparison means something only if the weights moved well beyond the tolerance."""
    if case.get("lora_rank"):  # the adapters' B starts at zero; the base weights never move
        moved = max(v.abs().max().item() for k, v in state.items() if "lora_B" in k)
        assert moved > at_least, f"adapters moved only {moved:.3g}"
        return
    init = blur_worker.build_tiny_llama(vocab_size=case.get("vocab", 101), seed=0).state_dict()
    moved = max((state[k] - init[k]).abs().max().item() for k in state if k in init and "rotary" not in k)
    assert moved > at_least, f"weights moved only {moved:.3g}"


def assert_same_sums(got: list[dict], want: list[dict], rtol: float = 1e-5) -> None:
    """The BLUR sums of each step: counted once (a double count would be exactly 2x or 4x)."""
    assert len(got) == len(want) > 0
    for step, (g, w) in enumerate(zip(got, want)):
        for key in ("sq_forget", "sq_retain"):
            assert g[key] == pytest.approx(w[key], rel=rtol, abs=1e-12), (step, key, g[key], w[key])
        # <g_r, g_f> cancels: its error is relative to ||g_r|| ||g_f||, not to itself
        scale = (g["sq_forget"] * g["sq_retain"]) ** 0.5
        assert g["dot_rf"] == pytest.approx(w["dot_rf"], rel=1e-3, abs=1e-6 * scale), (step, g, w)


# --------------------------------------------------------------------------------------------
# the 2-process launch
# --------------------------------------------------------------------------------------------
def two_rank_cases(out: str, model_dir: str) -> dict[str, dict]:
    ckpt_dir = os.path.join(out, "ckpt")
    os.makedirs(ckpt_dir, exist_ok=True)
    common = dict(world=2, micro_batches=6, accumulate=2)  # 3 BLUR steps per run
    cases = [
        dict(name="fsdp2_forget_lower", layout="fsdp2", mode="forget_lower", forget_loss="npo",
             retain_loss="nll", vocab=101, optimizer="adamw_fused", lr=1e-3,
             export_dir=os.path.join(out, "export"), **common),
        dict(name="fsdp2_rmu", layout="fsdp2", mode="rmu", forget_loss="ga", retain_loss="kl", vocab=100,
             model_path=model_dir, optimizer="sgd", lr=0.05, clip=0.3, **common),
        # BLURFusedAdamW on DTensor shards: d formed inside the update, clipped by the global sums
        dict(name="fsdp2_fused_adamw", layout="fsdp2", mode="forget_lower", forget_loss="npo",
             retain_loss="nll", vocab=101, optimizer="blur_fused_adamw", lr=1e-3, clip=0.3, **common),
        dict(name="ddp_forget_lower", layout="ddp", mode="forget_lower", forget_loss="npo", retain_loss="nll",
             vocab=101, optimizer="sgd", lr=0.05, **common),
        # DDP with gradient_as_bucket_view=True: .grad is DDP's bucket memory, shared by both passes
        dict(name="ddp_bucket_view", layout="ddp", bucket_view=True, optimizer="sgd", lr=0.05, **common),
        dict(name="ddp_bucket_view_k1", layout="ddp", bucket_view=True, optimizer="sgd", lr=0.05, world=2,
             micro_batches=3, accumulate=1),
        # rank 1's forget loss is infinite in micro-batch 2 (step 2), its gradients finite: both ranks skip
        dict(name="ddp_inf_loss_one_rank", layout="ddp", inf_loss_at=[1, 2], optimizer="sgd", lr=0.05, **common),
        # activation checkpointing per decoder layer, applied before fully_shard
        dict(name="fsdp2_checkpointing", layout="fsdp2", mode="forget_lower", forget_loss="npo",
             retain_loss="nll", vocab=101, optimizer="adamw", lr=1e-3, activation_checkpointing=True, **common),
        # LoRA on the meta-device path (adapters from rank 0), NPO + KL references from the sharded
        # policy with its adapters disabled, checkpointing on, the merged export
        dict(name="fsdp2_lora", layout="fsdp2", mode="forget_lower", forget_loss="npo", retain_loss="kl",
             vocab=100, model_path=model_dir, optimizer="adamw", lr=3e-3, lora_rank=4, lora_alpha=8.0,
             lora_target_modules=["q_proj", "v_proj", "down_proj"], activation_checkpointing=True,
             export_dir=os.path.join(out, "export_lora"), **common),
        dict(name="ddp_lora", layout="ddp", mode="forget_lower", forget_loss="npo", retain_loss="nll",
             vocab=101, optimizer="sgd", lr=0.5, lora_rank=4, activation_checkpointing=True, **common),
        # 4 steps uninterrupted, checkpoints after micro-batch 4 (step 2) and 5 (inside window 3)
        dict(name="ckpt_full_run", layout="fsdp2", world=2, micro_batches=8, accumulate=2, save_at=[4, 5],
             ckpt_dir=ckpt_dir),
        dict(name="ckpt_resume_step2", layout="fsdp2", world=2, micro_batches=8, accumulate=2,
             ckpt_path=os.path.join(ckpt_dir, "ckpt_full_run.micro4.ckpt")),
        dict(name="ckpt_resume_mid_window", layout="fsdp2", world=2, micro_batches=8, accumulate=2,
             ckpt_path=os.path.join(ckpt_dir, "ckpt_full_run.micro5.ckpt")),
    ]
    return {c["name"]: c for c in cases}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny Llama (vocab 100) and tokenizer on disk, for the load-by-name (meta device) path."""
    from blur_lightning.testing.tiny import tiny_tokenizer

    path = tmp_path_factory.mktemp("tiny100")
    blur_worker.build_tiny_llama(vocab_size=100, seed=0).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory, model_dir):
    out = str(tmp_path_factory.mktemp("two_rank"))
    cases = two_rank_cases(out, model_dir)
    start = time.monotonic()
    launch(list(cases.values()), nproc=2, out=out)
    print(f"2-process launch: {time.monotonic() - start:.1f}s for {len(cases)} fits")
    return out, cases


@pytest.mark.timeout(400)
@pytest.mark.parametrize(
    "name", ["fsdp2_forget_lower", "fsdp2_rmu", "fsdp2_fused_adamw", "fsdp2_checkpointing", "fsdp2_lora"]
)
def test_fsdp2_two_ranks_equal_one_process(two_rank_run, name):
    out, cases = two_rank_run
    case = cases[name]
    want = single_process(case)
    for rank in range(2):
        got = load(out, name, rank)
        assert got["global_step"] == want["global_step"] == 3
        diff = assert_same_weights(got["state"], want["state"], ATOL, f"{name} rank {rank}")
        assert_same_sums(got["stats"], want["stats"])
    assert_moved(want["state"], case)
    print(f"{name}: max abs diff {diff:.3g}")


@pytest.mark.timeout(400)
@pytest.mark.parametrize("name", ["fsdp2_rmu", "fsdp2_fused_adamw"])
def test_fsdp2_clipping_was_active(two_rank_run, name):
    """Both cases clip at 0.3 (rmu: the shard-aware clip over d; fused: a factor from the global
    sums, d never written): the global norm of d exceeded it, so the clip mattered."""
    out, cases = two_rank_run
    stats = load(out, name, 0)["stats"]
    assert max(s["direction_norm"] for s in stats) > cases[name]["clip"]


@pytest.mark.timeout(400)
@pytest.mark.parametrize("name", ["ddp_forget_lower", "ddp_lora"])
def test_ddp_two_ranks_equal_one_process_sums_counted_once(two_rank_run, name):
    out, cases = two_rank_run
    case = cases[name]
    want = single_process(case)
    for rank in range(2):
        got = load(out, name, rank)
        diff = assert_same_weights(got["state"], want["state"], ATOL, f"ddp rank {rank}")
        # DDP gradients are already all-reduced: the local sums are the global ones, not 2x.
        assert_same_sums(got["stats"], want["stats"])
    assert_moved(want["state"], case)
    print(f"ddp: max abs diff {diff:.3g}")


@pytest.mark.timeout(400)
@pytest.mark.parametrize("name", ["ddp_bucket_view", "ddp_bucket_view_k1"])
def test_ddp_gradient_as_bucket_view_equals_one_process(two_rank_run, name):
    """With gradient_as_bucket_view=True DDP points .grad at its buckets: the forget stash must not
    stay there, or the retain backward overwrites it (before: g_f == g_r from step 2, coef exactly
    gamma - 1, weights 8e-2 away from one process)."""
    out, cases = two_rank_run
    case = cases[name]
    want = single_process(case)
    for rank in range(2):
        got = load(out, name, rank)
        assert got["global_step"] == want["global_step"] == 3
        diff = assert_same_weights(got["state"], want["state"], ATOL, f"{name} rank {rank}")
        assert_same_sums(got["stats"], want["stats"])
    assert_moved(want["state"], case)
    print(f"{name}: max abs diff {diff:.3g}")


@pytest.mark.timeout(400)
def test_infinite_loss_on_one_rank_skips_the_step_on_both(two_rank_run):
    """The skip decision is reduced over the ranks: both skip step 2 and end equal to one process
    that skipped it (before: rank 1 skipped alone and the replicas drifted apart)."""
    out, cases = two_rank_run
    case = cases["ddp_inf_loss_one_rank"]
    ranks = [load(out, case["name"], rank) for rank in range(2)]
    assert [r["skipped_steps"] for r in ranks] == [1, 1]
    assert_same_weights(ranks[1]["state"], ranks[0]["state"], 0.0, "rank 1 vs rank 0")
    with pytest.warns(RuntimeWarning, match="1 step\\(s\\) skipped"):
        want = blur_worker.run_case({**case, "layout": "single", "inf_loss_at": [0, 2]}, 0)
    assert want["skipped_steps"] == 1
    assert_same_weights(ranks[0]["state"], want["state"], ATOL, "2 ranks vs one process")
    assert_moved(want["state"], case)


@pytest.mark.timeout(400)
def test_sharded_checkpoint_resume_reaches_same_weights(two_rank_run):
    out, cases = two_rank_run
    ckpt_dir = cases["ckpt_full_run"]["ckpt_dir"]
    at_step2 = os.path.join(ckpt_dir, "ckpt_full_run.micro4.ckpt")
    mid_window = os.path.join(ckpt_dir, "ckpt_full_run.micro5.ckpt")
    # Sharded: a directory with one .distcp file per rank and Lightning's meta.pt.
    assert distcp_files(at_step2) == ["__0_0.distcp", "__1_0.distcp"]
    meta_step2 = torch.load(os.path.join(at_step2, "meta.pt"), weights_only=False)
    meta_mid = torch.load(os.path.join(mid_window, "meta.pt"), weights_only=False)
    assert meta_step2["global_step"] == 2 and "blur_accumulation" not in meta_step2
    assert meta_mid["global_step"] == 2 and meta_mid["blur_accumulation"]["micro_step"] == 1
    full = load(out, "ckpt_full_run", 0)
    assert full["global_step"] == 4
    for name in ("ckpt_resume_step2", "ckpt_resume_mid_window"):
        for rank in range(2):
            got = load(out, name, rank)
            assert got["global_step"] == 4
            diff = assert_same_weights(got["state"], full["state"], 1e-7, f"{name} rank {rank}")
            if name == "ckpt_resume_mid_window":  # the saved window is what the full run went on with
                assert got["stats"] == full["stats"][-len(got["stats"]):]
            else:  # the full run reduced window 3's first micro-batch when it saved there (gradient_sync
                # per_step: the flush), this run only with the second: the same sums, rounded in another order
                assert_same_sums(got["stats"], full["stats"][-len(got["stats"]):], rtol=1e-6)
        print(f"{name}: max abs diff {diff:.3g}")


@pytest.mark.timeout(400)
def test_export_is_consolidated_hf_model(two_rank_run):
    from transformers import AutoModelForCausalLM

    out, cases = two_rank_run
    exported = AutoModelForCausalLM.from_pretrained(cases["fsdp2_forget_lower"]["export_dir"])
    assert type(exported).__name__ == "LlamaForCausalLM"
    trained = load(out, "fsdp2_forget_lower", 0)["state"]
    state = exported.state_dict()
    for key, value in trained.items():
        torch.testing.assert_close(state[key], value, rtol=0, atol=0, msg=key)


@pytest.mark.timeout(400)
def test_fsdp2_lora_export_is_the_merged_model(two_rank_run):
    """The FSDP2 LoRA export (gathered, merged on rank 0): a plain LlamaForCausalLM whose target
    weights are W + (alpha / r) B A of the trained shards, the other weights the base's; the
    adapter alone beside it."""
    from transformers import AutoModelForCausalLM

    out, cases = two_rank_run
    case = cases["fsdp2_lora"]
    exported = AutoModelForCausalLM.from_pretrained(case["export_dir"]).state_dict()
    assert os.path.isfile(os.path.join(case["export_dir"], "adapter", "adapter_config.json"))
    trained = load(out, "fsdp2_lora", 0)["state"]
    scale = case["lora_alpha"] / case["lora_rank"]
    merged = 0
    for key, value in trained.items():
        if "lora_" in key:
            continue
        name = key.removeprefix("base_model.model.").replace(".base_layer.", ".")
        want = value
        if ".base_layer." in key:
            stem = key.replace(".base_layer.weight", "")
            want = value + scale * trained[f"{stem}.lora_B.default.weight"] @ trained[f"{stem}.lora_A.default.weight"]
            merged += 1
        torch.testing.assert_close(exported[name], want, rtol=1e-6, atol=1e-6, msg=name)
    assert merged == 3 * 2  # q, v, down in 2 layers


# --------------------------------------------------------------------------------------------
# 2 processes, numbered QA rows: NPO's reference cached at fit start (npo_reference="cache")
# --------------------------------------------------------------------------------------------
def npo_cache_cases(out: str) -> dict[str, dict]:
    """24 forget rows, 2 per rank per micro-batch, 2 micro-batches a step: 3 steps are one epoch."""
    from blur_lightning.testing.tiny import tiny_tokenizer

    qa = os.path.join(HERE, "fixtures", "qa")
    with open(os.path.join(qa, "forget.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    rows += [{**r, "question": r["question"] + " Again?"} for r in rows[: 24 - len(rows)]]
    forget = os.path.join(out, "forget24.jsonl")
    with open(forget, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    data = dict(forget=forget, retain=os.path.join(qa, "retain.jsonl"), tokenizer=os.path.join(HERE, "fixtures",
                "tiny_tokenizer"))
    ckpt_dir = os.path.join(out, "ckpt")
    os.makedirs(ckpt_dir, exist_ok=True)
    # SGD: a rank's batch of 2 pads to another width than one process's batch of 4, and AdamW's first
    # steps (g / |g|) turn those 1e-7 roundings into lr-sized moves where a gradient is near 0
    # (4e-4 at lr 1e-2 measured); the tables agree to 1e-6 whatever the optimizer.
    common = dict(world=2, rows=2, accumulate=2, max_steps=3, data=data, vocab=len(tiny_tokenizer()),
                  forget_loss="npo", retain_loss="nll", npo_reference="cache", optimizer="sgd", lr=0.2)
    cases = [
        dict(name="fsdp2_npo_cache", layout="fsdp2", save_at=[2], ckpt_dir=ckpt_dir, **common),
        dict(name="fsdp2_npo_cache_resume", layout="fsdp2",
             ckpt_path=os.path.join(ckpt_dir, "fsdp2_npo_cache.micro2.ckpt"), **common),
        dict(name="ddp_npo_cache", layout="ddp", **common),
    ]
    return {c["name"]: c for c in cases}


@pytest.fixture(scope="module")
def npo_cache_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("npo_cache"))
    cases = npo_cache_cases(out)
    launch(list(cases.values()), nproc=2, out=out)
    return out, cases


@pytest.mark.timeout(400)
@pytest.mark.parametrize("name", ["fsdp2_npo_cache", "ddp_npo_cache"])
def test_cached_npo_reference_two_ranks_equal_one_process(npo_cache_run, name):
    """Each rank computes half the table (strided), one all-reduce gives both the whole of it, and
    the shuffled sampler's rows find their own values: 2 ranks = one process with the reference
    model on the same rows (batches of 4), and = one process with the cache."""
    out, cases = npo_cache_run
    case = cases[name]
    with_model = single_process({**case, "name": name + "_model", "npo_reference": "model"})
    with_cache = single_process(case)
    assert with_model["has_reference"] and not with_cache["has_reference"]
    for rank in range(2):
        got = load(out, name, rank)
        assert got["global_step"] == 3 and not got["has_reference"]
        torch.testing.assert_close(got["npo_table"], with_cache["npo_table"], rtol=0, atol=1e-6)
        diff = assert_same_weights(got["state"], with_model["state"], ATOL, f"{name} rank {rank} vs model")
        assert_same_weights(got["state"], with_cache["state"], ATOL, f"{name} rank {rank} vs cache")
    assert_moved(with_model["state"], case)
    print(f"{name}: max abs diff to one process with the reference model {diff:.3g}")


@pytest.mark.timeout(400)
def test_cached_npo_reference_resumes_from_a_sharded_checkpoint(npo_cache_run):
    """FSDP restores the checkpoint after on_fit_start: the table must still be the saved one."""
    out, cases = npo_cache_run
    meta = torch.load(os.path.join(cases["fsdp2_npo_cache"]["ckpt_dir"], "fsdp2_npo_cache.micro2.ckpt", "meta.pt"),
                      weights_only=False)
    full = load(out, "fsdp2_npo_cache", 0)
    assert torch.equal(meta["npo_reference_logprobs"]["values"], full["npo_table"])
    for rank in range(2):
        got = load(out, "fsdp2_npo_cache_resume", rank)
        assert got["global_step"] == 3
        assert torch.equal(got["npo_table"], full["npo_table"])
        assert_same_weights(got["state"], full["state"], 1e-7, f"resume rank {rank}")


# --------------------------------------------------------------------------------------------
# 2 processes, mode "pdu": the multiplier moves on the retain loss averaged over the ranks
# --------------------------------------------------------------------------------------------
def pdu_cases(out: str) -> dict[str, dict]:
    ckpt_dir = os.path.join(out, "ckpt")
    os.makedirs(ckpt_dir, exist_ok=True)
    # The tiny model's retain NLL is ~4.6 (vocab 101): eps 4.5 and step 0.5 move lambda ~0.05 a step,
    # and the ranks' own losses differ by more than the 1e-6 the comparison allows. Warm-up 1: step 1 leaves it.
    common = dict(world=2, micro_batches=6, accumulate=2, mode="pdu", forget_loss="pdu_entropic", retain_loss="nll",
                  optimizer="sgd", lr=0.05, pdu_retain_eps=4.5, pdu_dual_step_size=0.5, pdu_dual_warmup_steps=1)
    cases = [
        dict(name="ddp_pdu", layout="ddp", **common),
        dict(name="fsdp2_pdu", layout="fsdp2", save_at=[4], ckpt_dir=ckpt_dir, **common),
        dict(name="fsdp2_pdu_resume", layout="fsdp2", ckpt_path=os.path.join(ckpt_dir, "fsdp2_pdu.micro4.ckpt"),
             **common),
    ]
    return {c["name"]: c for c in cases}


@pytest.fixture(scope="module")
def pdu_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("pdu"))
    cases = pdu_cases(out)
    launch(list(cases.values()), nproc=2, out=out)
    return out, cases


@pytest.mark.timeout(400)
@pytest.mark.parametrize("name", ["ddp_pdu", "fsdp2_pdu"])
def test_pdu_lambda_is_one_value_over_ranks_equal_to_one_process(pdu_run, name):
    """Each rank's retain loss is its own half of the batch; the dual update uses their mean, so both
    ranks hold the lambda of one process on the whole batch (a rank-local update would split them, or,
    under DDP's buffer broadcast, leave both on rank 0's own losses)."""
    out, cases = pdu_run
    case = cases[name]
    want = single_process(case)
    assert len(want["lambdas"]) == 3 and want["lambdas"][0] == blur_worker.DEFAULTS["alpha"] != want["lambdas"][-1]
    ranks = [load(out, name, rank) for rank in range(2)]
    assert ranks[0]["lambdas"] == ranks[1]["lambdas"]  # bitwise: one all-reduced value
    assert ranks[0]["lambdas"] == pytest.approx(want["lambdas"], rel=1e-6)
    for rank, got in enumerate(ranks):
        assert_same_weights(got["state"], want["state"], ATOL, f"{name} rank {rank}")


@pytest.mark.timeout(400)
def test_pdu_lambda_resumes_from_a_sharded_checkpoint(pdu_run):
    out, cases = pdu_run
    full = load(out, "fsdp2_pdu", 0)
    for rank in range(2):
        got = load(out, "fsdp2_pdu_resume", rank)
        assert got["global_step"] == 3 and len(got["lambdas"]) == 1  # step 3 only, from the saved lambda
        assert got["lambdas"][-1] == full["lambdas"][-1]
        assert_same_weights(got["state"], full["state"], 1e-7, f"resume rank {rank}")


# --------------------------------------------------------------------------------------------
# 2 processes, projection_metric "adam": the 6 sums over FSDP2's shards of g and of AdamW's v
# --------------------------------------------------------------------------------------------
# forget_coef = gamma - s_rf^P / s_ff^P: the ratio cancels like a cosine, so its error is measured against
# sqrt(s_rr / s_ff) (~1 here, GA vs NLL on random tokens); float32 gradients and sums, sharded vs one process.
ADAM_METRIC_COEF_ATOL = 1e-5


def adam_metric_cases() -> dict[str, dict]:
    """4 AdamW steps: step 1 has no second moment (the identity), steps 2-4 project in P = 1 / (sqrt(v_hat) + eps).
    FSDP2 holds v as DTensor shards beside the gradients' (vocab 101: uneven), DDP a whole copy per rank."""
    common = dict(world=2, micro_batches=8, accumulate=2, mode="forget_lower", forget_loss="ga", retain_loss="nll",
                  vocab=101, optimizer="adamw", lr=1e-3, projection_metric="adam")
    cases = [dict(name="fsdp2_adam_metric", layout="fsdp2", **common),
             dict(name="ddp_adam_metric", layout="ddp", **common)]
    return {c["name"]: c for c in cases}


@pytest.fixture(scope="module")
def adam_metric_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("adam_metric"))
    cases = adam_metric_cases()
    start = time.monotonic()
    launch(list(cases.values()), nproc=2, out=out)
    print(f"adam-metric 2-process launch: {time.monotonic() - start:.1f}s")
    return out, cases


def coef_scale(step_stats: dict) -> float:
    """The size a forget_coef error is measured against: sqrt(s_rr / s_ff), the bound of |s_rf / s_ff|."""
    return (step_stats["sq_retain"] / step_stats["sq_forget"]) ** 0.5


def assert_same_coefs(got: list[dict], want: list[dict], atol: float) -> float:
    """Each step's coefficients within atol * coef_scale; returns the largest such relative error."""
    worst = 0.0
    for step, (g, w) in enumerate(zip(got, want, strict=True)):
        assert g["retain_coef"] == w["retain_coef"] == 1.0, (step, g, w)  # forget_lower: d = g_r + c g_f
        err = abs(g["forget_coef"] - w["forget_coef"]) / coef_scale(w)
        assert err <= atol, f"step {step}: forget_coef {g['forget_coef']:.9g} vs {w['forget_coef']:.9g}"
        worst = max(worst, err)
    return worst


@pytest.mark.timeout(400)
@pytest.mark.parametrize("name", ["fsdp2_adam_metric", "ddp_adam_metric"])
def test_adam_metric_two_ranks_equal_one_process(adam_metric_run, name, one_thread):
    """The P-weighted sums count every element once (FSDP2: all-reduced with the plain three over the
    shard group, v's local shard beside the gradient's; DDP: local, every rank holding the whole v), so
    both ranks' coefficients, logged sums and weights are one process's on the concatenated batch."""
    out, cases = adam_metric_run
    case = cases[name]
    want = single_process(case)
    assert want["global_step"] == 4
    # The metric was in use: step 1 (no v yet) has the identity's coefficient, steps 2-4 another one,
    # far outside the tolerance (measured: 0.015, 0.0032, 0.011 of the scale; without the metric ~1e-8).
    gamma = blur_worker.DEFAULTS["gamma"]
    identity = [gamma - s["dot_rf"] / s["sq_forget"] for s in want["stats"]]
    gaps = [abs(s["forget_coef"] - c) / coef_scale(s) for s, c in zip(want["stats"], identity)]
    assert gaps[0] <= ADAM_METRIC_COEF_ATOL and min(gaps[1:]) > 100 * ADAM_METRIC_COEF_ATOL, gaps
    for rank in range(2):
        got = load(out, name, rank)
        assert got["global_step"] == 4
        coef_err = assert_same_coefs(got["stats"], want["stats"], ADAM_METRIC_COEF_ATOL)
        assert_same_sums(got["stats"], want["stats"])
        diff = assert_same_weights(got["state"], want["state"], ATOL, f"{name} rank {rank}")
        print(f"{name} rank {rank}: max abs diff weights {diff:.3g}, forget_coef {coef_err:.3g} of the scale")
    assert_moved(want["state"], case)


# --------------------------------------------------------------------------------------------
# 4 processes: HSDP on a 2x2 mesh
# --------------------------------------------------------------------------------------------
@pytest.mark.timeout(400)
def test_hsdp_2x2_equals_one_process(tmp_path):
    case = dict(name="hsdp_2x2", layout="hsdp", world=4, shard_size=2, micro_batches=4, accumulate=2,
                optimizer="sgd", lr=0.05)
    launch([case], nproc=4, out=str(tmp_path))
    want = single_process(case)
    for rank in range(4):
        got = load(str(tmp_path), "hsdp_2x2", rank)
        assert got["global_step"] == 2
        diff = assert_same_weights(got["state"], want["state"], ATOL, f"hsdp rank {rank}")
        # Sums over the shard dim only: reducing over the replicas too would double them.
        assert_same_sums(got["stats"], want["stats"])
    assert_moved(want["state"], case)
    print(f"hsdp 2x2: max abs diff {diff:.3g}")


# --------------------------------------------------------------------------------------------
# two nodes on loopback, launched by torchrun
# --------------------------------------------------------------------------------------------
@pytest.mark.timeout(400)
def test_torchrun_two_nodes_loopback(tmp_path):
    # HSDP across nodes: each node holds a whole replica; gradients are all-reduced between them.
    case = dict(name="two_nodes", layout="hsdp", world=2, num_nodes=2, shard_size=1, micro_batches=2,
                accumulate=1, optimizer="adamw", lr=1e-3)
    launch_torchrun_nodes([case], nnodes=2, out=str(tmp_path))
    node0, node1 = load(str(tmp_path), "two_nodes", 0), load(str(tmp_path), "two_nodes", 1)
    assert node0["global_step"] == node1["global_step"] == 2
    assert_same_weights(node1["state"], node0["state"], 0.0, "node 1 vs node 0")
    want = single_process(case)
    diff = assert_same_weights(node0["state"], want["state"], ATOL, "two nodes vs one process")
    assert_same_sums(node0["stats"], want["stats"])
    print(f"two nodes: identical replicas, max abs diff to one process {diff:.3g}")


# --------------------------------------------------------------------------------------------
# the CLI with configs/fsdp/cpu_2proc.yaml under torchrun
# --------------------------------------------------------------------------------------------
@pytest.mark.timeout(300)
def test_cli_fsdp2_config_under_torchrun(tmp_path):
    """YAML -> FSDP2Strategy -> data module on 2 ranks -> sharded checkpoints -> consolidated export."""
    from transformers import AutoModelForCausalLM

    from blur_lightning.testing.tiny import tiny_llama, tiny_tokenizer

    model_dir, run_dir = str(tmp_path / "model"), str(tmp_path / "run")
    tokenizer = tiny_tokenizer()
    initial = tiny_llama(vocab_size=len(tokenizer))
    initial.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    root = os.path.dirname(HERE)
    cmd = [torchrun, "--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
           "-m", "blur_lightning.cli", "fit",
           "--config", os.path.join(root, "configs", "fsdp", "cpu_2proc.yaml"),
           "--model.model", model_dir,
           "--data.forget_path", os.path.join(HERE, "fixtures", "qa", "forget.jsonl"),
           "--data.retain_path", os.path.join(HERE, "fixtures", "qa", "retain.jsonl"),
           "--trainer.default_root_dir", run_dir, "--trainer.logger.init_args.save_dir", run_dir]
    _run_all([(cmd, _base_env())], str(tmp_path), LAUNCH_TIMEOUT)
    last = os.path.join(run_dir, "checkpoints", "last.ckpt")
    assert distcp_files(last) == ["__0_0.distcp", "__1_0.distcp"]
    assert torch.load(os.path.join(last, "meta.pt"), weights_only=False)["global_step"] == 2
    exported = AutoModelForCausalLM.from_pretrained(os.path.join(run_dir, "hf_model")).state_dict()
    moved = max((exported[k] - v).abs().max().item() for k, v in initial.state_dict().items())
    assert moved > 1e-4, f"the exported weights moved only {moved:.3g}"
