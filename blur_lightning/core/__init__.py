"""The BLUR update and the end of every step: projection, clipping, non-finite skip (no Lightning)."""
