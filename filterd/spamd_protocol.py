"""The spamd wire format (SPAMC/1.5, as SpamAssassin's spamd/PROTOCOL describes it), for
both ends: the `spamd` source reads requests and writes replies with it, and `filterd score
--tag --connect` sends a PROCESS request with it. Kept free of the engine and the plugin
interface, so the client side imports no model.

A request is a line (`PROCESS SPAMC/1.5`), header lines, an empty line, then a body of
exactly Content-length bytes (zlib-compressed with `Compress: zlib`). A reply is a line
(`SPAMD/1.5 0 EX_OK`), header lines (`Spam: True ; 8.8 / 5.0`, Content-length), an empty
line and a body; an error reply is its first line alone, with a sysexits.h code. Every
read is bounded: the header block by HEADER_LIMIT, the body by the caller's cap (the
decompressed body too, so a zip bomb costs at most the cap), the time by the caller's
timeout.
"""

from __future__ import annotations

import asyncio
import re
import socket
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

VERSION = "1.5"
DEFAULT_PORT = 783  # spamd's registered port
# The request or reply line and its header lines together. spamc builds its whole request
# header in an 8 KiB buffer, so no real client sends more.
HEADER_LIMIT = 8192
# sysexits.h codes spamd replies with (the subset filterd uses).
EX_OK = 0
EX_USAGE = 64
EX_DATAERR = 65
EX_UNAVAILABLE = 69
EX_SOFTWARE = 70
EX_IOERR = 74
EX_TEMPFAIL = 75
EX_PROTOCOL = 76
EX_NAMES = {
    EX_OK: "EX_OK",
    EX_USAGE: "EX_USAGE",
    EX_DATAERR: "EX_DATAERR",
    EX_UNAVAILABLE: "EX_UNAVAILABLE",
    EX_SOFTWARE: "EX_SOFTWARE",
    EX_IOERR: "EX_IOERR",
    EX_TEMPFAIL: "EX_TEMPFAIL",
    EX_PROTOCOL: "EX_PROTOCOL",
}
COMMANDS = (
    "PING",
    "CHECK",
    "SYMBOLS",
    "REPORT",
    "REPORT_IFSPAM",
    "PROCESS",
    "HEADERS",
    "SKIP",
    "TELL",
)
BODYLESS = ("PING", "SKIP")  # every other command carries a message
_FIRST_LINE = re.compile(r"([A-Z_]+) (SPAMC|SPAMD)/(\d+\.\d+)(?: (\d+)(?: (.*))?)?")
_NAME = re.compile(r"[!-9;-~]+")  # a header name: printable, no colon
_SPAM = re.compile(r"\s*(True|False|Yes|No)\s*;\s*(-?[0-9.]+)\s*/\s*(-?[0-9.]+)\s*", re.I)


class ProtocolError(Exception):
    """A request or reply that breaks the protocol or a limit; `code` is the sysexits.h
    code a server answers it with."""

    def __init__(self, code: int, why: str):
        super().__init__(why)
        self.code = code


class SpamdError(OSError):
    """The client side: the server could not be reached, failed, or answered an error
    (`code`, when it answered one)."""

    def __init__(self, why: str, code: int | None = None):
        super().__init__(why)
        self.code = code


