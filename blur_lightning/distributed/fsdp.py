"""BLUR across processes: FSDP2 under Lightning, HSDP, DDP and FSDP1, with exact global sums.

The projection needs three sums over every element of the model, s_rf = <g_r, g_f>,
s_ff = ||g_f||^2 and s_rr = ||g_r||^2 (`blur_lightning.core.projection`). Each rank sums what it
holds and the (3,) partials are all-reduced, so which ranks to reduce over depends only on how
the gradients are laid out after backward:

    layout                          a rank holds                            reduce the sums over
    one process                     every element                           nothing
    DDP (strategy="ddp")            every element (already all-reduced)     nothing: each rank has the total
    FSDP2 full shard (1-D mesh)     a dim-0 shard of each gradient          the shard group
    HSDP (FSDP2, 2-D mesh)          a shard, the same on every replica      the shard dim of the mesh only
    FSDP1 (strategy="fsdp")         a slice of each flat gradient, maybe    the FSDP process group (hybrid:
                                    empty (then .grad is None)              the intra-node group only)

Each element is counted exactly once; nothing is gathered: one all-reduce of 24 bytes per group
per optimizer step, and the coefficients never leave the device.

What lives here:
    FSDP2Strategy          ModelParallelStrategy with a (replicate, shard) mesh, mixed precision and
                           the data-parallel sampler over all ranks.
    configure_fsdp2        what BLURUnlearner.configure_model does under FSDP2: build (on the meta
                           device when the model is loaded by name), shard each decoder layer and the
                           root, shard the frozen reference the same way, install the hooks below.
    projection_group       the group(s) for the sums, from the gradients' layout (DTensor placements,
                           FSDP1 sharding strategy); installed in `module.strategy_hooks`.
    export_hf              gather full weights (a collective) and save_pretrained from rank 0.
    accumulation_state /   the forget stash and the retain .grad when a checkpoint falls inside an
    restore_accumulation   accumulation window (sharded checkpoints keep them as DTensors).
"""

from __future__ import annotations

import copy
import os
import warnings
from collections.abc import Sequence
from datetime import timedelta
from typing import Any, Literal

import torch
import torch.distributed as dist
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.strategies.parallel import ParallelStrategy
from torch import nn

from blur_lightning.core.accumulation import AccumulationWindow
from blur_lightning.distributed.hooks import StrategyHooks
from blur_lightning.models import adapters
from blur_lightning.models.layers import decoder_layers

SHARDINGS = ("full", "hybrid")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ACCUMULATION_KEY = "blur_accumulation"  # checkpoint entry for a window cut by a checkpoint
_STATE_PREFIX = "_blur_accumulation"  # DTensor entries inside a sharded checkpoint's state_dict


# --------------------------------------------------------------------------------------------
# the strategy
# --------------------------------------------------------------------------------------------
class FSDP2Strategy(ModelParallelStrategy):
    """FSDP2 (`fully_shard`) for BLUR: full sharding, or HSDP (shard in a node, replicate across nodes).

    Every rank is a data-parallel worker (the sampler splits the data over all ranks); the mesh
    says how parameters, gradients and optimizer state are split:

        sharding="full"     1-D mesh ("shard",) over all ranks: Shard(0) everywhere.
        sharding="hybrid"   2-D mesh ("replicate", "shard") of (world / shard_size, shard_size):
                            each replica group holds a whole sharded copy; gradients are
                            reduce-scattered in a replica and all-reduced across replicas.

    Args:
        sharding: "full" or "hybrid".
        shard_size: ranks per shard group for "hybrid" ("auto": the devices of one node).
        param_dtype: compute / all-gather dtype ("bfloat16", "float16", "float32"; None: the
            parameters' own). Sharded parameters, gradients and AdamW state keep the parameters'
            dtype, so the projection and the step run in float32 for a float32 model.
        reduce_dtype: gradient reduce-scatter dtype (None: param_dtype). "float32" with bf16 params
            is the usual choice.
        reshard_after_forward: free the gathered decoder-layer weights after each forward (True,
            less memory) or keep them to backward (False, fewer all-gathers).
        save_distributed_checkpoint: one file per rank (True) or a full checkpoint on rank 0.
        process_group_backend: None picks nccl on CUDA and gloo on CPU.
        timeout: collective timeout.
    """

    def __init__(
        self,
        sharding: Literal["full", "hybrid"] = "full",
        shard_size: int | Literal["auto"] = "auto",
        param_dtype: str | None = None,
        reduce_dtype: str | None = None,
        reshard_after_forward: bool = True,
        save_distributed_checkpoint: bool = True,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
    ) -> None:
        super().__init__(
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
            timeout=timeout,
        )
        if sharding not in SHARDINGS:
            raise ValueError(f"sharding={sharding!r}: expected one of {SHARDINGS}")
        if shard_size != "auto" and (not isinstance(shard_size, int) or shard_size < 1):
            raise ValueError(f"shard_size must be 'auto' or a positive int, got {shard_size!r}")
        for name, value in (("param_dtype", param_dtype), ("reduce_dtype", reduce_dtype)):
            if value is not None and value not in _DTYPES:
                raise ValueError(f"{name}={value!r}: expected one of {tuple(_DTYPES)} or None")
        self.sharding = sharding
        self.shard_size = shard_size
        self.param_dtype = param_dtype
        self.reduce_dtype = reduce_dtype
        self.reshard_after_forward = reshard_after_forward

    def setup_environment(self) -> None:
        # ModelParallelStrategy builds a (data_parallel, tensor_parallel) mesh; ours is (replicate, shard).
        ParallelStrategy.setup_environment(self)
        self._setup_distributed()
        shard_size = self.num_processes if self.shard_size == "auto" else self.shard_size
        self._device_mesh = build_mesh(self.sharding, self.world_size, shard_size, self.root_device.type)
        assert self.lightning_module is not None
        self.lightning_module._device_mesh = self._device_mesh

    @property
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        return {"num_replicas": self.world_size, "rank": self.global_rank}

    def mp_policy(self):
        from torch.distributed.fsdp import MixedPrecisionPolicy

        return MixedPrecisionPolicy(
            param_dtype=_DTYPES.get(self.param_dtype), reduce_dtype=_DTYPES.get(self.reduce_dtype)
        )


