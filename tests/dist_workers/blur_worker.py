"""Run BLUR fits of a tiny Llama under FSDP2, HSDP or DDP (or in one process) and save what they end with.

Usage (one process per rank; the launcher sets LOCAL_RANK/NODE_RANK/MASTER_* or torchrun does):

    python tests/dist_workers/blur_worker.py SPEC.json

SPEC is {"out": DIR, "cases": [CASE, ...]}; every case writes DIR/<name>.rank<R>.pt with the full
(gathered) state dict, the per-step BLUR sums and the global step. tests/test_fsdp.py imports this
file too, to run the single-process reference of a case on the ranks' batches concatenated.

A case (all keys but name and layout optional):
    name, layout ("single", "fsdp2", "hsdp", "ddp"), world (ranks whose data a "single" run
    concatenates), shard_size (hsdp), num_nodes, mode, forget_loss, retain_loss, gamma, alpha,
    vocab, rows (sequences per rank per micro-batch), micro_batches (per rank), accumulate,
    optimizer ("adamw", "adamw_fused", "sgd" or "blur_fused_adamw"), lr, clip,
    model_path (load by name: the lazy meta-device build),
    export_dir, save_at (micro-batch counts after which a checkpoint is saved, into ckpt_dir),
    ckpt_path (resume from it), bucket_view (DDP's gradient_as_bucket_view), inf_loss_at ([rank,
    micro-batch]: that rank's forget loss is made infinite there, its gradient left finite), npo_reference,
    data ({"forget", "retain", "tokenizer"}: QA JSONL files through ForgetRetainDataModule, `rows` per rank per
    micro-batch, shuffled; vocab must be the tokenizer's), max_steps,
    lora_rank / lora_alpha / lora_dropout / lora_target_modules (LoRA adapters),
    activation_checkpointing, max_epochs, scheduler (LinearWarmupDecay's keyword arguments: then each
    optimizer step's epoch and lr are recorded, and the lr after the last step), gradient_sync ("per_step" or
    "per_micro_batch"), count_collectives (record the gradient-sized collectives of every backward and every
    optimizer step: blur_lightning.testing.collectives), module ("blur", or "finetune": FineTuner on the retain
    side of the same batches), pdu_retain_eps / pdu_dual_step_size / pdu_dual_warmup_steps (mode "pdu": then
    each step's multiplier after its dual update is recorded in "lambdas"), projection_metric ("identity" or
    "adam": the inner product of AdamW's state before each step).
"""

from __future__ import annotations

import functools
import json
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # tests/: conftest's tiny model and batch builders

from conftest import build_tiny_llama, make_side  # noqa: E402

DEFAULTS = dict(
    world=1, shard_size=2, num_nodes=1, mode="forget_lower", forget_loss="npo", retain_loss="nll", gamma=0.7,
    alpha=2.0, vocab=101, rows=2, length=12, micro_batches=6, accumulate=2, optimizer="adamw", lr=1e-3,
    clip=None, model_path=None, export_dir=None, save_at=(), ckpt_dir=None, ckpt_path=None,
    accelerator="cpu", backend="torch", param_dtype=None, reduce_dtype=None, bucket_view=False, inf_loss_at=None,
    npo_reference="auto", data=None, max_steps=-1,
    lora_rank=None, lora_alpha=8.0, lora_dropout=0.0, lora_target_modules=None, activation_checkpointing=False,
    max_epochs=1, scheduler=None, gradient_sync="per_step", count_collectives=False, module="blur",
    pdu_retain_eps=None, pdu_dual_step_size=1.0, pdu_dual_warmup_steps=0, projection_metric="identity",
)


def rank_batches(case: dict, rank: int) -> list[dict]:
    """Rank `rank`'s micro-batches: `rows` sequences each, seeds fixed by (micro-batch, rank)."""
    out = []
    for j in range(case["micro_batches"]):
        out.append({
            side: make_side(case["rows"], case["length"], seed=base + 16 * j + rank, vocab_size=case["vocab"])
            for side, base in (("forget", 1000), ("retain", 5000))
        })
    return out


def concatenated_batches(case: dict) -> list[dict]:
    """What one process sees when it replaces `world` ranks: each micro-batch of all ranks, concatenated."""
    per_rank = [rank_batches(case, r) for r in range(case["world"])]
    return [
        {side: {k: torch.cat([b[j][side][k] for b in per_rank]) for k in per_rank[0][j][side]}
         for side in ("forget", "retain")}
        for j in range(case["micro_batches"])
    ]


class ResumableBatches:
    """A fixed list of batches that Lightning can checkpoint and resume mid-epoch (state_dict protocol).

    Sized, so Lightning does not prefetch: after batch b ends, b + 1 batches have been served.
    """

    def __init__(self, batches: list[dict]) -> None:
        self.batches = batches
        self.served = 0
        self.start = 0

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        start, self.start = self.start, 0
        for i in range(start, len(self.batches)):
            self.served = i + 1
            yield self.batches[i]

    def state_dict(self) -> dict:
        return {"served": self.served}

    def load_state_dict(self, state: dict) -> None:
        self.start = self.served = state["served"]


