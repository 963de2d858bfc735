"""Public GPT-2 weights in Hugging Face layout: find, download, verify, map.

A file (`model.safetensors` or `pytorch_model.bin`) or a folder holding one, with or
without the `transformer.` key prefix. Hub names (`gpt2`, `gpt2-medium`, ...) are
downloaded once into a user cache; with no network that fails within seconds and says
how to provide the files by hand. Nothing here unpickles arbitrary objects.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors.torch import load_file

from filterd.download import ChecksumError, cache_dir, fetch
from filterd.model.gpt2 import ARCHITECTURES, GPT2Classifier, GPTConfig

HUB_URL = os.environ.get("FILTERD_HUB_URL", "https://huggingface.co")
HUB_REPOS = {
    "gpt2": "openai-community/gpt2",
    "gpt2-medium": "openai-community/gpt2-medium",
    "gpt2-large": "openai-community/gpt2-large",
    "gpt2-xl": "openai-community/gpt2-xl",
}
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
# GPT-2 stores these as Conv1D (in, out); nn.Linear wants (out, in).
_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# Buffers or the tied LM head: nothing to load.
_SKIP = re.compile(r"(^lm_head\.|\.attn\.bias$|\.attn\.masked_bias$)")


class PretrainedError(RuntimeError):
    """The weights cannot be had or do not fit; the message says what to do."""


def load_pretrained(source: str | os.PathLike, n_classes: int = 2) -> GPT2Classifier:
    """A classifier whose body holds the given GPT-2 weights; its head is freshly initialised."""
    weights = resolve(source)
    state = read_weights(weights)
    config = infer_config(state, weights.parent / "config.json", n_classes)
    model = GPT2Classifier(config)
    mapped = to_filterd_keys(state)
    missing, unexpected = model.load_state_dict(mapped, strict=False)
    missing = [k for k in missing if not k.startswith("score.")]
    if missing or unexpected:
        raise PretrainedError(
            f"{weights}: not a GPT-2 checkpoint "
            f"(missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
    return model


def resolve(source: str | os.PathLike) -> Path:
    """The weights file for a path, a folder, or a hub name (downloading it if needed)."""
    path = Path(source).expanduser()
    if path.is_dir():
        for name in WEIGHT_FILES:
            if (path / name).is_file():
                return path / name
        raise PretrainedError(f"{path}: no {' or '.join(WEIGHT_FILES)} in this folder")
    if path.is_file():
        return path
    name = str(source)
    if name in HUB_REPOS:
        return download(name)
    raise PretrainedError(
        f"{source!r} is neither a file, a folder, nor one of {', '.join(HUB_REPOS)}"
    )


def download(name: str, dest: Path | None = None) -> Path:
    """Fetch `name` from the hub into the cache (once), verifying its sha256."""
    folder = (dest or cache_dir()) / name
    weights = folder / "model.safetensors"
    if weights.is_file() and (folder / "config.json").is_file():
        return weights
    folder.mkdir(parents=True, exist_ok=True)
    base = f"{HUB_URL}/{HUB_REPOS[name]}/resolve/main"
    for filename in ("config.json", "model.safetensors"):
        url = f"{base}/{filename}"
        try:
            fetch(url, folder / filename)
        except ChecksumError as e:
            raise PretrainedError(str(e)) from e
        except OSError as e:  # URLError, timeouts and refused connections are OSErrors
            reason = getattr(e, "reason", e)
            raise PretrainedError(
                f"could not download {name} from {url}: {reason}.\n"
                f"Without network access, fetch {base}/model.safetensors and "
                f"{base}/config.json on a machine that has it, then either pass their "
                f"folder as the path (e.g. --init /path/to/{name}) or copy both into {folder}/"
            ) from e
    return weights


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """Tensors from safetensors, or from a .bin with torch.load(weights_only=True)."""
    try:
        if path.suffix == ".bin":
            state = torch.load(path, map_location="cpu", weights_only=True)
        else:
            state = load_file(path)
    except Exception as e:  # safetensors and torch raise assorted types for bad files
        raise PretrainedError(f"{path}: cannot read weights ({e})") from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise PretrainedError(f"{path}: not a flat mapping of names to tensors")
    return state


def to_filterd_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, tensor in state.items():
        key = key.removeprefix("transformer.")
        if _SKIP.search(key):
            continue
        if key.endswith(_CONV1D):
            tensor = tensor.t()
        out[key] = tensor.float().contiguous()
    return out


def infer_config(state: dict[str, torch.Tensor], config_json: Path, n_classes: int) -> GPTConfig:
    """Architecture from config.json when present, else from tensor shapes."""
    state = {k.removeprefix("transformer."): v for k, v in state.items()}
    if "wte.weight" not in state or "wpe.weight" not in state:
        raise PretrainedError("not a GPT-2 checkpoint: no wte/wpe embedding weights")
    vocab_size, n_embd = state["wte.weight"].shape
    n_positions = state["wpe.weight"].shape[0]
    n_layer = len({k.split(".")[1] for k in state if k.startswith("h.")})
    if config_json.is_file():
        hf = json.loads(config_json.read_text())
        n_head = hf.get("n_head")
        eps = hf.get("layer_norm_epsilon", 1e-5)
    else:
        matches = [c for c in ARCHITECTURES.values() if (c.n_layer, c.n_embd) == (n_layer, n_embd)]
        if not matches:
            raise PretrainedError(
                f"cannot tell the number of attention heads of a {n_layer}-layer, "
                f"{n_embd}-wide model: put its config.json beside the weights"
            )
        n_head, eps = matches[0].n_head, matches[0].layer_norm_epsilon
    return GPTConfig(
        n_layer=n_layer,
        n_head=n_head,
        n_embd=n_embd,
        n_positions=n_positions,
        vocab_size=vocab_size,
        layer_norm_epsilon=eps,
        n_classes=n_classes,
    )
