"""One-GPU check of the FSDP2 path on CUDA (NCCL, Triton projection on DTensor shards, bf16 mixed precision).

    torchrun --nproc-per-node 1 tests/dist_workers/gpu_fsdp_check.py

Fits the tiny Llama three BLUR steps under FSDP2Strategy on one GPU and in one plain process, prints
the max abs weight difference and the sums, then a bf16-params / fp32-reduce run. Multi-GPU runs
are not covered here (the lent machines have one GPU); the CPU tests cover 2 and 4 ranks.
"""

from __future__ import annotations

import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import blur_worker  # noqa: E402


def main() -> None:
    import torch.distributed as dist

    accelerator = os.environ.get("CHECK_ACCELERATOR", "gpu")  # "cpu": a dry run of this script
    common = dict(world=1, accelerator=accelerator, backend="auto", micro_batches=6, accumulate=2)
    sharded = blur_worker.run_case(dict(name="gpu_fsdp2", layout="fsdp2", **common), 0)
    single = blur_worker.run_case(dict(name="gpu_single", layout="single", **common), 0)
    diff = max((sharded["state"][k] - single["state"][k]).abs().max().item() for k in single["state"])
    print(f"FSDP2 (1 GPU) vs one process: max abs diff {diff:.3g}; steps {sharded['global_step']}")
    print("sums fsdp2 :", sharded["stats"][0])
    print("sums single:", single["stats"][0])
    bf16 = blur_worker.run_case(
        dict(name="gpu_bf16", layout="fsdp2", param_dtype="bfloat16", reduce_dtype="float32", **common), 0
    )
    finite = all(math.isfinite(v) for s in bf16["stats"] for v in s.values())
    moved = max((bf16["state"][k] - single["state"][k]).abs().max().item() for k in single["state"])
    print(f"bf16 params / fp32 reduce: finite sums {finite}, steps {bf16['global_step']}, "
          f"max abs diff to fp32 {moved:.3g}, weight dtype {next(iter(bf16['state'].values())).dtype}")
    ok = diff <= 1e-5 and finite and sharded["global_step"] == 3
    print("GPU FSDP2 CHECK", "OK" if ok else "FAILED")
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
