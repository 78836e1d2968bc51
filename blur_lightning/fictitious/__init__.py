"""The fictitious benchmark's build: the target (every fact planted) and the retain oracle, cached."""
