"""Which ranks the BLUR sums are reduced over, on fake meshes and fake shards (one process, fast).

The multi-process runs are in test_fsdp.py. Here: the reduction-group logic on a fake 2x2 HSDP
mesh (the sums count every element once on every rank), FSDP1's flat-parameter shards with padding
and its per-parameter views with empty shards and `grad=None` (FSDP1 cannot run on CPU), the
shard-aware clip, the strategy's checks, and a checkpoint inside an accumulation window in one
process (the full-tensor path of the same save/restore code).
"""

from __future__ import annotations

import itertools
import math
import os
import sys
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch
from torch.distributed.tensor import Partial, Replicate, Shard

from blur_lightning.core.accumulation import AccumulationWindow
from blur_lightning.core.projection import blur_direction_, combine_, direction_coefs, partial_sums
from blur_lightning.distributed import fsdp as distributed
from blur_lightning.training.unlearner import _paired_grads

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "dist_workers"))

# Odd sizes on purpose: 1 element, fewer rows than ranks, 127, a vocabulary of 101 rows.
SHAPES = [(1,), (3, 5), (127,), (101, 8), (2, 4, 3)]


def grads(seed: int, dtype=torch.float64) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    forget = [torch.randn(s, generator=g, dtype=dtype) for s in SHAPES]
    retain = [torch.randn(s, generator=g, dtype=dtype) + 0.3 * f for s, f in zip(SHAPES, forget)]
    return forget, retain


# --------------------------------------------------------------------------------------------
# fake meshes: the reduction-group logic
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FakeMesh:
    """Stands in for a DeviceMesh: shape, and get_group(dim) naming the group along that dim."""

    shape: tuple[int, ...]

    def get_group(self, dim: int) -> str:
        return f"mesh_dim_{dim}"


def fake_dtensor(mesh: FakeMesh, placements) -> SimpleNamespace:
    return SimpleNamespace(device_mesh=mesh, placements=tuple(placements))


def test_shard_dims_skip_replicas_and_refuse_partial():
    assert distributed.shard_dims([Shard(0)]) == [0]
    assert distributed.shard_dims([Replicate(), Shard(0)]) == [1]
    assert distributed.shard_dims([Replicate()]) == []
    with pytest.raises(ValueError, match="Partial"):
        distributed.shard_dims([Replicate(), Partial()])


def test_groups_from_placements():
    fsdp = FakeMesh((4,))
    hsdp = FakeMesh((2, 2))
    assert distributed.dtensor_groups([fake_dtensor(fsdp, [Shard(0)])] * 3) == "mesh_dim_0"
    assert distributed.dtensor_groups([fake_dtensor(hsdp, [Replicate(), Shard(0)])] * 3) == "mesh_dim_1"
    assert distributed.dtensor_groups([fake_dtensor(hsdp, [Replicate(), Replicate()])]) is None  # DDP-like
    assert distributed.dtensor_groups([]) is None
    mixed = [fake_dtensor(hsdp, [Replicate(), Shard(0)]), fake_dtensor(hsdp, [Shard(0), Shard(0)])]
    with pytest.raises(ValueError, match="2 different ways"):
        distributed.dtensor_groups(mixed)


def local_shard(full: torch.Tensor, placements, coords) -> torch.Tensor:
    """What the rank at mesh coordinates `coords` holds (FSDP2 splits dim 0 with torch.chunk)."""
    t = full
    for dim, placement in enumerate(placements):
        if placement.is_shard():
            chunks = torch.chunk(t, MESH_SHAPE[dim], dim=placement.dim)
            t = chunks[coords[dim]] if coords[dim] < len(chunks) else t.narrow(placement.dim, 0, 0)
    return t


MESH_SHAPE = (2, 2)