def make_strategy(case: dict):
    layout = case["layout"]
    if layout == "single":
        return "auto"
    if layout == "ddp":
        from lightning.pytorch.strategies import DDPStrategy

        return DDPStrategy(process_group_backend="gloo" if case["accelerator"] == "cpu" else None,
                           gradient_as_bucket_view=case["bucket_view"])
    from blur_lightning.distributed.fsdp import FSDP2Strategy

    precision = dict(param_dtype=case["param_dtype"], reduce_dtype=case["reduce_dtype"])
    if layout == "fsdp2":
        return FSDP2Strategy(sharding="full", **precision)
    return FSDP2Strategy(sharding="hybrid", shard_size=case["shard_size"], **precision)


def build_module(case: dict):
    from blur_lightning.training.unlearner import BLURUnlearner

    if case["optimizer"] == "sgd":
        optimizer = functools.partial(torch.optim.SGD, lr=case["lr"])
    elif case["optimizer"] == "adamw_fused":  # torch's fused AdamW: the non-finite skip stays on the device
        optimizer = functools.partial(torch.optim.AdamW, lr=case["lr"], weight_decay=0.01, fused=True)
    elif case["optimizer"] == "blur_fused_adamw":  # the projection folded into AdamW, on local shards
        from blur_lightning.kernels import BLURFusedAdamW

        optimizer = functools.partial(BLURFusedAdamW, lr=case["lr"], weight_decay=0.01, backend="torch")
    else:
        optimizer = functools.partial(torch.optim.AdamW, lr=case["lr"], weight_decay=0.01)
    model = case["model_path"] or build_tiny_llama(vocab_size=case["vocab"], seed=0)
    scheduler = None
    if case["scheduler"] is not None:
        from blur_lightning.training.schedules import LinearWarmupDecay

        scheduler = functools.partial(LinearWarmupDecay, **case["scheduler"])
    if case["module"] == "finetune":
        from blur_lightning.training.finetune import FineTuner

        return FineTuner(model, accumulate_grad_batches=case["accumulate"], gradient_sync=case["gradient_sync"],
                         gradient_clip_val=case["clip"], optimizer=optimizer, export_dir=case["export_dir"],
                         attn_implementation="eager")  # fmt: skip
    return BLURUnlearner(
        model, mode=case["mode"], forget_loss=case["forget_loss"], retain_loss=case["retain_loss"],
        gamma=case["gamma"], alpha=case["alpha"], accumulate_grad_batches=case["accumulate"],
        gradient_clip_val=case["clip"], optimizer=optimizer, scheduler=scheduler, export_dir=case["export_dir"],
        projection_backend=case["backend"], attn_implementation="eager", npo_reference=case["npo_reference"],
        lora_rank=case["lora_rank"], lora_alpha=case["lora_alpha"], lora_dropout=case["lora_dropout"],
        lora_target_modules=case["lora_target_modules"], activation_checkpointing=case["activation_checkpointing"],
        gradient_sync=case["gradient_sync"], pdu_retain_eps=case["pdu_retain_eps"],
        pdu_dual_step_size=case["pdu_dual_step_size"], pdu_dual_warmup_steps=case["pdu_dual_warmup_steps"],
        projection_metric=case["projection_metric"],
    )


