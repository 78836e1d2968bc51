"""The BLUR projection and the projection+AdamW step: providers x model shapes x dtypes.

Providers, task "projection" (d written for every parameter):
    reference      the authors' way: clone both gradients, a Python loop with .item() per parameter,
                   a new tensor for each d (benchmarks/authors_projection.py)
    torch          our sync-free PyTorch path (blur_direction_(backend="torch"))
    triton         the two kernels (blur_direction_(backend="triton"))
    triton_pass1   multi_tensor_dots alone        triton_pass2   multi_tensor_combine_ alone
    triton_pass1_adam  multi_tensor_metric_dots alone (projection_metric "adam": also reads v)
Providers, task "step" (projection + optimizer step):
    torch_adamw         blur_direction_(backend="torch") + torch.optim.AdamW(fused=True)
    triton_adamw        blur_direction_(backend="triton") + torch.optim.AdamW(fused=True)
    triton_fused_adamw  compute_stats + BLURFusedAdamW: d is never written
    triton_fused_adamw_adam  the same with projection_metric "adam": pass 1 reads v too

Bytes are modelled, not measured: "projection" moves 2 reads in pass 1 and 2 reads + 1 write in
pass 2 per element; "step" (fused floor) pass 1 plus reads of g_r, g_f, p, m, v and writes of p, m, v.
The adam-metric providers are modelled with their one extra read of v in pass 1 (2g + s per element
instead of 2g; the step 4g + 7s instead of 4g + 6s).
GB/s = modelled bytes / median time, the same bytes for every provider of a task (so GB/s ratios
are speed ratios), and its fraction of a device-to-device copy measured in the same run.

    python benchmarks/bench_projection.py                       # CUDA: every model, fp32 and bf16
    python benchmarks/bench_projection.py --models smollm2-135m # CPU: the providers that can run
    TRITON_INTERPRET=1 python benchmarks/bench_projection.py --models tiny --out /tmp/bp
                                                  # smoke check of every provider on CPU (seconds)

On CPU the Triton providers are skipped unless TRITON_INTERPRET=1 is set, when they run under the
interpreter (a check that they run, not a timing); `tiny` (0.2M elements, 21 tensors) is the shape
that keeps that to seconds, and it is not in the default CUDA list.
"""

from __future__ import annotations

import argparse
import gc
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from authors_projection import authors_projection  # noqa: E402

from blur_lightning.core.metric import adam_metric  # noqa: E402
from blur_lightning.core.projection import blur_direction_, compute_stats  # noqa: E402
from blur_lightning.kernels import (  # noqa: E402
    BLURFusedAdamW,
    multi_tensor_combine_,
    multi_tensor_dots,
    multi_tensor_metric_dots,
    set_config,
)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PROJECTION_PROVIDERS = ["reference", "torch", "triton", "triton_pass1", "triton_pass2", "triton_pass1_adam"]
STEP_PROVIDERS = ["torch_adamw", "triton_adamw", "triton_fused_adamw", "triton_fused_adamw_adam"]
TRITON_PROVIDERS = {"triton", "triton_pass1", "triton_pass2", "triton_adamw", "triton_fused_adamw",
                    "triton_pass1_adam", "triton_fused_adamw_adam"}
GAMMA = 0.5  # forget_lower with gamma: d is a fixed point after one application, so reps stay finite


def llama_shapes(
    vocab: int, hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, *, tied: bool
) -> list[tuple[int, ...]]:
    """Trainable parameter shapes of a Llama-architecture model, in module order."""
    head_dim = hidden // heads
    q, kv = heads * head_dim, kv_heads * head_dim
    shapes: list[tuple[int, ...]] = [(vocab, hidden)]
    for _ in range(layers):
        shapes += [(q, hidden), (kv, hidden), (kv, hidden), (hidden, q)]  # attention
        shapes += [(intermediate, hidden), (intermediate, hidden), (hidden, intermediate)]  # MLP
        shapes += [(hidden,), (hidden,)]  # the two RMSNorms
    shapes.append((hidden,))
    if not tied:
        shapes.append((vocab, hidden))
    return shapes


