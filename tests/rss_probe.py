"""Peak memory of `filterd score` runs, measured in a process of their own.

    python tests/rss_probe.py OUT.json CHECKPOINT RUN ...   each RUN is MODE:INPUT[:OUTPUT]

MODE is `tag` (`filterd score --tag`, stdin INPUT, stdout to OUTPUT) or `score` (`filterd
score --json INPUT`, a file or a folder). The runs go through `filterd.cli.main` one after
the other in this process; after each, the peak resident set size so far (ru_maxrss) and
the exit status are recorded, so the first run (a tiny message) gives the baseline the
later ones are compared with. The tests run this as a subprocess: pytest's own memory
would otherwise be counted.
"""

from __future__ import annotations

import io
import json
import resource
import sys
import time


def _run(checkpoint: str, mode: str, source: str, target: str | None) -> int:
    from filterd.cli import main

    saved = sys.stdin, sys.stdout
    with open(source if mode == "tag" else "/dev/null", "rb") as stdin:
        out = open(target or "/dev/null", "wb")  # noqa: SIM115 - closed below
        sys.stdin, sys.stdout = io.TextIOWrapper(stdin), io.TextIOWrapper(out)
        try:
            argv = ["--tag"] if mode == "tag" else ["--json", source]
            return main(["score", "--checkpoint", checkpoint, *argv])
        finally:
            sys.stdout.flush()
            sys.stdin, sys.stdout = saved
            out.close()


def main() -> None:
    results = []
    for spec in sys.argv[3:]:
        mode, source, *target = spec.split(":")
        start = time.perf_counter()
        code = _run(sys.argv[2], mode, source, target[0] if target else None)
        elapsed = time.perf_counter() - start
        peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        results.append({"run": spec, "exit": code, "seconds": elapsed, "peak_mib": peak_kib / 1024})
    with open(sys.argv[1], "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main()
