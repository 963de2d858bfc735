"""Learning under drift: does `filterd learn` + `filterd retrain` follow newer mail?

Not a test: about half an hour on 2 cores. The SpamAssassin corpus's older mail
(`spam` and, for time, 800 of `easy_ham`) trains a base `gpt2-mini` (`filterd-train
--init random`); its newer
mail (`spam_2`, `hard_ham`, `easy_ham_2`) is split, stratified and seeded, into a pool that
corrections come from and a held-out set never learned from. Each round, the current model
scores the pool and 50 messages it gets wrong are fed back (`filterd learn`), as users
correct mistakes, then `filterd retrain` runs with its gate. After each round, on the
held-out newer mail: recall, false-positive rate and accuracy at the model's threshold,
beside (a) the base model with no learning and (c) bogofilter trained on the same older
mail and fed the same corrections with `-s/-n`; after the last round also (b) a gpt2-mini
trained from scratch on the older mail plus every correction. Also the retrain's wall time
and peak memory, and the scoring throughput while a retrain runs (at the daemon's idle
priority) against idle, in the same script.

`--init minilm-l6` makes the base (and (b)) the pretrained MiniLM instead. Needs Debian's
bogofilter (`apt-get install bogofilter`).

    .venv/bin/python benchmarks/drift_bench.py [--rounds 4] [--per-round 50] [--out DIR]
        [--init random|minilm-l6]
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import filterd
from filterd.text import message_text

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "spamassassin-public-corpus"
OLD = {"easy_ham": "ham", "spam": "spam"}
BIN = Path(sys.executable).parent  # filterd and filterd-train beside this interpreter
NEW = {"easy_ham_2": "ham", "hard_ham": "ham", "spam_2": "spam"}


def messages(root: Path, folders: dict[str, str]) -> list[tuple[Path, str]]:
    return [
        (p, label)
        for folder, label in folders.items()
        for p in sorted((root / folder).iterdir())
        if p.is_file() and p.name != "cmds"
    ]


def run(*command, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in command], check=True, **kw)


def place(items: list[tuple[Path, str]], folder: Path) -> dict[str, Path]:
    """Copies under folder/ham and folder/spam (filterd-train --ham/--spam take folders)."""
    out = {}
    for label in ("ham", "spam"):
        (folder / label).mkdir(parents=True, exist_ok=True)
        out[label] = folder / label
    for i, (path, label) in enumerate(items):
        shutil.copy(path, out[label] / f"{i:05d}")
    return out


def figures(probs: list[float], labels: list[str], threshold: float) -> dict:
    spam = [p >= threshold for p, y in zip(probs, labels, strict=True) if y == "spam"]
    ham = [p >= threshold for p, y in zip(probs, labels, strict=True) if y == "ham"]
    return {
        "recall": sum(spam) / len(spam),
        "fpr": sum(ham) / len(ham),
        "accuracy": (sum(spam) + len(ham) - sum(ham)) / len(labels),
        "false_positives": sum(ham),
    }


class Bogofilter:
    def __init__(self, root: Path, train: list[tuple[Path, str]]):
        self.db = root / "bogo"
        self.texts = root / "bogo-texts"
        self.texts.mkdir()
        self.learn(train)

    def _files(self, items: list[tuple[Path, str]]) -> list[Path]:
        files = []
        for path, _ in items:
            target = self.texts / f"{path.parent.name}-{path.name}"
            target.write_text(message_text(path.read_bytes()), encoding="utf-8")
            files.append(target)
        return files

    def learn(self, items: list[tuple[Path, str]]) -> None:
        for label, flag in (("spam", "-s"), ("ham", "-n")):
            files = self._files([i for i in items if i[1] == label])
            for start in range(0, len(files), 500):
                run("bogofilter", "-C", "-d", self.db, flag, "-B", *files[start : start + 500])

    def score(self, items: list[tuple[Path, str]]) -> list[float]:
        files = self._files(items)
        found: dict[str, float] = {}
        for start in range(0, len(files), 500):
            chunk = [str(f) for f in files[start : start + 500]]
            out = subprocess.run(
                ["bogofilter", "-C", "-d", str(self.db), "-T", "-B", *chunk],
                capture_output=True,
                text=True,
            )
            for line in out.stdout.splitlines():
                path, _, score = line.rsplit(" ", 2)
                found[path] = float(score)
        return [found[str(f)] for f in files]


def score(checkpoint: Path, items: list[tuple[Path, str]]) -> tuple[list[float], float]:
    clf = filterd.load_classifier(checkpoint)
    return clf.score_messages([p.read_bytes() for p, _ in items]), clf.threshold


def throughput(checkpoint: Path, items: list[tuple[Path, str]]) -> float:
    clf = filterd.load_classifier(checkpoint)
    raws = [p.read_bytes() for p, _ in items]
    clf.score_messages(raws[:16])
    start = time.perf_counter()
    clf.score_messages(raws)
    return len(raws) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, default=CORPUS)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--per-round", type=int, default=50)
    parser.add_argument("--base-epochs", type=int, default=3)
    parser.add_argument(
        "--init", default="random", help="the base's --init: random (gpt2-mini) or minilm-l6"
    )
    parser.add_argument(
        "--old-ham", type=int, default=800, help="easy_ham messages the base sees (time)"
    )
    parser.add_argument("--out", type=Path, help="keep the work folder here (default: a temp)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--fpr-tolerance",
        type=float,
        default=0.0,
        help="the gate's learning.fpr_tolerance (default 0, filterd's default)",
    )
    args = parser.parse_args()
    work = args.out or Path(tempfile.mkdtemp(prefix="drift-"))
    work.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    old = messages(args.corpus, OLD)
    old_ham = rng.sample([m for m in old if m[1] == "ham"], args.old_ham)
    old = old_ham + [m for m in old if m[1] == "spam"]
    new = messages(args.corpus, NEW)
    rng.shuffle(new)
    pool, held = [], []
    for label in ("ham", "spam"):
        items = [m for m in new if m[1] == label]
        cut = int(len(items) * 0.6)
        pool += items[:cut]
        held += items[cut:]
    held_labels = [label for _, label in held]
    results: dict = {"rounds": []}

    def log(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    base_dir = work / "base"
    folders = place(old, work / "old")
    started = time.monotonic()
    init = (
        ["--init", "random", "--arch", "gpt2-mini"]
        if args.init == "random"
        else ["--init", args.init]
    )
    base_cmd = [BIN / "filterd-train", *init]
    base_cmd += ["--epochs", args.base_epochs, "--seed", args.seed, "--out", base_dir]
    run(*base_cmd, "--ham", folders["ham"], "--spam", folders["spam"], stdout=subprocess.DEVNULL)
    results["base_train_seconds"] = round(time.monotonic() - started, 1)
    log(f"base model: {results['base_train_seconds']} s")

    model_dir = work / "model"
    shutil.copytree(base_dir, model_dir)
    config = work / "config.yaml"
    config.write_text(
        json.dumps(
            {
                "checkpoint": str(model_dir),
                "learning": {
                    "store": str(work / "feedback"),
                    "fpr_tolerance": args.fpr_tolerance,
                },
                "headers": {"secret_file": str(work / "secret")},
            }
        )
    )
    base_probs, base_t = score(base_dir, held)
    bogo = Bogofilter(work, old)
    bogo_t = 0.5
    fed: list[tuple[Path, str]] = []
    results["no_learning"] = figures(base_probs, held_labels, base_t)
    results["round_0_bogofilter"] = figures(bogo.score(held), held_labels, bogo_t)
    log(f"round 0: no learning {results['no_learning']}")
    for n in range(1, args.rounds + 1):
        probs, t = score(model_dir, pool)
        wrong = [m for m, p in zip(pool, probs, strict=True) if (p >= t) != (m[1] == "spam")]
        wrong = [m for m in wrong if m not in fed]
        batch = rng.sample(wrong, min(args.per_round, len(wrong)))
        fed += batch
        for label in ("spam", "ham"):
            paths = [p for p, y in batch if y == label]
            if paths:
                run(BIN / "filterd", "learn", f"--{label}", *paths, "--config", config)
        bogo.learn(batch)
        started = time.monotonic()
        retrain = subprocess.run(
            [BIN / "filterd", "retrain", "--config", config], capture_output=True, text=True
        )
        seconds = time.monotonic() - started
        if retrain.returncode not in (0, 1):
            raise SystemExit(f"retrain failed: {retrain.stderr}")
        report = json.loads(retrain.stdout.splitlines()[-1])
        probs, t = score(model_dir, held)
        row = {
            "round": n,
            "corrections": len(fed),
            "wrong_in_pool": len(wrong),
            "installed": report["installed"],
            "gate": report["gate"]["reason"],
            "gate_holdout_accuracy": [
                report["gate"][m]["holdout"]["accuracy"] for m in ("current", "candidate")
            ],
            "retrain_wall_seconds": round(seconds, 1),
            "retrain_peak_rss_mb": report["peak_rss_mb"],
            "trained_on": sum(sum(c.values()) for c in report["feedback"].values())
            - sum(report["feedback"]["holdout"].values()),
            "learned": figures(probs, held_labels, t),
            "bogofilter": figures(bogo.score(held), held_labels, bogo_t),
        }
        results["rounds"].append(row)
        log(json.dumps(row))

    # (b) from scratch on the older mail plus every correction.
    scratch = place(old + fed, work / "scratch-data")
    started = time.monotonic()
    scratch_cmd = [BIN / "filterd-train", *init]
    scratch_cmd += ["--epochs", args.base_epochs, "--seed", args.seed, "--out", work / "scratch"]
    run(*scratch_cmd, "--ham", scratch["ham"], "--spam", scratch["spam"], stdout=subprocess.DEVNULL)
    probs, t = score(work / "scratch", held)
    results["from_scratch"] = figures(probs, held_labels, t) | {
        "train_seconds": round(time.monotonic() - started, 1)
    }
    log(f"from scratch: {results['from_scratch']}")

    # Scoring while a retrain runs at the daemon's idle priority, against idle.
    sample = held[:300]
    idle = throughput(model_dir, sample)
    child = subprocess.Popen(
        [sys.executable, "-m", "filterd.trainer.retrain", "--idle", "--config", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(10)  # past its start-up, into the training
    busy = throughput(model_dir, sample)
    still_running = child.poll() is None
    child.wait()
    idle_again = throughput(model_dir, sample)
    results["throughput"] = {
        "idle_msgs_per_s": round(idle, 1),
        "during_retrain_msgs_per_s": round(busy, 1),
        "idle_after_msgs_per_s": round(idle_again, 1),
        "ratio": round(busy / ((idle + idle_again) / 2), 3),
        "retrain_still_running_at_the_end": still_running,
    }
    log(f"throughput: {results['throughput']}")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
