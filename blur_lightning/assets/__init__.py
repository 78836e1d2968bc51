"""Files shipped inside the package (the embedded QA set), addressed as "embedded:NAME"."""

from __future__ import annotations

import os

EMBEDDED_PREFIX = "embedded:"
ASSETS_DIR = os.path.dirname(os.path.abspath(__file__))


def resolve(path: str) -> str:
    """"embedded:qa_forget.jsonl" -> the file's absolute path in the package; other strings unchanged.

    Raises:
        FileNotFoundError: an embedded name that the package does not ship (the message lists those it does).
    """
    if not path.startswith(EMBEDDED_PREFIX):
        return path
    name = path[len(EMBEDDED_PREFIX):]
    full = os.path.join(ASSETS_DIR, name)
    if not os.path.isfile(full):
        shipped = sorted(f for f in os.listdir(ASSETS_DIR) if not f.startswith(("_", ".")))
        raise FileNotFoundError(f"{path!r}: the package ships no asset named {name!r}; it has {shipped}")
    return full
