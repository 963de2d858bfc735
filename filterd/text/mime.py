"""The MIME walk: a raw RFC 5322 message to the text the model reads.

The trainer and the runtime both call it, so a message is seen the same way when
it is learned and when it is judged. Anything that would only tell the model *which corpus*
a mail came from (routing headers, addresses) is left out, and every step is capped so a
hostile mail costs bounded time and memory.

Bump TEXT_VERSION whenever the output of message_text or normalize_text changes: a checkpoint
records the version it learned from, so loading one from an older version can say that
retraining would align it with what it now reads.
"""

from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass
from email.message import Message

from filterd.text.charset import decode, transfer_decode
from filterd.text.cut import head_and_tail
from filterd.text.fields import (
    content_info,
    decode_words,
    display_name,
    part_headers,
    sniff_boundary,
    split_headers,
)
from filterd.text.html import html_to_text
from filterd.text.plain import cap, normalize_text

# v2: every default-ignorable code point dropped, Latin look-alikes folded in mixed words,
# and the caps keep the head and the tail (bytes, parts) or flatten (depth) instead of cutting.
# v3: past max_bytes, a line longer than the cut keeps its own head and tail, and the tail
# gets back the MIME headers of the parts it starts inside (cut.py).
# v4: multipart/alternative reads the HTML version a client shows, not the plain one.
TEXT_VERSION: int = 4


@dataclass(frozen=True)
class TextLimits:
    """Caps on work per message, so hostile mail costs bounded time and memory."""

    max_bytes: int = 2_000_000  # raw bytes parsed; the rest is ignored
    max_parts: int = 200  # MIME parts walked
    max_depth: int = 30  # multipart nesting followed
    max_chars: int = 100_000  # characters of text extracted (keep head 3/4 and tail 1/4 when over)


class _Walker:
    """Collects the text blocks of one message, counting parts against the limits."""

    def __init__(self, limits: TextLimits) -> None:
        self.limits = limits
        self.parts = 0
        self.blocks: list[str] = []

    def message(self, data: bytes, depth: int) -> None:
        headers, body = split_headers(data)
        lines = []
        subject = decode_words(headers.get("subject", ""))
        if subject:
            lines.append(f"Subject: {subject}")
        name = display_name(headers.get("from", ""))
        if name:
            lines.append(f"From: {name}")
        if lines:
            self.blocks.append("\n".join(lines))
        self.part(headers, body, depth, "text/plain")

    def part(self, headers: dict[str, str], body: bytes, depth: int, default: str) -> None:
        if self.parts >= self.limits.max_parts:
            return
        self.parts += 1
        if depth > self.limits.max_depth:
            # Too deep to walk: its text with the MIME scaffolding removed, so nesting a
            # payload past the cap does not hide it.
            self.blocks.append(_MIME_LINE.sub("", decode(body)))
            return
        try:
            self._part(headers, body, depth, default)
        except RecursionError:
            raise
        except Exception:  # one broken part should not cost the rest of the message
            pass

    def _part(self, headers: dict[str, str], body: bytes, depth: int, default: str) -> None:
        headers = part_headers(headers, body, default)
        info = content_info(headers, default)
        ctype = info.get_content_type()
        main = ctype.split("/", 1)[0]
        cte = headers.get("content-transfer-encoding", "")
        if main == "multipart":
            self.multipart(info, body, depth)
        elif ctype in ("message/rfc822", "message/global", "text/rfc822-headers"):
            self.message(transfer_decode(body, cte), depth + 1)
        elif main != "text" or info.get_content_disposition() == "attachment":
            name = decode_words(info.get_filename() or "")[:200]
            self.blocks.append(f"[attachment: {name or ctype}]")
        else:
            text = decode(transfer_decode(body, cte), info.get_content_charset())
            # HTML sent as text/plain is rendered as HTML by the clients spammers target.
            if ctype == "text/html" or (ctype == "text/plain" and _HTML_START.match(text)):
                # Markup outweighs text many times over; past this the parse costs seconds.
                text = html_to_text(cap(text, 4 * self.limits.max_chars))
            self.blocks.append(text)

    def multipart(self, info: Message, body: bytes, depth: int) -> None:
        room = self.limits.max_parts - self.parts
        kids = _split_multipart(body, info.get_boundary(), room)
        if kids is None:  # boundary missing or wrong: look for the one the body uses
            kids = _split_multipart(body, sniff_boundary(body[:65536]), room)
        if kids is None:  # no parts at all: the stdlib also keeps such a body as text
            self.blocks.append(_MIME_LINE.sub("", decode(body)))
            return
        subtype = info.get_content_subtype()
        default = "message/rfc822" if subtype == "digest" else "text/plain"
        kids = [split_headers(kid) for kid in kids]
        if subtype != "alternative":
            for headers, body in kids:
                self.part(headers, body, depth + 1, default)
            return
        # multipart/alternative: the version a mail client shows, its last HTML (or
        # multipart) one, since a plain version nobody reads can carry innocent words; then
        # the plain one, then the rest, each taken only if it says anything.
        shown, plain, rest = [], [], []
        for kid in kids:
            kind = content_info(kid[0], default)
            ctype = kind.get_content_type()
            if kind.get_content_disposition() == "attachment":
                rest.append(kid)
            elif ctype == "text/html" or ctype.startswith("multipart/"):
                shown.append(kid)
            else:
                (plain if ctype == "text/plain" else rest).append(kid)
        for headers, body in shown[::-1] + plain[::-1] + rest[::-1]:
            mark = len(self.blocks)
            self.part(headers, body, depth + 1, default)
            if any(not block.isspace() and block for block in self.blocks[mark:]):
                return
            del self.blocks[mark:]


