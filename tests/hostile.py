"""A generated corpus of malformed mail, shared by the hostile-input tests.

Each case is named `class/variant`; the class names are the rows of the README's robustness
table, so the suite and the report count the same things. Every case is built here from
code (nothing is read from disk) and is deterministic, so a failure names one exact input.
"""

from __future__ import annotations

import base64
import random
from collections.abc import Callable
from pathlib import Path

PAYLOAD = "WINNER claim your prize at cheap-pills.example"
BIG_ATTACHMENT_BYTES = 50 * 1024 * 1024


def _mail(headers: list[str], body: bytes | str, eol: bytes = b"\r\n") -> bytes:
    if isinstance(body, str):
        body = body.encode("utf-8")
    head = eol.join(h.encode("utf-8") for h in headers)
    return head + eol + eol + body


def _multipart(parts: list[bytes], boundary: str = "b1", close: bool = True) -> bytes:
    out = b"preamble\r\n"
    for part in parts:
        out += f"--{boundary}\r\n".encode() + part + b"\r\n"
    if close:
        out += f"--{boundary}--\r\n".encode()
    return out


def _text_part(text: str, cte: str = "7bit", charset: str = "utf-8") -> bytes:
    data = text.encode("utf-8")
    if cte == "base64":
        data = base64.encodebytes(data)
    return _mail(
        [f"Content-Type: text/plain; charset={charset}", f"Content-Transfer-Encoding: {cte}"], data
    )


def _mixed(parts: list[bytes], boundary: str = "b1", close: bool = True, extra: str = "") -> bytes:
    ctype = f'Content-Type: multipart/mixed; boundary="{boundary}"{extra}'
    return _mail(["Subject: mixed", "MIME-Version: 1.0", ctype], _multipart(parts, boundary, close))


def _nested(depth: int, same_boundary: bool) -> bytes:
    raw = _text_part(PAYLOAD)
    for i in range(depth):
        b = "b" if same_boundary else f"b{i}"
        raw = _mail([f'Content-Type: multipart/mixed; boundary="{b}"'], _multipart([raw], b))
    return raw


def _nested_rfc822(depth: int) -> bytes:
    raw = _mail(["Subject: inner"], PAYLOAD)
    for _ in range(depth):
        raw = _mail(["Content-Type: message/rfc822"], raw)
    return raw


