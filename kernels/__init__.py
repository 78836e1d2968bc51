"""Triton kernels for the BLUR projection (imported as blur_lightning.kernels)."""
