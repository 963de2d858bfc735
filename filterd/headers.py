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
# One header field: a name, a colon, the rest of the line and any continuation lines.
_FIELD = re.compile(rb"([\x21-\x39\x3b-\x7e]+):[^\n]*(?:\n[ \t][^\n]*)*(?:\n|\Z)")
# Headers whose values the marker covers besides ours: what the model reads, plus identity.
_COVERED = (b"subject", b"from", b"to", b"date", b"message-id")
_STATUS = re.compile(rb"(Yes|No), score=[0-9.]+ required=[0-9.]+(?: probability=([0-9.]+))?")


class SecretError(OSError):
    """The marker secret is unusable; the message names the file and what is wrong."""


@dataclass(frozen=True)
class _Parsed:
    mbox: bytes  # the mbox "From " line with its line end, or b""
    fields: list[tuple[bytes, bytes]]  # (lower-cased name, whole field bytes) in order
    rest: bytes  # the blank line and body, or whatever ended the header block
    eol: bytes

    def body(self) -> bytes:
        return self.rest.removeprefix(b"\r\n").removeprefix(b"\n")


def _parse(raw: bytes) -> _Parsed:
    mbox = b""
    if raw.startswith(b"From "):
        end = raw.find(b"\n")
        # Nothing but an mbox line: a line end keeps our headers off that line.
        mbox = raw + b"\n" if end < 0 else raw[: end + 1]
    pos = min(len(mbox), len(raw))
    fields = []
    while m := _FIELD.match(raw, pos):
        fields.append((m[1].lower(), m[0]))
        pos = m.end()
        if not m[0].endswith(b"\n"):
            break
    lines = [f for _, f in fields if f.endswith(b"\n")] + [mbox, raw[pos:]]
    first = next((line for line in lines if b"\n" in line), b"")
    eol = b"\r\n" if first.split(b"\n", 1)[0].endswith(b"\r") else b"\n"
    return _Parsed(mbox, fields, raw[pos:], eol)


def _value(field: bytes) -> bytes:
    """A field's value unfolded and with runs of white space squeezed, so transport that
    re-folds or converts line ends does not make a marker stale."""
    return b" ".join(field.split(b":", 1)[1].split())


def _mac(secret: bytes, ours: list[bytes], parsed: _Parsed) -> str:
    h = hmac.new(secret, b"filterd-marker/" + _MARKER_VERSION, hashlib.sha256)
    for field in ours:
        h.update(b"\0" + b" ".join(field.split()))
    for name in _COVERED:
        value = next((_value(f) for n, f in parsed.fields if n == name), b"")
        h.update(b"\0" + name + b":" + value)
    h.update(b"\0\0")
    h.update(parsed.body().replace(b"\r\n", b"\n").rstrip(b"\n"))
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

    def previous(self, raw: bytes) -> tuple[bool, float | None] | None:
        """(is_spam, probability) from our headers if a valid marker vouches for them."""
        parsed = _parse(raw)
        markers = [f for n, f in parsed.fields if n == self._marker]
        if self.secret is None or len(markers) != 1:
            return None
        version, _, mac = _value(markers[0]).partition(b" ")
        ours = [f for n, f in parsed.fields if self._ours(n) and n != self._marker]
        if version != _MARKER_VERSION or not hmac.compare_digest(
            mac, _mac(self.secret, ours, parsed).encode()
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
        parsed = _Parsed(parsed.mbox, kept, parsed.rest, parsed.eol)
        ours = [self.prefix.encode() + name.encode() + b": " + v for name, v in values]
        ours = [f.rstrip() if f.endswith(b": ") else f for f in ours]
        if self.secret is not None:
            mac = _mac(self.secret, ours, parsed).encode()
            ours.append(
                self.prefix.encode() + MARKER.encode() + b": " + _MARKER_VERSION + b" " + mac
            )
        added = b"".join(f + parsed.eol for f in ours)
        return b"".join([parsed.mbox, added, *(f for _, f in kept), parsed.rest])

    def _prefix_subject(self, field: bytes) -> bytes:
        name, value = field.split(b":", 1)
        if value.lstrip().startswith(self.subject_prefix.strip()):
            return field
        return name + b": " + self.subject_prefix + value.lstrip(b" \t")


def _oneline(text: str) -> bytes:
    """Text safe inside one header line: no line breaks or controls, bounded length."""
    clean = "".join(c if c.isprintable() else " " for c in text)
    return " ".join(clean.split())[:200].encode("utf-8", "replace")
