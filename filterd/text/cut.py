"""The byte cap: what is read of a message too big to parse whole.

Past `max_bytes` the first 3/4 and the last 1/4 of the raw message are kept. Cut blindly,
the tail loses its context: a text part whose MIME header lies in the dropped middle is
glued onto whatever part the head ends in (a base64 attachment, say), and a line longer
than the cut vanishes whole. So each cut point moves to a nearby line start (a long line is
cut inside, keeping its own head and tail), and the delimiter line and MIME header of every
part the tail starts inside are put back in front of the tail.

Finding those headers reads the middle of a MIME message back from the tail, a chunk at a
time, with C-speed searches only: time linear in the message (at most 4 passes, and at
most 100 x max_bytes in all), memory a chunk. The message is read through
read(offset, length), so a file can be cut without reading all of it (`cut_file`).
"""

from __future__ import annotations

import re
from collections.abc import Callable

from filterd.text.fields import content_info, part_headers, sniff_boundary, split_headers

Read = Callable[[int, int], bytes]  # (offset, length) -> at most length bytes from offset

_SLACK = 1000  # a cut point moves at most this far to a line start (mail lines are shorter)
_CHUNK = 1 << 16  # bytes searched at a time for a delimiter line
_HEADER_BYTES = 1 << 16  # bytes of a part's header block read
_MAX_LEVELS = 30  # nested parts put back in front of the tail (TextLimits.max_depth)
_MESSAGE = ("message/rfc822", "message/global", "text/rfc822-headers")
_BLANK_LINES = re.compile(rb"[\r\n]*")


def head_and_tail(raw: bytes, max_bytes: int) -> bytes:
    """At most max_bytes: the first 3/4 and the last 1/4, cut at line starts (a line longer
    than the cut keeps its own head and tail), with the MIME headers of the parts the tail
    starts inside put back in front of it, so a text part behind a big attachment is read
    as text. Cutting again changes nothing."""
    if len(raw) <= max_bytes:
        return bytes(raw)
    with memoryview(raw) as view:
        return cut_file(lambda at, length: bytes(view[at : at + length]), len(raw), max_bytes)


def cut_file(read: Read, size: int, max_bytes: int) -> bytes:
    """head_and_tail of a message of `size` bytes that read(offset, length) returns (a
    file: os.pread), reading only the head and the tail it keeps and, for a MIME message,
    the middle a chunk at a time. A short read (a file truncated meanwhile) gives a shorter
    result, never an error."""
    if size <= max_bytes:
        return read(0, size)
    tail = size - max_bytes // 4
    newline = read(tail - 1, _SLACK + 1).find(b"\n")
    resume = tail + newline if newline >= 0 else tail
    budget = min(4 * size, 100 * max_bytes)
    levels, body = _anchors(read, resume, budget)
    if levels and body > resume:  # the tail starts inside a part's header block: at its body
        resume, newline = body, 0
    bridge_size = sum(len(level) for _, level in levels)
    if bridge_size > max_bytes // 4:  # absurd nesting: not worth the head it would cost
        levels, bridge_size = [], 0
    room = max(max_bytes - (size - resume) - bridge_size - 1, 0)
    head = read(0, room + 1)  # one byte more: is the first byte left out inside a character?
    cut = _cut_before(head, min(room, len(head)))
    if newline < 0:  # inside a long line: line up with the head, so base64 stays in step
        resume += (cut - resume) % 4
    last = read(resume, size - resume)
    skip = 0
    while newline < 0 and skip < min(3, len(last)) and 0x80 <= last[skip] < 0xC0:
        skip += 1  # not inside a UTF-8 character either
    bridge = b"".join(level for end, level in levels if end > cut)
    sep = b"\n" if cut and head[cut - 1] != 0x0A else b""
    return b"".join([memoryview(head)[:cut], sep, bridge, memoryview(last)[skip:]])


def _cut_before(head: bytes, pos: int) -> int:
    """Where the head ends: the start of the line holding pos if it is near, else inside that
    (long) line, at a multiple of 4 bytes from its start and not inside a UTF-8 character."""
    newline = head.rfind(b"\n", max(pos - _SLACK, 0), pos)
    if newline >= 0:
        return newline + 1
    start = head.rfind(b"\n", 0, pos) + 1
    cut = pos - (pos - start) % 4
    for _ in range(3):
        if cut <= start or cut >= len(head) or not 0x80 <= head[cut] < 0xC0:
            break
        cut -= 1
    return cut


