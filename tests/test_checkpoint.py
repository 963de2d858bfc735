import json
import logging
import struct
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

import filterd
from filterd.model.checkpoint import (
    FILENAME,
    CheckpointError,
    CheckpointMeta,
    load_checkpoint,
    save_checkpoint,
)
from filterd.text import TEXT_VERSION


def _meta(model, **kw):
    return CheckpointMeta(arch="gpt2-tiny", config=model.config.to_dict(), **kw)


def _rewrite_meta(path, **changes):
    """Rewrite the JSON metadata in place, keeping tensors and their hash."""
    blob = path.read_bytes()
    (size,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + size])
    meta = json.loads(header["__metadata__"]["filterd"])
    meta.update(changes)
    header["__metadata__"]["filterd"] = json.dumps(meta)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    # Offsets in the header are relative to the data section, so they stay valid.
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + blob[8 + size :])


def test_round_trip_file_and_folder(tmp_path, tiny_model, sms_lines):
    meta = _meta(
        tiny_model, threshold=0.73, max_tokens=64, data_fingerprint="abc", metrics={"a": 1}
    )
    path = save_checkpoint(tmp_path / "out", tiny_model, meta)
    assert path == tmp_path / "out" / FILENAME
    folder = tmp_path / "ck"
    folder.mkdir()
    saved = save_checkpoint(folder, tiny_model, meta)
    assert saved == folder / FILENAME
    assert [p.name for p in folder.iterdir()] == [FILENAME]  # no temporary left behind
    for source in (folder, saved):
        clf = filterd.load_classifier(source)
        assert clf.threshold == 0.73
        assert clf.meta.max_tokens == 64
        assert clf.meta.data_fingerprint == "abc"
        assert clf.meta.metrics == {"a": 1}
        assert clf.meta.text_version == TEXT_VERSION
        assert clf.meta.filterd_version == filterd.__version__
        assert clf.meta.created_at
        texts = [t for _, t in sms_lines[:5]]
        with torch.no_grad():
            for a, b in zip(
                clf.model.state_dict().values(), tiny_model.state_dict().values(), strict=True
            ):
                assert torch.equal(a, b)
        scores = clf.score_texts(texts)
        assert all(0.0 <= s <= 1.0 for s in scores)
        assert clf.score_message(b"Subject: hi\n\nhello there") == pytest.approx(
            clf.score_texts(["Subject: hi\n\nhello there"])[0]
        )


def test_save_replaces_atomically(tmp_path, tiny_model):
    target = tmp_path / FILENAME
    save_checkpoint(target, tiny_model, _meta(tiny_model, threshold=0.1))
    save_checkpoint(target, tiny_model, _meta(tiny_model, threshold=0.2))
    assert load_checkpoint(target)[1].threshold == 0.2
    assert sorted(p.name for p in tmp_path.iterdir()) == [FILENAME]


@pytest.mark.parametrize("cut", [0, 5, 100, -1000, -1])
def test_truncated_file_is_rejected(tmp_path, tiny_model, cut):
    path = save_checkpoint(tmp_path, tiny_model, _meta(tiny_model))
    blob = path.read_bytes()
    path.write_bytes(blob[:cut] if cut else b"")
    with pytest.raises(CheckpointError, match=str(path)):
        load_checkpoint(path)


def flip_byte(path, offset: int = -100) -> None:
    """Damage one byte of the tensor data in place."""
    blob = bytearray(path.read_bytes())
    blob[offset] ^= 0xFF
    path.write_bytes(bytes(blob))


def test_flipped_tensor_byte_is_rejected(tmp_path, tiny_model):
    path = save_checkpoint(tmp_path, tiny_model, _meta(tiny_model))
    flip_byte(path)
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(path)


