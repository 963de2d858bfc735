"""What one message costs through each pipe a delivery agent can run, whole command, wall
clock: `spamc` (PROCESS) against a running `filterd serve` with a spamd source, `filterd
score --tag --connect` to the same daemon, and plain `filterd score --tag` (which loads the
model itself). Rounds interleave the three (the first round only warms caches); medians
with min and max. The three outputs must be byte-identical.

    .venv/bin/python benchmarks/spamc_bench.py [--arch gpt2-tiny | --checkpoint DIR] [--runs 20]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from score_bench import CORPUS
from smtp_bench import write_checkpoint

BIN = Path(sys.executable).parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="gpt2-tiny", help="random weights of this architecture")
    parser.add_argument("--checkpoint", type=Path, help="a trained checkpoint instead")
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="spamc-bench-"))
    checkpoint = args.checkpoint or write_checkpoint(args.arch, root / "model")
    message = sorted((CORPUS / "easy_ham").iterdir())[5].read_bytes()
    config = root / "config.yaml"
    config.write_text(
        json.dumps(
            {
                "checkpoint": str(checkpoint),
                "headers": {"secret_file": str(root / "secret")},
                "sources": [{"name": "spamd", "options": {"port": 0}}],
            }
        )
    )
    env = os.environ | {"XDG_STATE_HOME": str(root / "state")}
    daemon = subprocess.Popen(
        [BIN / "filterd", "serve", "--config", config], stderr=subprocess.PIPE, text=True, env=env
    )
    port = None
    for line in daemon.stderr:
        if m := re.search(r"listening on 127\.0\.0\.1:(\d+)", line):
            port = m[1]
        if "ready:" in line:
            break
    commands = {
        "spamc": ["spamc", "-d", "127.0.0.1", "-p", port],
        "score --tag --connect": [
            *(BIN / "filterd", "score", "--tag", "--connect", f"127.0.0.1:{port}"),
            *("--config", config),
        ],
        "score --tag": [BIN / "filterd", "score", "--tag", "--config", config],
    }
    times: dict[str, list[float]] = {k: [] for k in commands}
    outputs = {}
    try:
        for i in range(args.runs + 1):
            for name, command in commands.items():
                start = time.perf_counter()
                done = subprocess.run(command, input=message, capture_output=True, env=env)
                elapsed = time.perf_counter() - start
                assert done.returncode == 0, done.stderr
                outputs[name] = done.stdout
                if i:
                    times[name].append(elapsed * 1000)
    finally:
        os.kill(daemon.pid, signal.SIGTERM)
        daemon.wait()
    assert len(set(outputs.values())) == 1, "the outputs differ"
    slowest = statistics.median(times["score --tag"])
    print(f"{checkpoint}, {len(message)}-byte message, {args.runs} runs each")
    for name, values in times.items():
        median = statistics.median(values)
        print(
            f"{name:22s} median {median:7.1f} ms ({min(values):.1f} to {max(values):.1f}), "
            f"{slowest / median:.1f}x cheaper than score --tag"
        )


if __name__ == "__main__":
    main()