def all_reduce_over(values: dict[tuple, torch.Tensor], group_names: list[str]) -> dict[tuple, torch.Tensor]:
    """Simulate dist.all_reduce(SUM) over the named mesh dims: ranks equal elsewhere are summed."""
    out = dict(values)
    for name in group_names:
        dim = int(name.rsplit("_", 1)[1])
        reduced = {}
        for coords in out:
            peers = [c for c in out if all(c[i] == coords[i] for i in range(len(coords)) if i != dim)]
            reduced[coords] = sum(out[p] for p in peers)
        out = reduced
    return out


@pytest.mark.parametrize(
    "placements", [(Replicate(), Shard(0)), (Shard(0), Shard(0))], ids=["hsdp", "fsdp_2d"]
)
def test_fake_2x2_mesh_sums_count_each_element_once(placements):
    """Every rank of a 2x2 mesh ends with the global sums, and d written into the shards is exact."""
    forget, retain = grads(0)
    full_sums = partial_sums(forget, retain)
    mesh = FakeMesh(MESH_SHAPE)
    groups = distributed.dtensor_groups([fake_dtensor(mesh, placements)])
    groups = groups if isinstance(groups, list) else [groups]
    ranks = list(itertools.product(range(2), range(2)))
    partials = {}
    for c in ranks:
        local_forget = [local_shard(f, placements, c) for f in forget]
        partials[c] = partial_sums(local_forget, [local_shard(r, placements, c) for r in retain])
    reduced = all_reduce_over(partials, groups)
    for c in ranks:
        torch.testing.assert_close(reduced[c], full_sums, rtol=1e-12, atol=0, msg=f"rank {c}")
    if placements[0].is_replicate():
        # The mistake this guards against: reducing over the replicas as well counts everything twice.
        wrong = all_reduce_over(partials, ["mesh_dim_0", "mesh_dim_1"])
        torch.testing.assert_close(wrong[(0, 0)], 2 * full_sums)

    # d written shard by shard with the reduced coefficients == d on the whole tensors.
    expected = [r.clone() for r in retain]
    blur_direction_(forget, expected, gamma=0.7, mode="forget_lower")
    retain_coef, forget_coef, _ = direction_coefs(reduced[(0, 0)], mode="forget_lower", gamma=0.7)
    written = [torch.full_like(r, float("nan")) for r in retain]  # poisoned: an unwritten element fails
    for c in ranks:
        local_forget = [local_shard(f, placements, c) for f in forget]
        local_retain = [local_shard(r, placements, c).clone() for r in retain]
        combine_(local_retain, local_forget, retain_coef, forget_coef, mode="forget_lower", backend="torch")
        for w, lr in zip(written, local_retain):
            local_shard(w, placements, c).copy_(lr)
    for i, (w, e) in enumerate(zip(written, expected)):
        torch.testing.assert_close(w, e, rtol=1e-12, atol=1e-12, msg=f"tensor {i} of shape {SHAPES[i]}")


# --------------------------------------------------------------------------------------------
# FSDP1 (strategy="fsdp"): fake shards
# --------------------------------------------------------------------------------------------
def flat_shards(tensors: list[torch.Tensor], world: int) -> list[torch.Tensor]:
    """FSDP1's FlatParameter layout: concatenate, pad to a multiple of world, split evenly."""
    flat = torch.cat([t.reshape(-1) for t in tensors])
    padded = torch.cat([flat, flat.new_zeros(math.ceil(flat.numel() / world) * world - flat.numel())])
    return list(padded.chunk(world))


def orig_param_views(tensors: list[torch.Tensor], world: int, rank: int) -> list[torch.Tensor | None]:
    """FSDP1 use_orig_params: each parameter's slice inside this rank's flat shard, None where empty."""
    chunk = math.ceil(sum(t.numel() for t in tensors) / world)
    lo, hi = rank * chunk, (rank + 1) * chunk
    views, offset = [], 0
    for t in tensors:
        start, stop = max(lo, offset), min(hi, offset + t.numel())
        views.append(t.reshape(-1)[start - offset:stop - offset] if start < stop else None)
        offset += t.numel()
    return views


