"""Mail through a real Postfix on loopback with filterd as its milter, as its after-queue
SMTP proxy (content_filter), and with no filter at all: messages per second and end-to-end
latency, for the gpt2-tiny and gpt2 (124M, random weights: speed does not depend on their
values) architectures, or minilm-l6 (the installed pretrained encoder, a fresh head).
Every run counts what arrives: 0 lost, 0 duplicated.

- Throughput: `smtp-source` (Postfix's own load generator) sends N copies of one corpus
  message over S sessions, each to a numbered recipient (-N); the clock runs from its start
  until the last copy is in the Maildir; the numbered recipients (X-Original-To) tell lost
  and duplicated copies.
- Latency: 4 senders, each sending one message after another with a unique Message-ID;
  from the start of its SMTP transaction to its file appearing in the Maildir (polled
  every 2 ms), end to end, as a user waits for mail.

Needs root and Debian's postfix (tests/postfix.py starts the throwaway instances, with the
README's main.cf / master.cf lines). Not a test: run it on a quiet machine.

    .venv/bin/python benchmarks/mta_bench.py [--messages 400] [--sessions 8] [--latency 120]
        [--archs gpt2-tiny,gpt2]
"""

from __future__ import annotations

import argparse
import json
import re
import smtplib
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from score_bench import CORPUS, corpus_sample  # noqa: E402
from smtp_bench import write_checkpoint  # noqa: E402

from tests.postfix import (  # noqa: E402
    AFTER_QUEUE_MAIN_CF,
    AFTER_QUEUE_MASTER_CF,
    MILTER_MAIN_CF,
    Postfix,
    free_port,
)
from tests.test_daemon import Daemon  # noqa: E402

_ORIGINAL_TO = re.compile(rb"^X-Original-To: (\S+)", re.MULTILINE)
_MESSAGE_ID = re.compile(rb"^Message-ID: (<[^>]+>)", re.MULTILINE | re.IGNORECASE)


def sample_message() -> bytes:
    """One ham message of the corpus, 2-6 KB, lines SMTP can carry, CRLF line ends."""
    for raw in corpus_sample(CORPUS, 200):
        crlf = raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        head, _, _ = crlf.partition(b"\r\n\r\n")
        if 2000 <= len(crlf) <= 6000 and max(map(len, crlf.split(b"\r\n"))) <= 998:
            head = b"\r\n".join(
                line for line in head.split(b"\r\n") if not line.lower().startswith(b"message-id")
            )
            return head + b"\r\n\r\n" + crlf.partition(b"\r\n\r\n")[2]
    raise SystemExit("no suitable message in the corpus")


