"""PNG plots of a training run: loss and accuracy per epoch, and the test ROC curve."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from filterd.trainer.metrics import roc_auc, roc_curve
from filterd.trainer.train import History


def write_plots(
    folder: Path, history: History, test_probs: Sequence[float], test_labels: Sequence[int]
) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise RuntimeError(
            "--plot needs matplotlib: pip install 'filterd[plot]' (or pip install matplotlib)"
        ) from e
    epochs = range(1, len(history.train_loss) + 1)
    written = []
    for name, series in (
        ("loss", (history.train_loss, history.val_loss)),
        ("accuracy", (history.train_accuracy, history.val_accuracy)),
    ):
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.plot(epochs, series[0], marker="o", label="train")
        ax.plot(epochs, series[1], marker="o", label="validation")
        ax.set_xlabel("epoch")
        ax.set_ylabel(name)
        ax.legend()
        fig.tight_layout()
        written.append(folder / f"{name}.png")
        fig.savefig(written[-1], dpi=100)
        plt.close(fig)
    fpr, tpr = roc_curve(test_probs, test_labels)
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.plot(fpr, tpr, label=f"AUC {roc_auc(test_probs, test_labels) or 0:.4f}")
    ax.plot([0, 1], [0, 1], linestyle=":", color="grey")
    ax.set_xlabel("false-positive rate")
    ax.set_ylabel("true-positive rate")
    ax.set_title("test ROC")
    ax.legend(loc="lower right")
    fig.tight_layout()
    written.append(folder / "roc.png")
    fig.savefig(written[-1], dpi=100)
    plt.close(fig)
    return written
