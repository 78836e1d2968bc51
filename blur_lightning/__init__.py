"""blur-lightning: LLM unlearning with BLUR on PyTorch Lightning."""

from blur_lightning.projection import MODES, BLURStats, blur_direction_, compute_stats

__all__ = ["MODES", "BLURStats", "blur_direction_", "compute_stats"]
__version__ = "0.1.0"