def test_plain_weights_file_is_not_a_checkpoint(tmp_path, tiny_model):
    save_file(tiny_model.state_dict(), tmp_path / FILENAME)
    with pytest.raises(CheckpointError, match="not a filterd checkpoint"):
        load_checkpoint(tmp_path)


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="cannot read"):
        load_checkpoint(tmp_path / "absent.safetensors")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"config": {"n_layer": 3, "n_head": 2, "n_embd": 64, "n_positions": 512}}, "match"),
        ({"config": {"n_layer": 2, "n_head": 3, "n_embd": 64, "n_positions": 512}}, "architecture"),
        ({"text_version": TEXT_VERSION + 1}, f"text extraction v{TEXT_VERSION + 1}, newer than"),
        ({"text_version": 0}, "text extraction version 0 is not a version"),
        ({"text_version": str(TEXT_VERSION)}, f"version '{TEXT_VERSION}' is not a version"),
        ({"text_version": True}, "text extraction version True is not a version"),
        ({"tokenizer": "cl100k"}, "tokenizer"),
        ({"labels": ["spam", "ham"]}, "labels"),
        ({"threshold": 1.5}, "threshold"),
        ({"max_tokens": 100_000}, "max_tokens"),
        ({"format": "other/9"}, "format"),
        ({"surprise": 1}, "bad filterd metadata"),
    ],
)
def test_mismatched_metadata_is_rejected(tmp_path, tiny_model, change, message):
    path = save_checkpoint(tmp_path, tiny_model, _meta(tiny_model))
    _rewrite_meta(path, **change)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(path)


def test_a_checkpoint_from_an_older_text_extraction_loads_scores_and_says_so(
    tmp_path, tiny_model, caplog
):
    """An upgrade that changes the text extraction must not stop a running filter: the
    checkpoint of the version before (v2 against v3) scores with today's text, and the log
    says that retraining aligns them."""
    older = TEXT_VERSION - 1
    path = save_checkpoint(tmp_path, tiny_model, _meta(tiny_model))
    current = filterd.load_classifier(path).score_message(b"Subject: hi\n\nhello there")
    _rewrite_meta(path, text_version=older)
    with caplog.at_level(logging.WARNING, logger="filterd"):
        clf = filterd.load_classifier(path)
    assert clf.meta.text_version == older
    assert clf.score_message(b"Subject: hi\n\nhello there") == pytest.approx(current)
    [note] = [r for r in caplog.records if r.name == "filterd"]
    assert note.levelno == logging.WARNING
    message = note.getMessage()
    assert "\n" not in message
    assert f"text extraction v{older}, this filterd extracts v{TEXT_VERSION}" in message
    assert f"filterd-train --init {path}" in message
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="filterd"):
        load_checkpoint(path, retrain=True)  # retraining is what the note asks for: no note
        _rewrite_meta(path, text_version=TEXT_VERSION)
        load_checkpoint(path)
    assert not caplog.records


def test_retraining_accepts_any_text_version(tmp_path, tiny_model):
    path = save_checkpoint(tmp_path, tiny_model, _meta(tiny_model))
    for version in (1, TEXT_VERSION + 1):
        _rewrite_meta(path, text_version=version)
        assert load_checkpoint(path, retrain=True).meta.text_version == version


def test_loading_draws_no_random_weights_and_stays_trainable(tmp_path, tiny_model):
    """The model is built without storage and takes the file's tensors: no random draw
    (on meta tensors torch's normal_ imports torch._dynamo, 1.5 s of every `filterd
    score`), and the parameters are ordinary trainable tensors for a retrain."""
    path = save_checkpoint(tmp_path / "ck", tiny_model, _meta(tiny_model))
    probe = (
        "import sys, torch\n"
        "from filterd.model.checkpoint import load_checkpoint\n"
        "torch.manual_seed(0); before = torch.rand(1)\n"
        "torch.manual_seed(0)\n"
        f"model, _, _ = load_checkpoint({str(path)!r})\n"
        "assert torch.equal(torch.rand(1), before), 'the generator moved: weights were drawn'\n"
        "assert 'torch._dynamo' not in sys.modules\n"
        "assert all(p.requires_grad and not p.is_meta for p in model.parameters())\n"
    )
    subprocess.run([sys.executable, "-c", probe], check=True, timeout=120)
    model, _, _ = load_checkpoint(path)
    loss = model(torch.tensor([[1, 2, 3]]), torch.tensor([3])).sum()
    loss.backward()
    torch.optim.AdamW(model.parameters()).step()  # in place on the loaded tensors
    changed = any(
        not torch.equal(a, b)
        for a, b in zip(model.state_dict().values(), tiny_model.state_dict().values(), strict=True)
    )
    assert changed
