"""How training scales across processes: one `filterd-train` against `torchrun` ranks.

The whole command each time (start-up, reading, tokenizing, frozen-block cache, training,
final scoring), on the same data and seed, one after another in this script:

- one process, batch 8 (the default), with C threads and with 1 (a rank's share of a
  2-core machine: the per-core scaling is 2 ranks against this);
- N ranks of 8/N: the same messages per optimizer step and the same step count;
- N ranks of 8: N times the messages per step, 1/N of the steps.

On a machine with C cores each rank gets C/N threads (torchrun sets OMP_NUM_THREADS=1
unless told otherwise; this script sets C/N). Prints wall seconds, the run's own
train_seconds, best epoch and test accuracy / ROC AUC from metrics.json.

    python benchmarks/ddp_bench.py [--ranks 2] [--init random --arch A] [-- filterd-train args]

(default data: the SMS collection in ../shared; `-- --ham DIR --spam DIR` for mail).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SMS = Path(__file__).resolve().parents[2] / "shared/datasets/sms-spam-collection/SMSSpamCollection"


def run(command: list[str], out: Path, threads: int) -> dict:
    env = os.environ | {"OMP_NUM_THREADS": str(threads)}
    started = time.perf_counter()
    subprocess.run([*command, "--out", str(out)], check=True, env=env, capture_output=True)
    wall = time.perf_counter() - started
    m = json.loads((out / "metrics.json").read_text())
    return {
        "wall_s": round(wall, 1),
        "train_s": m["train_seconds"],
        "best_epoch": m["best_epoch"],
        "test_accuracy": round(m["test"]["accuracy"], 4),
        "test_auc": round(m["test"]["roc_auc"], 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--init", default="random")
    parser.add_argument("--arch", default="gpt2-mini")
    parser.add_argument("extra", nargs="*", help="more filterd-train arguments (after --)")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    data = {"--sms", "--ham", "--spamassassin"}.intersection(args.extra)
    train = [*([] if data else ["--sms", str(SMS)]), "--init", args.init, *args.extra]
    if args.init == "random":
        train += ["--arch", args.arch]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    torchrun += ["--nproc-per-node", str(args.ranks), "-m", "filterd.trainer.cli"]
    runs = {
        "1 process x 8": ([sys.executable, "-m", "filterd.trainer.cli", *train], cores),
        "1 process x 8, 1 thread": ([sys.executable, "-m", "filterd.trainer.cli", *train], 1),
        f"{args.ranks} ranks x {8 // args.ranks}": (
            [*torchrun, *train, "--batch-size", str(8 // args.ranks)],
            max(1, cores // args.ranks),
        ),
        f"{args.ranks} ranks x 8": ([*torchrun, *train], max(1, cores // args.ranks)),
    }
    print(f"{cores} cores; filterd-train {' '.join(train)}")
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, (command, threads)) in enumerate(runs.items()):
            result = run(command, Path(tmp) / str(i), threads)
            print(json.dumps({"run": name, "threads_per_process": threads, **result}), flush=True)


if __name__ == "__main__":
    main()
