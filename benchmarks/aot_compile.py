"""Ahead-of-time compilation of every kernel for a GPU target, no GPU needed (CI's compile check).

`triton.compile` on an ASTSource runs the whole pipeline (TTIR -> TTGIR -> LLVM -> PTX -> cubin,
ptxas included), so a kernel that would fail to compile on an H100 fails here, on a CPU machine.
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget

from blur_lightning.kernels import _launch
from blur_lightning.kernels.adamw import _blur_adamw_kernel
from blur_lightning.kernels.combine import _combine_kernel
from blur_lightning.kernels.dots import _SUM_BLOCK, _dots_kernel, _sum_partials_kernel
from blur_lightning.kernels.metric_dots import ROWS as METRIC_ROWS
from blur_lightning.kernels.metric_dots import _metric_dots_kernel

_TABLE = {"ptrs": "*i64", "sizes": "*i64", "chunk_tensor": "*i64", "chunk_start": "*i64"}
_COUNTS = {"n_tensors": "i32", "n_chunks": "i32", "chunk": "i32"}
# The dtype pairs (forget, retain) compiled: each same-dtype pair and one mixed pair.
_PAIRS = [
    (tl.float32, tl.float32),
    (tl.bfloat16, tl.bfloat16),
    (tl.float16, tl.float16),
    (tl.float32, tl.bfloat16),
]


def kernel_specs(block: int | None = None) -> list[tuple[str, object, dict, dict]]:
    """(name, kernel, signature, constexprs) for every kernel variant the launchers can pick."""
    block = block or _launch.CONFIG.block
    specs = []
    for f_dtype, r_dtype in _PAIRS:
        tag = f"{f_dtype}-{r_dtype}"
        sig = {**_TABLE, "partials": "*fp64", "partial_offset": "i32", "n_partials": "i32", **_COUNTS}
        specs.append(
            _spec(
                f"dots[{tag}]", _dots_kernel, sig, F_DTYPE=f_dtype, R_DTYPE=r_dtype, ALIGNED=True, BLOCK=block
            )
        )
        sig = {**_TABLE, "retain_coef_ptr": "*fp32", "forget_coef_ptr": "*fp32", **_COUNTS}
        specs.append(
            _spec(
                f"combine[{tag}]",
                _combine_kernel,
                sig,
                F_DTYPE=f_dtype,
                R_DTYPE=r_dtype,
                ALIGNED=True,
                BLOCK=block,
            )
        )
    # The unaligned variants (a tensor at an odd offset in a flat buffer): scalar loads.
    sig = {**_TABLE, "partials": "*fp64", "partial_offset": "i32", "n_partials": "i32", **_COUNTS}
    specs.append(
        _spec(
            "dots[unaligned]",
            _dots_kernel,
            sig,
            F_DTYPE=tl.bfloat16,
            R_DTYPE=tl.bfloat16,
            ALIGNED=False,
            BLOCK=block,
        )
    )
    sig = {**_TABLE, "retain_coef_ptr": "*fp32", "forget_coef_ptr": "*fp32", **_COUNTS}
    specs.append(
        _spec(
            "combine[unaligned]",
            _combine_kernel,
            sig,
            F_DTYPE=tl.float16,
            R_DTYPE=tl.float16,
            ALIGNED=False,
            BLOCK=block,
        )
    )
    sig = {"partials": "*fp64", "out": "*fp64", "n_partials": "i32"}
    specs.append(_spec("sum_partials", _sum_partials_kernel, sig, BLOCK=_SUM_BLOCK, ROWS=3))
    specs.append(_spec("sum_partials[6]", _sum_partials_kernel, sig, BLOCK=_SUM_BLOCK, ROWS=METRIC_ROWS))
    # pass 1 in Adam's metric (projection_metric "adam"): fp32 moments with fp32 or bf16 gradients, bf16 moments
    sig = {**_TABLE, "partials": "*fp64", "partial_offset": "i32", "n_partials": "i32", "log2_beta2": "fp64",
           "eps": "fp32", **_COUNTS}  # fmt: skip
    for g_dtype, v_dtype in [(tl.float32, tl.float32), (tl.bfloat16, tl.float32), (tl.bfloat16, tl.bfloat16)]:
        specs.append(_spec(f"metric_dots[{g_dtype}-{v_dtype}]", _metric_dots_kernel, sig, F_DTYPE=g_dtype,
                           R_DTYPE=g_dtype, V_DTYPE=v_dtype, ALIGNED=True, BLOCK=block))  # fmt: skip
    sig = {
        **_TABLE,
        "retain_coef_ptr": "*fp32",
        "forget_coef_ptr": "*fp32",
        "lr_ptr": "*fp32",
        "found_inf_ptr": "*fp32",
        "beta1": "fp32",
        "beta2": "fp32",
        "log2_beta1": "fp64",
        "log2_beta2": "fp64",
        "eps": "fp32",
        "weight_decay": "fp32",
        **_COUNTS,
    }
    # (param, grads, moments) dtypes: all fp32, all bf16, fp32 master weights with bf16 grads, fp16.
    for p_dtype, g_dtype, m_dtype in [
        (tl.float32, tl.float32, tl.float32),
        (tl.bfloat16, tl.bfloat16, tl.bfloat16),
        (tl.float32, tl.bfloat16, tl.float32),
        (tl.float16, tl.float16, tl.float32),
    ]:
        for has_forget in (True, False):
            name = f"blur_adamw[{p_dtype}-{g_dtype}-{m_dtype}-forget={has_forget}]"
            specs.append(
                _spec(
                    name,
                    _blur_adamw_kernel,
                    sig,
                    P_DTYPE=p_dtype,
                    F_DTYPE=g_dtype,
                    R_DTYPE=g_dtype,
                    M_DTYPE=m_dtype,
                    V_DTYPE=m_dtype,
                    HAS_FORGET=has_forget,
                    ALIGNED=True,
                    BLOCK=block,
                )
            )
    return specs


def _spec(name: str, kernel, signature: dict, **constexprs) -> tuple[str, object, dict, dict]:
    return name, kernel, {**signature, **dict.fromkeys(constexprs, "constexpr")}, constexprs


def compile_kernel(kernel, signature: dict, constexprs: dict, capability: int, num_warps: int | None = None):
    """Compile one variant for `cuda` sm_<capability>; returns the CompiledKernel (asm in .asm)."""
    if _launch.interpreting():
        raise RuntimeError("ahead-of-time compilation needs a process without TRITON_INTERPRET=1")
    src = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    warp_size = 32
    options = {"num_warps": num_warps or _launch.CONFIG.num_warps}
    return triton.compile(src, target=GPUTarget("cuda", capability, warp_size), options=options)


def main(argv: list[str] | None = None) -> int:
    """Compile every variant for each capability; print a line per kernel; exit 1 on any failure."""
    import argparse
    import re
    import traceback

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--capability", type=int, nargs="+", default=[90, 80], help="sm_XY as XY (type: int)")
    args = parser.parse_args(argv)
    failed = 0
    for capability in args.capability:
        for name, kernel, signature, constexprs in kernel_specs():
            try:
                compiled = compile_kernel(kernel, signature, constexprs, capability)
            except Exception:  # report every failing variant, not just the first
                failed += 1
                print(f"FAIL sm_{capability} {name}\n{traceback.format_exc()}")
                continue
            ptx = compiled.asm["ptx"]
            vector = len(re.findall(r"(?:ld|st)\.global\.v\d", ptx))
            print(
                f"ok   sm_{capability} {name:48s} 16-byte accesses: {vector}  "
                f"shared: {compiled.metadata.shared}"
            )
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
