"""Helpers for tests and benchmarks: tiny models and tokenizers, the host-read and collective counters."""
