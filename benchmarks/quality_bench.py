"""filterd against the classic filters on the very split a checkpoint was trained on.

For a checkpoint folder written by `filterd-train` (model.safetensors + split.jsonl), this
re-reads the split's messages as the same model text filterd saw, trains the peers on the
same train messages, chooses every threshold on validation by filterd's own rule (best
accuracy with at most --max-fpr false positives on val ham), and scores the same test
messages:

- TF-IDF (word 1-2 grams, sublinear tf) + LogisticRegression, C chosen on val;
- TF-IDF + MultinomialNB, alpha chosen on val (scikit-learn);
- bogofilter (the Debian package): `-s`/`-n` on each train text, then `-T` for spamicity;
  `-C` so no bogofilter.cf changes it. It reads filterd's model text, not the raw message
  (its header tokens are lost; the issue's comparison did the same).

Printed side by side: accuracy at the val-chosen threshold and at 0.5, FP, FN, recall at
1% and 0.5% false-positive rate on the test ham (the best threshold a filter could have
had on test, an upper bound for each), ROC AUC, and the exact McNemar p-value of each
peer's test errors against filterd's (paired, at the val-chosen thresholds).

    .venv/bin/python benchmarks/quality_bench.py runs/sa-minilm [--json out.json]

Needs the `test` extra (scikit-learn, scipy); bogofilter is skipped with a note if missing.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from scipy.stats import binomtest
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.naive_bayes import MultinomialNB

import filterd
from filterd.trainer.data import read_split
from filterd.trainer.metrics import binary_metrics, choose_threshold, roc_curve

Scores = dict[str, list[float]]  # split name -> P(spam) per message, in split order


def recall_at_fpr(probs: Sequence[float], labels: Sequence[int], fpr: float) -> float:
    """Largest recall any threshold reaches with a false-positive rate <= fpr."""
    fprs, tprs = roc_curve(probs, labels)
    return max(t for f, t in zip(fprs, tprs, strict=True) if f <= fpr)


def mcnemar(ours: Sequence[bool], theirs: Sequence[bool]) -> tuple[int, int, float]:
    """(messages only filterd got right, only the peer got right, exact two-sided p)."""
    b = sum(o and not t for o, t in zip(ours, theirs, strict=True))
    c = sum(t and not o for o, t in zip(ours, theirs, strict=True))
    return b, c, binomtest(b, b + c, 0.5).pvalue if b + c else 1.0


def accuracy_at_rule(val: Sequence[float], val_y: Sequence[int], max_fpr: float) -> float:
    return binary_metrics(val, val_y, choose_threshold(val, val_y, max_fpr))["accuracy"]


def tfidf_peer(model_for: Callable[[float], object], grid: Sequence[float]):
    """A TF-IDF pipeline whose one hyperparameter is chosen on val by the threshold rule."""

    def run(texts: dict[str, list[str]], y: dict[str, list[int]], max_fpr: float) -> Scores:
        vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=2)
        x = {"train": vectorizer.fit_transform(texts["train"])}
        x |= {name: vectorizer.transform(texts[name]) for name in ("val", "test")}
        best = None
        for value in grid:
            model = model_for(value).fit(x["train"], y["train"])
            scores = {n: model.predict_proba(x[n])[:, 1].tolist() for n in ("val", "test")}
            key = (accuracy_at_rule(scores["val"], y["val"], max_fpr), value)
            if best is None or key > best[0]:
                best = (key, scores)
        return best[1]

    return run


def bogofilter_peer(texts: dict[str, list[str]], y: dict[str, list[int]], _: float) -> Scores:
    """Train a fresh bogofilter database on the train texts, then read its spamicity."""
    with tempfile.TemporaryDirectory(prefix="bogo-") as tmp:
        root = Path(tmp)
        files: dict[str, list[Path]] = {}
        for name, items in texts.items():
            (root / name).mkdir()
            files[name] = []
            for i, text in enumerate(items):
                path = root / name / f"{i:06d}"
                path.write_text(text, encoding="utf-8")
                files[name].append(path)
        db = root / "db"
        db.mkdir()
        for flag, label in (("-s", 1), ("-n", 0)):
            chosen = [str(p) for p, t in zip(files["train"], y["train"], strict=True) if t == label]
            for start in range(0, len(chosen), 500):  # -B: bulk mode, file names as arguments
                subprocess.run(
                    ["bogofilter", "-C", "-d", str(db), flag, "-B", *chosen[start : start + 500]],
                    check=True,
                )
        scores: Scores = {}
        for name in ("val", "test"):  # train is only learned from
            spamicity: dict[str, float] = {}
            paths = [str(p) for p in files[name]]
            for start in range(0, len(paths), 500):
                out = subprocess.run(
                    ["bogofilter", "-C", "-d", str(db), "-T", "-B", *paths[start : start + 500]],
                    capture_output=True,
                    text=True,
                )
                if out.returncode not in (0, 1, 2):  # 0 spam, 1 ham, 2 unsure, 3 error
                    raise RuntimeError(f"bogofilter -T failed: {out.stderr.strip()}")
                for line in out.stdout.splitlines():
                    path, _, score = line.rsplit(" ", 2)  # "FILE S 0.999123"
                    spamicity[path] = float(score)
            scores[name] = [spamicity[p] for p in paths]
        return scores


PEERS = {
    "TF-IDF + LogisticRegression": tfidf_peer(
        lambda c: LogisticRegression(C=c, max_iter=5000), (1.0, 10.0, 100.0)
    ),
    "TF-IDF + MultinomialNB": tfidf_peer(lambda a: MultinomialNB(alpha=a), (0.01, 0.1, 1.0)),
    "bogofilter": bogofilter_peer,
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", type=Path, help="a filterd-train --out folder")
    p.add_argument("--max-fpr", type=float, help="default: the checkpoint's own (metrics.json)")
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args(argv)

    trained = json.loads((args.checkpoint / "metrics.json").read_text())
    max_fpr = args.max_fpr if args.max_fpr is not None else trained["settings"]["max_fpr"]
    rows = read_split(args.checkpoint / "split.jsonl")
    texts = {s: [e.text for e, split in rows if split == s] for s in ("train", "val", "test")}
    y = {s: [e.y for e, split in rows if split == s] for s in ("train", "val", "test")}
    print(
        f"{args.checkpoint}: {trained['arch']} from {trained['init']}, "
        + ", ".join(f"{s} {len(texts[s])}" for s in texts)
        + f", threshold rule: FPR <= {max_fpr} on val",
        flush=True,
    )

    started = time.monotonic()
    clf = filterd.load_classifier(args.checkpoint)
    systems: dict[str, Scores] = {
        "filterd": {s: clf.score_texts(texts[s]) for s in ("val", "test")}
    }
    seconds = {"filterd": time.monotonic() - started}
    for name, run in PEERS.items():
        if name == "bogofilter" and not shutil.which("bogofilter"):
            print("bogofilter: not installed (apt-get install bogofilter), skipped")
            continue
        started = time.monotonic()
        systems[name] = run(texts, y, max_fpr)
        seconds[name] = time.monotonic() - started

    results = {}
    right: dict[str, list[bool]] = {}
    for name, scores in systems.items():
        threshold = choose_threshold(scores["val"], y["val"], max_fpr)
        m = binary_metrics(scores["test"], y["test"], threshold)
        right[name] = [p >= threshold for p in scores["test"]]
        right[name] = [r == (t == 1) for r, t in zip(right[name], y["test"], strict=True)]
        results[name] = {
            "threshold": threshold,
            "accuracy": m["accuracy"],
            "accuracy_at_0.5": m["accuracy_argmax"],
            "false_positives": m["false_positives"],
            "false_negatives": m["false_negatives"],
            "recall_at_1pct_fpr": recall_at_fpr(scores["test"], y["test"], 0.01),
            "recall_at_0.5pct_fpr": recall_at_fpr(scores["test"], y["test"], 0.005),
            "roc_auc": m["roc_auc"],
            "seconds": round(seconds[name], 1),
        }
    for name in results:
        if name != "filterd":
            b, c, pvalue = mcnemar(right["filterd"], right[name])
            results[name] |= {"only_filterd_right": b, "only_peer_right": c, "mcnemar_p": pvalue}

    print(
        f"\n| model | accuracy (val-chosen t) | FP | FN | accuracy at 0.5 | recall at 1% FPR "
        f"| recall at 0.5% FPR | ROC AUC | McNemar p vs filterd |\n|{' --- |' * 9}"
    )
    for name, r in results.items():
        p_text = "" if name == "filterd" else f"{r['mcnemar_p']:.3g}"
        print(
            f"| {name} | {r['accuracy']:.4f} | {r['false_positives']} | {r['false_negatives']} "
            f"| {r['accuracy_at_0.5']:.4f} | {r['recall_at_1pct_fpr']:.4f} "
            f"| {r['recall_at_0.5pct_fpr']:.4f} | {r['roc_auc']:.5f} | {p_text} |"
        )
    if args.json:
        report = {"checkpoint": str(args.checkpoint), "max_fpr": max_fpr, "results": results}
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