def build_mesh(sharding: str, world_size: int, shard_size: int, device_type: str):
    """The FSDP2 mesh: ("shard",) over all ranks, or ("replicate", "shard") of shape
    (world_size / shard_size, shard_size)."""
    from torch.distributed.device_mesh import init_device_mesh

    if sharding == "full":
        return init_device_mesh(device_type, (world_size,), mesh_dim_names=("shard",))
    if world_size % shard_size:
        raise ValueError(
            f"hybrid sharding: world size {world_size} is not a multiple of shard_size {shard_size}"
        )
    return init_device_mesh(
        device_type, (world_size // shard_size, shard_size), mesh_dim_names=("replicate", "shard")
    )


def _fsdp2_settings(strategy) -> tuple[Any, Any, bool]:
    """(mesh, mp_policy, reshard_after_forward) from our strategy or from a plain ModelParallelStrategy."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if isinstance(strategy, FSDP2Strategy):
        return strategy.device_mesh, strategy.mp_policy(), strategy.reshard_after_forward
    mesh = strategy.device_mesh
    if mesh["tensor_parallel"].size() > 1:
        raise ValueError(
            "BLURUnlearner shards with FSDP2 only (no tensor parallelism): use "
            "blur_lightning.distributed.fsdp.FSDP2Strategy, or ModelParallelStrategy(data_parallel_size=<world "
            f"size>, tensor_parallel_size=1) (got a mesh of shape {tuple(mesh.shape)})"
        )
    return mesh["data_parallel"], MixedPrecisionPolicy(), True


def is_fsdp2(strategy) -> bool:
    return isinstance(strategy, ModelParallelStrategy)


def is_fsdp1(strategy) -> bool:
    from lightning.pytorch.strategies import FSDPStrategy

    return isinstance(strategy, FSDPStrategy)


# --------------------------------------------------------------------------------------------
# building and sharding the model
# --------------------------------------------------------------------------------------------
def shard_model_(model: nn.Module, mesh, *, mp_policy=None, reshard_after_forward: bool = True) -> nn.Module:
    """fully_shard each decoder layer, then the root (embeddings, final norm and head: one group)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp_policy = mp_policy or MixedPrecisionPolicy()
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, mp_policy=mp_policy, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, mp_policy=mp_policy, reshard_after_forward=reshard_after_forward)
    return model