def _cases() -> dict[str, Callable[[], bytes]]:
    b64 = base64.encodebytes(PAYLOAD.encode()).decode()
    rng = random.Random(6)
    whole = _mixed([_text_part(PAYLOAD), _text_part(PAYLOAD, "base64")])
    cases: dict[str, Callable[[], bytes]] = {
        # truncated MIME: cut inside headers, inside a delimiter line, inside base64
        "truncated-mime/in-headers": lambda: whole[:30],
        "truncated-mime/in-delimiter": lambda: whole[: whole.index(b"--b1") + 3],
        "truncated-mime/in-base64": lambda: whole[: whole.rindex(b"\r\n--b1") - 7],
        "truncated-mime/no-closing-delimiter": lambda: _mixed([_text_part(PAYLOAD)], close=False),
        # missing or duplicate boundaries
        "boundaries/param-missing": lambda: _mail(
            ["Content-Type: multipart/mixed"], _multipart([_text_part(PAYLOAD)])
        ),
        "boundaries/param-empty": lambda: _mail(
            ['Content-Type: multipart/mixed; boundary=""'], _multipart([_text_part(PAYLOAD)])
        ),
        "boundaries/param-wrong": lambda: _mail(
            ['Content-Type: multipart/mixed; boundary="zz"'], _multipart([_text_part(PAYLOAD)])
        ),
        "boundaries/param-twice": lambda: _mixed([_text_part(PAYLOAD)], extra='; boundary="b2"'),
        "boundaries/delimiter-repeated": lambda: _mail(
            ['Content-Type: multipart/mixed; boundary="b1"'],
            b"--b1\r\n" * 500 + _text_part(PAYLOAD) + b"\r\n--b1--\r\n",
        ),
        "boundaries/nested-same": lambda: _nested(5, same_boundary=True),
        "boundaries/prefix-of-other": lambda: _mail(
            ['Content-Type: multipart/mixed; boundary="b"'],
            b"--b\r\n"
            + _mail(
                ['Content-Type: multipart/mixed; boundary="bb"'], b"--bb\r\n" + _text_part(PAYLOAD)
            )
            + b"\r\n--b--\r\n",
        ),
        # broken transfer encodings
        "broken-base64/bad-chars": lambda: _mail(
            ["Content-Transfer-Encoding: base64"], "!!!" + b64[:10] + "*&^%" + b64[10:]
        ),
        "broken-base64/bad-padding": lambda: _mail(
            ["Content-Transfer-Encoding: base64"], b64.rstrip("=\n") + "=\n="
        ),
        "broken-base64/one-extra-char": lambda: _mail(
            ["Content-Transfer-Encoding: base64"], b64.strip() + "Q"
        ),
        "broken-base64/not-base64": lambda: _mail(["Content-Transfer-Encoding: base64"], PAYLOAD),
        "broken-base64/all-padding": lambda: _mail(
            ["Content-Transfer-Encoding: base64"], "====\n" * 1000
        ),
        "broken-qp/bad-escapes": lambda: _mail(
            ["Content-Transfer-Encoding: quoted-printable"], "=ZZ=G1" + PAYLOAD + "=\r\n=\r\n="
        ),
        "broken-qp/soft-breaks-only": lambda: _mail(
            ["Content-Transfer-Encoding: quoted-printable"], "=\r\n" * 100_000 + PAYLOAD
        ),
        "broken-qp/unknown-cte": lambda: _mail(
            ["Content-Transfer-Encoding: x-uuencode-ish"], PAYLOAD
        ),
        # unknown and lying charsets
        "charsets/unknown": lambda: _mail(["Content-Type: text/plain; charset=x-no-such"], PAYLOAD),
        "charsets/empty": lambda: _mail(['Content-Type: text/plain; charset=""'], PAYLOAD),
        "charsets/codec-not-a-charset": lambda: _mail(
            ["Content-Type: text/plain; charset=unicode-escape"], PAYLOAD + "\\N{BOGUS}\\x"
        ),
        "charsets/ascii-but-utf8": lambda: _mail(
            ["Content-Type: text/plain; charset=us-ascii"], ("caf\u00e9 " + PAYLOAD).encode()
        ),
        "charsets/utf8-but-latin1": lambda: _mail(
            ["Content-Type: text/plain; charset=utf-8"], ("caf\u00e9 " + PAYLOAD).encode("latin-1")
        ),
        "charsets/utf16-but-ascii": lambda: _mail(
            ["Content-Type: text/plain; charset=utf-16"], PAYLOAD + "x"
        ),
        "charsets/utf7-malformed": lambda: _mail(
            ["Content-Type: text/plain; charset=utf-7"], "+AGEA-+" + PAYLOAD
        ),
        "charsets/encoded-word-bogus": lambda: _mail(
            ["Subject: =?x-bogus?Q?=FF=FE?= =?utf-8?B?!!!?= =?utf-8?Q?" + "=" * 1000 + "?="],
            PAYLOAD,
        ),
        # raw 8-bit and NUL bytes in headers
        "8bit-nul-headers/nul-in-value": lambda: (
            b"Subject: a\x00b\x00\r\nFrom: \x00\r\n\r\n" + PAYLOAD.encode()
        ),
        "8bit-nul-headers/nul-in-name": lambda: (
            b"Sub\x00ject: x\r\nTo: y\r\n\r\n" + PAYLOAD.encode()
        ),
        "8bit-nul-headers/8bit-name-and-value": lambda: (
            b"Subj\xe9ct: \xff\xfe\r\nFrom: \xc3\x28 <a@b>\r\n\r\n" + PAYLOAD.encode()
        ),
        "8bit-nul-headers/only-nul": lambda: b"\x00" * 10_000 + b"\r\n\r\n" + PAYLOAD.encode(),
        # one line of 1 MB
        "long-lines/body-1mb": lambda: _mail(["Subject: long"], "x" * 1_000_000 + " " + PAYLOAD),
        "long-lines/subject-1mb": lambda: _mail(["Subject: " + "y" * 1_000_000], PAYLOAD),
        "long-lines/header-no-colon-1mb": lambda: b"z" * 1_000_000 + b"\r\n\r\n" + PAYLOAD.encode(),
        "long-lines/html-1mb": lambda: _mail(
            ["Content-Type: text/html"], "<p>" + "<b>a</b>" * 125_000 + PAYLOAD + "</p>"
        ),
        # 10,000 header fields
        "many-headers/10k-fields": lambda: _mail([f"X-H{i}: v{i}" for i in range(10_000)], PAYLOAD),
        "many-headers/10k-received": lambda: _mail(
            [f"Received: from h{i} by h{i + 1}; Mon, 1 Jan 2024" for i in range(10_000)]
            + ["Subject: s"],
            PAYLOAD,
        ),
        "many-headers/10k-continuations": lambda: _mail(
            ["Subject: s"] + [" fold"] * 10_000, PAYLOAD
        ),
        "many-headers/10k-content-types": lambda: _mail(
            ["Content-Type: text/html"] * 10_000, PAYLOAD
        ),
        # multiparts nested 1,000 deep
        "deep-nesting/1000-distinct": lambda: _nested(1000, same_boundary=False),
        "deep-nesting/1000-same-boundary": lambda: _nested(1000, same_boundary=True),
        "deep-nesting/1000-rfc822": lambda: _nested_rfc822(1000),
        # empty input
        "empty/nothing": lambda: b"",
        "empty/one-newline": lambda: b"\n",
        "empty/blank-lines": lambda: b"\r\n\r\n\r\n",
        # random binary (seeded)
        "random-binary/4k": lambda: rng.randbytes(4096),
        "random-binary/64k": lambda: rng.randbytes(65536),
        "random-binary/1m": lambda: rng.randbytes(1_000_000),
        "random-binary/high-bytes": lambda: bytes(rng.randrange(128, 256) for _ in range(8192)),
        # only headers
        "headers-only/no-blank-line": lambda: b"Subject: s\r\nFrom: A <a@b>",
        "headers-only/blank-line-no-body": lambda: b"Subject: s\r\nFrom: A <a@b>\r\n\r\n",
        "headers-only/multipart-no-body": lambda: (
            b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n'
        ),
        "headers-only/names-without-colons": lambda: b"Subject\r\nFrom\r\nReceived",
        # only a body
        "body-only/plain": lambda: PAYLOAD.encode() + b"\r\nsecond line\r\n",
        "body-only/leading-blank-line": lambda: b"\r\n" + PAYLOAD.encode(),
        "body-only/leading-space": lambda: b"  indented " + PAYLOAD.encode() + b"\nmore\n",
        "body-only/mime-without-headers": lambda: _multipart([_text_part(PAYLOAD)]),
    }
    return cases


