"""Per-GPU memory and per-step traffic of the BLUR step under FSDP2 and HSDP, on paper.

Everything here is computed from shapes: a model built on the meta device (no weights, any
size) gives the parameter shapes and FSDP units, its config gives the decoder block's sizes.
Nothing is allocated and nothing touches a process group, so Llama-3-70B on 64 GPUs is priced
on a laptop CPU in a second (`benchmarks/memory_model.py` prints the tables of docs/FSDP.md).

What is counted, per GPU (the worst rank: FSDP2 splits dim 0 and pads it to a multiple of the
shard group, so rank 0 holds ceil(dim0 / ranks) rows of every tensor):

    parameters     every weight, sharded, in the master dtype (frozen LoRA base included)
    gradients      the retain gradient .grad, sharded like the parameters (d is written into it)
    stash          the forget gradient kept while the retain gradient is computed (training/unlearner.py)
    optimizer      AdamW's exp_avg and exp_avg_sq (the parameter's dtype) and a float32 `step`
                   per tensor (torch keeps a 0-dim step tensor per parameter)
    gathered       FSDP2's transient buffers: the root group (embeddings, final norm, head) held
                   gathered through each forward and each backward, two decoder layers (the one
                   running and the one prefetched), and the largest unit's unsharded gradient in
                   the compute dtype plus its reduce-dtype copy for the reduce-scatter
    activations    the tensors autograd saves for backward in one micro-batch (`activation_bytes`)
    loss head      the transient logits of the forward (not saved, but alive at its end)
    reference      the frozen reference model (sharded like the policy) or the cached reference
                   log-probabilities (one float32 per forget example)

The projection's traffic is one all-reduce of the three float64 sums (24 bytes) per optimizer
step over the shard group (`projection.all_reduce_sums`), set against FSDP2's all-gathers and
reduce-scatters (`traffic_bytes`).

Checked byte for byte against real tensors on a CPU (tests/test_memory.py): parameters,
gradients, stash and AdamW state after a real BLURUnlearner step, and sharded by fully_shard over
8 fake ranks; the saved activations of a full fine-tune, of a hand-written LoRA adapter of peft's
form, and what per-layer checkpointing keeps after the forward. The project does not run LoRA or
checkpointing yet (issue 13, items 1-2), so those rows are the model's, not a run's; the
transient rows (gathered buffers, logits, the recompute peak) are not measured at all.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

GIB = 2**30
SUMS_BYTES = 3 * 8  # projection.partial_sums: a (3,) float64 tensor, all-reduced once per step
STEP_BYTES = 4  # AdamW's per-tensor `step`: a 0-dim float32 tensor
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# --------------------------------------------------------------------------------------------
# the dtype conventions
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Precision:
    """Bytes per element of each kind of tensor.

    Attributes:
        name: the registry key.
        master: sharded parameters (the optimizer's copy; frozen weights too).
        grad: sharded gradients and the forget stash.
        moment: each of AdamW's two moments (torch allocates them like the parameter).
        compute: gathered parameters, activations, logits (FSDP2's param_dtype).
        reduce: the gradient reduce-scatter and the HSDP all-reduce (FSDP2's reduce_dtype).
    """

    name: str
    master: int
    grad: int
    moment: int
    compute: int
    reduce: int


PRECISIONS = {
    # The project's FSDP configs: model_dtype float32 (the sharded master weights), param_dtype
    # bfloat16 (compute and all-gather), reduce_dtype float32: 20 sharded bytes per trained weight.
    "fp32-master": Precision("fp32-master", master=4, grad=4, moment=4, compute=2, reduce=4),
    # model_dtype bfloat16 and no mixed precision: torch's AdamW then keeps bf16 moments too.
    "bf16": Precision("bf16", master=2, grad=2, moment=2, compute=2, reduce=2),
    # Everything float32 (how the CPU tests run): lets the model be checked against real tensors.
    "fp32": Precision("fp32", master=4, grad=4, moment=4, compute=4, reduce=4),
}


def precision(name: str) -> Precision:
    """The registered dtype convention `name` (see PRECISIONS)."""
    if name not in PRECISIONS:
        raise ValueError(f"precision={name!r}: expected one of {tuple(PRECISIONS)}")
    return PRECISIONS[name]


# --------------------------------------------------------------------------------------------
# models on the meta device
# --------------------------------------------------------------------------------------------
# Real shapes of Meta's Llama-3 (config.json of meta-llama/Meta-Llama-3-8B and -70B), and the
# project's tiny test model (blur_lightning.testing.tiny.tiny_llama's defaults).
MODELS = {
    "llama-3-8b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                       intermediate_size=14336, vocab_size=128256, max_position_embeddings=8192,
                       rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False),
    "llama-3-70b": dict(hidden_size=8192, num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
                        intermediate_size=28672, vocab_size=128256, max_position_embeddings=8192,
                        rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False),
    "tiny-llama": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       intermediate_size=128, vocab_size=512, max_position_embeddings=512,
                       tie_word_embeddings=False),
}


def llama_config(name: str, **overrides):
    """A transformers LlamaConfig with the shapes registered under `name` (see MODELS)."""
    from transformers import LlamaConfig

    if name not in MODELS:
        raise ValueError(f"model={name!r}: expected one of {tuple(MODELS)}")
    return LlamaConfig(**{**MODELS[name], **overrides})


def meta_model(config) -> nn.Module:
    """AutoModelForCausalLM.from_config on the meta device: shapes and modules, no storage."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


# --------------------------------------------------------------------------------------------
# layouts and shards
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Layout:
    """How the ranks split the model.

    Attributes:
        kind: "fsdp2" (full sharding over all ranks) or "hsdp" (shard within a node, replicate
            across nodes).
        world: the number of GPUs.
        shard: the ranks one tensor is split over (world for fsdp2, GPUs per node for hsdp).
    """

    kind: str
    world: int
    shard: int

    @property
    def replicas(self) -> int:
        return self.world // self.shard

    @property
    def label(self) -> str:
        if self.kind == "fsdp2":
            return f"FSDP2 {self.world} GPUs"
        return f"HSDP {self.replicas}x{self.shard} GPUs"


def fsdp2(world: int) -> Layout:
    """Full sharding: every tensor split over all `world` ranks (a 1-D mesh)."""
    if world < 1:
        raise ValueError(f"world={world}: expected >= 1 GPUs")
    return Layout("fsdp2", world, world)


def hsdp(world: int, gpus_per_node: int = 8) -> Layout:
    """HSDP: shard over the GPUs of a node, one replica per node (the ("replicate", "shard") mesh)."""
    if gpus_per_node < 1 or world % gpus_per_node:
        raise ValueError(f"hsdp: world={world} is not a multiple of gpus_per_node={gpus_per_node}")
    return Layout("hsdp", world, gpus_per_node)


def shard_numel(shape: Sequence[int], ranks: int) -> int:
    """Elements rank 0 holds of a tensor split on dim 0 over `ranks` (FSDP2's Shard(0), padded)."""
    if not shape:
        return 1
    return math.ceil(shape[0] / ranks) * math.prod(shape[1:])


def fsdp_units(model: nn.Module) -> list[list[tuple[int, ...]]]:
    """Parameter shapes per FSDP2 unit, as `distributed.shard_model_` groups them.

    Returns:
        [root, layer 0, layer 1, ...]: the root holds what no decoder layer holds (embeddings,
        final norm, head); tied weights are counted once.
    """
    from blur_lightning.models.layers import decoder_layers

    layers = decoder_layers(model)
    seen: set[int] = set()
    units = []
    for layer in layers:
        shapes = []
        for p in layer.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                shapes.append(tuple(p.shape))
        units.append(shapes)
    root = [tuple(p.shape) for p in model.parameters() if id(p) not in seen]
    return [root, *units]


def lora_units(model: nn.Module, rank: int, targets: Sequence[str] = LORA_TARGETS) -> list[list[tuple[int, ...]]]:
    """Adapter shapes per FSDP2 unit for LoRA of `rank` on the linears named in `targets`.

    As peft builds them: lora_A (rank, in_features) and lora_B (out_features, rank) beside each
    targeted nn.Linear. Same unit order as `fsdp_units` (root first: empty unless a root linear
    such as lm_head is targeted).
    """
    from blur_lightning.models.layers import decoder_layers

    if rank < 1:
        raise ValueError(f"lora rank={rank}: expected >= 1")

    def adapters(named_modules) -> list[tuple[int, ...]]:
        shapes = []
        for name, sub in named_modules:
            if isinstance(sub, nn.Linear) and name.rsplit(".", 1)[-1] in targets:
                shapes += [(rank, sub.in_features), (sub.out_features, rank)]
        return shapes

    layers = decoder_layers(model)
    in_layers = {id(m) for layer in layers for m in layer.modules()}
    root = adapters((name, sub) for name, sub in model.named_modules() if id(sub) not in in_layers)
    return [root, *(adapters(layer.named_modules()) for layer in layers)]


def _numel(units: Sequence[Sequence[tuple[int, ...]]], ranks: int = 1) -> int:
    return sum(shard_numel(s, ranks) for unit in units for s in unit)


def _tensors(units: Sequence[Sequence[tuple[int, ...]]]) -> int:
    return sum(len(unit) for unit in units)


# --------------------------------------------------------------------------------------------
# sharded state: parameters, gradients, stash, optimizer
# --------------------------------------------------------------------------------------------
def state_bytes(
    units: Sequence[Sequence[tuple[int, ...]]],
    trainable: Sequence[Sequence[tuple[int, ...]]] | None,
    layout: Layout,
    prec: Precision,
) -> dict[str, int]:
    """Bytes per GPU of the sharded state of one BLUR step.

    Args:
        units: the model's parameter shapes per FSDP unit (`fsdp_units`).
        trainable: the trained tensors' shapes per unit (`lora_units` for LoRA); None: all of `units`.
        layout: the sharding (`fsdp2`, `hsdp`).
        prec: the dtype convention.

    Returns:
        {"parameters", "gradients", "stash", "optimizer"}: the worst rank's bytes. Parameters
        include the trainable tensors when they are extra (LoRA adapters beside a frozen base).
    """
    extra = trainable is not None
    trainable = units if trainable is None else trainable
    n = layout.shard
    trained = _numel(trainable, n)
    params = _numel(units, n) + (trained if extra else 0)
    return {
        "parameters": params * prec.master,
        "gradients": trained * prec.grad,
        "stash": trained * prec.grad,  # the forget gradient: same shards, same dtype as .grad
        "optimizer": trained * 2 * prec.moment + _tensors(trainable) * STEP_BYTES,
    }


def gathered_bytes(
    units: Sequence[Sequence[tuple[int, ...]]],
    trainable: Sequence[Sequence[tuple[int, ...]]] | None,
    layout: Layout,
    prec: Precision,
) -> int:
    """FSDP2's transient unsharded buffers at their largest (an upper bound: they do not all peak at once).

    The root unit (embeddings, final norm, head) stays gathered from the root's pre-forward to its
    post-forward, and again through the whole backward; two decoder layers are gathered at a time
    (the running one and the prefetched one); the largest unit's gradient exists unsharded in the
    compute dtype plus its reduce-dtype copy for the reduce-scatter.
    """
    if layout.shard == 1:
        return 0  # one rank: nothing is gathered, the parameters are the compute copy (same dtype)
    root, layers = units[0], units[1:]
    n = layout.shard
    gathered = _numel([root], 1) * prec.compute
    if layers:
        gathered += 2 * max(_numel([u], 1) for u in layers) * prec.compute
    trainable = units if trainable is None else trainable
    largest = max((n * _numel([u], n) for u in trainable), default=0)  # padded unsharded size
    return gathered + largest * (prec.compute + prec.reduce)


# --------------------------------------------------------------------------------------------
# activations
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BlockShapes:
    """The sizes of a Llama decoder block the activation formula reads from a config."""

    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    layers: int
    vocab: int

    @classmethod
    def from_config(cls, config) -> BlockShapes:
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(
            hidden=config.hidden_size,
            intermediate=config.intermediate_size,
            heads=heads,
            kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=head_dim,
            layers=config.num_hidden_layers,
            vocab=config.vocab_size,
        )


def activation_bytes(
    config,
    batch: int,
    seq: int,
    *,
    compute: int,
    checkpointing: bool = False,
    lora_rank: int | None = None,
    padded: bool = False,
) -> dict[str, int]:
    """Bytes autograd saves for backward in one forward of a Llama (SDPA) plus the NLL loss.

    With N = batch * seq tokens, c the compute dtype's bytes, h hidden, i intermediate, a heads,
    k kv heads, d head_dim, each decoder layer saves (no checkpointing, full fine-tune):

        2 RMSNorms        2 N (4h + c h + 4)   the float32 upcast of the input, the normalised
                                               output (c) the weight multiplies, the float32 rsqrt
        q/k/v input       c N h                (one tensor, shared by the three projections)
        rotated q, k, v   c N (a d + 2 k d)    as SDPA gets them (GQA kernel: k, v not repeated)
        SDPA out, lse     c N a d + 4 N a      the output (= o_proj's input) and the log-sum-exp
        gate/up input     c N h
        MLP               4 c N i              gate out, silu(gate), up out, silu * up (down's input)

    Padded batches (a 4D mask, `attention.causal_padding_mask`): transformers repeats k and v
    to a heads (2 c N (a - k) d more, when k > 1) and SDPA saves the mask converted to the query dtype per
    layer (c batch seq^2). Outside the layers: the input ids (8 N), rotary cos and sin
    (2 c seq d), the final norm N (4h + c h + 4), the head's input c N h, and the loss:
    its float32 log-softmax 4 batch (seq-1) V, targets and mask 9 batch (seq-1), and 4 batch + 4
    bytes of per-sequence sums (NLL). Measured exact on the CPU (tests/test_memory.py).

    Not run by the project yet (issue 13, items 1-2), modelled here:
        checkpointing   per decoder layer, non-reentrant: each layer keeps only its input c N h
                        (and the shared int64 position ids, 8 seq), and one layer's full set is
                        alive while it is recomputed in backward. What is alive after the forward
                        is measured exact (tests/test_memory.py); the recompute peak is not.
        LoRA (rank r)   the frozen norms' weights need no normalised output (-c N h per norm),
                        the frozen head needs no input, the frozen embedding no ids, layer 0's
                        input norm saves nothing (its input needs no gradient), and each adapter
                        saves lora_A's output c N r (its input is the base linear's, dropout 0).
                        Exact against a hand-written adapter of peft's form (tests/test_memory.py);
                        peft itself is not installed in the project yet.

    Args:
        config: a Llama-like transformers config (hidden_size, intermediate_size, heads, ...).
        batch: sequences per micro-batch.
        seq: tokens per sequence.
        compute: bytes of the compute dtype (2 for bf16, 4 for fp32).
        checkpointing: activation checkpointing per decoder layer.
        lora_rank: LoRA rank on all seven linears of each block (None: full fine-tune).
        padded: whether the batch carries a padding mask.

    Returns:
        {"per_layer", "layers", "outside", "loss", "total", "loss_head_transient"}: bytes.
        "layers" is all decoder layers (with checkpointing: the kept inputs plus one layer's
        set); "loss_head_transient" is what is alive but not saved at the end of the forward
        (the head's logits c batch seq V and their float32 copy 4 batch (seq-1) V; plus the
        contiguous copy of the shifted logits, c batch (seq-1) V, when batch > 1).
    """
    b = BlockShapes.from_config(config)
    if batch < 1 or seq < 2:
        raise ValueError(f"batch={batch}, seq={seq}: expected batch >= 1 and seq >= 2")
    c, n_tok, h, i, d = compute, batch * seq, b.hidden, b.intermediate, b.head_dim
    lora = lora_rank is not None
    norm = n_tok * (4 * h + (0 if lora else c * h) + 4)
    # repeat_kv copies k and v to all heads (one kv head: an expand, a view of the same storage)
    kv_width = b.heads * d if padded and b.kv_heads > 1 else b.kv_heads * d
    attention = c * n_tok * (h + b.heads * d + 2 * kv_width + b.heads * d) + 4 * n_tok * b.heads
    if padded:
        attention += c * batch * seq * seq
    mlp = c * n_tok * h + 4 * c * n_tok * i
    adapters = 7 * c * n_tok * lora_rank if lora else 0
    per_layer = 2 * norm + attention + mlp + adapters
    if checkpointing:
        # each checkpoint keeps its layer's inputs: the hidden states, and the (1, seq) int64
        # position ids all layers share (cos and sin are already counted outside)
        layers = b.layers * c * n_tok * h + 8 * seq + per_layer
    else:
        layers = b.layers * per_layer - (norm if lora else 0)  # LoRA: layer 0's input norm saves nothing
    head_input = 0 if lora else c * n_tok * h
    ids = 0 if lora else 8 * n_tok  # a frozen embedding keeps no input ids for its backward
    outside = ids + 2 * c * seq * d + n_tok * (4 * h + (0 if lora else c * h) + 4) + head_input
    rows = batch * (seq - 1)
    loss = 4 * rows * b.vocab + 9 * rows + 4 * batch + 4
    transient = c * n_tok * b.vocab + 4 * rows * b.vocab + (c * rows * b.vocab if batch > 1 else 0)
    return {
        "per_layer": per_layer,
        "layers": layers,
        "outside": outside,
        "loss": loss,
        "total": layers + outside + loss,
        "loss_head_transient": transient,
    }


# --------------------------------------------------------------------------------------------
# the whole step's memory
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Setup:
    """One row of the memory table: the model, the layout and the training choices.

    Attributes:
        config: the model's transformers config.
        layout: the sharding.
        prec: the dtype convention.
        batch: sequences per micro-batch per GPU.
        seq: tokens per sequence.
        lora_rank: None for a full fine-tune.
        checkpointing: activation checkpointing per decoder layer.
        reference: "model" (a frozen copy, NPO/KL/RMU), "cached" (NPO's reference log-probs, one
            float32 per forget example) or "none".
        forget_examples: examples whose reference log-prob is cached.
        padded: whether micro-batches carry a padding mask (see `activation_bytes`).
    """

    config: object
    layout: Layout
    prec: Precision
    batch: int = 1
    seq: int = 4096
    lora_rank: int | None = None
    checkpointing: bool = False
    reference: str = "model"
    forget_examples: int = 400  # TOFU forget10
    padded: bool = False


REFERENCES = ("model", "cached", "none")


def step_memory(setup: Setup, model: nn.Module | None = None) -> dict[str, int]:
    """Per-GPU bytes of one BLUR step, one entry per row of docs/FSDP.md's memory table.

    Args:
        setup: what to price.
        model: the meta model of setup.config (built when None; pass it to price many layouts).

    Returns:
        parameters, gradients, stash, optimizer, gathered, activations, loss_head, reference,
        reference_forward (the reference's transient logits during the NPO forget pass), total.
    """
    if setup.reference not in REFERENCES:
        raise ValueError(f"reference={setup.reference!r}: expected one of {REFERENCES}")
    model = meta_model(setup.config) if model is None else model
    units = fsdp_units(model)
    trainable = lora_units(model, setup.lora_rank) if setup.lora_rank is not None else None
    prec, layout = setup.prec, setup.layout
    out = dict(state_bytes(units, trainable, layout, prec))
    out["gathered"] = gathered_bytes(units, trainable, layout, prec)
    acts = activation_bytes(
        setup.config, setup.batch, setup.seq, compute=prec.compute,
        checkpointing=setup.checkpointing, lora_rank=setup.lora_rank, padded=setup.padded,
    )
    out["activations"] = acts["total"]
    out["loss_head"] = acts["loss_head_transient"]
    reference = reference_forward = 0
    if setup.reference == "model" and setup.lora_rank is None:
        # distributed.configure_fsdp2 deep-copies the policy: same dtype, sharded the same way.
        reference = _numel(units, layout.shard) * prec.master
        vocab, rows = setup.config.vocab_size, setup.batch * (setup.seq - 1)
        reference_forward = prec.compute * setup.batch * setup.seq * vocab + 8 * rows * vocab
    elif setup.reference == "model":
        # LoRA: the reference is the base with its adapters disabled (peft's disable_adapter()):
        # no second copy; its forward's logits are transient as above.
        vocab, rows = setup.config.vocab_size, setup.batch * (setup.seq - 1)
        reference_forward = prec.compute * setup.batch * setup.seq * vocab + 8 * rows * vocab
    elif setup.reference == "cached":
        reference = 4 * setup.forget_examples
    out["reference"] = reference
    out["reference_forward"] = reference_forward
    out["total"] = sum(out.values())
    return out


# --------------------------------------------------------------------------------------------
# traffic
# --------------------------------------------------------------------------------------------
def ring_all_reduce_bytes(nbytes: int, ranks: int) -> float:
    """Bytes each rank sends in a ring all-reduce of `nbytes`: 2 (n-1)/n * nbytes."""
    return 2 * (ranks - 1) / ranks * nbytes if ranks > 1 else 0.0


def traffic_bytes(
    units: Sequence[Sequence[tuple[int, ...]]],
    trainable: Sequence[Sequence[tuple[int, ...]]] | None,
    layout: Layout,
    prec: Precision,
    *,
    reference_forwards: int = 1,
    micro_batches: int = 1,
) -> dict[str, float]:
    """Bytes each GPU sends in one BLUR optimizer step of `micro_batches` micro-batches.

    Ring algorithm: an all-gather or reduce-scatter over n ranks sends (n-1) shards per rank,
    i.e. (n-1)/n of the full buffer; an all-reduce sends 2 (n-1)/n of it.

    Per micro-batch the BLUR step runs two forwards and two backwards (forget, retain), and every
    unit reshards after its forward (`reshard_after_forward=True`, the root included): four
    all-gathers of the whole policy in the compute dtype, two reduce-scatters of the trained
    gradients in the reduce dtype, and under HSDP two all-reduces of the shard across the
    replicas (inter-node). Each reference forward gathers the reference once more (a LoRA
    reference is the same base: the same bytes). Per optimizer step the projection all-reduces
    24 bytes over the shard group; norm clipping adds none (its factor comes from the same sums).

    Args:
        units: the model's parameter shapes per FSDP unit (`fsdp_units`).
        trainable: the trained tensors' shapes (`lora_units`); None: all of `units`.
        layout: the sharding.
        prec: the dtype convention.
        reference_forwards: reference forwards per micro-batch (NPO 1; NPO + KL 2; 0 when cached).
        micro_batches: accumulate_grad_batches (FSDP2's collectives run in every micro-batch,
            the projection once per step).

    Returns:
        {"all_gather", "reduce_scatter", "replica_all_reduce", "reference_all_gather",
        "projection"}: bytes each GPU sends in one optimizer step.
    """
    trainable = units if trainable is None else trainable
    n = layout.shard
    shard_all = _numel(units, n) + (_numel(trainable, n) if trainable is not units else 0)
    shard_trained = _numel(trainable, n)
    gather_once = (n - 1) * shard_all * prec.compute
    if micro_batches < 1:
        raise ValueError(f"micro_batches={micro_batches}: expected >= 1")
    k = micro_batches
    return {
        "all_gather": k * 4 * gather_once,
        "reduce_scatter": k * 2 * (n - 1) * shard_trained * prec.reduce,
        "replica_all_reduce": k * 2 * ring_all_reduce_bytes(shard_trained * prec.reduce, layout.replicas),
        "reference_all_gather": k * reference_forwards * (n - 1) * _numel(units, n) * prec.compute,
        "projection": ring_all_reduce_bytes(SUMS_BYTES, n),
    }


def parameter_counts(model: nn.Module, lora_rank: int | None = None) -> dict[str, int]:
    """{"total", "trainable"} parameter counts (trainable: the adapters for LoRA)."""
    units = fsdp_units(model)
    total = _numel(units)
    if lora_rank is None:
        return {"total": total, "trainable": total}
    return {"total": total, "trainable": _numel(lora_units(model, lora_rank))}
