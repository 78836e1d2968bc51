"""The BLUR update: projection, clipping, compute backends, skipping non-finite steps (no Lightning)."""
