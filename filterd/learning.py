"""Labels in: every way a person tells filterd "this is spam" or "this is ham" (`filterd
learn`, `filterd quarantine release`, scripts through `filterd.learn`) records into this
host's feedback store, with what filterd had said about the message when its marker vouches
for it. `stores` adds, for reading, the stores of the other hosts of a fleet."""

from __future__ import annotations

import os

from filterd.config import Config, load_config
from filterd.headers import SecretError, Tagger, load_secret
from filterd.mail import Mail
from filterd.store.feedback import FeedbackError, FeedbackStore, Record, text_key
from filterd.text import message_text


def open_store(config: Config) -> FeedbackStore:
    """This host's store: the one labels go into."""
    learning = config.learning
    return FeedbackStore(learning.store_path(), learning.max_messages, learning.retention_days)


def stores(config: Config, problems: list[str] | None = None) -> list[FeedbackStore]:
    """This host's store, then each other one under learning.fleet_store: its subfolders,
    but hidden ones (an NFS server's .snapshot, a sync tool's temporary folder) and those
    without a readable labels/ folder (lost+found, a store copied in as another user: said
    in `problems`). The others are read here, never written or pruned: each belongs to the
    host that writes it."""
    own = open_store(config)
    fleet = config.learning.fleet_store
    if fleet is None or not fleet.expanduser().is_dir():
        return [own]
    found = [own]
    try:
        folders = sorted(fleet.expanduser().iterdir())
    except OSError as e:
        if problems is not None:
            problems.append(f"{fleet}: cannot read ({e.strerror or e}): no other host's store read")
        return found
    for folder in folders:
        if folder.name.startswith(".") or not folder.is_dir():
            continue
        if folder.resolve() == own.root.resolve():
            continue
        try:
            os.scandir(folder / "labels").close()
        except FileNotFoundError:  # not a store, or one with no label yet
            continue
        except OSError as e:
            if problems is not None:
                problems.append(f"{folder}: cannot read ({e.strerror or e}): not read as a store")
            continue
        found.append(FeedbackStore(folder))
    return found


def _verdict(raw: bytes, config: Config) -> dict | None:
    """filterd's earlier verdict from the message's marker, if this host's secret verifies
    it. A learner that cannot read the secret (another user) records no verdict."""
    path = config.headers.secret_path()
    if not path.exists():
        return None
    try:
        secret = load_secret(path)
    except SecretError:
        return None
    previous = Tagger(secret, config.headers.prefix).previous(raw)
    if previous is None:
        return None
    return {"is_spam": previous[0], "probability": previous[1]}


def _text(raw: bytes, config: Config) -> str:
    if not Mail(raw).has_header:
        raise FeedbackError("not a mail message: it does not begin with a header field")
    return message_text(raw, config.limits.text_limits())


def learn(
    raw: bytes,
    label: str,
    *,
    source: str = "api",
    kind: str = "feedback",
    config: Config | None = None,
    when: str | None = None,
    host: str | None = None,
    prune: bool = True,
) -> str:
    """Record that a message is ham or spam; returns "added", "replaced", "unchanged" or
    "kept newer". `when` (UTC, ISO 8601) and `host` say when and where the label was
    given, for stores fed from several machines; newest wins. `prune=False` leaves the
    retention rule to the caller (once after a batch, not per message)."""
    config = config or load_config()
    store = open_store(config)
    outcome = store.add(
        raw,
        _text(raw, config),
        label,
        source,
        kind=kind,
        verdict=_verdict(raw, config),
        when=when,
        host=host,
    )
    if prune:
        store.prune()
    return outcome


def forget(raw: bytes, config: Config | None = None) -> Record:
    """Remove a message's label from this host's store; FeedbackError if it holds none
    (naming the other hosts' stores that do: only their own host forgets there)."""
    config = config or load_config()
    text = _text(raw, config)
    try:
        return open_store(config).forget(text)
    except FeedbackError as e:
        elsewhere = [str(s.root) for s in stores(config)[1:] if s.get(text_key(text))]
        if not elsewhere:
            raise
        raise FeedbackError(
            f"{e}; labelled in {', '.join(elsewhere)}: forget it on that host, or label it "
            "again here (the newest label wins)"
        ) from e