def _anchors(read: Read, resume: int, budget: int) -> tuple[list[tuple[int, bytes]], int]:
    """The delimiter line and MIME header of each part that `resume` lies inside, outermost
    first, each with where its header ends; and where the innermost part's body starts.

    The headers are rebuilt from the fields the text needs (at most a few KB each). The
    walk follows what message_text does with the same bytes: an mbox line and blank lines
    skipped, a boundary sniffed when the Content-Type is missing, digest parts as messages.
    """
    piece = read(0, _HEADER_BYTES)
    start = piece.find(b"\n") + 1 if piece.startswith(b"From ") else 0
    if piece.startswith(b"From ") and not start:
        return [], 0
    offset = 0
    while piece:  # blank lines before the header
        start = offset + _BLANK_LINES.match(piece, start - offset).end()
        if start < offset + len(piece):
            break
        offset, piece = start, read(start, _CHUNK)
    headers, body = _header_block(read, start)
    levels: list[tuple[int, bytes]] = []
    default = "text/plain"
    while len(levels) < _MAX_LEVELS and body <= resume:
        headers = part_headers(headers, read(body, 1024), default)
        info = content_info(headers, default)
        cte = headers.get("content-transfer-encoding", "").strip().lower()
        if info.get_content_type() in _MESSAGE and cte not in ("base64", "quoted-printable"):
            headers, body = _header_block(read, body)  # the enclosed message's own header
            if levels:
                levels[-1] = (body, levels[-1][1] + _rebuilt(headers))
            default = "text/plain"
            continue
        if info.get_content_maintype() != "multipart":
            break
        boundary = info.get_boundary() or sniff_boundary(read(body, 65536))
        if not boundary:
            break
        found, budget = _last_delimiter(read, boundary, body, resume, budget)
        if found is None:
            break
        line_end, closing = found
        line = b"--" + boundary.encode("utf-8", "replace") + (b"--\n" if closing else b"\n")
        if closing:  # the tail is in the epilogue, which is no part of the message
            levels.append((line_end, line))
            break
        headers, body = _header_block(read, line_end + 1)
        levels.append((body, line + _rebuilt(headers)))
        default = "message/rfc822" if info.get_content_subtype() == "digest" else "text/plain"
    return levels, body


def _header_block(read: Read, at: int) -> tuple[dict[str, str], int]:
    """The header fields at `at` (the first _HEADER_BYTES of the block) and where the body
    after them starts."""
    data = read(at, _HEADER_BYTES)
    headers, rest = split_headers(data)
    return headers, at + len(data) - len(rest)


def _rebuilt(headers: dict[str, str]) -> bytes:
    """A header block holding the fields message_text reads, and the blank line after it."""
    lines = [f"{name}: {value.replace(chr(13), ' ')}\n" for name, value in headers.items()]
    return "".join(lines).encode("utf-8", "replace") + b"\n"


def _last_delimiter(
    read: Read, boundary: str, lo: int, hi: int, budget: int
) -> tuple[tuple[int, bool] | None, int]:
    """Where the last delimiter line of boundary between lo and hi ends (its line break)
    and whether it is the closing one; None if there is none, or the budget ran out.

    Searched back from hi a chunk at a time; a chunk where the boundary follows a line
    break is searched again with its spaces, tabs and CRs removed, so that a delimiter line
    (trailing white space allowed) is one exact byte string: no per-line Python work,
    whatever lines the message is made of. Such a chunk costs the budget 4 times its size.
    """
    prefix = b"\n--" + boundary.encode("utf-8", "replace")
    mark = prefix.translate(None, b" \t\r")
    opening, closing = mark + b"\n", mark + b"--\n"
    first = max(lo - 1, 0)  # the line break before the body
    end = hi
    while end > first and budget > 0:
        start = max(end - _CHUNK, first)
        if start > first:  # begin at a line break, unless the line is too long to be a delimiter
            before = max(start - _SLACK, first)
            newline = read(before, start + 1 - before).rfind(b"\n")
            start = before + newline if newline >= 0 else start
        piece = read(start, end - start)
        budget -= len(piece)
        if prefix in piece:
            budget -= 3 * len(piece)
            chunk = piece.translate(None, b" \t\r")
            at = max(chunk.rfind(opening), chunk.rfind(closing))
            if at >= 0:
                # The delimiter is the line after the chunk's k-th line break (from 0).
                k = chunk.count(b"\n", 0, at)
                lines = piece.split(b"\n", k + 2)
                line_start = start + len(b"\n".join(lines[: k + 1])) + 1
                return (line_start + len(lines[k + 1]), chunk.startswith(closing, at)), budget
        if start == first or not piece:
            break
        end = start + 1 if piece[:1] == b"\n" else start
    return None, budget