def configure_fsdp2(module, strategy) -> None:
    """Build, shard and hook up a BLURUnlearner under FSDP2 (ModelParallelStrategy or FSDP2Strategy).

    A model given by name is built on the meta device on every rank, sharded, materialized shard
    by shard, and filled from rank 0's copy (`broadcast_from_rank0`): no rank but rank 0 ever
    holds a whole model. A ready nn.Module (tests, small models) is sharded in place. The frozen
    reference, when a loss needs one, is a copy taken before sharding, sharded the same way (with
    LoRA adapters: none, the policy with its adapters disabled serves). Adapters are added before
    sharding (on rank 0's full model too, so the broadcast carries their initial values) and
    activation checkpointing is applied per decoder layer before `fully_shard`.
    """
    from torch.distributed.fsdp import FSDPModule

    if isinstance(module.model, FSDPModule):  # configure_model runs once per Trainer entry point
        return
    mesh, mp_policy, reshard = _fsdp2_settings(strategy)
    device = strategy.root_device
    lazy = module.model is None
    full_model = None  # rank 0's whole model when built by name; None elsewhere
    if lazy:
        full_model, module.model = _meta_model_from_source(module)
        full_model = module.add_adapters(full_model)  # rank 0's adapters: what every rank gets
    module.model = module.add_adapters(module.model)
    module.apply_trainable_filter()
    reference = copy.deepcopy(module.model) if module.needs_reference_copy else None
    module.enable_activation_checkpointing()  # when switched on; before fully_shard, as torch composes the two
    shard_model_(module.model, mesh, mp_policy=mp_policy, reshard_after_forward=reshard)
    models = [module.model]
    if reference is not None:
        reference.requires_grad_(False)
        # The reference only runs forward under no_grad: always free its gathered weights after.
        shard_model_(reference, mesh, mp_policy=mp_policy, reshard_after_forward=True)
        reference.eval()
        module.set_reference(reference)
        models.append(reference)
    if lazy:
        for model in models:
            _materialize_from_rank0(model, full_model, device)
    install_hooks(module)


def _meta_model_from_source(module) -> tuple[nn.Module | None, nn.Module]:
    """(rank 0's full CPU model or None, an empty model of the same config on the meta device)."""
    from transformers import AutoModelForCausalLM

    from blur_lightning.models.loading import load_causal_lm, load_tokenizer

    rank = dist.get_rank()
    full = None
    if rank == 0:
        hparams = module.hparams
        full = load_causal_lm(
            module.model_source, dtype=hparams.model_dtype, attn_implementation=hparams.attn_implementation,
            compute_dtype=module.compute_dtype(),
        )
    box = [full.config if full is not None else None]
    dist.broadcast_object_list(box, src=0)
    config = box[0]
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(config)
    meta.to(_DTYPES.get(module.hparams.model_dtype, torch.float32))
    module.tokenizer = load_tokenizer(module.model_source)
    return full, meta


def _materialize_from_rank0(model: nn.Module, full_model: nn.Module | None, device: torch.device) -> None:
    """Allocate the local shards and copy rank 0's weights into them; buffers are broadcast whole."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    model.to_empty(device=device)
    state = full_model.state_dict() if full_model is not None else {}
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(model, state, options=options)
    # Non-persistent buffers (rotary inv_freq) are not in a state dict: broadcast them too.
    full_buffers = dict(full_model.named_buffers()) if full_model is not None else {}
    for name, buf in model.named_buffers():
        if name in full_buffers:
            buf.copy_(full_buffers[name])
        dist.broadcast(buf, src=0)


def install_hooks(module) -> None:
    """Fill the module's StrategyHooks (blur_lightning.distributed.hooks) for a sharded model."""
    module.strategy_hooks = StrategyHooks(projection_group=projection_group, export=export_hf)


# --------------------------------------------------------------------------------------------
# FSDP1 (Lightning's strategy="fsdp"): GPU only, not run in CI
# --------------------------------------------------------------------------------------------
def wrap_fsdp1(module) -> None:
    """Wrap the policy (and the reference) as their own FSDP1 roots, inside Lightning's wrap context.

    Two choices differ from Lightning's defaults, both for the BLUR step:
    * The policy is its own FSDP root, not the LightningModule: each of the step's two forwards
      then unshards and each backward finalizes, as in two training iterations. Under a root
      around the LightningModule the root's weights (embeddings, head) are resharded after the
      first backward and never gathered again for the second forward.
    * use_orig_params=False: the optimizer and the pointer-swap stash see the FlatParameters, whose
      .grad FSDP1 accumulates in place. With use_orig_params=True, FSDP1 copies any per-parameter
      .grad that is not a view of the flat gradient back into it before each forward: swapping
      in the forget stash would overwrite the retain accumulator (and a None would zero it).
      Padding at the end of the last shard has zero gradient and adds nothing to the sums.
    Consequence: `trainable_params` must select whole FSDP units (FSDP1 flattens a unit's
    parameters together and needs them all trainable or all frozen); FSDP2 has no such limit.
    """
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy, wrap

    if isinstance(module.model, FSDP):
        return
    layer_classes = {type(layer) for layer in decoder_layers(module.model)}
    overrides: dict[str, Any] = {"use_orig_params": False}
    if layer_classes:
        overrides["auto_wrap_policy"] = ModuleWrapPolicy(layer_classes)
    if module.reference_model is not None:
        module.set_reference(wrap(module.reference_model, **overrides))
    module.model = wrap(module.model, **overrides)


