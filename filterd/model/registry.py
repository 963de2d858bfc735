"""The model families filterd knows, by name: a new backbone is one module plus one entry."""

from __future__ import annotations

from typing import Any

from filterd.model.bert import Bert
from filterd.model.family import Family
from filterd.model.gpt2 import GPT2

FAMILIES: dict[str, Family] = {f.name: f for f in (GPT2(), Bert())}


def family(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown model family {name!r}; known: {', '.join(FAMILIES)}") from None


def architecture(name: str) -> tuple[Family, Any]:
    """The family and config of a named size (`gpt2`, `gpt2-mini`, `minilm-l6`, ...)."""
    for candidate in FAMILIES.values():
        if name in candidate.architectures:
            return candidate, candidate.architectures[name]
    known = ", ".join(n for f in FAMILIES.values() for n in f.architectures)
    raise ValueError(f"unknown architecture {name!r}; known: {known}")
