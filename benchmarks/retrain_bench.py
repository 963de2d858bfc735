"""Wall time of one `filterd retrain` (the whole command) on 1,000 feedback + replay messages.

Not a test. A copy of CHECKPOINT_DIR (a `filterd-train` output folder with split.jsonl, e.g.
a gpt2-mini or minilm-l6 SpamAssassin model) gets a fresh feedback store with `--feedback`
labelled messages from its own validation split (labels as split.jsonl gives them; for
timing, which ones does not matter) and replay from its train split to make up `--total`
messages in all; then `filterd retrain` runs once, and its wall time, the retrain's own
figure and its peak memory are printed.

    .venv/bin/python benchmarks/retrain_bench.py CHECKPOINT_DIR [--feedback 200] [--total 1000]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--feedback", type=int, default=200)
    parser.add_argument("--total", type=int, default=1000)
    args = parser.parse_args()
    rows = [json.loads(line) for line in (args.checkpoint / "split.jsonl").open()]
    val = [r for r in rows if r["split"] == "val"][: args.feedback]
    if len(val) < args.feedback:
        raise SystemExit(f"{args.checkpoint}: only {len(val)} validation messages")
    with tempfile.TemporaryDirectory(prefix="retrain-") as tmp:
        work = Path(tmp)
        model = work / "model"
        shutil.copytree(args.checkpoint, model, ignore=shutil.ignore_patterns("history", "*.png"))
        config = work / "config.yaml"
        # Replay: what the train split holds, up to the total less the trained feedback.
        held = max(20, round(args.feedback * 0.2))
        replay = args.total - (args.feedback - held)
        config.write_text(
            json.dumps(
                {
                    "checkpoint": str(model),
                    "learning": {"store": str(work / "fb"), "replay_messages": replay},
                    "headers": {"secret_file": str(work / "secret")},
                }
            )
        )
        for label in ("spam", "ham"):
            paths = [r["id"] for r in val if r["label"] == label]
            subprocess.run(
                [BIN / "filterd", "learn", f"--{label}", *paths, "--config", config],
                check=True,
                stderr=subprocess.DEVNULL,
            )
        start = time.perf_counter()
        done = subprocess.run(
            [BIN / "filterd", "retrain", "--config", config], capture_output=True, text=True
        )
        wall = time.perf_counter() - start
        if done.returncode not in (0, 1):
            raise SystemExit(done.stderr)
        report = json.loads(done.stdout.splitlines()[-1])
        trained = sum(report["feedback"]["train"].values()) + sum(
            report["feedback"]["replay"].values()
        )
        print(
            json.dumps(
                {
                    "checkpoint": str(args.checkpoint),
                    "trained_on": trained,
                    "held_out": sum(report["feedback"]["holdout"].values()),
                    "wall_seconds": round(wall, 1),
                    "retrain_seconds": report["seconds"],
                    "peak_rss_mb": report["peak_rss_mb"],
                    "installed": report["installed"],
                    "gate": report["gate"]["reason"],
                }
            )
        )


if __name__ == "__main__":
    main()