def _split_multipart(body: bytes, boundary: str | None, room: int) -> list[bytes] | None:
    """Raw bytes of at most `room` body parts; None if the boundary never appears. Past
    `room` parts, the first 3/4 and the last 1/4 are kept: a payload after a run of empty
    parts is still read.

    Some mailers put spaces into the delimiter lines that the boundary parameter lacks, so
    when the exact delimiter is absent a whitespace-blind one is tried.
    """
    if not boundary:
        return None
    if room <= 0:
        return []
    mark = boundary.encode("utf-8", "replace")
    kids = _cut(body, re.escape(mark), room)
    if kids is None:
        loose = rb"[ \t]*".join(re.escape(bytes([c])) for c in mark if c not in b" \t")
        kids = _cut(body, rb"[ \t]*" + loose, room)
    return kids


def _cut(body: bytes, mark: bytes, room: int) -> list[bytes] | None:
    delimiter = re.compile(rb"^--" + mark + rb"(--)?[ \t]*\r?$", re.M)
    tail_room = room // 4
    head: list[tuple[int, int]] = []  # spans, not slices: bytes are copied once, at the end
    tail: deque[tuple[int, int]] = deque(maxlen=tail_room or None)
    start = None
    for m in delimiter.finditer(body):
        if start is not None:
            end = m.start()  # the line break before a delimiter belongs to it
            if body[end - 1 : end] == b"\n":
                end -= 1
            if body[end - 1 : end] == b"\r":
                end -= 1
            if len(head) < room - tail_room:
                head.append((start, max(end, start)))
            elif tail_room:
                tail.append((start, max(end, start)))
            else:
                break
        if m[1]:  # closing delimiter: the epilogue is not part of the message
            start = None
            break
        start = m.end() + (body[m.end() : m.end() + 1] == b"\n")
    else:
        if start is None:
            return None
    if start is not None:  # the last part, never closed
        if len(head) < room - tail_room:
            head.append((start, len(body)))
        elif tail_room:
            tail.append((start, len(body)))
    return [body[a:b] for a, b in [*head, *tail]]


_HTML_START = re.compile(
    r"\s*<(?:!--|(?:!doctype|x-html|html|head|body|font|center|table|div|p|b)\b)", re.I
)
_MIME_LINE = re.compile(r"^--\S*[ \t]*$|^Content-[\w-]+:.*$", re.M | re.I)


def _fallback(raw: bytes) -> str:
    """Last resort when parsing fails: the body bytes as text, minus MIME scaffolding."""
    try:
        _, body = split_headers(raw)
    except Exception:
        body = raw
    return _MIME_LINE.sub("", decode(body))


def message_text(raw: bytes, limits: TextLimits = TextLimits()) -> str:
    """The text the model reads for one raw RFC 5322 / MIME message.

    `Subject: ...`, `From: <display name>`, a blank line, then the visible body text, all
    normalized and capped. Never raises: a spam filter must not crash on the mail it is
    meant to judge.
    """
    try:
        if isinstance(raw, str):  # be forgiving to callers that already decoded the mail
            raw = raw.encode("utf-8", "replace")
        # One line-ending convention, so bare-CR mail cannot fold the body into a header.
        raw = head_and_tail(raw, limits.max_bytes).replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        if raw.startswith(b"From "):  # mbox separator line
            newline = raw.find(b"\n")
            raw = raw[newline + 1 :] if newline >= 0 else b""
        raw = raw.lstrip(b"\n")  # else the headers would be read as body text
        try:
            walker = _Walker(limits)
            walker.message(raw, 0)
            text = "\n\n".join(walker.blocks)
        except Exception:  # RecursionError on absurd limits, anything on hostile bytes
            text = _fallback(raw)
        if len(text) > 4 * limits.max_chars:  # bound the cost of normalizing
            text = cap(text, 4 * limits.max_chars)
        return cap(normalize_text(text), limits.max_chars)
    except Exception:
        return ""
