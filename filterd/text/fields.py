"""Header fields as the text extractor needs them: a linear split of the header block,
encoded words, the From display name, and the content type of a part."""

from __future__ import annotations

import binascii
import re
from email.message import Message

from filterd.text.charset import b64, decode

# A header block ends at the first line that is neither "Name: value" nor a continuation,
# the way the stdlib feedparser decides it; one regex keeps it linear.
# A continuation line with no field before it is body text, not a header to drop.
_HEADER_BLOCK = re.compile(rb"(?:[\x21-\x39\x3b-\x7e]+:[^\n]*(?:\n|\Z)(?:[ \t][^\n]*(?:\n|\Z))*)*")
_FOLD = re.compile(rb"\r?\n(?=[ \t])")
_WANTED = re.compile(
    rb"^(subject|from|content-type|content-disposition|content-transfer-encoding)[ \t]*:(.*)",
    re.I | re.M,
)
_MAX_HEADER = 4096  # bytes kept of a header; the stdlib param parser is quadratic in it

_ENCODED_WORD = re.compile(r"=\?([^?\s]+)\?([bBqQ])\?([^?\s]*)\?=")
_SNIFF = re.compile(
    rb'^--([^\s"]{1,200})[ \t]*\r?\nContent-(?:Type|Transfer-Encoding):', re.M | re.I
)


def split_headers(data: bytes) -> tuple[dict[str, str], bytes]:
    """Headers we use (first occurrence wins) and the body.

    Only the headers the text needs are kept at all: routing headers such as Received or
    Delivered-To identify the collection a mail came from, not whether it is spam.
    """
    end = _HEADER_BLOCK.match(data).end()
    block, body = data[:end], data[end:]
    if body.startswith(b"\r\n"):
        body = body[2:]
    elif body.startswith(b"\n"):
        body = body[1:]
    headers: dict[str, str] = {}
    for m in _WANTED.finditer(_FOLD.sub(b"", block)):
        key = m[1].lower().decode("ascii")
        if key not in headers:
            headers[key] = decode(m[2][:_MAX_HEADER].strip())
    return headers, body


def decode_words(value: str) -> str:
    """Decode RFC 2047 encoded words, joining adjacent ones so split multibyte chars survive."""
    out: list[str] = []
    run: list[bytes] = []
    run_charset = None
    pos = 0
    for m in _ENCODED_WORD.finditer(value):
        gap = value[pos : m.start()]
        charset = m[1].split("*", 1)[0]  # RFC 2231 adds *language
        joined = bool(run) and (not gap or gap.isspace())  # space between words is dropped
        if run and not (joined and charset.lower() == run_charset.lower()):
            out.append(decode(b"".join(run), run_charset))
            run = []
        if not joined:
            out.append(gap)
        payload = m[3].encode("latin-1", "replace")
        run.append(b64(payload) if m[2] in "bB" else binascii.a2b_qp(payload, header=True))
        run_charset = charset
        pos = m.end()
    if run:
        out.append(decode(b"".join(run), run_charset))
    out.append(value[pos:])
    return " ".join("".join(out).split())


def display_name(value: str) -> str:
    """The sender's display name, never the address: addresses name the corpus, not spam."""
    if "<" in value:
        name = value[: value.index("<")]
    elif "(" in value and ")" in value:
        name = value[value.index("(") + 1 : value.rindex(")")]
    else:
        return ""
    name = decode_words(name.strip().strip("\"'").replace('\\"', '"'))
    return " ".join(word for word in name.split() if "@" not in word).strip("\"' ")


def content_info(headers: dict[str, str], default: str) -> Message:
    """A stdlib Message holding only the MIME headers, for its parameter parsing."""
    info = Message()
    info.set_default_type(default)
    for key in ("content-type", "content-disposition"):
        if key in headers:
            info[key] = headers[key]
    return info


def sniff_boundary(head: bytes) -> str | None:
    """The boundary of the first delimiter line followed by a MIME header, if any."""
    m = _SNIFF.search(head)
    return m[1].decode("latin-1") if m else None


def part_headers(headers: dict[str, str], body: bytes, default: str) -> dict[str, str]:
    """The headers of a part, with a multipart Content-Type when a MIME body lost its own
    (common in old spam): reading it as the parts it plainly is beats showing base64."""
    if "content-type" not in headers and default == "text/plain":
        boundary = sniff_boundary(body[:1024])
        if boundary:
            return {**headers, "content-type": f'multipart/mixed; boundary="{boundary}"'}
    return headers
