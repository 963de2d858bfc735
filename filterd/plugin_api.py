"""Plugins: checks, actions and sources, found by name through Python entry points.

A plugin is a class registered under one of the GROUPS in its package's metadata, e.g.

    [project.entry-points."filterd.checks"]
    lists = "filterd.builtin.lists:ListsCheck"

filterd's built-ins (in `plugins/`) register exactly as a third-party package would, and
config.yaml picks them by that name. Each plugin declares its options as a pydantic model
(`Options`), so a typo in its settings is an error naming the key, like any other setting.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from filterd.config import Config, ConfigError, PluginChoice
from filterd.mail import Mail
from filterd.verdict import Action as ActionName
from filterd.verdict import Verdict

if TYPE_CHECKING:
    from filterd.engine import Engine

GROUPS = {"checks": "filterd.checks", "actions": "filterd.actions", "sources": "filterd.sources"}


class Options(BaseModel):
    """Base of a plugin's options: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Plugin:
    """Built with its validated options and the whole (read-only) configuration."""

    Options: ClassVar[type[Options]] = Options
    name: str = ""  # the entry-point name it was loaded by

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


@dataclass(frozen=True)
class Outcome:
    """What became of a message; sources map it onto their protocol."""

    disposition: Literal["deliver", "quarantined", "reject", "tempfail"]
    data: bytes | None = None  # the bytes to deliver, for "deliver"
    note: str = ""  # a quarantine id, a failure reason
    verdict: Verdict | None = None  # what led to it (None when scoring failed), for logs


class Action(Plugin, ABC):
    """Carries out a verdict's action (tag, quarantine, reject) for one message. Called in a
    thread, so it may block on disk or network; an action that only computes sets `inline`,
    and runs on the event loop for messages up to 256 KiB (a thread hop costs more)."""

    inline: ClassVar[bool] = False

    @abstractmethod
    def apply(self, mail: Mail, verdict: Verdict, engine: Engine) -> Outcome:
        """Subclasses say what this plugin does."""


Handler = Callable[[Mail], Awaitable[Outcome]]


class Source(Plugin, ABC):
    """Brings messages in, hands each to `handle` and acts on the outcome. One-shot sources
    return an exit status; servers run until cancelled and return 0."""

    @abstractmethod
    async def run(self, handle: Handler) -> int:
        """Subclasses say what this plugin does."""


_BASES: dict[str, type[Plugin]] = {"checks": Check, "actions": Action, "sources": Source}


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


def load(kind: str, choice: PluginChoice, where: str, config: Config) -> Any:
    """An instance of the plugin `choice` names; errors name the config key (`where`)."""
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
            f"{where}.options.{'.'.join(str(p) for p in err['loc'])}: {err['msg']}"
            for err in e.errors()
        )
        raise ConfigError(problems) from e
    plugin = cls(options, config)
    plugin.name = choice.name
    return plugin