@dataclass
class Head:
    """A header block read line by line, by either end (sans I/O: the caller reads): the
    first line, then fields until the empty line, HEADER_LIMIT bytes at most in all."""

    fields: dict[str, str] = field(default_factory=dict)  # lower-cased name: value
    size: int = 0
    command: str = ""  # a request's, once its first line is read

    def count(self, line: bytes) -> None:
        """Account for one line read (the first line too): over the limit, or cut short by
        the peer closing, is an error."""
        self.size += len(line)
        if self.size > HEADER_LIMIT:
            raise ProtocolError(EX_PROTOCOL, f"header block over {HEADER_LIMIT} bytes")
        if not line.endswith(b"\n"):  # the peer closed mid-line
            raise ProtocolError(EX_PROTOCOL, "connection closed inside the header block")

    def feed(self, line: bytes) -> bool:
        """Take one field line; False once the empty line ending the block came."""
        self.count(line)
        text = line.rstrip(b"\r\n").decode("latin-1")
        if not text:
            return False
        name, colon, value = text.partition(":")
        if not colon or not _NAME.fullmatch(name):
            raise ProtocolError(EX_PROTOCOL, f"bad header line {text[:80]!r}")
        key, value = name.lower(), value.strip()
        if key == "content-length" and self.fields.get(key, value) != value:
            raise ProtocolError(EX_DATAERR, "two different Content-length headers")
        self.fields[key] = value
        return True

    def content_length(self, cap: int) -> int | None:
        """The body's declared size (None: not given); over `cap` is an error."""
        value = self.fields.get("content-length")
        if value is None:
            return None
        if not value.isdigit() or len(value) > 12:
            raise ProtocolError(EX_DATAERR, f"bad Content-length {value[:20]!r}")
        if int(value) > cap:
            raise ProtocolError(
                EX_DATAERR, f"Content-length {int(value)} is over the {cap}-byte limit"
            )
        return int(value)


def first_line(line: bytes, side: str) -> tuple[str, str, int | None, str]:
    """(command, version, code, message) of `COMMAND SPAMC/1.5` (side "SPAMC") or
    `SPAMD/1.5 0 EX_OK` (side "SPAMD", read as its command "SPAMD")."""
    text = line.rstrip(b"\r\n").decode("latin-1")
    if side == "SPAMD":
        text = "SPAMD " + text  # one pattern for both: the reply has no command
    m = _FIRST_LINE.fullmatch(text)
    if m is None or m[2] != side or (side == "SPAMD") != (m[4] is not None):
        shown = text.removeprefix("SPAMD ") if side == "SPAMD" else text
        raise ProtocolError(EX_PROTOCOL, f"bad {side} line {shown[:80]!r}")
    return m[1], m[3], None if m[4] is None else int(m[4]), m[5] or ""


def encode(line: str, fields: list[tuple[str, str]], body: bytes | None) -> bytes:
    """A request or reply in wire form; Content-length is added when there is a body."""
    if body is not None:
        fields = [("Content-length", str(len(body))), *fields]
    head = "".join(f"{name}: {value}\r\n" for name, value in fields)
    return f"{line}\r\n{head}\r\n".encode("latin-1", "replace") + (body or b"")


def inflate(data: bytes, cap: int) -> bytes:
    """A `Compress: zlib` body decompressed, never to more than `cap` bytes: a small bomb
    is refused after producing cap + 1 bytes, not expanded whole."""
    inflater = zlib.decompressobj()
    try:
        out = inflater.decompress(data, cap + 1)
    except zlib.error as e:
        raise ProtocolError(EX_DATAERR, f"Compress: zlib: not zlib data ({e})") from None
    if len(out) > cap:
        raise ProtocolError(EX_DATAERR, f"over the {cap}-byte limit once decompressed")
    if not inflater.eof:
        raise ProtocolError(EX_DATAERR, "Compress: zlib: the compressed data is cut short")
    return out


# --- the server side ------------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    """One client request: its command, protocol version, header fields and message."""

    command: str
    version: str
    fields: dict[str, str]
    body: bytes = b""

    @property
    def user(self) -> str:
        """Whom the client asks for (logged only: one model scores for every user)."""
        return user_of(self.fields)


def user_of(fields: dict[str, str]) -> str:
    """The User header, reduced to what a Unix user name holds (it goes into logs)."""
    return "".join(c for c in fields.get("user", "") if c.isalnum() or c in "-_.@")[:64]


