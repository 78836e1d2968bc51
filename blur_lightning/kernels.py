"""Triton kernels for the BLUR projection: the public face of the top-level `kernels/` folder.

    multi_tensor_dots(forget_grads, retain_grads) -> float64 (3,) [s_rf, s_ff, s_rr]    pass 1
    multi_tensor_combine_(retain_grads, forget_grads, retain_coef, forget_coef)        pass 2, in place
    blur_adamw_step_(params, forget_grads, retain_grads, exp_avgs, exp_avg_sqs, ...)   pass 2 fused into AdamW
    BLURFusedAdamW                                                                     the optimizer around it

CUDA tensors run the compiled kernels; CPU tensors run the same kernels under the Triton
interpreter (tests). `blur_lightning.kernels.reference` holds the plain-PyTorch oracles.

Why a module and a folder: the kernel files live in `kernels/` at the top of the repository, and
that folder has no `__init__.py` on purpose. A regular package there would win over the PyPI
package `kernels` (which transformers >= 5 imports while loading model classes) for every process
started in the repository root, since the path finder returns the first regular package it meets
on `sys.path`, while a folder without `__init__.py` is only a PEP 420 namespace portion and the
search goes on to site-packages. This module is that package's `__init__`: its `__path__` makes
`blur_lightning.kernels.<name>` load `kernels/<name>.py` (source checkout, editable install) or
`blur_lightning/kernels/<name>.py` (an installed wheel, where setuptools copies the folder).
"""

from pathlib import Path as _Path


def _kernel_folder() -> str:
    here = _Path(__file__).resolve().parent
    # wheel: blur_lightning/kernels/ beside this file; checkout: kernels/ beside the package. The
    # marker file keeps site-packages' own `kernels/` (the PyPI package) from ever being taken.
    for folder in (here / "kernels", here.parent / "kernels"):
        if (folder / "_launch.py").is_file():
            return str(folder)
    raise ImportError(f"blur_lightning.kernels: no kernel folder with _launch.py beside {here}")


__path__ = [_kernel_folder()]

from blur_lightning.kernels._launch import CONFIG, KernelConfig, clear_tables, set_config  # noqa: E402
from blur_lightning.kernels.adamw import BLURFusedAdamW, blur_adamw_step_  # noqa: E402
from blur_lightning.kernels.combine import multi_tensor_combine_  # noqa: E402
from blur_lightning.kernels.dots import multi_tensor_dots  # noqa: E402
from blur_lightning.kernels.metric_dots import multi_tensor_metric_dots  # noqa: E402

__all__ = [
    "BLURFusedAdamW",
    "CONFIG",
    "KernelConfig",
    "blur_adamw_step_",
    "clear_tables",
    "multi_tensor_combine_",
    "multi_tensor_dots",
    "multi_tensor_metric_dots",
    "set_config",
]