MODELS = {
    "smollm2-135m": llama_shapes(49152, 576, 1536, 30, 9, 3, tied=True),  # 134.5M, 272 tensors
    "llama-3.2-1b": llama_shapes(128256, 2048, 8192, 16, 32, 8, tied=True),  # 1.24B, 146 tensors
    "llama-3-8b": llama_shapes(128256, 4096, 14336, 32, 32, 8, tied=False),  # 8.03B, 291 tensors
    # A smoke check's shape, never in the default list: 205k elements, so one call of a Triton
    # provider under the CPU interpreter takes well under a second (~400x slower than torch there)
    "tiny": llama_shapes(1024, 64, 128, 2, 4, 2, tied=False),  # 0.21M, 21 tensors
}
DEFAULT_MODELS = [m for m in MODELS if m != "tiny"]


def numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def modelled_bytes(task: str, n: int, grad_size: int, state_size: int) -> int:
    if task == "projection":
        return n * (2 * grad_size + 3 * grad_size)  # pass 1: read f, r; pass 2: read f, r, write r
    return n * (4 * grad_size + 6 * state_size)  # pass 1 + fused: read f, r, p, m, v; write p, m, v


def needed_bytes(provider: str, n: int, max_n: int, size: int) -> int:
    """Memory a provider needs beyond the two gradient lists (an estimate, for skipping)."""
    if provider == "reference":
        return 2 * n * size + 3 * max_n * size  # two clones, d replacing them tensor by tensor
    if provider == "torch" or provider == "torch_adamw":
        extra = 2 * max_n * 4 if size < 4 else 0  # float32 copies of one tensor pair in pass 1
        return extra + (3 * n * size if provider == "torch_adamw" else 0)
    if provider in STEP_PROVIDERS:
        return 3 * n * size  # parameters and two moments
    return 0


def make_provider(
    provider: str, forget: list[torch.Tensor], retain: list[torch.Tensor], device: torch.device
) -> Callable[[], object]:
    if provider == "reference":
        return lambda: authors_projection(forget, retain, gamma=GAMMA)
    if provider in ("torch", "triton"):
        return lambda: blur_direction_(forget, retain, gamma=GAMMA, backend=provider)
    if provider == "triton_pass1":
        return lambda: multi_tensor_dots(forget, retain)
    if provider == "triton_pass1_adam":
        v = [r.detach().float().square().to(r.dtype) for r in retain]  # a second moment in the gradients' dtype
        steps = [torch.full((), 10.0, device=device)] * len(retain)
        return lambda: multi_tensor_metric_dots(forget, retain, v, steps, beta2=0.999, eps=1e-8)
    if provider == "triton_pass2":
        one = torch.ones((), device=device)
        coef = torch.full((), 0.25, device=device)
        return lambda: multi_tensor_combine_(retain, forget, one, coef)
    # step providers: parameters and state in the gradients' dtype; .grad is the retain buffer
    params = [torch.nn.Parameter(torch.randn_like(r)) for r in retain]
    for p, r in zip(params, retain):
        p.grad = r
    if provider in ("triton_fused_adamw", "triton_fused_adamw_adam"):
        optimizer = BLURFusedAdamW(params, lr=1e-4, weight_decay=0.01)
        optimizer.step(forget_grads=forget, stats=compute_stats(forget, retain, gamma=GAMMA, backend="triton"))
        metric = adam_metric(optimizer, params) if provider.endswith("_adam") else None  # the state exists now

        def fused_step():
            stats = compute_stats(forget, retain, gamma=GAMMA, backend="triton", metric=metric)
            optimizer.step(forget_grads=forget, stats=stats)

        return fused_step
    lr = torch.tensor(1e-4, device=device) if device.type == "cuda" else 1e-4
    extra = dict(fused=True) if device.type == "cuda" else dict(foreach=True)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01, **extra)
    backend = "torch" if provider == "torch_adamw" else "triton"

    def step():
        blur_direction_(forget, retain, gamma=GAMMA, backend=backend)
        optimizer.step()

    return step


