"""filterd: a local, private spam filter built on a GPT-2 classifier."""

__version__ = "0.1.0"

from filterd.classifier import Classifier, load_classifier  # noqa: E402

__all__ = ["Classifier", "load_classifier", "__version__"]