CASES = _cases()


def corpus() -> dict[str, bytes]:
    """Every generated case (the 50 MB attachment apart): name -> raw bytes."""
    return {name: make() for name, make in CASES.items()}


def classes(names: list[str]) -> dict[str, int]:
    """How many cases of each class (the part before the slash)."""
    out: dict[str, int] = {}
    for name in names:
        key = name.split("/", 1)[0]
        out[key] = out.get(key, 0) + 1
    return out


def write_big_attachment(
    path: Path, size: int = BIG_ATTACHMENT_BYTES, text_first: bool = False
) -> int:
    """A message with a base64 attachment of `size` decoded bytes, streamed to `path`.

    The text part comes after the attachment unless `text_first`: a payload behind a big
    attachment must not fall outside what the extraction reads. Returns the file's size.
    """
    line = base64.b64encode(bytes(range(57)) * 1) + b"\r\n"  # 57 bytes -> one 76-char line
    head = _mail(
        ["Subject: big", "MIME-Version: 1.0", 'Content-Type: multipart/mixed; boundary="big"'], b""
    )
    attach = b"--big\r\n" + _mail(
        ["Content-Type: application/octet-stream; name=a.bin", "Content-Transfer-Encoding: base64"],
        b"",
    )
    text = b"--big\r\n" + _text_part(PAYLOAD) + b"\r\n"
    with open(path, "wb") as out:
        out.write(head)
        if text_first:
            out.write(text)
        out.write(attach)
        chunk = line * 10_000
        for _ in range(size // (57 * 10_000)):
            out.write(chunk)
        out.write(line * ((size // 57) % 10_000))
        if not text_first:
            out.write(text)
        out.write(b"--big--\r\n")
    return path.stat().st_size
