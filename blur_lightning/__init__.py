"""blur-lightning: LLM unlearning with BLUR on PyTorch Lightning."""

import logging as _logging

# torchao (the quantization probe's library) is imported by transformers whenever a model is built once
# it is installed. On a CPU build it logs "Failed to load _C_mxfp8 / _C_cutlass_90a" (CUDA-only
# extensions) and torch's pytree logs a deprecation for its enums: two harmless warnings per process,
# on every demo and test run. Errors still show.
_logging.getLogger("torchao").setLevel(_logging.ERROR)
_logging.getLogger("torch.utils._pytree").setLevel(_logging.ERROR)

from blur_lightning.core.projection import MODES, BLURStats, blur_direction_, compute_stats  # noqa: E402

__all__ = ["MODES", "BLURStats", "blur_direction_", "compute_stats"]
__version__ = "0.1.0"
