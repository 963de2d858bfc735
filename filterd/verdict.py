"""What filterd decided about one message, and which action that calls for.

Kept apart from the engine so headers, actions and sources can read a verdict without
loading the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

ActionName = Literal["tag", "quarantine", "reject"]


@dataclass(frozen=True)
class Verdict:
    probability: float | None  # None when a check or a valid marker decided without the model
    is_spam: bool
    action: ActionName
    threshold: float
    model: str
    decided_by: str = "model"  # "model", "marker" (already scored) or "check:<name>"
    reason: str = ""  # what a check found, e.g. "allowlisted=example.org"

    @property
    def label(self) -> str:
        return "spam" if self.is_spam else "ham"

    @property
    def points(self) -> float:
        """SpamAssassin-style score: probability x 10, so required=5.0 reads naturally."""
        if self.probability is None:
            return 10.0 if self.is_spam else 0.0
        return round(self.probability * 10, 1)


def log_fields(verdict: Verdict | None, none: str = "unscored") -> str:
    """The verdict part of every source's line per message: `label=ham score=0.1192
    action=tag`; a check or a marker decided: `label=spam decided_by=check:lists score=-
    action=reject`; no verdict: `label=- score=- action=unscored` (or `none`)."""
    if verdict is None:
        return f"label=- score=- action={none}"
    p = verdict.probability
    by = "" if verdict.decided_by == "model" else f" decided_by={verdict.decided_by}"
    score = f"{p:.4f}" if p is not None and verdict.decided_by == "model" else "-"
    return f"label={verdict.label}{by} score={score} action={verdict.action}"


def action_for(
    probability: float, quarantine_threshold: float | None, reject_threshold: float | None
) -> ActionName:
    """The strongest action whose threshold the probability reaches; tagging otherwise."""
    if reject_threshold is not None and probability >= reject_threshold:
        return "reject"
    if quarantine_threshold is not None and probability >= quarantine_threshold:
        return "quarantine"
    return "tag"
