"""filterd: a local, private spam filter built on a GPT-2 classifier."""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"
__all__ = ["Classifier", "__version__", "forget", "learn", "load_classifier"]

if TYPE_CHECKING:
    from filterd.learning import forget, learn
    from filterd.model.classifier import Classifier, load_classifier


def __getattr__(name: str):
    # Lazy: importing torch takes seconds, and `filterd --help` or a config error
    # should not wait for it.
    if name in ("Classifier", "load_classifier"):
        from filterd.model import classifier

        return getattr(classifier, name)
    if name in ("learn", "forget"):
        from filterd import learning

        return getattr(learning, name)
    raise AttributeError(f"module 'filterd' has no attribute {name!r}")
