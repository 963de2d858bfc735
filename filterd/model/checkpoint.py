"""The checkpoint: one self-describing safetensors file the runtime loads alone.

Tensors plus a JSON document in the safetensors header (architecture, tokenizer, text
extraction version, threshold, metrics, ...), so no trainer code and no pickle is needed
to load it. A sha256 of the tensor bytes sits in the header too: safetensors checks the
layout, the hash catches flipped or zeroed bytes. Writes are atomic (temporary file,
fsync, rename), so a daemon watching the path never reads half a file.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import struct
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from torch.overrides import TorchFunctionMode

from filterd import __version__
from filterd.model.family import Backbone, Family
from filterd.model.registry import family
from filterd.model.tokenizer import Tokenizer
from filterd.store.durable import replace_durably
from filterd.text import TEXT_VERSION

FORMAT = "filterd-checkpoint/1"
FILENAME = "model.safetensors"
_META_KEY = "filterd"
_TOKENIZER = "tokenizer."  # tensors holding the tokenizer's files, as bytes
log = logging.getLogger("filterd")


class CheckpointError(ValueError):
    """The file is not a usable filterd checkpoint; the message says why."""


@dataclass
class CheckpointMeta:
    arch: str
    config: dict
    family: str = "gpt2"
    threshold: float = 0.5
    max_tokens: int = 256
    labels: list[str] = field(default_factory=lambda: ["ham", "spam"])
    tokenizer: str = "gpt2"
    text_version: int = TEXT_VERSION
    data_fingerprint: str = ""
    metrics: dict = field(default_factory=dict)
    filterd_version: str = __version__
    created_at: str = ""
    format: str = FORMAT

    @property
    def model_family(self) -> Family:
        return family(self.family)

    @property
    def model_config(self) -> Any:
        return self.model_family.config_from_dict(self.config)


class Loaded(NamedTuple):
    """A checkpoint ready to score or train: network, metadata and tokenizer."""

    model: Backbone
    meta: CheckpointMeta
    tokenizer: Tokenizer


def checkpoint_path(path: str | os.PathLike) -> Path:
    """Accept the checkpoint file or the folder holding it (a new path is a folder
    unless it ends in .safetensors)."""
    p = Path(path).expanduser()
    if p.is_file() or (p.suffix == ".safetensors" and not p.is_dir()):
        return p
    return p / FILENAME


def save_checkpoint(
    path: str | os.PathLike,
    model: Backbone,
    meta: CheckpointMeta,
    tokenizer: Tokenizer | None = None,
) -> Path:
    """Write atomically; the tokenizer's files go in too when it has any (a vocabulary
    that does not ship with filterd)."""
    target = checkpoint_path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    meta.config = model.config.to_dict()
    meta.created_at = meta.created_at or datetime.datetime.now(datetime.UTC).isoformat(
        timespec="seconds"
    )
    tensors = {
        k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()
    }
    for name, data in (tokenizer.files() if tokenizer else {}).items():
        tensors[_TOKENIZER + name] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    # The data section does not depend on the header, so hash it from a first pass.
    digest = _data_sha256(save_tensors(tensors, metadata={}))
    header = {_META_KEY: json.dumps(asdict(meta)), "sha256": digest}
    blob = save_tensors(tensors, metadata=header)
    replace_durably(target, blob)
    return target


def load_checkpoint(
    path: str | os.PathLike, device: str | torch.device = "cpu", retrain: bool = False
) -> Loaded:
    """A validated model and its metadata. A checkpoint from an older text extraction loads
    with a warning; `retrain` accepts any text-extraction version, a newer one too: the
    weights are a fine start for training on the current text."""
    target = checkpoint_path(path)
    try:
        blob = target.read_bytes()
    except OSError as e:
        raise CheckpointError(f"{target}: cannot read checkpoint ({e.strerror or e})") from e
    header = _header(blob, target)
    meta = _meta(header, target, retrain)
    if _data_sha256(blob) != header.get("sha256"):
        raise CheckpointError(f"{target}: tensor data is corrupt (sha256 mismatch)")
    try:
        tensors = load_tensors(blob)
    except Exception as e:  # safetensors raises its own error type for layout damage
        raise CheckpointError(f"{target}: damaged tensor data ({e})") from e
    files = {k.removeprefix(_TOKENIZER): v for k, v in tensors.items() if k.startswith(_TOKENIZER)}
    tensors = {k: v for k, v in tensors.items() if not k.startswith(_TOKENIZER)}
    fam, config = meta.model_family, meta.model_config
    problem = fam.size_problem(config, {k: tuple(v.shape) for k, v in tensors.items()})
    if problem:
        raise CheckpointError(f"{target}: tensors do not match its architecture: {problem}")
    try:
        # A model without storage: metadata that names a huge architecture must not make
        # us allocate it before the tensors are compared, and random initial weights
        # would only be overwritten.
        with torch.device("meta"), _NoInit():
            model = fam.build(config)
    except (ValueError, TypeError, RuntimeError) as e:
        raise CheckpointError(f"{target}: bad architecture in metadata: {e}") from e
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in tensors.items()}
    if expected != found:
        diff = sorted(set(expected.items()) ^ set(found.items()))[:4]
        raise CheckpointError(f"{target}: tensors do not match its architecture: {diff}")
    try:
        tokenizer = fam.tokenizer({k: v.numpy().tobytes() for k, v in files.items()})
    except (ValueError, OSError) as e:
        raise CheckpointError(f"{target}: cannot rebuild its tokenizer: {e}") from e
    model.load_state_dict(tensors, assign=True)  # the file's tensors become the parameters
    return Loaded(model.to(device).eval(), meta, tokenizer)


class _NoInit(TorchFunctionMode):
    """Skips drawing random weights. On meta tensors that is more than wasted work:
    torch's meta normal_ imports torch._dynamo, 1.5 s of every `filterd score`."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _RANDOM_INITS:
            return args[0] if args else kwargs["tensor"]
        return func(*args, **(kwargs or {}))


