"""Data: reading rows, prompts, tokenizing, forget/retain pairing, the data module, fictitious people."""
