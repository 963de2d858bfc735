"""The one configuration schema: every setting, its default and its check.

config.yaml at the repository root documents the same settings for people; a test keeps
the two in step. Unknown keys are errors, so a typo never silently means a default.
"""

from __future__ import annotations

import itertools
import os
import socket
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

from filterd.listen import TcpListening
from filterd.text import TextLimits

DEFAULT_PATH = Path("/etc/filterd/config.yaml")

# How the model computes: int8 Linear layers on a CPU; half precision on a CUDA GPU.
Precision = Literal["float32", "int8", "bfloat16", "float16"]


def state_dir() -> Path:
    """Where filterd keeps its secret and quarantine by default: per user, no root needed."""
    base = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(base) / "filterd"


class ConfigError(ValueError):
    """The configuration is unreadable or invalid; the message names the setting."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Limits(_Section):
    """Work per message (see filterd.text.TextLimits); defaults are safe for hostile mail."""

    max_bytes: int = Field(TextLimits.max_bytes, ge=1024)
    max_parts: int = Field(TextLimits.max_parts, ge=1)
    max_depth: int = Field(TextLimits.max_depth, ge=1, le=200)
    max_chars: int = Field(TextLimits.max_chars, ge=1000)

    def text_limits(self) -> TextLimits:
        return TextLimits(**self.model_dump())


_Probability = Field(None, ge=0.0, le=1.0)


class Scoring(_Section):
    """Thresholds on the spam probability and how verdicts are waited for."""

    threshold: float | None = _Probability  # None: the checkpoint's own threshold
    quarantine_threshold: float | None = _Probability  # None: never quarantine
    reject_threshold: float | None = _Probability  # None: never reject
    failure_policy: Literal["fail_open", "tempfail"] = "fail_open"
    timeout_seconds: float = Field(30.0, gt=0)
    batch_wait_ms: float = Field(20.0, ge=0, le=1000)
    max_batch: int = Field(16, ge=1, le=1024)
    # A message with no text at all (empty; only headers, with no Subject) gets this label
    # without the model; ham, so such mail is tagged and delivered, never lost.
    no_text: Literal["ham", "spam"] = "ham"

    @model_validator(mode="after")
    def _ordered(self) -> Scoring:
        self.check_order(self.threshold)
        return self

    def check_order(self, spam: float | None) -> None:
        """spam <= quarantine <= reject among those set; raises ValueError naming the key."""
        named = [
            ("threshold", spam),
            ("quarantine_threshold", self.quarantine_threshold),
            ("reject_threshold", self.reject_threshold),
        ]
        named = [(k, v) for k, v in named if v is not None]
        for (lo_key, lo), (hi_key, hi) in itertools.pairwise(named):
            if lo > hi:
                raise ValueError(f"{hi_key} ({hi}) must be >= {lo_key} ({lo})")


class Headers(_Section):
    """The X-Spam-* headers written by `filterd score --tag` and the daemon."""

    prefix: str = Field("X-Spam-", pattern=r"^[!-9;-~]+$")
    # e.g. "[SPAM] "; off by default: it breaks DKIM signatures. No control characters: a
    # CR or LF here would break every spam message's header or inject fields into it.
    subject_prefix: str = Field("", pattern=r"^[^\x00-\x1f\x7f]*$")
    secret_file: Path | None = None  # None: <state dir>/secret, created on first use

    def secret_path(self) -> Path:
        return (self.secret_file or state_dir() / "secret").expanduser()


class Quarantine(_Section):
    """The quarantine Maildir and how long it keeps messages."""

    path: Path | None = None  # None: <state dir>/quarantine
    retention_days: float = Field(30.0, gt=0)

    def store_path(self) -> Path:
        return (self.path or state_dir() / "quarantine").expanduser()


class Relay(_Section):
    """The next-hop SMTP server that released (and, with the daemon, filtered) mail goes to."""

    host: str = "127.0.0.1"
    port: int = Field(10026, ge=1, le=65535)
    timeout_seconds: float = Field(30.0, gt=0)


class Daemon(_Section):
    """`filterd serve`: model reloads and shutdown."""

    # How often the checkpoint file is checked for a new version (reloaded like SIGHUP); 0: off.
    reload_check_seconds: float = Field(2.0, ge=0)
    # SIGTERM: the longest wait for messages being scored or relayed to get their answer.
    stop_timeout_seconds: float = Field(90.0, gt=0)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # Score in a child process: text extraction and the model then never hold up the SMTP
    # dialogue or the Maildir watcher (they share no GIL). false: all in one process.
    scoring_process: bool = True


class Retrain(_Section):
    """When the daemon retrains on its own (either, or both; neither: never)."""

    after_labels: int | None = Field(None, ge=1)  # this many new labels since the last one
    every_hours: float | None = Field(None, gt=0)  # and/or this often, if any label is new


class Learning(_Section):
    """The feedback store and retraining from it (README "Learning from corrections")."""

    store: Path | None = None  # None: <fleet_store>/<host name>, else <state dir>/feedback
    # Several hosts: a folder whose subfolders are each host's store. Retrains and `learn
    # --stats` read them all, merged (newest label wins); this host writes only its own.
    fleet_store: Path | None = None
    max_messages: int = Field(20000, ge=1)  # the oldest labels beyond this are dropped
    retention_days: float = Field(365.0, gt=0)
    # Retraining: epochs over feedback + replay; the replay sample's size.
    epochs: int = Field(2, ge=1)
    replay_messages: int = Field(1000, ge=0)
    # The gate: feedback held out of training (a share, and at least holdout_min messages);
    # the candidate is installed only if its accuracy there beats the running model's by
    # more than accuracy_margin and its false-positive rate on the original test ham is at
    # most the running model's plus fpr_tolerance.
    holdout_fraction: float = Field(0.2, gt=0, lt=1)
    holdout_min: int = Field(20, ge=1)
    accuracy_margin: float = Field(0.0, ge=0, le=1)
    fpr_tolerance: float = Field(0.0, ge=0, le=1)
    keep_checkpoints: int = Field(3, ge=1)  # earlier checkpoints kept for `filterd rollback`
    # The Maildir source learns from moves into and out of its Junk folder.
    maildir_moves: bool = False
    # The daemon takes labels here from users who may not write the store (None: off).
    socket: Path | None = None
    socket_mode: str = Field("0660", pattern=r"^0?[0-7]{3}$")
    retrain: Retrain = Retrain()

    @model_validator(mode="after")
    def _own_store_in_the_fleet(self) -> Learning:
        """The fleet's subfolders are read as stores: this host's store must be one of them
        (or lie outside), not the fleet folder itself or a folder above it."""
        if self.fleet_store is not None:
            fleet, own = self.fleet_store.expanduser(), self.store_path()
            if own == fleet or own in fleet.parents:
                raise ValueError(
                    f"learning.store ({own}) is learning.fleet_store ({fleet}) or a folder "
                    "above it, whose subfolders are read as stores: give this host its own "
                    "subfolder, or leave store unset for <fleet_store>/<host name>"
                )
        return self

    def store_path(self) -> Path:
        """This host's store: the one it writes, prunes and locks for a retrain."""
        if self.store is not None:
            return self.store.expanduser()
        if self.fleet_store is not None:
            return self.fleet_store.expanduser() / socket.gethostname()
        return state_dir() / "feedback"


