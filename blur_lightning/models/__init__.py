"""Models: loading (hub, local, embedded GGUF), LoRA, attention masks, activation checkpointing."""
