"""The one configuration schema: every setting, its default and its check.

config.yaml at the repository root documents the same settings for people; a test keeps
the two in step. Unknown keys are errors, so a typo never silently means a default.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from filterd.message import TextLimits

DEFAULT_PATH = Path("/etc/filterd/config.yaml")


class ConfigError(ValueError):
    """The configuration is unreadable or invalid; the message names the setting."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Limits(_Section):
    """Work per message (see filterd.message.TextLimits); defaults are safe for hostile mail."""

    max_bytes: int = Field(TextLimits.max_bytes, ge=1024)
    max_parts: int = Field(TextLimits.max_parts, ge=1)
    max_depth: int = Field(TextLimits.max_depth, ge=1, le=200)
    max_chars: int = Field(TextLimits.max_chars, ge=1000)

    def text_limits(self) -> TextLimits:
        return TextLimits(**self.model_dump())


class Config(_Section):
    checkpoint: Path | None = None
    device: Literal["cpu", "cuda", "auto"] = "cpu"
    limits: Limits = Limits()


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
    if not isinstance(data, dict):
        raise ConfigError(f"{target}: expected a mapping of settings at the top level")
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors()
        )
        raise ConfigError(f"{target}: {problems}") from e
