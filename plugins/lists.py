"""Allow and block lists by sender address or domain: decided without the model.

Entries are `user@example.org` (that address) or `example.org` (that domain and its
subdomains). Both the From header and the envelope sender are matched; a block entry wins
over an allow entry, because either address can be forged and a forged From must not
carry spam past a block. Verdicts say which entry decided, e.g. `allowlisted=example.org`.
"""

from __future__ import annotations

import re

from pydantic import Field, field_validator

from filterd.mail import Mail
from filterd.plugin_api import Check, Decision, Options
from filterd.verdict import ActionName, Verdict

_ENTRY = re.compile(r"([^\s@]+@)?[a-z0-9-]+(\.[a-z0-9-]+)*")


class ListsOptions(Options):
    allow: list[str] = Field(default_factory=list)
    block: list[str] = Field(default_factory=list)
    block_action: ActionName = "tag"  # what a blocklisted message gets: tag, quarantine, reject

    @field_validator("allow", "block")
    @classmethod
    def _entries(cls, entries: list[str]) -> list[str]:
        clean = [e.strip().lower().rstrip(".") for e in entries]
        bad = [e for e in clean if not _ENTRY.fullmatch(e)]
        if bad:
            raise ValueError(f"not an address or domain: {bad[0]!r}")
        return clean


def _match(address: str, entries: list[str]) -> str | None:
    domain = address.rpartition("@")[2]
    for entry in entries:
        if address == entry or domain == entry or domain.endswith("." + entry):
            return entry
    return None


class ListsCheck(Check):
    Options = ListsOptions
    stage = "pre"
    options: ListsOptions

    def check(self, mail: Mail, verdict: Verdict | None) -> Decision | None:
        senders = mail.header_addresses("From")
        if mail.mail_from:
            senders.append(mail.mail_from.strip("<>").lower())
        for listed, spam, word in (
            (self.options.block, True, "blocklisted"),
            (self.options.allow, False, "allowlisted"),
        ):
            for address in senders:
                entry = _match(address, listed)
                if entry:
                    action = self.options.block_action if spam else "tag"
                    return Decision(spam, f"{word}={entry}", action)
        return None
