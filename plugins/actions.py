"""The built-in actions a verdict names: tag, quarantine, reject. Each only decides: the
source that brought the message in places it (relays it, files it, answers the sender)."""

from __future__ import annotations

from filterd.mail import Mail
from filterd.plugin_api import Action, Context, Outcome
from filterd.verdict import Verdict


class Tag(Action):
    """Deliver with filterd's headers added (or untouched if already scored)."""

    inline = True

    def apply(self, mail: Mail, verdict: Verdict, context: Context) -> Outcome:
        return Outcome("deliver", context.tagger.tag(mail.raw, verdict))


class Quarantine(Action):
    """Keep it from its recipients: the source holds it (the quarantine store, or a Maildir's
    Junk folder with the tagged copy). Tagging only computes, so it runs inline."""

    inline = True

    def apply(self, mail: Mail, verdict: Verdict, context: Context) -> Outcome:
        return Outcome("quarantine", context.tagger.tag(mail.raw, verdict))


class Reject(Action):
    """Refuse the message (SMTP 550 where the source can still refuse)."""

    inline = True

    def apply(self, mail: Mail, verdict: Verdict, context: Context) -> Outcome:
        return Outcome("reject", note=verdict.reason or f"spam probability {verdict.probability}")
