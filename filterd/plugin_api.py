"""What a plugin is: the check, action and source interfaces, and the registry that finds
them by name through Python entry points.

A plugin is a class registered under one of the GROUPS in its package's metadata, e.g.

    [project.entry-points."filterd.checks"]
    lists = "filterd.builtin.lists:ListsCheck"

filterd's built-ins (the repository's `plugins/` folder, installed as `filterd.builtin`)
register exactly as a third-party package would, and config.yaml picks them by that name.
Each plugin declares its options as a pydantic model (`Options`), so a typo in its settings
is an error naming the key, like any other setting.

Plugins see the core only through what this module hands them: a `Context` (the
configuration, the tagger, the quarantine store) and, for sources, a `Handler` that turns a
message into an `Outcome`. They never get the engine or the model, so loading one imports
no torch.
"""

from __future__ import annotations

import asyncio
import threading
from abc import ABC, abstractmethod
from collections.abc import Awaitable
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from typing import Any, ClassVar, Literal, Protocol

from pydantic import BaseModel, ConfigDict, ValidationError

from filterd.config import Config, ConfigError, PluginChoice
from filterd.headers import Tagger
from filterd.mail import Mail
from filterd.store.quarantine import Store
from filterd.verdict import ActionName, Verdict

GROUPS = {"checks": "filterd.checks", "actions": "filterd.actions", "sources": "filterd.sources"}


class Options(BaseModel):
    """Base of a plugin's options: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Plugin:
    """Built with its validated options and the whole (read-only) configuration."""

    Options: ClassVar[type[Options]] = Options
    name: str = ""  # the entry-point name it was loaded by
    where: str = ""  # the config key of its options, for error messages

    def __init__(self, options: Options, config: Config):
        self.options = options
        self.config = config


@dataclass(frozen=True)
class Decision:
    """A check's ruling, made without (or over) the model."""

    is_spam: bool
    reason: str  # shown in X-Spam-Status, e.g. "allowlisted=example.org"
    action: ActionName = "tag"


class Check(Plugin, ABC):
    """Runs before the model ("pre": verdict is None) or after it ("post": the model's
    verdict). Returning a Decision settles the message; None leaves it to the next step.
    Checks run in the engine's worker threads (two batches at once), beside the model: keep
    them quick and thread-safe."""

    stage: ClassVar[Literal["pre", "post"]] = "pre"

    @abstractmethod
    def check(self, mail: Mail, verdict: Verdict | None) -> Decision | None:
        """Subclasses say what this plugin does."""


Disposition = Literal["deliver", "quarantine", "reject", "tempfail"]


@dataclass(frozen=True)
class Outcome:
    """What is to become of a message; the source carries it out in its own way."""

    disposition: Disposition
    # deliver: the bytes to deliver. quarantine: the tagged copy, for sources that file it
    # where its reader looks (a Maildir's Junk folder); the store keeps the original.
    data: bytes | None = None
    note: str = ""  # a quarantine id, a failure reason
    verdict: Verdict | None = None  # what led to it (None when scoring failed), for logs


class Context:
    """What actions and sources may use besides the message: the configuration, the tagger
    and the quarantine store (opened on first use). Never the engine or the model."""

    def __init__(self, config: Config, tagger: Tagger):
        self.config = config
        self.tagger = tagger
        self._store: Store | None = None
        self._lock = threading.Lock()  # first used from worker threads

    @property
    def store(self) -> Store:
        with self._lock:
            if self._store is None:
                q = self.config.quarantine
                self._store = Store(q.store_path(), q.retention_days)
            return self._store

    def failure(self, mail: Mail, why: str) -> Outcome:
        """The failure policy: fail_open delivers with one header saying it was not
        scored; tempfail asks the sender to try again later."""
        if self.config.scoring.failure_policy == "tempfail":
            return Outcome("tempfail", note=why)
        return Outcome("deliver", self.tagger.unscored(mail.raw, why), note=why)


class Action(Plugin, ABC):
    """Decides what becomes of a message given its verdict (tag, quarantine, reject), as an
    Outcome; the source places the message. Called in a thread, so it may block; an action
    that only computes sets `inline`, and runs on the event loop for messages up to 256 KiB
    (a thread hop costs more)."""

    inline: ClassVar[bool] = False

    @abstractmethod
    def apply(self, mail: Mail, verdict: Verdict, context: Context) -> Outcome:
        """Subclasses say what this plugin does."""


