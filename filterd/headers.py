"""Byte-exact tagging with SpamAssassin-compatible headers and an unforgeable marker.

Mail must come out as it went in, plus our headers: same line ends, same body, the mbox
`From ` line first, no trailing newline added. So this works on bytes and touches only
the header lines it adds or removes; it never round-trips through the `email` package.

Headers carrying our prefix that arrive with a message are removed first, so a spammer's
`X-Spam-Flag: NO` never reaches the user's rules. The marker is an HMAC-SHA256, keyed
with a local secret, over our headers, the headers the model reads, those that change how
the message is decoded or shown (`_COVERED`, `_COVERED_MIME`) and the body: a copy pasted
onto another message, or a tagged message whose Content-Transfer-Encoding was edited, does
not verify. A message with a valid marker was already scored here and passes through
untouched; one with a marker of another version is scored again.
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
_MARKER_VERSION = b"v2"  # v1 (before issue 12) did not cover the MIME fields
_SECRET_BYTES = 32
# One header field: a name, a colon (white space before it is obsolete syntax that mail
# software still reads), the rest of the line and any continuation lines.
_FIELD = re.compile(rb"([\x21-\x39\x3b-\x7e]+)[ \t]*:[^\n]*(?:\n[ \t][^\n]*)*(?:\n|\Z)")
# Any other non-empty line before the first empty one. procmail, Dovecot and Sieve read
# everything up to the empty line as the header, so such a line must not end ours: a spoofed
# header after it would survive. Its "name" is what precedes a colon, so a mangled
# `X-Spam-Flag\0: NO` is still recognised as carrying our prefix.
_OTHER = re.compile(rb"(?!\r?\n|\r?\Z)[^\n]*(?:\n[ \t][^\n]*)*(?:\n|\Z)")
# Fields the marker covers besides ours, as DKIM's h= lists them: every occurrence, in order,
# and their number, so editing, removing or adding one (even one absent when the message was
# tagged) voids the marker. What the model reads, plus identity; compared with white space
# squeezed, so a re-folded Subject stays valid.
_COVERED = (b"subject", b"from", b"to", b"date", b"message-id")
# And every top-level field that changes how a part is decoded or shown (the parts' own MIME
# fields are in the body, which is covered): compared exactly but for line breaks, as white
# space inside a quoted boundary or file name matters. Content-Base and Content-Location set
# the base of an HTML part's relative links.
_COVERED_MIME = (
    b"mime-version",
    b"content-type",
    b"content-transfer-encoding",
    b"content-disposition",
    b"content-base",
    b"content-location",
)
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
_SCAN_CHUNK = 1 << 16


def _body_end(raw: bytes, start: int) -> int:
    """Where the body's final run of line ends (LF or CR LF) begins, found with a backward
    scan in bounded chunks and C-speed searches, so a 50 MB run of empty lines costs about
    what 50 MB of text does. (A regex search for that run backtracked and kept state for
    every byte of it: 0.25 s per MB and 120 bytes of memory per trailing byte.)"""
    if raw.endswith(b"\r"):  # a final bare CR ends no line: nothing to drop
        return len(raw)
    end = len(raw)
    while end > start:  # back to just past the last byte that is neither CR nor LF
        lo = max(start, end - _SCAN_CHUNK)
        chunk = raw[lo:end]
        if chunk.translate(None, b"\r\n"):  # it is in this chunk (rstrip is slower)
            end = lo + len(chunk.rstrip(b"\r\n"))
            break
        end = lo
    last_cr = raw.rfind(b"\r", end)  # memrchr: quick
    if last_cr < 0:  # a run of LF alone
        return end
    # Only CR and LF from `end` on, the last an LF: the run starts after the last CR that no
    # LF follows, i.e. the first of the last CR CR pair (there is none after `last_cr`).
    bare = raw.rfind(b"\r\r", end, last_cr + 1)
    return end if bare < 0 else bare + 1


def _hash_body(h: hmac.HMAC, raw: bytes, start: int) -> None:
    """h.update(body.replace(CRLF, LF).rstrip(LF)) for the body at raw[start:], a chunk at a
    time: a big message is not copied whole, let alone twice."""
    end = _body_end(raw, start)
    view = memoryview(raw)
    pos = start
    while pos < end:
        stop = min(pos + _BODY_CHUNK, end)
        if stop < end and raw[stop - 1] == 0x0D:  # keep a CR LF pair in one chunk
            stop -= 1
        piece = bytes(view[pos:stop])
        if b"\r" in piece and b"\n" in piece:  # two memchr calls: replace is slow on a run of CR
            piece = piece.replace(b"\r\n", b"\n")
        h.update(piece)
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


def _exact(field: bytes) -> bytes:
    """A field's value unfolded (line breaks removed, so LF or CRLF and RFC 5322 folding at
    white space do not matter) but with its white space kept."""
    return field.partition(b":")[2].replace(b"\r\n", b"\n").replace(b"\n", b"").strip(b" \t")


def _put(h: hmac.HMAC, label: bytes, items: list[bytes]) -> None:
    """The label, how many items, and each item prefixed by its length: no two different
    lists feed the same bytes to the hash."""
    h.update(b"%s %d\0" % (label, len(items)))
    for item in items:
        h.update(b"%d\0" % len(item) + item)


def _mac(secret: bytes, ours: list[bytes], parsed: _Parsed, others: list[bytes]) -> str:
    h = hmac.new(secret, b"filterd-marker/" + _MARKER_VERSION, hashlib.sha256)
    _put(h, b"ours", [b" ".join(f.split()) for f in ours])
    for name in _COVERED:
        _put(h, name, [_value(f) for n, f in parsed.fields if n == name])
    for name in _COVERED_MIME:
        _put(h, name, [_exact(f) for n, f in parsed.fields if n == name])
    # Lines of the header that are no field: a headerless message's text.
    _put(h, b"others", [b" ".join(line.split()) for line in others])
    h.update(b"body\0")
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