@pytest.mark.parametrize("world", [2, 3, 8])
def test_fsdp1_flat_shards_with_padding_count_once(world):
    """use_orig_params=False (what wrap_fsdp1 uses): each rank sums its padded flat shard."""
    forget, retain = grads(1)
    full_sums = partial_sums(forget, retain)
    f_shards, r_shards = flat_shards(forget, world), flat_shards(retain, world)
    total = sum(partial_sums([f], [r]) for f, r in zip(f_shards, r_shards))  # the all-reduce
    torch.testing.assert_close(total, full_sums, rtol=1e-12, atol=0)
    retain_coef, forget_coef, _ = direction_coefs(total, mode="rmu", gamma=1.0, alpha=2.0)
    for f, r in zip(f_shards, r_shards):
        combine_([r], [f], retain_coef, forget_coef, mode="rmu", backend="torch")
    expected = [r.clone() for r in retain]
    blur_direction_(forget, expected, gamma=1.0, alpha=2.0, mode="rmu")
    numel = sum(t.numel() for t in retain)
    flat = torch.cat(r_shards)
    torch.testing.assert_close(flat[:numel], torch.cat([e.reshape(-1) for e in expected]))
    assert torch.all(flat[numel:] == 0)  # the padding: zero gradients give d = 0


@pytest.mark.parametrize("world", [2, 8])
def test_fsdp1_orig_param_views_empty_shards_and_none_grads(world):
    """use_orig_params=True layout: a rank may hold no slice of a parameter (grad None on both sides),
    or a gradient on one side only; the module's pairing fills zeros and the sums still count once."""
    forget, retain = grads(2)
    full_sums = partial_sums(forget, retain)
    total = torch.zeros(3, dtype=torch.float64)
    saw_empty = False
    for rank in range(world):
        f_views = orig_param_views(forget, world, rank)
        r_views = orig_param_views(retain, world, rank)
        saw_empty |= any(v is None for v in r_views)
        # one side missing on this rank (a parameter the forget loss did not reach): zeros stand in
        f_views = [None if (i == 0 and v is not None) else v for i, v in enumerate(f_views)]
        params = [SimpleNamespace(grad=r) for r in r_views]
        _, forget_grads, retain_grads = _paired_grads(params, f_views)
        assert len(forget_grads) == sum(v is not None for v in r_views)
        total += partial_sums(forget_grads, retain_grads)
    assert saw_empty
    # the element forget[0] was hidden from its rank: remove it from the reference too
    forget[0] = torch.zeros_like(forget[0])
    torch.testing.assert_close(total, partial_sums(forget, retain), rtol=1e-12, atol=0)
    assert not torch.equal(total, full_sums)


def test_fsdp1_group_choice():
    from torch.distributed.fsdp import ShardingStrategy

    pg = object()
    assert distributed.fsdp1_group(ShardingStrategy.NO_SHARD, pg) is None  # replicated like DDP
    for strategy in ("FULL_SHARD", "SHARD_GRAD_OP", "HYBRID_SHARD", "_HYBRID_SHARD_ZERO2"):
        # hybrid: FSDP1's process_group is the intra-node shard group; replicas (_inter_node_pg) never
        assert distributed.fsdp1_group(getattr(ShardingStrategy, strategy), pg) is pg
    with pytest.raises(ValueError, match="unknown FSDP sharding"):
        distributed.fsdp1_group("SOMETHING", pg)


def test_replicated_layouts_reduce_nothing():
    """DDP and one process: the local sums are the global ones (all-reducing would count world_size times)."""
    from lightning.pytorch.strategies import DDPStrategy

    params = [torch.nn.Parameter(torch.zeros(3))]
    module = SimpleNamespace(trainable_parameters=lambda: params)
    assert distributed.projection_group(module, DDPStrategy()) is None
    assert distributed.projection_group(module, None) is None