def random_lists(shapes, dtype, device, seed: int = 0) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    gen = torch.Generator(device=device).manual_seed(seed)
    forget = [torch.randn(s, generator=gen, device=device, dtype=dtype) for s in shapes]
    retain = [torch.randn(s, generator=gen, device=device, dtype=dtype) for s in shapes]
    return forget, retain


def free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        import psutil

        return psutil.virtual_memory().available
    except ImportError:
        return 8 << 30


def sweep(device: torch.device, model: str, dtype: torch.dtype, args, meta: dict) -> tuple[dict, list[dict]]:
    """Time the triton provider over launch configs; return the fastest config and the rows."""
    forget, retain = random_lists(MODELS[model], dtype, device)
    rows, best = [], None
    for block, num_warps in [(1024, 4), (2048, 4), (2048, 8), (4096, 8), (4096, 16)]:
        for programs_per_sm in (2, 4, 8):
            config = dict(block=block, num_warps=num_warps, programs_per_sm=programs_per_sm)
            set_config(**config)
            timing = common.time_it(
                make_provider("triton", forget, retain, device), device, rep=10, budget_s=1.0
            )
            name = f"triton[b={block},w={num_warps},p={programs_per_sm}]"
            rows.append(
                {
                    **meta,
                    "model": model,
                    "dtype": {v: k for k, v in DTYPES.items()}[dtype],
                    "task": "sweep",
                    "provider": name,
                    "median_ms": timing.median_ms,
                    "p20_ms": timing.p20_ms,
                    "p80_ms": timing.p80_ms,
                }
            )
            print(f"  sweep {name:32s} {timing.median_ms:8.3f} ms", flush=True)
            if best is None or timing.median_ms < best[1]:
                best = (config, timing.median_ms)
    del forget, retain
    return best[0], rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models",
        nargs="+",
        choices=list(MODELS),
        default=None,
        help="(default: all but tiny on CUDA, smollm2-135m on CPU)",
    )
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=["fp32", "bf16"])
    parser.add_argument("--providers", nargs="+", default=PROJECTION_PROVIDERS + STEP_PROVIDERS)
    parser.add_argument(
        "--out", type=Path, default=common.REPO / "benchmarks" / "results", help="folder for CSV, PNG, table"
    )
    parser.add_argument(
        "--results-md", type=Path, default=None, help="also update this RESULTS.md's projection section"
    )
    parser.add_argument("--rep", type=int, default=20, help="repetitions at most (type: int, default: 20)")
    parser.add_argument(
        "--budget-s", type=float, default=2.0, help="seconds per provider at most (default: 2.0)"
    )
    parser.add_argument(
        "--sweep", action="store_true", help="tune block/warps/programs on llama-3.2-1b bf16 first"
    )
    parser.add_argument("--adopt-best", action="store_true", help="run with the sweep's fastest config")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    models = args.models or (DEFAULT_MODELS if device.type == "cuda" else ["smollm2-135m"])
    providers = list(args.providers)
    from blur_lightning.kernels._launch import interpreting

    if device.type != "cuda" and interpreting():
        print("on CPU with TRITON_INTERPRET=1: the Triton providers run under the interpreter (a check that "
              "they run, whose times say nothing about a GPU; --models tiny keeps it to seconds)")
    elif device.type != "cuda":
        skipped = [p for p in providers if p in TRITON_PROVIDERS]
        providers = [p for p in providers if p not in TRITON_PROVIDERS]
        print(
            f"on CPU: running {providers}; skipping {skipped} (Triton needs CUDA; TRITON_INTERPRET=1 runs "
            "them under the interpreter, a correctness tool ~400x slower than torch)"
        )
    meta = {
        "device": common.device_name(device),
        "date": common.today(),
        "commit": common.git_commit(),
        "torch": torch.__version__,
    }
    try:
        import triton

        meta["triton"] = triton.__version__
    except ImportError:
        meta["triton"] = ""
    print(f"{meta['device']} | torch {meta['torch']} | triton {meta['triton']} | commit {meta['commit']}")
    copy_gbps, copy_timing = common.copy_bandwidth(device)
    print(
        f"device-to-device copy: {copy_gbps:.0f} GB/s (read + write), {copy_timing.median_ms:.3f} ms",
        flush=True,
    )

    rows: list[dict] = []
    from blur_lightning.kernels import CONFIG

    default = dict(block=CONFIG.block, num_warps=CONFIG.num_warps, programs_per_sm=CONFIG.programs_per_sm)
    if args.sweep and device.type == "cuda":
        # Report-only: the rows say whether another config would be faster; the run below (and
        # so RESULTS.md) uses the shipped defaults unless --adopt-best.
        best, sweep_rows = sweep(device, "llama-3.2-1b", torch.bfloat16, args, meta)
        rows += sweep_rows
        print(f"fastest config in the sweep: {best}", flush=True)
        set_config(**(best if args.adopt_best else default))
    config = best if (args.sweep and args.adopt_best and device.type == "cuda") else default
    meta["config"] = ",".join(f"{k}={v}" for k, v in config.items())

    for model in models:
        shapes = MODELS[model]
        n = sum(numel(s) for s in shapes)
        max_n = max(numel(s) for s in shapes)
        for dtype_name in args.dtypes:
            dtype = DTYPES[dtype_name]
            size = torch.empty((), dtype=dtype).element_size()
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            if 2 * n * size > free_bytes(device) - (1 << 30):
                print(
                    f"{model} {dtype_name}: skipped, the two gradient lists "
                    f"({2 * n * size / 1e9:.1f} GB) do not fit"
                )
                continue
            forget, retain = random_lists(shapes, dtype, device)
            print(f"{model} {dtype_name}: {n / 1e6:.1f}M elements in {len(shapes)} tensors", flush=True)
            for provider in providers:
                task = "step" if provider in STEP_PROVIDERS else "projection"
                need = needed_bytes(provider, n, max_n, size)
                if need > free_bytes(device) - (1 << 30):
                    print(f"  {provider:20s} skipped: needs ~{need / 1e9:.1f} GB more than is free")
                    rows.append(
                        {
                            **meta,
                            "model": model,
                            "dtype": dtype_name,
                            "task": task,
                            "provider": provider,
                            "n_params": n,
                            "n_tensors": len(shapes),
                            "note": "skipped: memory",
                        }
                    )
                    continue
                fn = make_provider(provider, forget, retain, device)
                timing = common.time_it(fn, device, rep=args.rep, budget_s=args.budget_s)
                syncs = common.count_host_syncs(fn, device)
                extra = common.extra_memory(fn, device)
                nbytes = modelled_bytes(task, n, size, size)
                if provider == "triton_fused_adamw_adam":
                    nbytes += n * size  # pass 1 also reads v
                if provider == "triton_pass1":
                    nbytes = n * 2 * size
                elif provider == "triton_pass1_adam":
                    nbytes = n * 3 * size
                elif provider == "triton_pass2":
                    nbytes = n * 3 * size
                gbps = nbytes / timing.median_ms / 1e6
                row = {
                    **meta,
                    "model": model,
                    "dtype": dtype_name,
                    "task": task,
                    "provider": provider,
                    "n_params": n,
                    "n_tensors": len(shapes),
                    "median_ms": timing.median_ms,
                    "p20_ms": timing.p20_ms,
                    "p80_ms": timing.p80_ms,
                    "reps": timing.reps,
                    "modelled_bytes": nbytes,
                    "gbps": gbps,
                    "copy_gbps": copy_gbps,
                    "frac_of_copy": gbps / copy_gbps,
                    "extra_mb": None if extra is None else extra / 1e6,
                    "host_syncs": syncs,
                    "note": "",
                }
                rows.append(row)
                print(
                    f"  {provider:20s} {timing.median_ms:9.3f} ms [{timing.p20_ms:.3f}, {timing.p80_ms:.3f}] "
                    f"{gbps:7.0f} GB/s ({gbps / copy_gbps:5.1%} of copy) extra {row['extra_mb']} MB "
                    f"syncs {syncs}",
                    flush=True,
                )
                del fn
                gc.collect()
            del forget, retain
    _add_speedups(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    common.append_csv(args.out / "projection.csv", rows)
    table = summary(rows, meta, copy_gbps)
    (args.out / "projection.md").write_text(table + "\n")
    if args.results_md:
        common.write_markdown_section(args.results_md, "projection", table)
    plot(rows, copy_gbps, args.out / "projection.png", meta)
    print(table)
    return 0


def _add_speedups(rows: list[dict]) -> None:
    """speedup_vs_torch / _vs_reference: the baseline's median over this row's, per model and dtype."""
    index = {(r["model"], r["dtype"], r["provider"]): r for r in rows if r.get("median_ms")}
    for r in rows:
        if not r.get("median_ms") or r["task"] == "sweep":
            continue
        base = "torch" if r["task"] == "projection" else "torch_adamw"
        for key, provider in (("speedup_vs_torch", base), ("speedup_vs_reference", "reference")):
            other = index.get((r["model"], r["dtype"], provider))
            if other is not None and (r["task"] == "projection" or key == "speedup_vs_torch"):
                r[key] = other["median_ms"] / r["median_ms"]


def summary(rows: list[dict], meta: dict, copy_gbps: float) -> str:
    columns = [
        ("model", "model"),
        ("dtype", "dtype"),
        ("task", "task"),
        ("provider", "provider"),
        ("median_ms", "median ms"),
        ("p20_ms", "p20"),
        ("p80_ms", "p80"),
        ("gbps", "GB/s"),
        ("pct_copy", "% of copy"),
        ("speedup_vs_torch", "x torch"),
        ("speedup_vs_reference", "x reference"),
        ("extra_mb", "extra MB"),
        ("host_syncs", "host syncs"),
        ("note", "note"),
    ]
    shown = []
    for r in rows:
        if r.get("task") == "sweep":
            continue
        shown.append({**r, "pct_copy": f"{100 * r['frac_of_copy']:.0f}%" if r.get("frac_of_copy") else ""})
    head = (
        f"{meta['device']}, torch {meta['torch']}, triton {meta['triton']}, commit {meta['commit']}, "
        f"{meta['date']}; launch config {meta['config']}. Device-to-device copy: {copy_gbps:.0f} GB/s "
        "(bytes read + written). GB/s = the task's modelled bytes / median time, the same bytes for "
        "every provider of a task; 'x torch' is the torch (projection) or torch_adamw (step) median "
        "over this one's."
    )
    return head + "\n\n" + common.markdown_table(shown, columns)


def plot(rows: list[dict], copy_gbps: float, path: Path, meta: dict) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot")
        return
    rows = [r for r in rows if r.get("gbps") and r.get("task") != "sweep"]
    if not rows:
        return
    groups = list(dict.fromkeys((r["model"], r["dtype"]) for r in rows))
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(groups) * len(providers) / 4), 4.5))
    width = 0.8 / len(providers)
    for j, provider in enumerate(providers):
        values = [
            next((r["gbps"] for r in rows if (r["model"], r["dtype"]) == g and r["provider"] == provider), 0)
            for g in groups
        ]
        ax.bar([i + j * width for i in range(len(groups))], values, width, label=provider)
    ax.axhline(copy_gbps, color="black", linestyle="--", linewidth=1, label="device copy")
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(groups))], [f"{m}\n{d}" for m, d in groups])
    ax.set_ylabel("GB/s (modelled bytes / median time)")
    ax.set_title(f"BLUR projection, {meta['device']}", fontsize=10)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