class Arrivals:
    """Polls the Maildir's new/ every 2 ms; the first time each file was seen."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.seen: dict[str, tuple[float, bytes]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._stop.is_set():
            try:
                names = [p for p in self.folder.iterdir() if p.name not in self.seen]
            except FileNotFoundError:
                names = []
            now = time.monotonic()
            for path in names:
                head = path.read_bytes()[:4096]
                self.seen[path.name] = (now, head)
            time.sleep(0.002)

    def heads(self) -> list[tuple[float, bytes]]:
        return list(self.seen.values())

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def setup(
    mode: str, checkpoint: Path, work: Path, scoring: dict
) -> tuple[Postfix, dict | None, int]:
    """A Postfix instance set up for `mode`, the settings of filterd behind it, and the
    port to send to."""
    inbound = free_port()
    listen = f"127.0.0.1:{inbound} inet n - n - - smtpd\n"
    if mode == "none":
        return Postfix(listen), None, inbound
    filterd_port, back = free_port(), free_port()
    settings = {
        "checkpoint": str(checkpoint),
        "headers": {"secret_file": str(work / "secret")},
        "quarantine": {"path": str(work / "quarantine")},
        "relay": {"port": back},
        "scoring": scoring,
    }
    if mode == "milter":
        postfix = Postfix(listen, MILTER_MAIN_CF.format(milter_port=filterd_port))
        settings["sources"] = [{"name": "milter", "options": {"port": filterd_port}}]
    else:
        postfix = Postfix(
            listen + AFTER_QUEUE_MASTER_CF.format(reinject_port=back),
            AFTER_QUEUE_MAIN_CF.format(proxy_port=filterd_port),
        )
        settings["sources"] = [{"name": "smtp", "options": {"port": filterd_port}}]
    return postfix, settings, inbound


def throughput(port: int, postfix: Postfix, message: Path, n: int, sessions: int) -> dict:
    arrivals = Arrivals(postfix.box / "new")
    start = time.monotonic()
    source = ["smtp-source", "-N", "-s", str(sessions), "-m", str(n), "-F", str(message)]
    subprocess.run(
        [*source, "-f", "bench@example.org", "-t", "box@example.test", f"127.0.0.1:{port}"],
        check=True,
        timeout=3600,
    )
    deadline = time.monotonic() + 600
    while len(arrivals.seen) < n and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(1.0)  # late duplicates would show here
    arrivals.stop()
    heads = arrivals.heads()
    recipients = [m[1] for _, head in heads if (m := _ORIGINAL_TO.search(head))]
    last = max(t for t, _ in heads)
    return {
        "messages": n,
        "msgs_per_s": round(n / (last - start), 2),
        "arrived": len(heads),
        "lost": n - len(set(recipients)),
        "duplicated": len(recipients) - len(set(recipients)),
    }


def latency(port: int, postfix: Postfix, message: bytes, n: int, senders: int = 4) -> dict:
    arrivals = Arrivals(postfix.box / "new")
    began: dict[bytes, float] = {}

    def send(count: int) -> None:
        with smtplib.SMTP("127.0.0.1", port, timeout=120) as smtp:
            for _ in range(count):
                mid = f"<{uuid.uuid4().hex}@bench>".encode()
                raw = b"Message-ID: " + mid + b"\r\n" + message
                began[mid] = time.monotonic()
                smtp.sendmail("bench@example.org", ["box@example.test"], raw)

    with ThreadPoolExecutor(senders) as pool:
        list(pool.map(send, [n // senders] * senders))
    total = (n // senders) * senders
    deadline = time.monotonic() + 300
    while len(arrivals.seen) < total and time.monotonic() < deadline:
        time.sleep(0.01)
    arrivals.stop()
    waits = []
    for seen_at, head in arrivals.heads():
        m = _MESSAGE_ID.search(head)
        if m and m[1] in began:
            waits.append((seen_at - began[m[1]]) * 1000)
    waits.sort()
    return {
        "p50_ms": round(statistics.median(waits), 1),
        "p99_ms": round(waits[min(len(waits) - 1, int(len(waits) * 0.99))], 1),
        "arrived": len(waits),
        "lost": total - len(waits),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=400)
    parser.add_argument("--sessions", type=int, default=8)
    parser.add_argument("--latency", type=int, default=120)
    parser.add_argument("--archs", default="gpt2-tiny,gpt2")
    parser.add_argument("--modes", default="none,milter,after_queue")
    parser.add_argument("--scoring", default="{}", help='scoring settings, e.g. {"max_batch": 8}')
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="mta-bench-"))
    message = sample_message()
    message_file = work / "message.eml"
    message_file.write_bytes(message)
    print(f"message: {len(message)} bytes; {args.messages} via smtp-source -s {args.sessions}")
    results = []
    for arch in args.archs.split(","):
        checkpoint = write_checkpoint(arch, work / arch)
        for i, mode in enumerate(args.modes.split(",")):  # a mode may come twice (alternating)
            run = work / f"{arch}-{i}-{mode}"
            run.mkdir()
            postfix, settings, port = setup(mode, checkpoint, run, json.loads(args.scoring))
            daemon = None
            try:
                if settings is not None:
                    daemon = Daemon(run, settings, smtp=False)
                latency(port, postfix, message, 8)  # warm up: model, connections
                for path in (postfix.box / "new").iterdir():
                    path.unlink()
                result = {"arch": arch, "mode": mode}
                result |= throughput(port, postfix, message_file, args.messages, args.sessions)
                for path in (postfix.box / "new").iterdir():
                    path.unlink()
                result |= {"latency": latency(port, postfix, message, args.latency)}
            finally:
                if daemon is not None:
                    daemon.stop()
                postfix.stop()
            print(json.dumps(result), flush=True)
            results.append(result)


if __name__ == "__main__":
    main()
