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
import os
import struct
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from filterd import __version__
from filterd.model.gpt2 import GPT2Classifier, GPTConfig
from filterd.store.durable import replace_durably
from filterd.text import TEXT_VERSION

FORMAT = "filterd-checkpoint/1"
FILENAME = "model.safetensors"
_META_KEY = "filterd"


class CheckpointError(ValueError):
    """The file is not a usable filterd checkpoint; the message says why."""


@dataclass
class CheckpointMeta:
    arch: str
    config: dict
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
    def model_config(self) -> GPTConfig:
        return GPTConfig.from_dict(self.config)


def checkpoint_path(path: str | os.PathLike) -> Path:
    """Accept the checkpoint file or the folder holding it (a new path is a folder
    unless it ends in .safetensors)."""
    p = Path(path).expanduser()
    if p.is_file() or (p.suffix == ".safetensors" and not p.is_dir()):
        return p
    return p / FILENAME


def save_checkpoint(path: str | os.PathLike, model: GPT2Classifier, meta: CheckpointMeta) -> Path:
    target = checkpoint_path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    meta.config = model.config.to_dict()
    meta.created_at = meta.created_at or datetime.datetime.now(datetime.UTC).isoformat(
        timespec="seconds"
    )
    tensors = {
        k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()
    }
    # The data section does not depend on the header, so hash it from a first pass.
    digest = _data_sha256(save_tensors(tensors, metadata={}))
    header = {_META_KEY: json.dumps(asdict(meta)), "sha256": digest}
    blob = save_tensors(tensors, metadata=header)
    replace_durably(target, blob)
    return target


def load_checkpoint(
    path: str | os.PathLike, device: str | torch.device = "cpu", retrain: bool = False
) -> tuple[GPT2Classifier, CheckpointMeta]:
    """A validated model and its metadata. `retrain` accepts any text-extraction version:
    the weights are a fine start for training on the current text, not for scoring."""
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
    _check_size(meta.model_config, tensors, target)
    try:
        # Shapes first, from a model without storage: metadata that names a huge
        # architecture must not make us allocate it before the tensors are compared.
        with torch.device("meta"):
            skeleton = GPT2Classifier(meta.model_config)
    except (ValueError, TypeError, RuntimeError) as e:
        raise CheckpointError(f"{target}: bad architecture in metadata: {e}") from e
    expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in tensors.items()}
    if expected != found:
        diff = sorted(set(expected.items()) ^ set(found.items()))[:4]
        raise CheckpointError(f"{target}: tensors do not match its architecture: {diff}")
    model = GPT2Classifier(meta.model_config)
    model.load_state_dict(tensors)
    return model.to(device).eval(), meta


def _check_size(config: GPTConfig, tensors: dict[str, torch.Tensor], target: Path) -> None:
    """The metadata's main dimensions against the file's tensors, before any model is built:
    a forged `n_layer: 100000` fails here at once instead of after minutes of building."""
    blocks = {k.split(".", 2)[1] for k in tensors if k.startswith("h.")}
    found = (
        tuple(getattr(tensors.get("wte.weight"), "shape", ())),
        tuple(getattr(tensors.get("wpe.weight"), "shape", ())),
        len(blocks),
    )
    wanted = ((config.vocab_size, config.n_embd), (config.n_positions, config.n_embd))
    if found != (*wanted, config.n_layer):
        raise CheckpointError(
            f"{target}: tensors do not match its architecture: (wte, wpe, blocks) are "
            f"{found}, the metadata says {(*wanted, config.n_layer)}"
        )


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
    try:
        if not isinstance(meta.config, dict):
            raise TypeError(f"config is a {type(meta.config).__name__}, not a mapping")
        for key in ("layer_norm_epsilon", "dropout"):  # GPTConfig checks only its ints
            value = meta.config.get(key, 0.0)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise TypeError(f"{key} is {value!r}, not a number")
        meta.model_config  # noqa: B018 - validates the architecture fields
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{target}: bad architecture in metadata: {e}") from e
    if meta.format != FORMAT:
        raise CheckpointError(f"{target}: format {meta.format!r}, this filterd reads {FORMAT!r}")
    if meta.tokenizer != "gpt2":
        raise CheckpointError(f"{target}: tokenizer {meta.tokenizer!r} is not supported")
    if meta.text_version != TEXT_VERSION and not retrain:
        raise CheckpointError(
            f"{target}: trained on text extraction v{meta.text_version}, this filterd extracts "
            f"v{TEXT_VERSION}; retrain it (filterd-train --init {target}) or use a matching filterd"
        )
    if meta.labels != ["ham", "spam"]:
        raise CheckpointError(f"{target}: labels {meta.labels} are not ['ham', 'spam']")
    positions = meta.config.get("n_positions", 0) if isinstance(meta.config, dict) else 0
    if not isinstance(meta.max_tokens, int) or not 2 <= meta.max_tokens <= positions:
        raise CheckpointError(f"{target}: max_tokens {meta.max_tokens} does not fit the model")
    number = isinstance(meta.threshold, int | float) and not isinstance(meta.threshold, bool)
    if not number or not 0.0 <= meta.threshold <= 1.0:
        raise CheckpointError(f"{target}: threshold {meta.threshold} is not a probability")
    return meta


def _data_sha256(blob: bytes) -> str:
    (size,) = struct.unpack("<Q", blob[:8])
    return hashlib.sha256(memoryview(blob)[8 + size :]).hexdigest()