class Handler(Protocol):
    """The one way from a source to checks, the model and actions. `can_reject`: the
    sender can still be refused (else a reject verdict is quarantined); `tag_only`: the
    caller acts itself (a pipe, the spamd protocol), so every verdict is only tagged.
    Failures come back as the failure policy's Outcome, never as exceptions."""

    def __call__(
        self, mail: Mail, *, can_reject: bool = False, tag_only: bool = False
    ) -> Awaitable[Outcome]: ...


class Source(Plugin, ABC):
    """A way mail comes in. The daemon starts every configured source with the same
    handler and context, and on SIGTERM asks each to stop accepting, then to drain.

    `start` returns once the source accepts mail (listening, watching); `stop_accepting`
    refuses new messages while those in hand go on; `drain` waits (at most `timeout`) for
    those to be settled, then closes. A one-shot source (stdin) also overrides `finished`,
    which returns its exit status once its input is done; servers run until stopped."""

    one_shot: ClassVar[bool] = False  # ends by itself (stdin): not for `filterd serve`

    def preflight(self) -> None:
        """Raise ConfigError for what `start` would refuse, without starting anything
        (`filterd check` calls it); the default has nothing to check."""

    @abstractmethod
    async def start(self, handle: Handler, context: Context) -> None:
        """Begin taking mail; return once it is accepted."""

    @abstractmethod
    async def stop_accepting(self) -> None:
        """Take no new messages; those in hand carry on."""

    @abstractmethod
    async def drain(self, timeout: float) -> None:
        """Settle the messages in hand (at most `timeout` seconds), then close."""

    async def finished(self) -> int:
        """A one-shot source's exit status once its input is done; servers never finish."""
        await asyncio.Event().wait()
        return 0

    async def run(self, handle: Handler, context: Context) -> int:
        """The whole lifecycle for a one-shot use (`filterd score --tag`)."""
        await self.start(handle, context)
        try:
            return await self.finished()
        finally:
            await self.stop_accepting()
            await self.drain(self.config.daemon.stop_timeout_seconds)


_BASES: dict[str, type[Plugin]] = {"checks": Check, "actions": Action, "sources": Source}


def options_of(kind: str, name: str) -> set[str]:
    """The option names a plugin takes (none if it is not installed or fails to load: the
    error comes where it is used)."""
    ep = available(kind).get(name)
    try:
        cls = ep.load() if ep is not None else None
    except Exception:  # reported by load() wherever the plugin is used
        return set()
    return set(cls.Options.model_fields) if isinstance(cls, type) else set()


def available(kind: str) -> dict[str, EntryPoint]:
    """Installed plugins of one kind by name; two packages claiming one name is an error."""
    found: dict[str, EntryPoint] = {}
    for ep in entry_points(group=GROUPS[kind]):
        if ep.name in found and found[ep.name].value != ep.value:
            raise ConfigError(
                f"{kind}: plugin name {ep.name!r} is registered twice "
                f"({found[ep.name].value} and {ep.value})"
            )
        found[ep.name] = ep
    return found


def load(
    kind: str, choice: PluginChoice, where: str, config: Config, options_key: str | None = None
) -> Any:
    """An instance of the plugin `choice` names; errors name the config key (`where`, and
    `options_key` for its options: `where.options` unless given)."""
    options_key = options_key or f"{where}.options"
    plugins = available(kind)
    ep = plugins.get(choice.name)
    if ep is None:
        known = ", ".join(sorted(plugins)) or "none"
        raise ConfigError(f"{where}.name: no {kind} plugin {choice.name!r} (installed: {known})")
    try:
        cls = ep.load()
    except Exception as e:
        raise ConfigError(
            f"{where}.name: plugin {choice.name!r} ({ep.value}) fails to load: {e}"
        ) from e
    if not (isinstance(cls, type) and issubclass(cls, _BASES[kind])):
        raise ConfigError(f"{where}.name: {ep.value} is not a filterd {_BASES[kind].__name__}")
    try:
        options = cls.Options.model_validate(choice.options)
    except ValidationError as e:
        problems = "; ".join(
            f"{options_key}.{'.'.join(str(p) for p in err['loc'])}: {err['msg']}"
            for err in e.errors()
        )
        raise ConfigError(problems) from e
    plugin = cls(options, config)
    plugin.name, plugin.where = choice.name, options_key
    return plugin
