"""Training with Lightning: the BLUR module, fine-tuning, curves, schedules, checkpoint files, runs."""
