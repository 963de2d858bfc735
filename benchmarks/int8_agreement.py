"""Do int8 weights change verdicts? Score a trained checkpoint's test split both ways.

Not a test: it needs a run folder from `filterd-train --out DIR` (model.safetensors,
split.jsonl). Prints how many test messages get the same verdict at the checkpoint's
threshold under float32 and int8, both accuracies, the largest probability change and
both speeds (one message per batch for int8, length-bucketed batches for float32).

    .venv/bin/python benchmarks/int8_agreement.py runs/spamassassin-mini
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from filterd.model.classifier import load_classifier
from filterd.text import message_text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a filterd-train --out folder")
    parser.add_argument("--split", default="test")
    args = parser.parse_args()

    rows = [json.loads(line) for line in (args.run / "split.jsonl").open()]
    rows = [r for r in rows if r["split"] == args.split]
    if not rows or not Path(rows[0]["id"]).is_file():
        raise SystemExit(f"{args.run}: no {args.split} messages readable from split.jsonl")
    truth = [r["label"] == "spam" for r in rows]
    texts = [message_text(Path(r["id"]).read_bytes()) for r in rows]

    results = {}
    for precision in ("float32", "int8"):
        clf = load_classifier(args.run, precision=precision)
        ids = [clf.tokens(t) for t in texts]
        clf.score_tokens(ids[:4])  # warm up (and pack the int8 weights)
        start = time.perf_counter()
        probs = clf.score_tokens(ids)
        seconds = time.perf_counter() - start
        spam = [p >= clf.threshold for p in probs]
        accuracy = sum(s == t for s, t in zip(spam, truth, strict=True)) / len(rows)
        results[precision] = probs, spam
        print(
            f"{precision:8} accuracy {accuracy:.4f} at threshold {clf.threshold:.4f}, "
            f"{len(rows) / seconds:.1f} msgs/s (model only)"
        )
    (p32, s32), (p8, s8) = results["float32"], results["int8"]
    same = sum(a == b for a, b in zip(s32, s8, strict=True))
    worst = max(abs(a - b) for a, b in zip(p32, p8, strict=True))
    print(f"same verdict: {same}/{len(rows)} = {same / len(rows):.4f}; max |dp| {worst:.4f}")


if __name__ == "__main__":
    main()