# --------------------------------------------------------------------------------------------
# which ranks the sums are reduced over
# --------------------------------------------------------------------------------------------
def shard_dims(placements: Sequence[Any]) -> list[int]:
    """The mesh dims a DTensor is split over (Shard); Replicate dims hold copies and are skipped.

    Raises:
        ValueError: a Partial placement (a gradient still awaiting its reduction).
    """
    dims = []
    for i, placement in enumerate(placements):
        if placement.is_shard():
            dims.append(i)
        elif placement.is_partial():
            raise ValueError(f"gradient placement {placements} is Partial on mesh dim {i}: not reduced yet")
    return dims


def dtensor_groups(tensors: Sequence[torch.Tensor]):
    """The process groups to sum the partial sums over, for DTensor gradients (or parameters).

    All tensors must share one mesh and one set of placements (a model sharded by one
    configuration); None when nothing is sharded (a replicate-only mesh).
    """
    # DeviceMesh compares by value: FSDP may hand equal meshes as distinct objects.
    layouts = {(t.device_mesh, tuple(t.placements)) for t in tensors}
    if not layouts:
        return None
    if len(layouts) > 1:
        raise ValueError(
            f"parameters are sharded in {len(layouts)} different ways ({sorted(map(str, layouts))}): the "
            "BLUR sums need one layout (shard the whole model with one mesh)"
        )
    sample = tensors[0]
    groups = [sample.device_mesh.get_group(d) for d in shard_dims(sample.placements)]
    if not groups:
        return None
    return groups[0] if len(groups) == 1 else groups


def fsdp1_group(sharding_strategy, process_group):
    """FSDP1's reduction group for the sums: the shard group (hybrid: the intra-node one), None for NO_SHARD.

    HYBRID_SHARD's replicas across nodes sit in FSDP's `_inter_node_pg`: never reduce over it,
    every replica already holds the same shard.
    """
    name = getattr(sharding_strategy, "name", str(sharding_strategy)).upper()
    if name == "NO_SHARD":
        return None
    if name in ("FULL_SHARD", "SHARD_GRAD_OP", "HYBRID_SHARD", "_HYBRID_SHARD_ZERO2"):
        return process_group
    raise ValueError(f"unknown FSDP sharding strategy {sharding_strategy!r}")


def _fsdp1_model_group(root: nn.Module):
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    groups = {}
    for unit in FSDP.fsdp_modules(root):
        group = fsdp1_group(unit.sharding_strategy, unit.process_group)
        groups[id(group)] = group
    if not groups:
        return None
    if len(groups) > 1:
        raise ValueError("FSDP units use different process groups: the BLUR sums need one sharding group")
    return next(iter(groups.values()))


def projection_group(module, strategy):
    """The group(s) over which BLURUnlearner's three partial sums are all-reduced (None: no reduction)."""
    params = module.trainable_parameters()
    dtensors = [p for p in params if _is_dtensor(p)]
    if dtensors:
        if len(dtensors) != len(params):
            raise ValueError("some trainable parameters are DTensors and some are not: shard the whole model")
        return dtensor_groups(dtensors)
    if is_fsdp1(strategy):
        return _fsdp1_model_group(module.model)
    # DDP: every rank holds the all-reduced gradient, so the local sums are the global ones
    # (all-reducing them would count each element world_size times). One process: the same.
    return None


def grads_alias_buckets(strategy) -> bool:
    """Whether .grad is a view of DDP's bucket memory (DDPStrategy(gradient_as_bucket_view=True)).

    Then the forget and the retain backward write the same memory, and BLURUnlearner copies a
    gradient out before the other pass's backward (module._own_grads).
    """
    from torch.nn.parallel import DistributedDataParallel

    model = getattr(strategy, "model", None)
    return isinstance(model, DistributedDataParallel) and bool(getattr(model, "gradient_as_bucket_view", False))


