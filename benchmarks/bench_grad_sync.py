"""Gradient collectives and ms per optimizer step: gradient_sync "per_step" against "per_micro_batch".

    python benchmarks/bench_grad_sync.py --out OUT_DIR          (2 gloo processes on the CPU, k = 8)
    python benchmarks/bench_grad_sync.py --out OUT_DIR --accumulate 2 --steps 1 --warmup 1 --rounds 1   (smoke)

Two processes (gloo, one torch thread each) fit BLURUnlearner (GA + NLL, AdamW) on a random tiny Llama
(blur_lightning.testing.tiny) under each layout (DDP, FSDP2), with each setting in turn in the same
processes, `--rounds` times in alternating order so that drift on a shared machine hits both alike:

    per_step         each side's gradient is reduced once per optimizer step, in the window's last
                     micro-batch (blur_lightning.distributed.grad_sync): 2 reductions per step
    per_micro_batch  every backward reduces, as DDP and FSDP2 do by default: 2k reductions per step

Per row: the collectives of one optimizer step, counted by the profiler in the last warm-up step
(blur_lightning.testing.collectives; "gradient" are the all-reduces and reduce-scatters of more than
8 values: DDP's buckets, FSDP2's reduce-scatters, one per fully_shard group; gloo runs a reduce-scatter
as an all-reduce of the whole input), and the median ms per optimizer step (first micro-batch start to
the update's end, on rank 0; gloo's collectives keep the ranks in step) with p20/p80 over the timed
steps of all rounds. Rows are appended to OUT/bench_grad_sync.csv with the device, date and commit;
OUT/bench_grad_sync.md holds this run's table, which is also printed. On a shared CPU the times move
with the other jobs: compare rows of one run only.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for path in (ROOT, os.path.join(ROOT, "benchmarks")):
    if path not in sys.path:
        sys.path.insert(0, path)

from common import append_csv, device_name, git_commit, markdown_table, today  # noqa: E402

LAYOUTS = ("ddp", "fsdp2")
SETTINGS = ("per_step", "per_micro_batch")
WORLD = 2


# --------------------------------------------------------------------------------------------
# one rank
# --------------------------------------------------------------------------------------------
def random_side(rows: int, length: int, vocab: int, seed: int) -> dict[str, torch.Tensor]:
    """rows x length random tokens; the loss on all but the first 3 (a prompt)."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab, (rows, length), generator=g)
    labels = input_ids.clone()
    labels[:, :3] = -100
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}


class Batches:
    """A sized iterable of ready batches (a plain list would be taken for several dataloaders)."""

    def __init__(self, batches: list[dict]) -> None:
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        return iter(self.batches)


