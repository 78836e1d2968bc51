"""One full BLUR optimizer step against a weighted-sum step and the authors' step: time and peak memory.

    python benchmarks/bench_step.py --out OUT_DIR            (GPU: a ~1B random-init Llama)
    python benchmarks/bench_step.py --out OUT_DIR --size small   (what a CPU runs: a tiny Llama)

Four providers, each a full step of the same model on the same batches (forward and backward of
both losses, the update, AdamW), run through Lightning exactly as a user's fit runs them:

    blur          BLURUnlearner's step: forget fwd+bwd, stash by pointer swap, retain fwd+bwd, the
                  projection on device (Triton on CUDA), AdamW. One activation graph alive at a time;
                  two gradient buffers. With a fused AdamW the non-finite check stays on the device:
                  no host read in the step.
    blur_fused    the same step with BLURFusedAdamW: pass 1 only, d formed inside the AdamW update.
    weighted_sum  the baseline: one backward of gamma * forget + retain (both graphs alive, one
                  gradient buffer, no projection).
    authors       the reference implementation's way: both forwards, forget backward with
                  retain_graph=True, both gradients cloned, the sums read per parameter with .item().

All use the same torch AdamW (`--adamw fused`, the default, or `foreach`, which makes the BLUR
step read its finite check on the host). The host-reads column counts device-to-host reads in
one untimed step (HostReadCounter); each one stalls the CPU until the GPU has drained.

Goals (GPU): blur time <= 1.05x weighted_sum (was 1.10x); blur peak <= weighted_sum peak + one gradient buffer.
Rows (median ms/step with p20/p80, peak memory, ratios to weighted_sum) are appended to
OUT/bench_step.csv with the device, date, torch version and commit; OUT/bench_step.md holds this
run's table, which is also printed. Needs no `datasets`; about a minute on an H100.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import results_page  # noqa: E402

_DEFAULT_OUT = str(results_page.RESULTS_DIR)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchmarks/: common.py


# name: (hidden, layers, heads, kv_heads, intermediate, vocab, batch, seq_len)
SIZES = {
    "1b": (2048, 22, 32, 4, 5632, 32000, 4, 512),  # TinyLlama-1.1B's shape: 1.10e9 parameters
    "small": (128, 2, 4, 2, 256, 1000, 4, 64),  # CPU: seconds, for a smoke check of the script
    # 1b's 22 layers at a negligible width: on a CPU the step time is then mostly host time (Python,
    # dispatch, launches), the part a GPU hides only while the CPU runs ahead of it
    "host": (64, 22, 4, 2, 128, 1000, 2, 32),
}
PROVIDERS = ("weighted_sum", "blur", "blur_fused", "authors")


def llama_config(size: str):
    from transformers import LlamaConfig

    hidden, layers, heads, kv, inter, vocab, _, seq = SIZES[size]
    return LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv, intermediate_size=inter, max_position_embeddings=max(seq, 64),
        tie_word_embeddings=False,
    )


def make_batches(size: str, n: int, seed: int = 0) -> list[dict]:
    """n random-token batches {forget, retain}, each side (batch, seq_len) with labels on every token."""
    _, _, _, _, _, vocab, batch, seq = SIZES[size]
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        sides = {}
        for side in ("forget", "retain"):
            ids = torch.randint(0, vocab, (batch, seq), generator=g)
            # "padded:attention_mask" as ForgetRetainDataModule's collator marks it (attention.py)
            sides[side] = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone(),
                           "padded:attention_mask": False}
        out.append(sides)
    return out


def _modules():
    """The three providers as BLURUnlearner subclasses, so all run under the same Trainer loop."""
    from blur_lightning.training.unlearner import BLURUnlearner

    class WeightedSumStep(BLURUnlearner):
        def training_step(self, batch, batch_idx):
            optimizer = self.optimizers()
            loss = self.hparams.gamma * self.forget_loss(batch["forget"]) + self.retain_loss(batch["retain"])
            self.manual_backward(loss)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    class AuthorsStep(BLURUnlearner):
        def training_step(self, batch, batch_idx):
            optimizer = self.optimizers()
            params = self.trainable_parameters()
            loss_forget = self.forget_loss(batch["forget"])
            loss_retain = self.retain_loss(batch["retain"])
            self.manual_backward(loss_forget, retain_graph=True)
            forget_grads = [p.grad.clone() for p in params]
            optimizer.zero_grad(set_to_none=True)
            self.manual_backward(loss_retain)
            retain_grads = [p.grad.clone() for p in params]
            dot = sq_forget = 0.0
            for f, r in zip(forget_grads, retain_grads):  # one host sync per parameter and sum
                dot += (r.float() * f.float()).sum().item()
                sq_forget += (f.float() * f.float()).sum().item()
            coef = self.hparams.gamma - dot / sq_forget if sq_forget > 0 else 0.0
            for p, f, r in zip(params, forget_grads, retain_grads):
                p.grad = r + coef * f
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    return {"weighted_sum": WeightedSumStep, "blur": BLURUnlearner, "blur_fused": BLURUnlearner,
            "authors": AuthorsStep}


def make_optimizer(name: str, adamw: str):
    import functools

    if name == "blur_fused":
        from blur_lightning.kernels import BLURFusedAdamW

        return functools.partial(BLURFusedAdamW, lr=1e-5, weight_decay=0.0)
    impl = {"fused": dict(fused=True), "foreach": dict(foreach=True)}[adamw]
    return functools.partial(torch.optim.AdamW, lr=1e-5, weight_decay=0.0, **impl)


def run_provider(
    name: str, size: str, dtype: torch.dtype, device: str, steps: int, warmup: int, profile: bool = False,
    adamw: str = "fused", trace_dir: str | None = None,
) -> dict:
    """Build a fresh model, fit warmup + steps optimizer steps; per-step wall times and peak memory.

    The last warmup step runs under HostReadCounter (its overhead stays out of the timed steps).
    """
    import lightning.pytorch as pl
    from transformers import LlamaForCausalLM

    from blur_lightning.testing.host_reads import HostReadCounter

    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(llama_config(size)).to(dtype)
    n_params = sum(p.numel() for p in model.parameters())
    grad_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    module = _modules()[name](
        model, forget_loss="ga", retain_loss="nll", mode="forget_lower", gamma=1.0, export_dir=None,
        optimizer=make_optimizer(name, adamw), attn_implementation="sdpa",
    )
    times: list[float] = []
    cuda = device == "cuda"
    profiler = None
    counter = HostReadCounter(device_type="cuda" if cuda else None)
    host_reads = {}

    class Timer(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            nonlocal profiler
            if batch_idx == warmup - 1:
                counter.__enter__()
            if (profile or trace_dir) and batch_idx == warmup:
                profiler = torch.profiler.profile(
                    activities=[torch.profiler.ProfilerActivity.CPU]
                    + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
                )
                profiler.__enter__()
            if cuda:
                torch.cuda.synchronize()
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.t0)
            if batch_idx == warmup - 1:
                counter.__exit__(None, None, None)
                host_reads["count"] = counter.count
                if counter.count:
                    print(f"--- {name}: {counter.count} host read(s) in one step; where:\n{counter.sites(3)}")
            if profiler is not None and batch_idx == warmup + 1:  # two profiled steps
                profiler.__exit__(None, None, None)
                if trace_dir:
                    os.makedirs(trace_dir, exist_ok=True)
                    path = os.path.join(trace_dir, f"trace_{name}.json")
                    profiler.export_chrome_trace(path)
                    print(f"--- {name}: chrome trace of two steps in {path}")
                if profile:
                    sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
                    print(f"--- {name}: two steps, top ops by {sort}")
                    print(profiler.key_averages().table(sort_by=sort, row_limit=15))
                    try:  # a diagnostic: never let it cost the benchmark's table
                        _print_gpu_busy(profiler, name)
                    except Exception as err:  # noqa: BLE001
                        print(f"--- {name}: GPU busy time not available ({type(err).__name__}: {err})")

    if cuda:
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    trainer = pl.Trainer(
        accelerator="gpu" if cuda else "cpu", devices=1, max_steps=warmup + steps, max_epochs=-1,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[Timer()], num_sanity_val_steps=0,
    )
    trainer.fit(module, train_dataloaders=_Batches(make_batches(size, warmup + steps)))
    peak = torch.cuda.max_memory_allocated() if cuda else float("nan")
    timed = sorted(times[warmup:])
    result = {
        "provider": name,
        "ms_median": 1e3 * statistics.median(timed),
        "ms_p20": 1e3 * timed[int(0.2 * (len(timed) - 1))],
        "ms_p80": 1e3 * timed[int(0.8 * (len(timed) - 1))],
        "peak_gib": peak / 2**30,
        "model_gib": (base / 2**30) if cuda else float("nan"),
        "grad_buffer_gib": grad_bytes / 2**30,
        "params": n_params,
        "host_reads": host_reads.get("count", float("nan")),
    }
    del trainer, module, model
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return result


def _print_gpu_busy(profiler, name: str) -> None:
    """GPU busy time of the two profiled steps: the union of kernel intervals, from the trace events.

    The step's wall time minus this is where the GPU waited for the host.
    """
    spans = sorted(
        (e.time_range.start, e.time_range.end)
        for e in profiler.events()
        if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA
    )
    busy, end = 0.0, float("-inf")
    for s, e in spans:
        if s > end:
            busy += e - s
            end = e
        elif e > end:
            busy += e - end
            end = e
    if spans:
        print(f"--- {name}: GPU busy {busy / 1e3:.1f} ms over two steps, first to last kernel "
              f"{(end - spans[0][0]) / 1e3:.1f} ms")


class _Batches:
    """A sized list of batches (no DataLoader workers, no sampler)."""

    def __init__(self, batches):
        self.batches = batches

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        return iter(self.batches)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=_DEFAULT_OUT, help="directory for bench_step.csv / .md")
    parser.add_argument("--size", choices=tuple(SIZES), default=None,
                        help="default: 1b on CUDA, small on CPU")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default=None,
                        help="model dtype (default: bfloat16 on CUDA, float32 on CPU)")
    parser.add_argument("--steps", type=int, default=None,
                        help="timed optimizer steps (default: 20 on CUDA, 5 on CPU)")
    parser.add_argument("--warmup", type=int, default=3,
                        help="untimed steps first (Triton compiles here; the last counts host reads)")
    parser.add_argument("--profile", action="store_true",
                        help="print the top ops and the GPU busy time of two steps per provider")
    parser.add_argument("--trace", default=None, metavar="DIR",
                        help="write a chrome trace (CPU and GPU timelines) of two steps per provider to DIR")
    parser.add_argument("--adamw", choices=("fused", "foreach"), default="fused",
                        help="torch AdamW implementation for the providers other than blur_fused")
    parser.add_argument("--providers", nargs="+", choices=PROVIDERS, default=list(PROVIDERS),
                        help="which to run (weighted_sum is always run: it is the baseline of the ratios)")
    args = parser.parse_args(argv)

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    size = args.size or ("1b" if cuda else "small")
    dtype = getattr(torch, args.dtype or ("bfloat16" if cuda else "float32"))
    steps = args.steps or (20 if cuda else 5)
    if args.warmup < 1:
        parser.error("--warmup must be >= 1 (the last warmup step counts host reads)")
    if not cuda:
        torch.set_num_threads(min(4, os.cpu_count() or 1))
        print(f"no CUDA device: running on CPU at size {size!r} (a smoke check, not the ~1B benchmark); "
              "peak memory is not measured on CPU")
    device_name = torch.cuda.get_device_name() if cuda else "cpu"

    start = time.perf_counter()
    names = [p for p in PROVIDERS if p == "weighted_sum" or p in args.providers]
    results = [
        run_provider(n, size, dtype, device, steps, args.warmup, args.profile, args.adamw, args.trace)
        for n in names
    ]
    print(f"benchmark wall time {time.perf_counter() - start:.0f}s ({len(names)} providers, model builds included)")
    ws = next(r for r in results if r["provider"] == "weighted_sum")
    for r in results:
        r["time_ratio"] = r["ms_median"] / ws["ms_median"]
        r["peak_ratio"] = r["peak_gib"] / ws["peak_gib"] if cuda else float("nan")
        # extra peak over the weighted-sum step, in gradient buffers (the goal for blur: <= 1)
        extra = (r["peak_gib"] - ws["peak_gib"]) / r["grad_buffer_gib"]
        r["extra_peak_in_grad_buffers"] = extra if cuda else float("nan")
    goals = {}
    for provider in ("blur", "blur_fused"):
        r = next((r for r in results if r["provider"] == provider), None)
        if r is None:
            continue
        goals[f"{provider} time <= 1.05x weighted_sum"] = r["time_ratio"] <= 1.05
        goals[f"{provider} peak <= weighted_sum + 1 gradient buffer"] = (
            (r["extra_peak_in_grad_buffers"] <= 1.0) if cuda else None
        )

    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "device": device_name, "torch": torch.__version__, "commit": common.git_commit(), "size": size,
        "dtype": str(dtype).replace("torch.", ""), "params": results[0]["params"],
        "batch": f"{SIZES[size][6]}x{SIZES[size][7]} per side", "adamw": args.adamw,
        "warmup": args.warmup, "steps": steps,
    }
    table = _markdown(results, meta, goals)
    print(table)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench_step.md"), "w") as f:
        f.write(table + "\n")
    # appended with the header widened where columns are new (common.append_csv): past runs stay
    common.append_csv(Path(args.out) / "bench_step.csv", [{**meta, **r} for r in results])
    if args.out == _DEFAULT_OUT:
        results_page.rebuild_if_default(Path(args.out))
    return results


def _markdown(results: list[dict], meta: dict, goals: dict) -> str:
    lines = [
        f"BLUR step benchmark: {meta['device']}, torch {meta['torch']}, commit {meta['commit']}, "
        f"{meta['date']}",
        f"model: random-init Llama '{meta['size']}' ({meta['params'] / 1e9:.3f}B params, {meta['dtype']}), "
        f"batch {meta['batch']}, AdamW ({meta['adamw']}; blur_fused: BLURFusedAdamW), "
        f"{meta['warmup']} warmup + {meta['steps']} timed steps",
        "",
        "| provider | ms/step (median) | p20 | p80 | time / weighted_sum | peak GiB | peak / weighted_sum "
        "| extra peak (grad buffers) | host reads / step |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['provider']} | {r['ms_median']:.1f} | {r['ms_p20']:.1f} | {r['ms_p80']:.1f} | "
            f"{r['time_ratio']:.3f} | {r['peak_gib']:.2f} | {r['peak_ratio']:.3f} | "
            f"{r['extra_peak_in_grad_buffers']:+.2f} | {r['host_reads']} |"
        )
    lines.append("")
    for goal, ok in goals.items():
        lines.append(f"- {goal}: {'n/a on CPU' if ok is None else ('met' if ok else 'NOT met')}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
