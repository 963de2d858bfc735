"""The daemon's scoring throughput while its own scheduled retrain runs, against idle.

Not a test. A copy of CHECKPOINT_DIR (a `filterd-train` output folder with split.jsonl)
is served by a real `filterd serve` (spamd source on loopback) with
`learning.retrain.after_labels: 1` and a feedback store of `--feedback` labelled messages
from the checkpoint's validation split. Four real `spamc -c` clients at once send the
first `--messages` of its test split: once idle; then one more label is learned, the
daemon starts its retrain (at idle CPU priority, as it always does) within seconds, and
the same messages are sent again while it runs; then once more after it has finished.
Prints msgs/s of each pass and the ratio busy / idle.

    .venv/bin/python benchmarks/retrain_load_bench.py CHECKPOINT_DIR [--messages 200]
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(log: Path, text: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while text not in log.read_text():
        if time.monotonic() > deadline:
            raise SystemExit(f"no {text!r} in {log} after {timeout} s:\n{log.read_text()[-2000:]}")
        time.sleep(0.2)


def finished(log: Path) -> bool:
    """The daemon logged the end of its retrain (installed, kept or failed)."""
    text = log.read_text()
    return any(f"retrain {end}" in text for end in ("installed", "kept", "failed"))


def passes(port: int, raws: list[bytes]) -> float:
    """msgs/s of four spamc clients at once over these messages."""

    def check(raw: bytes) -> None:
        done = subprocess.run(
            ["spamc", "-d", "127.0.0.1", "-p", str(port), "-c", "-x"],
            input=raw,
            capture_output=True,
        )
        if done.returncode not in (0, 1):
            raise SystemExit(f"spamc failed ({done.returncode}): {done.stderr!r}")

    start = time.perf_counter()
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(check, raws))
    return len(raws) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--feedback", type=int, default=200)
    parser.add_argument("--messages", type=int, default=200)
    args = parser.parse_args()
    rows = [json.loads(line) for line in (args.checkpoint / "split.jsonl").open()]
    val = [r for r in rows if r["split"] == "val"][: args.feedback + 1]
    raws = [Path(r["id"]).read_bytes() for r in rows if r["split"] == "test"][: args.messages]
    with tempfile.TemporaryDirectory(prefix="retrain-load-") as tmp:
        work = Path(tmp)
        model = work / "model"
        shutil.copytree(args.checkpoint, model, ignore=shutil.ignore_patterns("history", "*.png"))
        port = free_port()
        config = work / "config.yaml"
        config.write_text(
            json.dumps(
                {
                    "checkpoint": str(model),
                    "learning": {"store": str(work / "fb"), "retrain": {"after_labels": 1}},
                    "headers": {"secret_file": str(work / "secret")},
                    "quarantine": {"path": str(work / "quarantine")},
                    "sources": [{"name": "spamd", "options": {"port": port}}],
                }
            )
        )

        def learn(items: list[dict]) -> None:
            for label in ("spam", "ham"):
                paths = [r["id"] for r in items if r["label"] == label]
                if paths:
                    subprocess.run(
                        [BIN / "filterd", "learn", f"--{label}", *paths, "--config", config],
                        check=True,
                        stderr=subprocess.DEVNULL,
                    )

        learn(val[:-1])  # before the daemon starts: these do not trigger a retrain
        log = work / "daemon.log"
        daemon = subprocess.Popen(
            [BIN / "filterd", "serve", "--config", config], stderr=log.open("w")
        )
        try:
            wait_for(log, "ready:", 120)
            passes(port, raws[:8])  # warm
            idle = passes(port, raws)
            learn(val[-1:])
            wait_for(log, "retrain (", 30)
            busy = passes(port, raws)
            still = not finished(log)
            deadline = time.monotonic() + 900
            while not finished(log) and time.monotonic() < deadline:
                time.sleep(1)
            after = passes(port, raws)
        finally:
            daemon.terminate()
            daemon.wait(60)
        print(
            json.dumps(
                {
                    "checkpoint": str(args.checkpoint),
                    "messages": len(raws),
                    "idle_msgs_per_s": round(idle, 2),
                    "during_retrain_msgs_per_s": round(busy, 2),
                    "idle_after_msgs_per_s": round(after, 2),
                    "ratio": round(busy / idle, 3),
                    "retrain_still_running_at_the_end": still,
                    "retrain_log": [ln for ln in log.read_text().splitlines() if "retrain" in ln],
                }
            )
        )


if __name__ == "__main__":
    main()
