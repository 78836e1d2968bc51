"""Triton kernels for the BLUR projection (imported as blur_lightning.kernels).

    multi_tensor_dots(forget_grads, retain_grads) -> float64 (3,) [s_rf, s_ff, s_rr]    pass 1
    multi_tensor_combine_(retain_grads, forget_grads, retain_coef, forget_coef)        pass 2, in place
    blur_adamw_step_(params, forget_grads, retain_grads, exp_avgs, exp_avg_sqs, ...)   pass 2 fused into AdamW
    BLURFusedAdamW                                                                     the optimizer around it

CUDA tensors run the compiled kernels; CPU tensors run the same kernels under the Triton
interpreter (tests). `reference` holds the plain-PyTorch oracles.
"""

from ._launch import CONFIG, KernelConfig, clear_tables, set_config
from .adamw import BLURFusedAdamW, blur_adamw_step_
from .combine import multi_tensor_combine_
from .dots import multi_tensor_dots

__all__ = [
    "BLURFusedAdamW",
    "CONFIG",
    "KernelConfig",
    "blur_adamw_step_",
    "clear_tables",
    "multi_tensor_combine_",
    "multi_tensor_dots",
    "set_config",
]
