"""Messages/second through `filterd serve`'s SMTP proxy: N concurrent senders on loopback,
through a real `filterd serve` process, into a sink; then the same messages through the
raw model (`Classifier.score_messages`) for comparison.

Not a test: run it on a quiet machine. Two runs: (a) `gpt2-tiny`, where the model costs
next to nothing, so the number is the plumbing's (SMTP in and out, tagging, batching);
(b) the `gpt2` (124M) architecture with random weights (speed does not depend on their
values), where the goal is >= 80% of the raw model's batch throughput. Each round prints
messages/s, p50/p99 latency (MAIL FROM to the answer to DATA), sent / acked / relayed /
lost (acked but never relayed: must be 0), and the CPU time per message of the sender
process, the daemon and its scoring process (steadier than messages/s on a noisy machine).
Rounds run one after another against the same daemon; the median round is summarized.

    .venv/bin/python benchmarks/smtp_bench.py [--senders 16] [--tiny 2000] [--gpt2 64] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from score_bench import CORPUS, corpus_sample

from filterd.builtin.smtp_proxy import NextHop
from filterd.model.bert import load_pretrained_bert
from filterd.model.checkpoint import CheckpointMeta, save_checkpoint
from filterd.model.classifier import load_classifier
from filterd.model.registry import architecture, family

_ID = re.compile(rb"^X-Bench-Id: (\d+)\r$", re.MULTILINE)


def smtp_messages(n: int, corpus: Path) -> list[bytes]:
    """n corpus messages as SMTP carries them: CRLF line ends, no line over 998 bytes."""
    usable = []
    for raw in corpus_sample(corpus, 2 * n if n <= 500 else 1000):
        crlf = raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        if max(map(len, crlf.split(b"\r\n"))) <= 998:
            usable.append(crlf)
    return [usable[i % len(usable)] for i in range(n)]


class Sink(asyncio.Protocol):
    """The next hop, as cheap as can be so the proxy's cost shows: 250 to every command,
    DATA read in bulk, the number of each message that arrives recorded."""

    def __init__(self, ids: list[int]):
        self.ids = ids
        self.buffer = b""
        self.in_data = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        transport.write(b"220 sink\r\n")

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            if self.in_data:
                end = self.buffer.find(b"\r\n.\r\n")
                if end < 0:
                    return
                m = _ID.search(self.buffer, 0, end + 2)
                self.ids.append(int(m[1]) if m else -1)
                self.buffer, self.in_data = self.buffer[end + 5 :], False
                self.transport.write(b"250 2.0.0 Ok\r\n")
                continue
            line, found, self.buffer = self.buffer.partition(b"\r\n")
            if not found:
                self.buffer = line
                return
            verb = line[:4].upper()
            if verb == b"DATA":
                self.in_data = True
            self.transport.write(b"354 go\r\n" if verb == b"DATA" else b"250 Ok\r\n")
            if verb == b"QUIT":
                self.transport.close()


def write_checkpoint(arch: str, folder: Path) -> Path:
    """`minilm-l6`: the installed pretrained encoder (with a fresh head); other
    architectures: random weights (speed does not depend on their values)."""
    torch.manual_seed(0)
    if arch == "minilm-l6":
        model, tokenizer = load_pretrained_bert(arch)
        fam = family("bert")
    else:
        fam, config = architecture(arch)
        model, tokenizer = fam.build(config), fam.tokenizer({})
    meta = CheckpointMeta(
        arch=arch, config={}, family=fam.name, tokenizer=tokenizer.name, max_tokens=256
    )
    return save_checkpoint(folder, model.eval(), meta, tokenizer)


async def start_daemon(checkpoint: Path, sink_port: int, senders: int, folder: Path, child: bool):
    config = {
        "checkpoint": str(checkpoint),
        "headers": {"secret_file": str(folder / "secret")},
        "quarantine": {"path": str(folder / "quarantine")},
        "relay": {"port": sink_port, "timeout_seconds": 60},
        "smtp": {"enabled": True, "port": 0, "max_queue": max(64, senders)},
        "scoring": {"timeout_seconds": 900},
        "daemon": {"reload_check_seconds": 0, "scoring_process": child},
    }
    (folder / "config.yaml").write_text(json.dumps(config))
    log = folder / "daemon.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "filterd.cli", "serve", "--config", str(folder / "config.yaml")],
        stderr=log.open("w"),
    )
    while not (m := re.search(r"listening on 127\.0\.0\.1:(\d+)", log.read_text())):
        if proc.poll() is not None:
            raise SystemExit(f"filterd serve exited:\n{log.read_text()}")
        await asyncio.sleep(0.1)
    return proc, int(m[1])


async def send_all(port: int, messages: list[bytes], senders: int) -> tuple[list[float], set[int]]:
    """Each sender keeps one connection and sends from a shared queue; the latencies and
    numbers of the messages acked with 250."""
    latencies: list[float] = []
    acked: set[int] = set()
    queue = list(enumerate(messages))

    async def sender() -> None:
        hop = await NextHop.connect("127.0.0.1", port, 900, "bench.example")
        while queue:
            n, raw = queue.pop()
            start = time.perf_counter()
            await hop.command("MAIL FROM:<bench@example.org>")
            await hop.command("RCPT TO:<user@example.net>")
            reply = await hop.data(b"X-Bench-Id: %d\r\n" % n + raw)
            if reply.code == 250:
                acked.add(n)
                latencies.append(time.perf_counter() - start)
        await hop.quit()

    await asyncio.gather(*(sender() for _ in range(senders)))
    return latencies, acked


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children(pid: int) -> list[int]:
    """The daemon's child processes: its scoring process (and multiprocessing's tracker)."""
    kids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "stat").read_text().rsplit(")", 1)[1].split()[1] == str(pid):
                    kids.append(int(entry.name))
            except OSError:  # gone meanwhile
                continue
    return kids


async def run(arch: str, n: int, senders: int, corpus: Path, child: bool, rounds: int) -> None:
    messages = smtp_messages(n, corpus)
    name = f"{arch}{'' if child else ' (one process)'}"
    rates = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        checkpoint = write_checkpoint(arch, folder / "model")
        relayed: list[int] = []
        server = await asyncio.get_running_loop().create_server(
            lambda: Sink(relayed), "127.0.0.1", 0
        )
        proc, port = await start_daemon(
            checkpoint, server.sockets[0].getsockname()[1], senders, folder, child
        )
        try:
            await send_all(port, messages[: min(senders, 8)], min(senders, 8))  # warm up
            pids = [proc.pid, *children(proc.pid)]
            for _ in range(rounds):
                relayed.clear()
                cpu = [time.process_time()] + [cpu_seconds(p) for p in pids]
                start = time.perf_counter()
                latencies, acked = await send_all(port, messages, senders)
                elapsed = time.perf_counter() - start
                used = [time.process_time()] + [cpu_seconds(p) for p in pids]
                per_msg = [(b - a) / n * 1000 for a, b in zip(cpu, used, strict=True)]
                lost = len(acked - set(relayed))
                ms = sorted(x * 1000 for x in latencies)
                p99 = ms[min(len(ms) - 1, int(len(ms) * 0.99))] if ms else float("nan")
                rates.append(n / elapsed)
                print(
                    f"{name}: {n} messages, {senders} senders: {rates[-1]:.1f} msgs/s through "
                    f"the proxy ({elapsed:.1f} s), p50 "
                    f"{statistics.median(ms) if ms else float('nan'):.0f} ms, p99 {p99:.0f} ms; "
                    f"sent {n}, acked {len(acked)}, relayed {len(relayed)}, lost {lost}; CPU "
                    f"ms/message: senders+sink {per_msg[0]:.2f}, daemon {per_msg[1]:.2f}, "
                    f"children {' '.join(f'{x:.2f}' for x in per_msg[2:]) or '-'}",
                    flush=True,
                )
        finally:
            proc.terminate()
            proc.wait(120)
            server.close()
        clf = load_classifier(checkpoint)
        clf.score_messages(messages[:8])
        t_raw = time.perf_counter()
        clf.score_messages(messages)
        t_raw = time.perf_counter() - t_raw
    proxy_rate, raw_rate = statistics.median(rates), n / t_raw
    print(
        f"{name}: median of {rounds} rounds {proxy_rate:.1f} msgs/s "
        f"(range {min(rates):.1f} to {max(rates):.1f}); raw model (score_messages, same "
        f"messages): {raw_rate:.1f} msgs/s; proxy / raw = {proxy_rate / raw_rate:.0%}",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--senders", type=int, default=16)
    parser.add_argument("--tiny", type=int, default=2000, help="messages for gpt2-tiny; 0: skip")
    parser.add_argument("--gpt2", type=int, default=64, help="messages for gpt2; 0: skip")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per daemon")
    parser.add_argument("--corpus", type=Path, default=CORPUS)
    parser.add_argument(
        "--one-process", action="store_true", help="daemon.scoring_process false as well"
    )
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    for arch, n in (("gpt2-tiny", args.tiny), ("gpt2", args.gpt2)):
        for child in (True, False) if args.one_process else (True,):
            if n:
                asyncio.run(run(arch, n, args.senders, args.corpus, child, args.rounds))


if __name__ == "__main__":
    main()
