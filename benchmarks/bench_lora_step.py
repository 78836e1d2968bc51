"""The BLUR step with LoRA adapters and activation checkpointing, against full fine-tuning.

    python benchmarks/bench_lora_step.py --out OUT_DIR                 (SmolLM2-135M, the demo's data)
    python benchmarks/bench_lora_step.py --out OUT_DIR --size small    (a tiny Llama: a smoke check)

Four variants of one configuration (configs/lora.yaml's: NPO + NLL, forget_lower, batch 8, max
length 96, AdamW; LoRA rank 16 / alpha 32 on every linear layer), each fitted through Lightning for
`--steps` optimizer steps on the same batches:

    full        every weight trained; NPO's reference log-probs are cached before the first update
                (npo_reference auto), no frozen copy
    full_ac     the same, activation checkpointing per decoder layer
    lora        adapters only; the reference is the model with its adapters disabled (no copy)
    lora_ac     LoRA and checkpointing

Per variant: median ms per step (first step dropped: warm-up) with p20/p80, trainable parameters,
and on CUDA the peak memory. Rows are appended to OUT/bench_lora_step.csv with the device, date and
commit; the table is printed. On a shared CPU the times move with the other jobs: compare rows of
one run only.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for path in (ROOT, os.path.join(ROOT, "benchmarks")):
    if path not in sys.path:
        sys.path.insert(0, path)

from common import append_csv, device_name, git_commit, markdown_table, today  # noqa: E402

VARIANTS = {
    "full": {},
    "full_ac": {"activation_checkpointing": True},
    "lora": {"lora_rank": 16, "lora_alpha": 32.0, "lora_target_modules": "all-linear"},
    "lora_ac": {"lora_rank": 16, "lora_alpha": 32.0, "lora_target_modules": "all-linear",
                "activation_checkpointing": True},
}
LR = {"full": 1e-5, "lora": 2e-4}  # demo.yaml's and lora.yaml's


def step_times(variant: str, size: str, steps: int) -> dict:
    import lightning.pytorch as pl

    from blur_lightning.data.datamodule import ForgetRetainDataModule
    from blur_lightning.training.unlearner import BLURUnlearner

    if size == "small":
        from blur_lightning.testing.tiny import tiny_llama, tiny_tokenizer

        tokenizer = tiny_tokenizer()
        model = tiny_llama(vocab_size=len(tokenizer))
        tokenizer_name = os.path.join(ROOT, "tests", "fixtures", "tiny_tokenizer")
    else:
        model, tokenizer_name = "embedded:smollm2-135m-instruct", "embedded:smollm2-135m-instruct"
    lr = LR["lora" if variant.startswith("lora") else "full"]
    module = BLURUnlearner(
        model, forget_loss="npo", retain_loss="nll", gamma=0.1, export_dir=None,
        optimizer=functools.partial(torch.optim.AdamW, lr=lr, weight_decay=0.0), **VARIANTS[variant],
    )
    data = ForgetRetainDataModule(
        tokenizer=tokenizer_name, format="qa", answer_column="response", max_length=96, batch_size=8, seed=0
    )
    times: list[float] = []

    class Clock(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.start = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.start)

    torch.manual_seed(0)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    trainer = pl.Trainer(
        accelerator="auto", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[Clock()], num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    trainer.fit(module, datamodule=data)
    kept = sorted(times[1:]) or times
    at = lambda f: kept[round(f * (len(kept) - 1))]  # nearest rank: no extrapolation from few steps
    return {
        "variant": variant,
        "median_ms": 1e3 * statistics.median(kept),
        "p20_ms": 1e3 * at(0.2),
        "p80_ms": 1e3 * at(0.8),
        "steps_timed": len(kept),
        "trainable": sum(p.numel() for p in module.trainable_parameters()),
        "total_params": sum(p.numel() for p in module.model.parameters()),
        "reference_copy": module.reference_model is not None,
        "peak_mib": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--size", choices=("smollm2", "small"), default="smollm2")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    for variant in args.variants:
        row = step_times(variant, args.size, args.steps)
        row.update(size=args.size, device=device_name(device), date=today(), commit=git_commit(),
                   torch=torch.__version__)
        rows.append(row)
    base = next((r["median_ms"] for r in rows if r["variant"] == "full"), None)
    for row in rows:
        row["vs_full"] = row["median_ms"] / base if base else None
    append_csv(__import__("pathlib").Path(args.out) / "bench_lora_step.csv", rows)
    print(markdown_table(rows, [("variant", "variant"), ("median_ms", "ms/step"), ("p20_ms", "p20"),
                                ("p80_ms", "p80"), ("vs_full", "vs full"), ("trainable", "trainable"),
                                ("reference_copy", "ref copy"), ("peak_mib", "peak MiB")]))
    print(rows[0]["device"], rows[0]["date"], rows[0]["commit"])


if __name__ == "__main__":
    main()
