"""Classification metrics and the choice of a decision threshold.

A spam filter's costly mistake is losing ham, so the threshold is chosen on the
validation set for the best accuracy whose false-positive rate stays under a bound.
"""

from __future__ import annotations

from collections.abc import Sequence


def binary_metrics(probs: Sequence[float], labels: Sequence[int], threshold: float) -> dict:
    """Metrics at `threshold` (spam when p >= t) plus argmax accuracy (p >= 0.5)."""
    n = len(labels)
    tp = sum(p >= threshold and y == 1 for p, y in zip(probs, labels, strict=True))
    fp = sum(p >= threshold and y == 0 for p, y in zip(probs, labels, strict=True))
    fn = sum(p < threshold and y == 1 for p, y in zip(probs, labels, strict=True))
    tn = n - tp - fp - fn
    argmax_right = sum((p >= 0.5) == (y == 1) for p, y in zip(probs, labels, strict=True))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "n": n,
        "accuracy": (tp + tn) / n if n else 0.0,
        "accuracy_argmax": argmax_right / n if n else 0.0,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "roc_auc": roc_auc(probs, labels),
        "false_positives": fp,
        "false_negatives": fn,
        "true_positives": tp,
        "true_negatives": tn,
    }


def roc_auc(probs: Sequence[float], labels: Sequence[int]) -> float | None:
    """Area under the ROC curve: the chance a random spam outscores a random ham."""
    pos = sorted(p for p, y in zip(probs, labels, strict=True) if y == 1)
    neg = sorted(p for p, y in zip(probs, labels, strict=True) if y == 0)
    if not pos or not neg:
        return None
    # Mann-Whitney U with ties counted half, by merging the two sorted lists.
    wins, j, k = 0.0, 0, 0
    for p in pos:
        while j < len(neg) and neg[j] < p:
            j += 1
        k = max(k, j)
        while k < len(neg) and neg[k] == p:
            k += 1
        wins += j + 0.5 * (k - j)
    return wins / (len(pos) * len(neg))


def roc_curve(probs: Sequence[float], labels: Sequence[int]) -> tuple[list[float], list[float]]:
    """False- and true-positive rates as the threshold sweeps from high to low."""
    pairs = sorted(zip(probs, labels, strict=True), key=lambda t: -t[0])
    n_pos = sum(labels) or 1
    n_neg = (len(labels) - sum(labels)) or 1
    fpr, tpr, fp, tp = [0.0], [0.0], 0, 0
    for i, (p, y) in enumerate(pairs):
        tp += y
        fp += 1 - y
        if i + 1 == len(pairs) or pairs[i + 1][0] != p:
            fpr.append(fp / n_neg)
            tpr.append(tp / n_pos)
    return fpr, tpr


def choose_threshold(probs: Sequence[float], labels: Sequence[int], max_fpr: float) -> float:
    """Best accuracy with false-positive rate <= max_fpr; ties go to the higher threshold.

    The threshold sits midway between the lowest score called spam and the next score
    below it, so messages a little below the validation boundary are not flipped.
    """
    n_neg = sum(1 for y in labels if y == 0)
    scores = sorted(set(probs))
    best: tuple[int, float] | None = None
    best_index = len(scores)
    # Candidate i: spam when p >= scores[i]; candidate len(scores): nothing is spam.
    for i in range(len(scores) + 1):
        t = scores[i] if i < len(scores) else float("inf")
        fp = sum(p >= t and y == 0 for p, y in zip(probs, labels, strict=True))
        if n_neg and fp / n_neg > max_fpr:
            continue
        right = sum((p >= t) == (y == 1) for p, y in zip(probs, labels, strict=True))
        if best is None or right >= best[0]:
            best, best_index = (right, t), i
    if best_index >= len(scores):
        return 1.0
    if best_index == 0:
        return scores[0] / 2
    return (scores[best_index] + scores[best_index - 1]) / 2
