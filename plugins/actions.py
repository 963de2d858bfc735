"""The built-in actions a verdict names: tag, quarantine, reject."""

from __future__ import annotations

from filterd.engine import Engine
from filterd.mail import Mail
from filterd.plugin_api import Action, Outcome
from filterd.verdict import Verdict


class Tag(Action):
    """Deliver with filterd's headers added (or untouched if already scored)."""

    inline = True

    def apply(self, mail: Mail, verdict: Verdict, engine: Engine) -> Outcome:
        return Outcome("deliver", engine.tagger.tag(mail.raw, verdict))


class Quarantine(Action):
    """Hold the original bytes and envelope in the quarantine store; deliver nothing."""

    def apply(self, mail: Mail, verdict: Verdict, engine: Engine) -> Outcome:
        return Outcome("quarantined", note=engine.store.add(mail, verdict))


class Reject(Action):
    """Refuse the message (SMTP 550 where the source can still refuse)."""

    inline = True

    def apply(self, mail: Mail, verdict: Verdict, engine: Engine) -> Outcome:
        return Outcome("reject", note=verdict.reason or f"spam probability {verdict.probability}")
