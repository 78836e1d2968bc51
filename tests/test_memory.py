"""The paper memory model (benchmarks/step_memory.py) against bytes measured from real tensors on a CPU.

Measured: parameters, the retain gradient, the forget stash and AdamW's state after a real
BLURUnlearner step (one process); the same sharded by FSDP2's fully_shard over 8 ranks of a fake
process group (real DTensor shards, uneven vocabulary, a real backward and AdamW step, on rank 0);
the tensors autograd saves in one forward plus the NLL loss (saved_tensors_hooks). LoRA and
activation checkpointing are not run by the project yet: LoRA's saved activations are measured
on a hand-written adapter of peft's form, checkpointing through transformers' own switch by the
tensors still alive after the forward (saved-tensor hooks do not see what a checkpoint keeps).
"""

from __future__ import annotations

import gc
import importlib.util
import weakref
from pathlib import Path

import pytest
import step_memory as memory
import torch
from conftest import make_batch
from test_module import fit
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from blur_lightning.core.projection import all_reduce_sums, partial_sums
from blur_lightning.losses import functional as losses
from blur_lightning.models import attention
from blur_lightning.testing.tiny import tiny_llama
from blur_lightning.training.unlearner import BLURUnlearner

FP32 = memory.PRECISIONS["fp32"]
ROOT = Path(__file__).resolve().parents[1]


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (DTensors: their local shards)."""
    storages = {}
    for t in tensors:
        if t is None:
            continue
        t = t.to_local() if hasattr(t, "to_local") else t
        st = t.untyped_storage()
        storages[st.data_ptr()] = st.nbytes()
    return sum(storages.values())


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return storage_bytes(v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v))


# --------------------------------------------------------------------------------------------
# sharded state: one process, a real BLUR step
# --------------------------------------------------------------------------------------------
def test_state_bytes_match_a_real_blur_step():
    """Parameters, .grad, the stash and AdamW state after the module's own step, byte for byte."""
    model = tiny_llama(vocab_size=101)
    module = BLURUnlearner(model, forget_loss="npo", accumulate_grad_batches=2, export_dir=None,
                           optimizer=torch.optim.AdamW)
    seen = {}

    class Probe:
        def __call__(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx == 0:  # inside the window: the stash and the retain .grad are both alive
                params = pl_module.trainable_parameters()
                seen["grads"] = storage_bytes(p.grad for p in params)
                seen["stash"] = storage_bytes(pl_module._window.forget_stash)
                seen["n_stash"] = sum(g is not None for g in pl_module._window.forget_stash)
            else:
                seen["optimizer"] = optimizer_state_bytes(trainer.optimizers[0])

    from lightning.pytorch.callbacks import LambdaCallback

    fit(module, [make_batch(seed=0), make_batch(seed=1)], callbacks=[LambdaCallback(on_train_batch_end=Probe())])
    predicted = memory.step_memory(
        memory.Setup(model.config, memory.fsdp2(1), FP32, batch=4, seq=12), model
    )
    assert seen["n_stash"] == len(list(model.parameters()))
    numel = sum(p.numel() for p in model.parameters())
    assert storage_bytes(model.parameters()) == predicted["parameters"] == 4 * numel
    assert seen["grads"] == predicted["gradients"]
    assert seen["stash"] == predicted["stash"]
    assert seen["optimizer"] == predicted["optimizer"]
    assert storage_bytes(module.reference_model.parameters()) == predicted["reference"]


# --------------------------------------------------------------------------------------------
# sharded state: FSDP2 over 8 fake ranks
# --------------------------------------------------------------------------------------------
@pytest.fixture
def fake_world():
    """An 8-rank fake process group in this process (collectives are no-ops; shapes are real)."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=8)
    try:
        yield 8
    finally:
        dist.destroy_process_group()


def test_sharded_state_matches_fully_shard_over_8_ranks(fake_world):
    """Rank 0's shards after a real backward and AdamW step: vocab 101 pads to 13 rows per rank."""
    from torch.distributed.device_mesh import init_device_mesh

    from blur_lightning.distributed.fsdp import shard_model_

    model = tiny_llama(vocab_size=101)
    units = memory.fsdp_units(model)
    shard_model_(model, init_device_mesh("cpu", (fake_world,), mesh_dim_names=("shard",)))
    ids = torch.randint(0, 101, (2, 9), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, use_cache=False).logits.float().pow(2).mean().backward()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    optimizer.step()
    predicted = memory.state_bytes(units, None, memory.fsdp2(fake_world), FP32)
    params = list(model.parameters())
    assert params[0].to_local().shape[0] == 13  # ceil(101 / 8): the padded dim-0 shard of rank 0
    assert sum(4 * p.to_local().numel() for p in params) == predicted["parameters"]
    assert sum(4 * p.grad.to_local().numel() for p in params) == predicted["gradients"] == predicted["stash"]
    assert optimizer_state_bytes(optimizer) == predicted["optimizer"]


# --------------------------------------------------------------------------------------------
# activations: the tensors autograd saves
# --------------------------------------------------------------------------------------------
def saved_bytes(model, side) -> int:
    """Distinct storages autograd saves in one forward + NLL loss, parameters excluded."""
    param_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = attention.forward(model, side).logits
        losses.nll_loss(logits, side["labels"])
    return storage_bytes(t for t in saved if t.untyped_storage().data_ptr() not in param_storages)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize(
    "batch,seq,layers,heads,kv_heads", [(3, 17, 2, 4, 2), (1, 33, 3, 4, 4), (2, 8, 1, 8, 1)]
)
def test_activation_bytes_match_saved_tensors(dtype, padded, batch, seq, layers, heads, kv_heads):
    """Exact on the CPU for the SDPA path, with and without a padding mask, in fp32 and bf16."""
    config = dict(hidden=64, layers=layers, heads=heads, kv_heads=kv_heads, intermediate=96)
    model = tiny_llama(vocab_size=101, dtype=dtype, **config)
    ids = torch.randint(0, 101, (batch, seq), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(batch, seq, dtype=torch.long)
    side = {"input_ids": ids, "labels": ids.clone(), "attention_mask": mask}
    if padded:
        mask[0, -2:] = 0
        side["labels"][0, -2:] = -100
    else:
        attention.mark_padding(side)  # as the data module's collator does: no mask, SDPA's is_causal
    measured = saved_bytes(model, side)
    predicted = memory.activation_bytes(
        model.config, batch, seq, compute=torch.finfo(dtype).bits // 8, padded=padded
    )
    assert measured == predicted["total"], (measured, predicted)


class LoraLinear(torch.nn.Module):
    """peft's LoRA forward, written out: base(x) + lora_B(lora_A(dropout(x))) * scaling, dropout 0."""

    def __init__(self, base: torch.nn.Linear, rank: int) -> None:
        super().__init__()
        self.base = base
        self.lora_A = torch.nn.Linear(base.in_features, rank, bias=False, dtype=base.weight.dtype)
        self.lora_B = torch.nn.Linear(rank, base.out_features, bias=False, dtype=base.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.lora_B(self.lora_A(x)) * 2.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("padded", [False, True])
def test_lora_activation_bytes_match_a_hand_written_adapter(dtype, padded):
    """The LoRA formula (frozen base, adapters on all seven linears) against saved tensors, exact.

    Not peft itself (not a dependency yet): an adapter of the same form, so what autograd saves
    around frozen and trainable weights is measured, not assumed.
    """
    model = tiny_llama(vocab_size=101, dtype=dtype, hidden=64, layers=3, heads=4, kv_heads=2, intermediate=96)
    model.requires_grad_(False)
    for sub in list(model.modules()):
        for target in memory.LORA_TARGETS:
            if isinstance(getattr(sub, target, None), torch.nn.Linear):
                setattr(sub, target, LoraLinear(getattr(sub, target), rank=4))
    batch, seq = 3, 17
    ids = torch.randint(0, 101, (batch, seq), generator=torch.Generator().manual_seed(2))
    side = {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones(batch, seq, dtype=torch.long)}
    if padded:
        side["attention_mask"][0, -2:] = 0
    else:
        attention.mark_padding(side)
    predicted = memory.activation_bytes(
        model.config, batch, seq, compute=torch.finfo(dtype).bits // 8, lora_rank=4, padded=padded
    )
    assert saved_bytes(model, side) == predicted["total"]
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == memory.parameter_counts(tiny_llama(vocab_size=101, hidden=64, layers=3, heads=4,
                                                           kv_heads=2, intermediate=96), 4)["trainable"]


class LiveTensors(TorchDispatchMode):
    """Weak references to every tensor an op makes inside the mode."""

    def __init__(self) -> None:
        super().__init__()
        self.refs: list[weakref.ref] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.refs += [weakref.ref(t) for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        return out


def bytes_alive_after_forward(model, side) -> int:
    """Storages made in one forward + NLL that are still alive once it returns (what backward will
    use: saved tensors, and what a checkpoint keeps), plus the input ids made before it."""
    param_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    live = LiveTensors()
    with live:
        loss = losses.nll_loss(attention.forward(model, side).logits, side["labels"])
    gc.collect()
    alive = [t for t in (r() for r in live.refs) if t is not None and t is not loss]
    alive = [t for t in alive if t.untyped_storage().data_ptr() not in param_storages]
    return storage_bytes(alive) + side["input_ids"].untyped_storage().nbytes()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_checkpointing_keeps_only_each_layers_input(dtype):
    """Per-layer non-reentrant checkpointing (transformers' activation_checkpointing_enable): after
    the forward only each layer's input c N h is alive inside the layers, exact. The recompute
    peak in backward (one layer's full set on top) is modelled, not measured."""
    shapes = dict(hidden=64, layers=3, heads=4, kv_heads=2, intermediate=96)
    batch, seq = 3, 17
    ids = torch.randint(0, 101, (batch, seq), generator=torch.Generator().manual_seed(3))
    side = {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones(batch, seq, dtype=torch.long)}
    attention.mark_padding(side)
    compute = torch.finfo(dtype).bits // 8
    plain = tiny_llama(vocab_size=101, dtype=dtype, **shapes).train()
    predicted = memory.activation_bytes(plain.config, batch, seq, compute=compute)
    assert bytes_alive_after_forward(plain, side) == saved_bytes(plain, side) == predicted["total"]
    checkpointed = tiny_llama(vocab_size=101, dtype=dtype, **shapes).train()
    # transformers 5.x renamed gradient_checkpointing_enable to activation_checkpointing_enable (5.0.0 has
    # only the old name)
    enable = getattr(checkpointed, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        checkpointed.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    predicted = memory.activation_bytes(plain.config, batch, seq, compute=compute, checkpointing=True)
    assert bytes_alive_after_forward(checkpointed, side) == predicted["total"] - predicted["per_layer"], predicted


def test_checkpointing_and_lora_only_lower_activations():
    """The analytical variants keep their order: checkpointing far below, LoRA a little below."""
    config = memory.llama_config("llama-3-8b")
    full = memory.activation_bytes(config, 1, 4096, compute=2)["total"]
    ckpt = memory.activation_bytes(config, 1, 4096, compute=2, checkpointing=True)["total"]
    lora = memory.activation_bytes(config, 1, 4096, compute=2, lora_rank=16)["total"]
    assert ckpt < full / 5
    assert 0.85 * full < lora < full


# --------------------------------------------------------------------------------------------
# shapes of the large models and of LoRA
# --------------------------------------------------------------------------------------------
def test_llama3_shapes_and_lora_counts():
    """Published counts: Llama-3-8B 8,030,261,248 and 70B 70,553,706,496 parameters; peft's
    print_trainable_parameters for r=16 on all seven linears of 8B: 41,943,040 trainable."""
    small = memory.meta_model(memory.llama_config("llama-3-8b"))
    large = memory.meta_model(memory.llama_config("llama-3-70b"))
    assert all(p.is_meta for p in small.parameters())
    assert memory.parameter_counts(small, 16) == {"total": 8_030_261_248, "trainable": 41_943_040}
    assert memory.parameter_counts(large)["total"] == 70_553_706_496
    units = memory.fsdp_units(small)
    assert len(units) == 33 and len(units[0]) == 3  # root: embeddings, final norm, head


def test_lora_adapters_shard_with_dim0_padding():
    """rank-16 lora_A over 64 ranks: FSDP2 pads 16 rows to one per rank, 4x the even share."""
    assert memory.shard_numel((16, 4096), 64) == 4096
    assert memory.shard_numel((101, 64), 8) == 13 * 64
    assert memory.shard_numel((), 8) == 1


# --------------------------------------------------------------------------------------------
# traffic
# --------------------------------------------------------------------------------------------
def test_projection_moves_one_24_byte_all_reduce(monkeypatch):
    """The sums the projection all-reduces are a (3,) float64 tensor, sent once per group."""
    import torch.distributed as dist

    grads = [torch.randn(5, 3), torch.randn(7)]
    sums = partial_sums(grads, [g.clone() for g in grads], backend="torch")
    calls = []
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "all_reduce", lambda t, op=None, group=None: calls.append(t.numel() * t.element_size()))
    all_reduce_sums(sums, group="shard")
    assert calls == [memory.SUMS_BYTES] == [24]


def test_traffic_ring_factors():
    model = memory.meta_model(memory.llama_config("tiny-llama"))
    units = memory.fsdp_units(model)
    total = sum(torch.Size(s).numel() for u in units for s in u)
    one = memory.traffic_bytes(units, None, memory.fsdp2(1), FP32)
    assert one["all_gather"] == one["reduce_scatter"] == one["projection"] == 0
    full = memory.traffic_bytes(units, None, memory.fsdp2(2), FP32)
    assert full["projection"] == 2 * (2 - 1) / 2 * 24
    assert full["reduce_scatter"] == 2 * (2 - 1) * memory.state_bytes(units, None, memory.fsdp2(2), FP32)["gradients"]
    hybrid = memory.traffic_bytes(units, None, memory.hsdp(16, 8), FP32)
    shard = memory.state_bytes(units, None, memory.hsdp(16, 8), FP32)["gradients"]
    assert hybrid["replica_all_reduce"] == 2 * 2 * (2 - 1) / 2 * shard  # two backwards, R = 2 nodes
    assert hybrid["projection"] == 2 * 7 / 8 * 24  # over the 8 ranks of a node only
    assert total * 4 <= 8 * shard  # the shards (padded) cover the model


def test_bad_layouts_and_names():
    with pytest.raises(ValueError, match="gpus_per_node"):
        memory.hsdp(12, 8)
    with pytest.raises(ValueError, match="precision"):
        memory.precision("fp8")
    with pytest.raises(ValueError, match="model"):
        memory.llama_config("llama-9")


# --------------------------------------------------------------------------------------------
# the script
# --------------------------------------------------------------------------------------------
def load_script():
    spec = importlib.util.spec_from_file_location("memory_model", ROOT / "benchmarks" / "memory_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_script_main_at_small_size(tmp_path, capsys):
    """The script's table for the tiny model on 1 GPU shows the bytes measured from the real model."""
    script = load_script()
    doc = tmp_path / "doc.md"
    doc.write_text(f"before\n{script.BEGIN}\nold\n{script.END}\nafter\n")
    args = ["--models", "tiny-llama", "--gpus", "1", "2", "--batch", "2", "--seq", "16", "--lora-rank", "4",
            "--precision", "fp32", "--write-doc", str(doc)]
    text = script.main(args)
    assert text in capsys.readouterr().out
    model = tiny_llama()
    param_row = next(line for line in text.splitlines() if line.startswith("| parameters"))
    assert param_row.split("|")[2].strip() == script.human(storage_bytes(model.parameters()))
    assert "full, FSDP2 2 GPUs" in text and "LoRA r=4" in text
    written = doc.read_text()
    assert written.startswith("before\n") and written.endswith("after\n") and "old" not in written
    assert "python benchmarks/memory_model.py --models tiny-llama" in written


def test_doc_tables_are_the_scripts_output():
    """docs/FSDP.md's generated section is what the script prints today (regenerate: see the doc)."""
    script = load_script()
    doc = (ROOT / "docs" / "FSDP.md").read_text()
    section = doc.split(script.BEGIN, 1)[1].split(script.END, 1)[0]
    assert "`python benchmarks/memory_model.py --write-doc docs/FSDP.md`" in section
    assert script.report(script.parse_args([])) in section
