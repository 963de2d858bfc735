"""Byte-exact tagging with SpamAssassin-compatible headers and an unforgeable marker.

Mail must come out as it went in, plus our headers: same line ends, same body, the mbox
`From ` line first, no trailing newline added. So this works on bytes and touches only
the header lines it adds or removes; it never round-trips through the `email` package.

Headers carrying our prefix that arrive with a message are removed first, so a spammer's
`X-Spam-Flag: NO` never reaches the user's rules. The marker is an HMAC-SHA256, keyed
with a local secret, over our headers, the headers the model reads and the body: a copy
pasted onto another message does not verify. A message with a valid marker was already
scored here and passes through untouched.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

from filterd.verdict import Verdict

MARKER = "Marker"  # the marker header is <prefix>Marker
_MARKER_VERSION = b"v1"
_SECRET_BYTES = 32
# One header field: a name, a colon (white space before it is obsolete syntax that mail
# software still reads), the rest of the line and any continuation lines.
_FIELD = re.compile(rb"([\x21-\x39\x3b-\x7e]+)[ \t]*:[^\n]*(?:\n[ \t][^\n]*)*(?:\n|\Z)")
# Any other non-empty line before the first empty one. procmail, Dovecot and Sieve read
# everything up to the empty line as the header, so such a line must not end ours: a spoofed
# header after it would survive. Its "name" is what precedes a colon, so a mangled
# `X-Spam-Flag\0: NO` is still recognised as carrying our prefix.
_OTHER = re.compile(rb"(?!\r?\n|\r?\Z)[^\n]*(?:\n[ \t][^\n]*)*(?:\n|\Z)")
# Headers whose values the marker covers besides ours: what the model reads, plus identity.
_COVERED = (b"subject", b"from", b"to", b"date", b"message-id")
_STATUS = re.compile(rb"(Yes|No), score=[0-9.]+ required=[0-9.]+(?: probability=([0-9.]+))?")


class SecretError(OSError):
    """The marker secret is unusable; the message names the file and what is wrong."""


@dataclass(frozen=True)
class _Parsed:
    mbox: bytes  # the mbox "From " line with its line end, or b""
    fields: list[tuple[bytes, bytes]]  # (lower-cased name, whole field bytes) in order
    raw: bytes  # the whole message; the blank line and body start at `pos`
    pos: int
    eol: bytes

    @property
    def rest(self) -> memoryview:
        """The blank line and body: a view, so a 50 MB body is not copied to tag it."""
        return memoryview(self.raw)[self.pos :]

    def body_start(self) -> int:
        start = self.pos + 2 if self.raw.startswith(b"\r\n", self.pos) else self.pos
        return start + 1 if self.raw.startswith(b"\n", start) else start


_BODY_CHUNK = 1 << 20
_EOLS = re.compile(rb"(?:\r?\n)*\Z")


def _hash_body(h: hmac.HMAC, raw: bytes, start: int) -> None:
    """h.update(body.replace(CRLF, LF).rstrip(LF)) for the body at raw[start:], a chunk at a
    time: a big message is not copied whole, let alone twice."""
    window = 4096
    while True:  # where the final line ends begin; the window grows only over a long run
        lo = max(start, len(raw) - window)
        end = _EOLS.search(raw, lo).start()
        if end > lo or lo == start:
            break
        window *= 4
    view = memoryview(raw)
    pos = start
    while pos < end:
        stop = min(pos + _BODY_CHUNK, end)
        while stop < end and raw[stop - 1] == 0x0D:  # keep a CR LF pair in one chunk
            stop += 1
        h.update(bytes(view[pos:stop]).replace(b"\r\n", b"\n"))
        pos = stop


def _parse(raw: bytes) -> _Parsed:
    mbox = b""
    if raw.startswith(b"From "):
        end = raw.find(b"\n")
        # Nothing but an mbox line: a line end keeps our headers off that line.
        mbox = raw + b"\n" if end < 0 else raw[: end + 1]
    pos = min(len(mbox), len(raw))
    fields = []
    while pos < len(raw):
        if m := _FIELD.match(raw, pos):
            fields.append((m[1].lower(), m[0]))
        elif m := _OTHER.match(raw, pos):
            fields.append((m[0].split(b":", 1)[0].strip().lower(), m[0]))
        else:  # the empty line
            break
        pos = m.end()
        if not m[0].endswith(b"\n"):
            break
    # The line end of the first line that has one (a field, the mbox line or the rest).
    first = next((f for _, f in fields if f.endswith(b"\n")), None)
    if first is None and b"\n" in mbox:
        first = mbox
    if first is not None:
        newline = first.index(b"\n")
        crlf = first[newline - 1 : newline] == b"\r"
    else:
        newline = raw.find(b"\n", pos)
        crlf = newline > 0 and raw[newline - 1] == 0x0D
    return _Parsed(mbox, fields, raw, pos, b"\r\n" if crlf else b"\n")


def header_fields(raw: bytes) -> list[tuple[bytes, bytes]]:
    """(lower-cased name, whole field) for each line of the header, as tagging reads it."""
    return _parse(raw).fields


def _value(field: bytes) -> bytes:
    """A field's value unfolded and with runs of white space squeezed, so transport that
    re-folds or converts line ends does not make a marker stale."""
    return b" ".join(field.partition(b":")[2].split())  # a line with no colon: no value


def _mac(secret: bytes, ours: list[bytes], parsed: _Parsed, others: list[bytes]) -> str:
    h = hmac.new(secret, b"filterd-marker/" + _MARKER_VERSION, hashlib.sha256)
    for field in ours:
        h.update(b"\0" + b" ".join(field.split()))
    for name in _COVERED:
        value = next((_value(f) for n, f in parsed.fields if n == name), b"")
        h.update(b"\0" + name + b":" + value)
    for line in others:  # lines of the header that are no field: a headerless message's text
        h.update(b"\0-" + b" ".join(line.split()))
    h.update(b"\0\0")
    _hash_body(h, parsed.raw, parsed.body_start())
    return h.hexdigest()


def load_secret(path: Path) -> bytes:
    """The marker key; created (random, mode 0600) on first use, refused if others can read it."""
    if not path.exists():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, secrets.token_bytes(_SECRET_BYTES))
            os.fsync(fd)
            os.close(fd)
            os.link(tmp, path)  # never replaces a secret another process just created
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        with os.fdopen(fd, "rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            secret = f.read(4096)
    except OSError as e:
        raise SecretError(f"headers.secret_file: {path}: {e.strerror or e}") from e
    if mode & 0o077:
        raise SecretError(f"headers.secret_file: {path}: readable by others (chmod 600 it)")
    if len(secret) < 16:
        raise SecretError(f"headers.secret_file: {path}: under 16 bytes, too short to be a key")
    return secret


class Tagger:
    """Adds, strips and verifies headers with one prefix and one secret (None: no marker is
    written or trusted, for failing open when the secret itself is the problem)."""

    def __init__(self, secret: bytes | None, prefix: str = "X-Spam-", subject_prefix: str = ""):
        self.secret = secret
        self.prefix = prefix
        self._prefix = prefix.lower().encode("ascii")
        self._marker = (prefix + MARKER).lower().encode("ascii")
        self.subject_prefix = subject_prefix.encode("utf-8")

    def _ours(self, name: bytes) -> bool:
        return name.startswith(self._prefix)

    def _others(self, parsed: _Parsed) -> list[bytes]:
        return [f for n, f in parsed.fields if not self._ours(n) and not _FIELD.match(f)]

    def previous(self, raw: bytes) -> tuple[bool, float | None] | None:
        """(is_spam, probability) from our headers if a valid marker vouches for them."""
        parsed = _parse(raw)
        markers = [f for n, f in parsed.fields if n == self._marker]
        if self.secret is None or len(markers) != 1:
            return None
        version, _, mac = _value(markers[0]).partition(b" ")
        ours = [f for n, f in parsed.fields if self._ours(n) and n != self._marker]
        if version != _MARKER_VERSION or not hmac.compare_digest(
            mac, _mac(self.secret, ours, parsed, self._others(parsed)).encode()
        ):
            return None
        status_name = (self.prefix + "Status").lower().encode()
        status = next((_value(f) for n, f in parsed.fields if n == status_name), b"")
        m = _STATUS.match(status)
        if not m:
            return None
        return m[1] == b"Yes", float(m[2]) if m[2] else None

    def tag(self, raw: bytes, verdict: Verdict) -> bytes:
        """The message with our headers for this verdict; a marker-verified one unchanged."""
        if verdict.decided_by == "marker":
            return raw
        status = [b"score=%.1f required=%.1f" % (verdict.points, verdict.threshold * 10)]
        if verdict.probability is not None:
            status.append(b"probability=%.3f" % verdict.probability)
        if verdict.reason:
            status.append(_oneline(verdict.reason))
        status.append(b"model=" + _oneline(verdict.model))
        flag = b"Yes" if verdict.is_spam else b"No"
        values = [("Status", flag + b", " + b" ".join(status))]
        values += [("Score", b"%.1f" % verdict.points), ("Level", b"*" * int(verdict.points))]
        if verdict.is_spam:
            values.insert(0, ("Flag", b"YES"))
        return self._write(raw, values, subject=verdict.is_spam)

    def unscored(self, raw: bytes, why: str) -> bytes:
        """The fail-open form: spoofed headers gone, one header saying why it wasn't scored."""
        if self.previous(raw) is not None:
            return raw
        return self._write(raw, [("Status", b"Unscored, reason=" + _oneline(why))], False)

    def _write(self, raw: bytes, values: list[tuple[str, bytes]], subject: bool) -> bytes:
        parsed = _parse(raw)
        kept = [(n, f) for n, f in parsed.fields if not self._ours(n)]
        if subject and self.subject_prefix:
            kept = [(n, self._prefix_subject(f) if n == b"subject" else f) for n, f in kept]
        parsed = dataclasses.replace(parsed, fields=kept)
        ours = [self.prefix.encode() + name.encode() + b": " + v for name, v in values]
        ours = [f.rstrip() if f.endswith(b": ") else f for f in ours]
        if self.secret is not None:
            mac = _mac(self.secret, ours, parsed, self._others(parsed)).encode()
            ours.append(
                self.prefix.encode() + MARKER.encode() + b": " + _MARKER_VERSION + b" " + mac
            )
        added = b"".join(f + parsed.eol for f in ours)
        lead = b""
        if kept and kept[0][1][:1] in (b" ", b"\t"):
            # A first line that is a continuation would fold into our last header and go
            # with it when the message is tagged again: it stays first instead.
            lead = kept.pop(0)[1]
            lead += b"" if lead.endswith(b"\n") else parsed.eol
        return b"".join([parsed.mbox, lead, added, *(f for _, f in kept), parsed.rest])

    def _prefix_subject(self, field: bytes) -> bytes:
        name, value = field.split(b":", 1)
        if value.lstrip().startswith(self.subject_prefix.strip()):
            return field
        return name + b": " + self.subject_prefix + value.lstrip(b" \t")


def _oneline(text: str) -> bytes:
    """Text safe inside one header line: no line breaks or controls, bounded length."""
    clean = "".join(c if c.isprintable() else " " for c in text)
    return " ".join(clean.split())[:200].encode("utf-8", "replace")
