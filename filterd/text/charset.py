"""Bytes to str: charsets as mail really uses them, and transfer encodings that survive
the damage spammers do to base64 and quoted-printable."""

from __future__ import annotations

import binascii
import codecs
import re

# Labels whose real-world use is a superset of what they promise.
_CHARSET_ALIASES = {
    "us-ascii": "cp1252",
    "ascii": "cp1252",
    "iso-8859-1": "cp1252",
    "latin1": "cp1252",
    "latin-1": "cp1252",
    "gb2312": "gb18030",
    "gbk": "gb18030",
    "ks_c_5601-1987": "cp949",
    "euc-kr": "cp949",
}
# Codecs that are not mail charsets and could be slow or surprising on hostile input.
_BAD_CODECS = {"idna", "punycode", "raw-unicode-escape", "unicode-escape", "undefined"}


def _codec(charset: str | None) -> str | None:
    """A Python codec name for a MIME charset label, or None if we should not trust it."""
    if not charset:
        return None
    label = charset.strip().strip("\"'").lower()
    label = _CHARSET_ALIASES.get(label, label)
    try:
        name = codecs.lookup(label).name
    except (LookupError, ValueError, TypeError):
        return None
    return None if name in _BAD_CODECS else name


def decode(data: bytes, charset: str | None = None) -> str:
    """Decode bytes whose label may be missing or lying; never fails.

    Mail labelled latin-1 or ascii is very often UTF-8 in fact, and valid UTF-8 is rarely
    produced by accident, so UTF-8 is tried before an ASCII-compatible label.
    """
    codec = _codec(charset)
    if codec == "utf-8":
        codec = None  # failing UTF-8 falls back to Windows-1252, not to U+FFFD everywhere
    if data.isascii():
        if codec:
            try:
                return data.decode(codec)
            except (UnicodeDecodeError, LookupError):
                pass
        return data.decode("ascii", "replace")
    wide = codec is not None and codec.startswith(("utf-16", "utf-32"))
    for name in (codec, "utf-8") if wide else ("utf-8", codec):
        if name:
            try:
                return data.decode(name)
            except (UnicodeDecodeError, LookupError):
                pass
    if codec:
        try:
            return data.decode(codec, "replace")
        except (UnicodeDecodeError, LookupError):
            pass
    return data.decode("cp1252", "replace")


# Leading lines made only of base64 characters; whatever follows (a list footer appended
# by a mailing list, say) is plain text and stays as it is.
_B64_LINES = re.compile(rb"(?:[ \t]*[A-Za-z0-9+/=]*[ \t]*(?:\r?\n|\Z))*")
# A line of base64 with stray characters in it (mail clients skip those, so a spammer can
# sprinkle them in): one word, mostly of base64 characters.
_B64_JUNK_LINE = re.compile(rb"[ \t]*(\S+)[ \t]*(?:\r?\n|\Z)")
_NOT_B64 = re.compile(rb"[^A-Za-z0-9+/]")
_NOT_B64_OR_PAD = re.compile(rb"[^A-Za-z0-9+/=]")


def _b64_end(data: bytes) -> int:
    """Where the leading base64 lines (clean, or mostly base64 in one word) end."""
    end = 0
    while True:
        end = _B64_LINES.match(data, end).end()
        junk = _B64_JUNK_LINE.match(data, end)
        if not junk or end >= len(data):
            return end
        word = junk[1]
        if len(_NOT_B64_OR_PAD.sub(b"", word)) * 4 < len(word) * 3:
            return end
        end = junk.end()


def b64(data: bytes) -> bytes:
    """Lenient base64 that never raises: bad padding is repaired, stray characters are
    skipped as mail clients skip them, trailing text is kept raw."""
    end = _b64_end(data)
    clean = _NOT_B64.sub(b"", data[:end])
    if not clean:
        return data  # not base64 at all: the label lied
    extra = len(clean) % 4
    if extra == 1:
        clean = clean[:-1]
    elif extra:
        clean += b"=" * (4 - extra)
    try:
        decoded = binascii.a2b_base64(clean)
    except (binascii.Error, ValueError):
        return data
    rest = data[end:]
    return decoded + b"\n" + rest if rest.strip() else decoded


def transfer_decode(body: bytes, cte: str) -> bytes:
    cte = cte.strip().lower()
    if cte == "base64":
        return b64(body)
    if cte == "quoted-printable":
        try:
            return binascii.a2b_qp(body)
        except (binascii.Error, ValueError):
            return body
    return body