# --------------------------------------------------------------------------------------------
# the strategy
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"sharding": "zero3"}, "sharding='zero3'"),
        ({"shard_size": 0}, "shard_size"),
        ({"param_dtype": "fp8"}, "param_dtype='fp8'"),
        ({"reduce_dtype": "half"}, "reduce_dtype='half'"),
    ],
)
def test_strategy_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        distributed.FSDP2Strategy(**kwargs)


def test_strategy_mixed_precision_policy_and_mesh_checks():
    strategy = distributed.FSDP2Strategy(sharding="hybrid", param_dtype="bfloat16", reduce_dtype="float32")
    policy = strategy.mp_policy()
    assert policy.param_dtype == torch.bfloat16 and policy.reduce_dtype == torch.float32
    with pytest.raises(ValueError, match="not a multiple of shard_size 3"):
        distributed.build_mesh("hybrid", 4, 3, "cpu")


def test_decoder_layers_found(tiny_llama):
    layers = distributed.decoder_layers(tiny_llama)
    assert [type(m).__name__ for m in layers] == ["LlamaDecoderLayer"] * 2


# --------------------------------------------------------------------------------------------
# a checkpoint inside an accumulation window, one process (full tensors in the checkpoint)
# --------------------------------------------------------------------------------------------
@pytest.mark.timeout(300)
def test_checkpoint_inside_accumulation_window_resumes_exactly(tmp_path):
    import blur_worker

    base = dict(layout="single", world=1, micro_batches=6, accumulate=3, ckpt_dir=str(tmp_path))
    full = blur_worker.run_case({**base, "name": "full", "save_at": [4]}, 0)  # 4 = 1 into window 2
    ckpt = os.path.join(str(tmp_path), "full.micro4.ckpt")
    saved = torch.load(ckpt, weights_only=False)["blur_accumulation"]
    assert saved["micro_step"] == 1 and len(saved["forget"]) == len(saved["retain"]) > 0
    resumed = blur_worker.run_case({**base, "name": "resumed", "ckpt_path": ckpt}, 0)
    assert resumed["global_step"] == full["global_step"] == 2
    for key, value in full["state"].items():
        torch.testing.assert_close(resumed["state"][key], value, rtol=0, atol=1e-7, msg=key)

    # Control: the same resume with the window dropped from the checkpoint ends elsewhere.
    dropped = torch.load(ckpt, weights_only=False)
    del dropped["blur_accumulation"]
    torch.save(dropped, os.path.join(str(tmp_path), "dropped.ckpt"))
    lost = blur_worker.run_case({**base, "name": "lost", "ckpt_path": str(tmp_path / "dropped.ckpt")}, 0)
    assert max((lost["state"][k] - full["state"][k]).abs().max().item() for k in full["state"]) > 1e-5


def test_no_window_no_entry():
    checkpoint: dict = {}
    distributed.accumulation_state(AccumulationWindow(), [], checkpoint, None)
    assert checkpoint == {}



# --------------------------------------------------------------------------------------------
# the module's strategy hooks: an explicit interface, not attributes found by name
# --------------------------------------------------------------------------------------------
def test_strategy_hooks_are_declared_filled_and_called(tmp_path):
    from conftest import build_tiny_llama

    from blur_lightning.distributed.hooks import StrategyHooks
    from blur_lightning.training.unlearner import BLURUnlearner

    module = BLURUnlearner(build_tiny_llama(), export_dir=str(tmp_path))
    assert module.strategy_hooks == StrategyHooks()  # one process: nothing installed
    assert module._projection_group() is None
    distributed.install_hooks(module)
    assert module.strategy_hooks == StrategyHooks(
        projection_group=distributed.projection_group, export=distributed.export_hf
    )
    calls = []
    module.strategy_hooks = StrategyHooks(
        projection_group=lambda m, strategy: calls.append(("group", m, strategy)) or "the group",
    )
    assert module._projection_group() == "the group"
    assert calls == [("group", module, None)]
