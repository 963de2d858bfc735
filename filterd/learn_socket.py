"""Labels handed to the daemon over a local socket (`learning.socket`), for learners that
may not write the feedback store themselves: Dovecot's IMAPSieve scripts run as the mail
user, the store belongs to the user filterd runs as. `filterd learn` uses it by itself
when it cannot write the store.

One request per connection, in the spirit of spamd's TELL:

    LEARN spam|ham|forget [replay]\\r\\n
    Content-length: N\\r\\n
    Source: imapsieve\\r\\n        (optional: who says so)
    \\r\\n
    N bytes of message

answered by `OK added|replaced|unchanged|kept newer|forgotten\\r\\n` or `ERROR why\\r\\n`.
The sender's uid (SO_PEERCRED) goes into the label's source, after the Source it gave.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
from pathlib import Path

from filterd.config import Config
from filterd.learning import forget, learn
from filterd.listen import prepare_socket, secure_socket
from filterd.store.feedback import FeedbackError

log = logging.getLogger("filterd")

ACTIONS = ("spam", "ham", "forget")
_HEAD_LIMIT = 1024
_TIMEOUT = 30.0


class HandoffError(OSError):
    """The daemon did not take the label; the message says why."""


def _peer_uid(writer: asyncio.StreamWriter) -> int | None:
    sock = writer.get_extra_info("socket")
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except (AttributeError, OSError):
        return None
    return struct.unpack("3i", creds)[1]


async def _request(reader: asyncio.StreamReader, cap: int) -> tuple[str, bool, str, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    if len(head) > _HEAD_LIMIT:
        raise FeedbackError("request header too long")
    lines = head.decode("ascii", "replace").split("\r\n")
    words = lines[0].split()
    if len(words) not in (2, 3) or words[0] != "LEARN" or words[1] not in ACTIONS:
        raise FeedbackError(f"expected LEARN spam|ham|forget [replay], got {lines[0][:80]!r}")
    if len(words) == 3 and words[2] != "replay":
        raise FeedbackError(f"unknown option {words[2][:40]!r}")
    name, _, value = lines[1].partition(":")
    if name.strip().lower() != "content-length" or not value.strip().isdigit():
        raise FeedbackError("expected a Content-length header")
    size = int(value)
    if size > cap:
        raise FeedbackError(f"message of {size} bytes is over the {cap}-byte limit")
    source = ""
    for line in lines[2:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "source":
            source = "".join(c for c in value.strip() if c.isprintable())[:40]
    return words[1], len(words) == 3, source, await reader.readexactly(size)


async def start(config: Config) -> asyncio.AbstractServer:
    """Listen on learning.socket (mode learning.socket_mode)."""
    learning = config.learning
    path = Path(learning.socket)
    cap = config.limits.max_bytes * 4

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        uid = _peer_uid(writer)
        try:
            action, replay, source, raw = await asyncio.wait_for(_request(reader, cap), _TIMEOUT)
            if action == "forget":
                await asyncio.to_thread(forget, raw, config)
                outcome = "forgotten"
            else:
                outcome = await asyncio.to_thread(
                    learn,
                    raw,
                    action,
                    source=f"{source} (socket uid={uid})" if source else f"socket uid={uid}",
                    kind="replay" if replay else "feedback",
                    config=config,
                )
            reply = f"OK {outcome}"
        except (FeedbackError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as e:
            reply = f"ERROR {e}"
        except TimeoutError:
            reply = "ERROR timed out"
        except OSError as e:  # the store: full disk, permissions
            reply = f"ERROR cannot write the feedback store: {e.strerror or e}"
        log.info("learn socket: uid=%s %s", uid, reply)
        try:
            writer.write(reply.replace("\n", " ").encode() + b"\r\n")
            await writer.drain()
            writer.close()
            await writer.wait_closed()
        except OSError as e:
            log.warning("learn socket: reply lost: %s", e)

    prepare_socket(path)
    server = await asyncio.start_unix_server(handle, path)
    secure_socket(path, learning.socket_mode)
    return server


def send(path: Path, action: str, raw: bytes, replay: bool = False, source: str = "") -> str:
    """Hand one label to the daemon; its outcome ("added", ...). FeedbackError when it
    refused this message, HandoffError when it could not be asked."""
    head = f"LEARN {action}{' replay' if replay else ''}\r\nContent-length: {len(raw)}\r\n"
    head += f"Source: {source}\r\n\r\n" if source else "\r\n"
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(_TIMEOUT)
            s.connect(str(path))
            s.sendall(head.encode() + raw)
            s.shutdown(socket.SHUT_WR)
            reply = b""
            while chunk := s.recv(4096):
                reply += chunk
    except OSError as e:
        raise HandoffError(f"the daemon's learn socket {path}: {e.strerror or e}") from e
    status, _, rest = reply.decode("utf-8", "replace").strip().partition(" ")
    if status == "ERROR":  # about this message: the next one may do
        raise FeedbackError(rest)
    if status != "OK":
        raise HandoffError(f"the daemon's learn socket {path}: no answer ({reply[:80]!r})")
    return rest