_RANDOM_INITS = {
    torch.nn.init.normal_,
    torch.nn.init.uniform_,
    torch.nn.init.kaiming_uniform_,
    torch.Tensor.normal_,
    torch.Tensor.uniform_,
}


def is_checkpoint(path: str | os.PathLike) -> bool:
    """Whether path holds filterd metadata (as opposed to plain pretrained weights)."""
    target = checkpoint_path(path)
    try:
        with open(target, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return False
            size = struct.unpack("<Q", head)[0]
            header = json.loads(f.read(min(size, 100_000_000)))
    except (OSError, ValueError, RecursionError):  # deeply nested JSON: not ours either
        return False
    return isinstance(header, dict) and _META_KEY in (header.get("__metadata__") or {})


def _header(blob: bytes, target: Path) -> dict:
    if len(blob) < 8:
        raise CheckpointError(f"{target}: truncated ({len(blob)} bytes): not a checkpoint")
    (size,) = struct.unpack("<Q", blob[:8])
    if size > len(blob) - 8:
        raise CheckpointError(f"{target}: truncated or not a safetensors file")
    try:
        header = json.loads(blob[8 : 8 + size])
        metadata = header.get("__metadata__") or {}
    except (ValueError, AttributeError, RecursionError) as e:
        raise CheckpointError(f"{target}: unreadable safetensors header ({e})") from e
    if _META_KEY not in metadata:
        raise CheckpointError(
            f"{target}: no filterd metadata: a plain weights file, not a filterd checkpoint "
            "(train one with filterd-train)"
        )
    return metadata


def _meta(metadata: dict, target: Path, retrain: bool = False) -> CheckpointMeta:
    try:
        meta = CheckpointMeta(**json.loads(metadata[_META_KEY]))
    except (TypeError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{target}: bad filterd metadata ({e})") from e
    if meta.format != FORMAT:
        raise CheckpointError(f"{target}: format {meta.format!r}, this filterd reads {FORMAT!r}")
    try:
        if not isinstance(meta.config, dict):
            raise TypeError(f"config is a {type(meta.config).__name__}, not a mapping")
        meta.model_config  # noqa: B018 - validates the family and its architecture fields
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{target}: bad architecture in metadata: {e}") from e
    if meta.tokenizer != meta.model_family.tokenizer_name:
        raise CheckpointError(f"{target}: tokenizer {meta.tokenizer!r} is not supported")
    if not isinstance(meta.arch, str) or not meta.arch or not meta.arch.isprintable():
        # It is written into X-Spam-Status: a line break there would inject header fields.
        raise CheckpointError(f"{target}: architecture name {meta.arch!r} is not a printable name")
    if meta.labels != ["ham", "spam"]:
        raise CheckpointError(f"{target}: labels {meta.labels} are not ['ham', 'spam']")
    positions = meta.config.get("n_positions", 0) if isinstance(meta.config, dict) else 0
    if not isinstance(meta.max_tokens, int) or not 2 <= meta.max_tokens <= positions:
        raise CheckpointError(f"{target}: max_tokens {meta.max_tokens} does not fit the model")
    number = isinstance(meta.threshold, int | float) and not isinstance(meta.threshold, bool)
    if not number or not 0.0 <= meta.threshold <= 1.0:
        raise CheckpointError(f"{target}: threshold {meta.threshold} is not a probability")
    if not retrain:
        _check_text_version(meta.text_version, target)
    return meta


def _check_text_version(version: Any, target: Path) -> None:
    """An older text extraction still scores, with a note (an upgrade must not stop a
    running filter); a newer one than this filterd knows (a downgrade) is refused."""
    number = isinstance(version, int) and not isinstance(version, bool)
    if number and version == TEXT_VERSION:
        return
    if number and 1 <= version < TEXT_VERSION:
        log.warning(
            "%s: trained on text extraction v%d, this filterd extracts v%d and scores with it; "
            "retraining (filterd-train --init %s) aligns them",
            target,
            version,
            TEXT_VERSION,
            target,
        )
        return
    if number and version > TEXT_VERSION:
        raise CheckpointError(
            f"{target}: trained on text extraction v{version}, newer than this filterd's "
            f"v{TEXT_VERSION}: upgrade filterd, or retrain it here (filterd-train --init {target})"
        )
    raise CheckpointError(f"{target}: text extraction version {version!r} is not a version")


def _data_sha256(blob: bytes) -> str:
    (size,) = struct.unpack("<Q", blob[:8])
    return hashlib.sha256(memoryview(blob)[8 + size :]).hexdigest()