def _is_dtensor(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


# --------------------------------------------------------------------------------------------
# export: consolidated HF weights from rank 0
# --------------------------------------------------------------------------------------------
def export_hf(module, export_dir: str) -> None:
    """Gather the full state dict (all ranks take part) and save_pretrained it from rank 0."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(module.model, options=options)  # empty on ranks > 0 with cpu_offload
    if not dist.is_initialized() or dist.get_rank() == 0:
        hf_model = getattr(module.model, "module", module.model)  # FSDP1 wraps; FSDP2 does not
        if adapters.has_adapters(hf_model):  # the merged model, and the adapter alone in adapter/
            adapters.export(hf_model, module.tokenizer, export_dir, state=state)
        else:
            os.makedirs(export_dir, exist_ok=True)
            hf_model.save_pretrained(export_dir, state_dict=state)
            if module.tokenizer is not None:
                module.tokenizer.save_pretrained(export_dir)
    if dist.is_initialized():
        dist.barrier()


# --------------------------------------------------------------------------------------------
# a checkpoint inside an accumulation window
# --------------------------------------------------------------------------------------------
def accumulation_state(
    window: AccumulationWindow, named: Sequence[tuple[str, nn.Parameter]], checkpoint: dict[str, Any], strategy=None
) -> None:
    """Add the open window (its state_dict, with the retain .grad) to `checkpoint`, if one is open.

    Lightning can save between two micro-batches of one optimizer step (a time-based or
    validation-time ModelCheckpoint, a SLURM requeue signal, an exception, a user's
    trainer.save_checkpoint). Both gradients hold partial sums then, so both are saved:
        sharded: as DTensors inside checkpoint["state_dict"] (each rank writes its shards);
        else:    as full tensors in checkpoint[ACCUMULATION_KEY] (DTensors gathered first).

    Args:
        window: the module's open optimizer step.
        named: the trainable (name, parameter) pairs, in the stash's order.
    """
    if not window.is_open:
        return
    if is_fsdp1(strategy):
        warnings.warn(
            "checkpoint inside an accumulation window under FSDP1: the partial gradients are not saved, "
            "a resume restarts the window from zero (use FSDP2Strategy, or checkpoint on optimizer steps)",
            RuntimeWarning,
            stacklevel=2,
        )
        return
    sharded = is_fsdp2(strategy) and strategy._save_distributed_checkpoint
    state = window.state_dict([n for n, _ in named], [p.grad for _, p in named])
    entry: dict[str, Any] = {**state, "sharded": sharded, "forget": {}, "retain": {}}
    for side in ("forget", "retain"):
        for name, grad in state[side].items():
            if sharded:
                checkpoint["state_dict"][f"{_STATE_PREFIX}.{side}.{name}"] = grad
                entry[side][name] = True
            else:
                full = grad.full_tensor() if _is_dtensor(grad) else grad
                entry[side][name] = full.detach().cpu()
    checkpoint[ACCUMULATION_KEY] = entry


def restore_accumulation(
    window: AccumulationWindow,
    named: Sequence[tuple[str, nn.Parameter]],
    entry: dict[str, Any],
    checkpoint_path: str | None,
) -> None:
    """Reopen a saved window: the stash, micro-step and loss sums into `window`, the retain gradients into .grad.

    Call once the model is set up on its final device (sharded, or DDP-wrapped).
    """
    names = [n for n, _ in named]
    AccumulationWindow.check_names(entry, names)
    grads: dict[tuple[str, str], torch.Tensor] = {}
    if entry["sharded"]:
        import torch.distributed.checkpoint as dcp

        templates = {}
        for name, p in named:
            for side in ("forget", "retain"):
                if entry[side].get(name):
                    templates[f"{_STATE_PREFIX}.{side}.{name}"] = torch.zeros_like(p)
        dcp.load({"state_dict": templates}, checkpoint_id=checkpoint_path)
        for key, tensor in templates.items():
            _, side, name = key.split(".", 2)
            grads[(side, name)] = tensor
    else:
        for name, p in named:
            for side in ("forget", "retain"):
                full = entry[side].get(name)
                if full is None:
                    continue
                if _is_dtensor(p):
                    from torch.distributed.tensor import distribute_tensor

                    grads[(side, name)] = distribute_tensor(full.to(p.dtype), p.device_mesh, p.placements)
                else:
                    grads[(side, name)] = full.to(device=p.device, dtype=p.dtype)
    placed = {side: {name: g for (s, name), g in grads.items() if s == side} for side in ("forget", "retain")}
    device = named[0][1].device if named else torch.device("cpu")
    retain = window.load_state_dict({**entry, **placed}, names, device)
    for (_, p), grad in zip(named, retain):
        p.grad = grad