def older(version: str, than: str) -> bool:
    """Whether protocol `version` comes before `than`, numerically (1.2 before 1.10)."""
    return tuple(map(int, version.split("."))) < tuple(map(int, than.split(".")))


async def _line(reader: asyncio.StreamReader) -> bytes:
    try:
        return await reader.readuntil(b"\n")
    except asyncio.IncompleteReadError as e:
        return e.partial  # EOF: Head.count says so
    except asyncio.LimitOverrunError:  # one line over the stream's limit (HEADER_LIMIT)
        raise ProtocolError(EX_PROTOCOL, f"header block over {HEADER_LIMIT} bytes") from None


async def read_request(reader: asyncio.StreamReader, cap: int, head: Head | None = None) -> Request:
    """One request from a client; ProtocolError for anything malformed or over `cap`. The
    caller bounds the time (a Content-length longer than what comes waits for more), and
    may pass `head` to see how far a request that failed got (its command, its fields)."""
    head = Head() if head is None else head
    line = await _line(reader)
    if not line:
        raise ProtocolError(EX_PROTOCOL, "connection closed before a request")
    head.count(line)
    command, version, _, _ = first_line(line, "SPAMC")
    if command not in COMMANDS:
        raise ProtocolError(EX_PROTOCOL, f"unknown command {command[:20]!r}")
    head.command = command
    if command in BODYLESS and older(version, VERSION):
        return Request(command, version, {})  # before 1.5 nothing followed the line
    while head.feed(await _line(reader)):
        pass
    if command in BODYLESS:
        return Request(command, version, head.fields)
    size = head.content_length(cap)
    if size is None:
        raise ProtocolError(EX_DATAERR, f"Content-length missing (required with {command})")
    try:
        body = await reader.readexactly(size)
    except asyncio.IncompleteReadError as e:
        raise ProtocolError(
            EX_DATAERR,
            f"Content-length {size}, but the client closed after {len(e.partial)} bytes",
        ) from None
    compress = head.fields.get("compress", "").strip().lower()
    if compress == "zlib":
        body = inflate(body, cap)
    elif compress:
        raise ProtocolError(EX_PROTOCOL, f"unknown Compress {compress[:20]!r}")
    return Request(command, version, head.fields, body)


def spam_field(is_spam: bool, points: float, required: float) -> tuple[str, str]:
    """The Spam header of CHECK and the scoring commands: `True ; 8.8 / 5.0`."""
    return "Spam", f"{is_spam} ; {points:.1f} / {required:.1f}"


def reply(fields: list[tuple[str, str]], body: bytes | None = None) -> bytes:
    """A success reply (code 0)."""
    return encode(f"SPAMD/{VERSION} {EX_OK} EX_OK", fields, body)


def scored(version: str, spam: tuple[str, str], body: bytes | None, message: bool) -> bytes:
    """A scoring command's reply as spamd writes it for the client's protocol version:
    from 1.3 on, Content-length (with a body) and Spam; before, one header only: the
    message of PROCESS and HEADERS (`message`) with Content-length, anything else with
    Spam and no Content-length (Exim sends REPORT SPAMC/1.2 and reads just that form)."""
    if not older(version, "1.3"):
        return reply([spam], body)
    if message:
        return reply([], body)
    return reply([spam]) + (body or b"")


def pong() -> bytes:
    """PING's reply: a line alone."""
    return f"SPAMD/{VERSION} {EX_OK} PONG\r\n".encode()


def error_reply(code: int, why: str) -> bytes:
    """An error reply: its first line alone, after which the server closes."""
    why = " ".join("".join(c if c.isprintable() else " " for c in why).split())[:200]
    return f"SPAMD/{VERSION} {code} {EX_NAMES.get(code, 'EX_SOFTWARE')} {why}\r\n".encode()