class Metrics(_Section, TcpListening):
    """The Prometheus endpoint of `filterd serve` (README "Metrics"): a TCP address like
    a source's, loopback unless allow_remote (Prometheus scrapes no Unix socket)."""

    enabled: bool = False
    port: int = Field(9847, ge=0, le=65535)  # 0: any free port, named in the ready line


class PluginChoice(_Section):
    """A plugin picked by its entry-point name; it validates its own options."""

    name: str
    options: dict[str, Any] = {}


# Sections of older configs that are now the options of a built-in source.
LEGACY_SOURCES = {"smtp": "enabled", "maildir": "paths"}  # section: the key that turns it on


class Config(_Section):
    checkpoint: Path | None = None
    device: Literal["cpu", "cuda", "auto"] = "cpu"
    precision: Precision = "float32"
    limits: Limits = Limits()
    scoring: Scoring = Scoring()
    headers: Headers = Headers()
    quarantine: Quarantine = Quarantine()
    relay: Relay = Relay()
    daemon: Daemon = Daemon()
    learning: Learning = Learning()
    metrics: Metrics = Metrics()
    checks: list[PluginChoice] = []
    sources: list[PluginChoice] = []  # what `filterd serve` runs: smtp, maildir, ...
    _legacy: tuple[str, ...] = PrivateAttr(())  # sections read as sources, for notes
    _disabled: dict[str, frozenset[str]] = PrivateAttr(default_factory=dict)  # their keys

    @model_validator(mode="wrap")
    @classmethod
    def _legacy_sections(cls, data: Any, handler: Any) -> Config:
        """`smtp:` and `maildir:` sections of older configs become entries of `sources`."""
        legacy: list[str] = []
        disabled: dict[str, frozenset[str]] = {}
        if isinstance(data, dict) and LEGACY_SOURCES.keys() & data.keys():
            data = dict(data)
            sources = list(data.get("sources") or [])
            for section, switch in LEGACY_SOURCES.items():
                if section not in data:
                    continue
                options = data.pop(section)
                if not isinstance(options, dict):
                    raise ValueError(f"{section}: expected a mapping of settings")
                options = dict(options)
                on = options.pop(switch, False) if section == "smtp" else options.get(switch)
                if not on:  # off, yet a typo in it is still an error (load_sources)
                    disabled[section] = frozenset(options)
                    continue
                if any(isinstance(c, dict) and c.get("name") == section for c in sources):
                    raise ValueError(f"{section}: set it as a `{section}` entry of sources only")
                sources.append({"name": section, "options": options})
                legacy.append(section)
            data["sources"] = sources
        config = handler(data)
        config._legacy, config._disabled = tuple(legacy), disabled
        return config

    def source_choices(self) -> list[tuple[str, PluginChoice, str]]:
        """Each configured source with the keys its errors name: (where, choice, options)."""
        n = len(self.sources) - len(self._legacy)  # legacy sections come last
        found = [(f"sources[{i}]", c, f"sources[{i}].options") for i, c in enumerate(self.sources)]
        return found[:n] + [(s, c, s) for s, c in zip(self._legacy, self.sources[n:], strict=True)]

    def disabled_sections(self) -> dict[str, frozenset[str]]:
        """An older config's sections that are off, with the keys they set."""
        return dict(self._disabled)

    def notes(self) -> list[str]:
        """How to write the sections of an older config the new way."""
        return [
            f"the {s}: section is read as the `{s}` source; write it as `sources: [{{name: {s}, "
            f"options: {{...}}}}]` (config.yaml shows how)"
            for s in self._legacy
        ]

    @model_validator(mode="after")
    def _precision_fits_device(self) -> Config:
        if self.precision == "int8" and self.device != "cpu":
            raise ValueError("precision: int8 runs on the CPU only; set device: cpu")
        if self.precision in ("bfloat16", "float16") and self.device == "cpu":
            raise ValueError(
                f"precision: {self.precision} is for a CUDA GPU (device: cuda or auto); "
                "on a CPU use float32 or int8"
            )
        return self


def load_config(path: str | os.PathLike | None = None) -> Config:
    """Read and validate a YAML config; no file at the default path means defaults."""
    explicit = path is not None
    target = Path(path) if explicit else DEFAULT_PATH
    if not target.exists():
        if explicit:
            raise ConfigError(f"{target}: no such config file")
        return Config()
    try:
        data = yaml.safe_load(target.read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"{target}: cannot read config: {e}") from e
    except RecursionError as e:  # PyYAML composes nested collections recursively
        raise ConfigError(f"{target}: cannot read config: nested too deeply") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{target}: expected a mapping of settings at the top level")
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(top level)'}: {err['msg']}"
            for err in e.errors()
        )
        raise ConfigError(f"{target}: {problems}") from e