def fit(spec: dict, layout: str, setting: str, rank: int) -> dict:
    """One fit of warmup + steps optimizer steps; the collectives of the last warm-up step and the timed steps' ms."""
    import lightning.pytorch as pl
    from lightning.pytorch.strategies import DDPStrategy

    from blur_lightning.distributed.fsdp import FSDP2Strategy
    from blur_lightning.testing.collectives import CollectiveCounter
    from blur_lightning.testing.tiny import tiny_llama
    from blur_lightning.training.unlearner import BLURUnlearner

    k, vocab = spec["accumulate"], spec["vocab"]
    model = tiny_llama(vocab_size=vocab, hidden=spec["hidden"], layers=spec["layers"], attn_implementation="eager")
    module = BLURUnlearner(
        model, forget_loss="ga", retain_loss="nll", gamma=1.0, accumulate_grad_batches=k, gradient_sync=setting,
        export_dir=None, attn_implementation="eager",
        optimizer=functools.partial(torch.optim.AdamW, lr=1e-4, weight_decay=0.0),
    )  # fmt: skip
    windows = spec["warmup"] + spec["steps"]
    batches = [
        {side: random_side(spec["rows"], spec["length"], vocab, seed=base + WORLD * j + rank)
         for side, base in (("forget", 1000), ("retain", 5000))}
        for j in range(windows * k)
    ]  # fmt: skip
    times: list[float] = []
    counted: dict = {}

    class Clock(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx % k == 0:
                self.start = time.perf_counter()
                if batch_idx // k == spec["warmup"] - 1:  # the last warm-up step: counted, not timed
                    self.counter = CollectiveCounter().__enter__()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if (batch_idx + 1) % k:
                return
            if batch_idx // k == spec["warmup"] - 1:
                self.counter.__exit__(None, None, None)
                counted.update(gradient=self.counter.gradient, gradient_numel=self.counter.gradient_numel,
                               kinds=dict(self.counter.kinds))  # fmt: skip
            elif batch_idx // k >= spec["warmup"]:
                times.append(time.perf_counter() - self.start)

    strategy = (DDPStrategy(process_group_backend="gloo") if layout == "ddp"
                else FSDP2Strategy(sharding="full", process_group_backend="gloo"))  # fmt: skip
    torch.manual_seed(0)
    trainer = pl.Trainer(
        accelerator="cpu", devices=WORLD, strategy=strategy, max_epochs=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False, callbacks=[Clock()],
        limit_val_batches=0, num_sanity_val_steps=0,
    )  # fmt: skip
    trainer.fit(module, train_dataloaders=Batches(batches))
    return {"times_ms": [1e3 * t for t in times], **counted,
            "params": sum(p.numel() for p in model.parameters())}  # fmt: skip


def worker(spec_path: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)  # two processes on a few shared cores
    with open(spec_path) as f:
        spec = json.load(f)
    rank = int(os.environ["LOCAL_RANK"])
    results: dict[str, dict] = {}
    for round_ in range(spec["rounds"]):
        for layout in spec["layouts"]:
            order = SETTINGS if round_ % 2 == 0 else SETTINGS[::-1]  # alternate: drift hits both alike
            for setting in order:
                got = fit(spec, layout, setting, rank)
                row = results.setdefault(f"{layout}/{setting}", {"times_ms": []})
                row["times_ms"] += got.pop("times_ms")
                row.update(got)
    if rank == 0:
        with open(spec["result"], "w") as f:
            json.dump(results, f)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    # after profiler sessions the interpreter's exit can abort in torch's C++ teardown (seen in the tests'
    # workers); the results are written: leave without it
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# --------------------------------------------------------------------------------------------
# the launcher
# --------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(spec: dict, workdir: str, timeout: float) -> dict:
    """WORLD processes of this script in worker mode (Lightning reads the rank variables); rank 0's results."""
    spec = {**spec, "result": os.path.join(workdir, "result.json")}
    spec_path = os.path.join(workdir, "spec.json")
    with open(spec_path, "w") as f:
        json.dump(spec, f)
    port = str(free_port())
    procs, logs = [], []
    for rank in range(WORLD):
        env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                   WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD), NODE_RANK="0", LOCAL_RANK=str(rank))  # fmt: skip
        log = open(os.path.join(workdir, f"rank{rank}.log"), "w")
        logs.append(log)
        procs.append(subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", spec_path], env=env,
                                      stdout=log, stderr=subprocess.STDOUT, start_new_session=True))  # fmt: skip
    deadline, failed = time.monotonic() + timeout, None
    try:
        for rank, proc in enumerate(procs):
            try:
                if proc.wait(timeout=max(1.0, deadline - time.monotonic())) != 0:
                    failed = f"rank {rank} exited with {proc.returncode}"
            except subprocess.TimeoutExpired:
                failed = f"rank {rank} still running after {timeout:.0f} s"
            if failed:
                break
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)  # the session this launcher started
                proc.wait()
        for log in logs:
            log.close()
    if failed:
        tail = Path(workdir, "rank0.log").read_text()[-4000:]
        raise SystemExit(f"bench_grad_sync: {failed}\n--- rank 0 log tail ---\n{tail}")
    with open(spec["result"]) as f:
        return json.load(f)


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[round(q * (len(ordered) - 1))]  # nearest rank: no extrapolation from a few steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--out", help="folder for bench_grad_sync.csv and .md")
    parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=LAYOUTS)
    parser.add_argument("--accumulate", type=int, default=8, help="micro-batches per optimizer step (k)")
    parser.add_argument("--steps", type=int, default=5, help="timed optimizer steps per fit")
    parser.add_argument("--warmup", type=int, default=2, help="untimed optimizer steps first (the last is counted)")
    parser.add_argument("--rounds", type=int, default=2, help="fits per layout and setting, in alternating order")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--rows", type=int, default=2, help="sequences per rank, micro-batch and side")
    parser.add_argument("--length", type=int, default=32)
    parser.add_argument("--timeout", type=float, default=1800.0)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker)
        return
    if not args.out:
        parser.error("--out is required")
    if args.warmup < 1 or args.steps < 1:
        parser.error("--warmup and --steps must be >= 1 (the last warm-up step is the counted one)")
    from blur_lightning.testing.tiny import TINY_VOCAB_SIZE

    spec = {k: getattr(args, k) for k in ("layouts", "accumulate", "steps", "warmup", "rounds", "hidden", "layers",
                                          "rows", "length")}  # fmt: skip
    spec["vocab"] = TINY_VOCAB_SIZE
    with tempfile.TemporaryDirectory() as workdir:
        results = launch(spec, workdir, args.timeout)
    torch.set_num_threads(1)  # what each worker ran with: the device column then says so
    stamp = dict(device=f"{WORLD} x {device_name(torch.device('cpu'))}, gloo", date=today(), commit=git_commit(),
                 torch=torch.__version__)  # fmt: skip
    rows = []
    for layout in args.layouts:
        base = statistics.median(results[f"{layout}/per_micro_batch"]["times_ms"])
        for setting in SETTINGS:
            got = results[f"{layout}/{setting}"]
            times = got["times_ms"]
            rows.append({
                "layout": layout, "gradient_sync": setting, "accumulate": args.accumulate, "world": WORLD,
                "params": got["params"], "gradient_collectives": got["gradient"],
                "gradient_numel": got["gradient_numel"], "collectives": sum(got["kinds"].values()),
                "median_ms": statistics.median(times), "p20_ms": quantile(times, 0.2),
                "p80_ms": quantile(times, 0.8), "steps_timed": len(times),
                "vs_per_micro_batch": statistics.median(times) / base, **stamp,
            })  # fmt: skip
    out = Path(args.out)
    append_csv(out / "bench_grad_sync.csv", rows)
    table = markdown_table(rows, [
        ("layout", "layout"), ("gradient_sync", "gradient_sync"), ("gradient_collectives", "gradient collectives"),
        ("gradient_numel", "gradient values reduced"), ("collectives", "all collectives"),
        ("median_ms", "ms/step"), ("p20_ms", "p20"), ("p80_ms", "p80"), ("vs_per_micro_batch", "vs per_micro_batch"),
    ])  # fmt: skip
    text = (f"Gradient sync benchmark: {stamp['device']}; k = {args.accumulate}; tiny Llama "
            f"({rows[0]['params']:,} parameters); {stamp['date']}, commit {stamp['commit']}\n\n"
            f"Per optimizer step; {rows[0]['steps_timed']} timed steps per row.\n\n{table}\n")  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_grad_sync.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