def run_case(case: dict, rank: int) -> dict:
    """Fit one case on this rank; returns {"state", "stats", "global_step"} (full tensors on the CPU)."""
    import lightning.pytorch as pl

    case = {**DEFAULTS, **case}
    torch.manual_seed(0)
    stats: list[dict[str, float]] = []
    lambdas: list[float] = []  # mode "pdu": the multiplier after each step's dual update
    lrs: list[tuple[int, float]] = []  # (epoch, lr) of each optimizer step
    step_lr = [0.0, 0]  # the lr in effect at the batch's start, and the global step then

    class Record(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            step_lr[:] = [trainer.optimizers[0].param_groups[0]["lr"], trainer.global_step]

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step > step_lr[1]:  # this batch closed a window: a step at that lr
                lrs.append((trainer.current_epoch, step_lr[0]))
            if outputs and "stats" in outputs:
                s = outputs["stats"]
                stats.append({k: float(getattr(s, k))
                              for k in ("dot_rf", "sq_forget", "sq_retain", "coef", "retain_coef", "forget_coef",
                                        "direction_norm")})
                if case["mode"] == "pdu":
                    lambdas.append(float(pl_module.pdu_lambda))
            if batch_idx + 1 in case["save_at"]:
                path = os.path.join(case["ckpt_dir"], f"{case['name']}.micro{batch_idx + 1}.ckpt")
                trainer.save_checkpoint(path)

    module = build_module(case)
    collectives: dict[str, list[int]] = {"backward": [], "step": []}
    if case["count_collectives"]:
        count_collectives(module, collectives)
    if case["inf_loss_at"] is not None:
        infinite_forget_loss(module, rank, *case["inf_loss_at"])
    single = case["layout"] == "single"
    if case["data"] is not None:  # numbered rows: the sampler gives each rank its share
        from blur_lightning.data.datamodule import ForgetRetainDataModule

        data = case["data"]
        loader = dict(datamodule=ForgetRetainDataModule(
            forget_path=data["forget"], retain_path=data["retain"], tokenizer=data["tokenizer"], max_length=64,
            batch_size=case["rows"] * (case["world"] if single else 1), seed=0,
        ))
    else:
        batches = rank_batches(case, rank) if not single else concatenated_batches(case)
        if case["module"] == "finetune":  # one set: the retain side
            batches = [{"retain": b["retain"]} for b in batches]
        loader = dict(train_dataloaders=ResumableBatches(batches))
    trainer = pl.Trainer(
        accelerator=case["accelerator"], devices=1 if single else case["world"] // case["num_nodes"],
        num_nodes=1 if single else case["num_nodes"],
        strategy=make_strategy(case), max_epochs=case["max_epochs"], max_steps=case["max_steps"], logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        use_distributed_sampler=False, callbacks=[Record()], limit_val_batches=0,
    )
    trainer.fit(module, ckpt_path=case["ckpt_path"], **loader)
    cache = getattr(module, "_npo_cache", None)  # BLURUnlearner only
    table = cache.values.cpu() if cache is not None else None
    schedule = module.lr_schedulers()
    return {"state": full_state_dict(module.model), "stats": stats, "global_step": trainer.global_step,
            "skipped_steps": int(module.skipped_steps), "npo_table": table,
            "has_reference": module.reference_model is not None, "lrs": lrs,
            "final_lr": trainer.optimizers[0].param_groups[0]["lr"],
            "schedule": None if schedule is None else (schedule.warmup_steps, schedule.total_steps),
            "collectives": collectives, "lambdas": lambdas}


def count_collectives(module, record: dict[str, list[int]]) -> None:
    """Append the gradient-sized collectives of each backward to record["backward"] (forget, retain,
    forget, ...) and of each optimizer step (the projection, the update) to record["step"]."""
    from blur_lightning.testing.collectives import CollectiveCounter

    name = "_optimizer_step" if hasattr(module, "_optimizer_step") else "_fine_tune_step"
    backward, optimizer_step = module.manual_backward, getattr(module, name)

    def counted_backward(loss, *args, **kwargs):
        with CollectiveCounter() as comms:
            backward(loss, *args, **kwargs)
        record["backward"].append(comms.gradient)

    def counted_step(*args):
        with CollectiveCounter() as comms:
            out = optimizer_step(*args)
        record["step"].append(comms.gradient)
        return out

    module.manual_backward = counted_backward
    setattr(module, name, counted_step)


def infinite_forget_loss(module, rank: int, at_rank: int, at_micro_batch: int) -> None:
    """On rank at_rank, micro-batch at_micro_batch (0-based): forget loss + inf, a detached constant,
    so the loss is infinite while every gradient stays finite (only that rank can tell)."""
    original, calls = module.forget_loss, [0]

    def forget_loss(side):
        loss = original(side)
        calls[0] += 1
        return loss + float("inf") if rank == at_rank and calls[0] == at_micro_batch + 1 else loss

    module.forget_loss = forget_loss


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Whole tensors on every rank (DTensor shards gathered), cloned to the CPU."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.tensor import DTensor

    if any(isinstance(p, DTensor) for p in model.parameters()):
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    else:
        state = model.state_dict()
    return {k: v.detach().cpu().clone() for k, v in state.items()}


def main() -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)  # two cores shared by all ranks (and other jobs)
    with open(sys.argv[1]) as f:
        spec = json.load(f)
    if "RANK" in os.environ:  # torchrun
        rank = int(os.environ["RANK"])
    else:  # tests/test_fsdp.py's launcher, like Lightning's: NODE_RANK, LOCAL_RANK, LOCAL_WORLD_SIZE
        env = os.environ
        rank = int(env["NODE_RANK"]) * int(env["LOCAL_WORLD_SIZE"]) + int(env["LOCAL_RANK"])
    for case in spec["cases"]:
        result = run_case(case, rank)
        torch.save(result, os.path.join(spec["out"], f"{case['name']}.rank{rank}.pt"))
    if dist.is_initialized():
        # A rank that leaves before the others finish their last collective has been seen to abort.
        dist.barrier()
        dist.destroy_process_group()
    if any(case.get("count_collectives") for case in spec["cases"]):
        # After many profiler sessions the interpreter's exit has aborted ("terminate called without an
        # active exception", 2 launches in ~10): the results are saved, so leave without the C++ teardown.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    main()
