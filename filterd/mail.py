"""A message as it was received: its exact bytes plus the SMTP envelope, when there is one.

Checks look at the envelope sender beside the From header, and the quarantine keeps the
envelope so a released message reaches the recipients it was meant for.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from email.utils import getaddresses

from filterd.headers import header_fields

# Headers are read from this much of the message at most: hostile mail costs bounded work.
_HEAD_BYTES = 256 * 1024
# Mail begins with a header field (after an mbox "From " line, if any).
_FIRST_FIELD = re.compile(rb"(?:From [^\n]*\n)?[\x21-\x39\x3b-\x7e]+[ \t]*:")


@dataclass(frozen=True)
class Mail:
    raw: bytes
    mail_from: str | None = None  # envelope sender (MAIL FROM); "" is the null sender
    rcpt_tos: tuple[str, ...] = field(default_factory=tuple)
    origin: str = ""  # where it came from, for reports: a path, "-" for stdin, a peer

    @property
    def has_header(self) -> bool:
        """Whether it begins as mail does, with a header field: a binary or a bare text
        piped in by mistake does not, and is worth a warning (it is still scored)."""
        return _FIRST_FIELD.match(self.raw) is not None

    @functools.cached_property
    def _fields(self) -> dict[bytes, bytes]:
        """The first field of each name, found once for every check and log line (by the
        splitter tagging uses: a fifth of the email package's time)."""
        first: dict[bytes, bytes] = {}
        for name, line in header_fields(self.raw[:_HEAD_BYTES]):
            first.setdefault(name, line)
        return first

    def header(self, name: str) -> str | None:
        """The first `name` header's value, unfolded (e.g. Message-ID, for logs)."""
        line = self._fields.get(name.lower().encode("ascii", "replace"))
        if line is None:
            return None
        return " ".join(line.partition(b":")[2].decode("utf-8", "replace").split())

    def header_addresses(self, name: str) -> list[str]:
        """Lower-cased addresses in the first `name` header (e.g. From), never raising."""
        value = self.header(name)
        try:
            pairs = getaddresses([value]) if value is not None else []
        except Exception:  # a malformed header is no address, not a crash
            return []
        return [addr.lower() for _, addr in pairs if "@" in addr]
