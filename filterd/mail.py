"""A message as it was received: its exact bytes plus the SMTP envelope, when there is one.

Checks look at the envelope sender beside the From header, and the quarantine keeps the
envelope so a released message reaches the recipients it was meant for.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from email.message import Message
from email.parser import BytesHeaderParser
from email.policy import compat32
from email.utils import getaddresses

# Headers are read from this much of the message at most: hostile mail costs bounded work.
_HEAD_BYTES = 256 * 1024
_BLANK_LINE = re.compile(rb"\r?\n\r?\n")


@dataclass(frozen=True)
class Mail:
    raw: bytes
    mail_from: str | None = None  # envelope sender (MAIL FROM); "" is the null sender
    rcpt_tos: tuple[str, ...] = field(default_factory=tuple)
    origin: str = ""  # where it came from, for reports: a path, "-" for stdin, a peer

    @functools.cached_property
    def _head(self) -> Message | None:
        """The header, parsed once for every check and log line that reads it."""
        head = self.raw[:_HEAD_BYTES]
        if head.startswith(b"From "):  # mbox separator line
            head = head[head.find(b"\n") + 1 :] if b"\n" in head else b""
        if end := _BLANK_LINE.search(head):  # the body is not parsed
            head = head[: end.end()]
        try:
            return BytesHeaderParser(policy=compat32).parsebytes(head)
        except Exception:  # a malformed header is no header, not a crash
            return None

    def header(self, name: str) -> str | None:
        """The first `name` header's value (e.g. Message-ID, for logs), never raising."""
        try:
            value = None if self._head is None else self._head.get(name)
            return None if value is None else str(value)
        except Exception:  # a malformed header is no header, not a crash
            return None

    def header_addresses(self, name: str) -> list[str]:
        """Lower-cased addresses in the first `name` header (e.g. From), never raising."""
        value = self.header(name)
        try:
            pairs = getaddresses([value]) if value is not None else []
        except Exception:  # a malformed header is no address, not a crash
            return []
        return [addr.lower() for _, addr in pairs if "@" in addr]