def header_block(message: bytes) -> bytes:
    """A message's header up to and including the empty line that ends it (HEADERS),
    found as spamc finds it to append the body: the first CRLF CRLF or LF LF."""
    found = ((message.find(b"\r\n\r\n"), 4), (message.find(b"\n\n"), 2))
    ends = [i + n for i, n in found if i >= 0]
    return message[: min(ends)] if ends else message


# --- the client side ------------------------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    """One server reply, as the client side reads it."""

    code: int
    message: str
    fields: dict[str, str]
    body: bytes

    def spam(self) -> tuple[bool, float, float] | None:
        """(is_spam, score, required) from the Spam header, if there is one."""
        m = _SPAM.fullmatch(self.fields.get("spam", ""))
        if m is None:
            return None
        return m[1].lower() in ("true", "yes"), float(m[2]), float(m[3])


Address = str | tuple[str, int]


def parse_address(text: str) -> Address:
    """`/path.sock` (anything with a slash) for a Unix socket, else `HOST[:PORT]` or
    `[IPv6][:PORT]`, port 783 by default."""
    if "/" in text:
        return str(Path(text).expanduser())
    host, port = text, str(DEFAULT_PORT)
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest.removeprefix(":") or port
    elif text.count(":") == 1:
        host, port = text.split(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{text!r}: expected HOST:PORT, [IPv6]:PORT or /path/to.sock")
    return host, int(port)


def _connect(address: Address, timeout: float) -> socket.socket:
    if isinstance(address, str):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(address)
        except BaseException:
            sock.close()
            raise
        return sock
    return socket.create_connection(address, timeout)


def request(
    address: Address,
    command: str,
    body: bytes | None,
    fields: list[tuple[str, str]] | None = None,
    timeout: float = 30.0,
    cap: int = 1 << 20,
) -> Reply:
    """Send one request and read its reply (at most `cap` bytes of body), each socket step
    bounded by `timeout`; SpamdError when that fails or the server answers an error."""
    where = address if isinstance(address, str) else f"{address[0]}:{address[1]}"
    try:
        with _connect(address, timeout) as sock:
            sock.sendall(encode(f"{command} SPAMC/{VERSION}", fields or [], body))
            sock.shutdown(socket.SHUT_WR)
            with sock.makefile("rb") as stream:
                return _read_reply(stream, cap, bodyless=command in BODYLESS)
    except TimeoutError:
        raise SpamdError(f"spamd {where}: no answer within {timeout:g} s") from None
    except OSError as e:
        raise SpamdError(f"spamd {where}: {e.strerror or e}") from e
    except ProtocolError as e:
        raise SpamdError(f"spamd {where}: {e}", e.code) from e


def _read_reply(stream: BinaryIO, cap: int, bodyless: bool = False) -> Reply:
    head = Head()
    line = stream.readline(HEADER_LIMIT + 1)
    if not line:
        raise ProtocolError(EX_IOERR, "closed the connection without an answer")
    head.count(line)
    _, _, code, message = first_line(line, "SPAMD")
    assert code is not None
    if code != EX_OK:
        raise ProtocolError(code, f"answered {code} {message}")
    if bodyless:  # PONG: the line is the whole reply
        return Reply(code, message, {}, b"")
    while head.feed(stream.readline(HEADER_LIMIT + 1)):
        pass
    size = head.content_length(cap)
    body = stream.read(size) if size is not None else b""
    if size is not None and len(body) != size:
        raise ProtocolError(EX_PROTOCOL, f"Content-length {size}, but {len(body)} bytes came")
    return Reply(code, message, head.fields, body)


def process(address: Address, raw: bytes, timeout: float = 30.0) -> tuple[bytes, Reply]:
    """The message as the server tags it (PROCESS), with the reply (for its Spam header)."""
    answer = request(address, "PROCESS", raw, timeout=timeout, cap=len(raw) + (1 << 16))
    if "content-length" not in answer.fields:
        raise SpamdError("spamd: PROCESS answered without Content-length", EX_PROTOCOL)
    return answer.body, answer
