"""Security checks: crafted checkpoints and configs run no code and fail fast with a clear
error; quarantine commands stay inside the store; spoofed headers and forged markers never
survive tagging."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import struct
import sys
import time
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save as save_tensors

from filterd.cli import main
from filterd.config import ConfigError, load_config
from filterd.engine import Engine
from filterd.headers import Tagger
from filterd.mail import Mail
from filterd.model.checkpoint import CheckpointError, CheckpointMeta, is_checkpoint, load_checkpoint
from filterd.model.classifier import load_classifier
from filterd.model.gpt2 import ARCHITECTURES, GPT2, GPT2Classifier
from filterd.model.pretrained import PretrainedError, load_pretrained
from filterd.store.quarantine import QuarantineError, Store
from filterd.verdict import Verdict
from tests.test_engine import make_checkpoint

KEY = b"k" * 32
# Examples per hypothesis property; raise it for a long fuzz run (README "Robustness").
EXAMPLES = int(os.environ.get("FILTERD_FUZZ_EXAMPLES", "300"))
SPAM = Verdict(0.9, True, "tag", 0.5, "gpt2-tiny")


@pytest.fixture(autouse=True)
def state(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.setattr("filterd.config.DEFAULT_PATH", tmp_path / "no-default.yaml")
    monkeypatch.chdir(tmp_path)  # payloads that did run would leave PWNED files here


def run_cli(monkeypatch, capsysbinary, argv: list, stdin: bytes = b"") -> tuple[int, bytes, str]:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin)))
    code = main([str(a) for a in argv])
    out, err = capsysbinary.readouterr()
    return code, out, err.decode()


def pwned(tmp_path: Path) -> list[Path]:
    return sorted(tmp_path.rglob("PWNED*"))


class Payload:
    """Unpickling this runs code: it must never happen."""

    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path('PWNED-pickle').write_text('x')",))


# ------------------------------------------------------------------------------------------
# checkpoints


@pytest.fixture(scope="module")
def tensors() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = GPT2Classifier(ARCHITECTURES["gpt2-tiny"])
    return {k: v.contiguous() for k, v in model.state_dict().items()}


def forge(path: Path, tensors: dict, changes: dict | None = None, raw_meta: str | None = None):
    """A checkpoint whose sha256 is right (so loading reaches the metadata checks) but whose
    metadata says what an attacker wants."""
    meta = asdict(CheckpointMeta(arch="gpt2-tiny", config=ARCHITECTURES["gpt2-tiny"].to_dict()))
    meta.update(changes or {})
    plain = save_tensors(tensors, metadata={})
    digest = hashlib.sha256(plain[8 + struct.unpack("<Q", plain[:8])[0] :]).hexdigest()
    header = {"filterd": raw_meta if raw_meta is not None else json.dumps(meta), "sha256": digest}
    path.write_bytes(save_tensors(tensors, metadata=header))


def raw_header(path: Path, header: bytes) -> None:
    path.write_bytes(struct.pack("<Q", len(header)) + header)


TINY = ARCHITECTURES["gpt2-tiny"].to_dict()
FORGED_METADATA = {
    "huge-architecture": ({"config": {**TINY, "n_layer": 10_000, "n_embd": 8192}}, "match"),
    "config-not-a-mapping": ({"config": [1, 2]}, "bad architecture"),
    "family-unknown": ({"family": "llama"}, "unknown model family"),
    "family-not-a-name": ({"family": ["gpt2"]}, "bad architecture"),
    "config-unknown-field": ({"config": {**TINY, "__class__": "os.system"}}, "bad architecture"),
    "config-wrong-type": ({"config": {**TINY, "layer_norm_epsilon": "x"}}, "bad architecture"),
    "threshold-list": ({"threshold": [0.5]}, "not a probability"),
    "threshold-string": ({"threshold": "0.5"}, "not a probability"),
    "threshold-nan": ({"threshold": float("nan")}, "not a probability"),
    "max-tokens-huge": ({"max_tokens": 10**12}, "max_tokens"),
    "labels-swapped": ({"labels": ["spam", "ham"]}, "labels"),
    "arch-name-with-line-break": ({"arch": "gpt2\r\nBcc: x@example.org"}, "not a printable"),
    "arch-name-not-a-string": ({"arch": ["gpt2"]}, "not a printable"),
    "unknown-key": ({"__reduce__": ["os.system", "id"]}, "bad filterd metadata"),
    "format-other": ({"format": "pickle"}, "format"),
    "text-version-not-a-number": ({"text_version": "1"}, "text extraction version"),
    "text-version-newer": ({"text_version": 99}, "text extraction v99, newer"),
}
FORGED_RAW_META = {
    "not-json": "{nope",
    "json-list": "[1, 2]",
    "nested-100k-deep": "[" * 100_000 + "]" * 100_000,
    "huge-integer": "1" + "0" * 5000,
}
FORGED_HEADERS = {
    "nested-100k-deep": b"[" * 100_000 + b"]" * 100_000,
    "a-list": b"[1, 2]",
    "metadata-a-list": b'{"__metadata__": [1]}',
    "metadata-value-an-object": b'{"__metadata__": {"filterd": {"a": 1}}}',
    "bad-utf8": b'{"\xff": 1}',
    "python-tag": b'{"__metadata__": {"filterd": "!!python/object/apply:os.system [id]"}}',
}


@pytest.mark.parametrize("case", sorted(FORGED_METADATA))
def test_forged_metadata_is_refused_before_building_anything(tmp_path, tensors, case, monkeypatch):
    changes, message = FORGED_METADATA[case]
    path = tmp_path / "model.safetensors"
    forge(path, tensors, changes)
    built: list = []
    real = GPT2.build

    def guarded(self, config):
        built.append(config)
        if config.n_layer > 64:  # the unfixed loader would allocate ~13 GB here
            raise MemoryError("test guard: a huge model would have been built")
        return real(self, config)

    monkeypatch.setattr(GPT2, "build", guarded)
    start = time.perf_counter()
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(path)
    assert time.perf_counter() - start < 5
    assert all(c.n_layer <= 64 for c in built)


@pytest.mark.parametrize("case", sorted(FORGED_RAW_META))
def test_unreadable_metadata_is_a_checkpoint_error(tmp_path, tensors, case):
    path = tmp_path / "model.safetensors"
    forge(path, tensors, raw_meta=FORGED_RAW_META[case])
    with pytest.raises(CheckpointError, match="bad filterd metadata"):
        load_checkpoint(path)


@pytest.mark.parametrize("case", sorted(FORGED_HEADERS))
def test_hostile_safetensors_headers_are_checkpoint_errors(tmp_path, case):
    path = tmp_path / "model.safetensors"
    raw_header(path, FORGED_HEADERS[case])
    with pytest.raises(CheckpointError, match=re.escape(str(path))):
        load_checkpoint(path)
    assert is_checkpoint(path) in (True, False)  # the trainer's probe never raises


def test_pickles_never_run(tmp_path, tensors, monkeypatch, capsysbinary):
    """A pickle as the checkpoint, as pretrained weights (.bin) and inside a weights dict."""
    torch.save({"wte.weight": Payload()}, tmp_path / "model.safetensors")
    torch.save({"wte.weight": Payload()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        load_checkpoint(tmp_path)
    assert not is_checkpoint(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(PretrainedError, match="cannot read weights"):
        load_pretrained(tmp_path)  # what `filterd-train --init DIR` calls
    torch.save(Payload(), tmp_path / "model.safetensors")
    code, _, err = run_cli(monkeypatch, capsysbinary, ["score", "--checkpoint", tmp_path], b"x")
    assert code == 3 and "model.safetensors" in err
    assert pwned(tmp_path) == []


def test_forged_checkpoint_through_the_cli_exits_3_naming_the_file(
    tmp_path, tensors, monkeypatch, capsysbinary
):
    path = tmp_path / "model.safetensors"
    forge(path, tensors, {"config": {**TINY, "n_layer": 10_000}})
    code, out, err = run_cli(monkeypatch, capsysbinary, ["score", "--checkpoint", path], b"x")
    assert (code, out) == (3, b"") and str(path) in err and "architecture" in err
    code, out, err = run_cli(monkeypatch, capsysbinary, ["score", "--tag", "--checkpoint", path])
    assert code == 0 and out.startswith(b"X-Spam-Status: Unscored, reason=CheckpointError")


# ------------------------------------------------------------------------------------------
# configuration

YAML_CODE = {
    "object-apply": "!!python/object/apply:os.system ['touch PWNED-yaml1']\n",
    "in-a-value": "checkpoint: !!python/object/apply:os.system ['touch PWNED-yaml2']\n",
    "name": "scoring: !!python/name:os.system\n",
    "object-new": "device: !!python/object/new:subprocess.Popen [['touch', 'PWNED-yaml3']]\n",
    "module": "device: !!python/module:os\n",
}


@pytest.mark.parametrize("case", sorted(YAML_CODE))
def test_yaml_tags_cannot_run_code(tmp_path, monkeypatch, capsysbinary, case):
    path = tmp_path / "config.yaml"
    path.write_text(YAML_CODE[case])
    with pytest.raises(ConfigError, match=r"config\.yaml: cannot read config"):
        load_config(path)
    code, _, err = run_cli(monkeypatch, capsysbinary, ["check", "--config", path])
    assert code == 2 and "config.yaml" in err
    assert pwned(tmp_path) == []


def test_yaml_bombs_fail_fast(tmp_path, monkeypatch, capsysbinary):
    laughs = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for prev, name in zip("abcdefgh", "bcdefghi", strict=True):
        laughs.append(f"{name}: &{name} [" + ",".join([f"*{prev}"] * 9) + "]")
    bombs = {
        "laughs": "\n".join(laughs) + "\n",
        "laughs-in-a-list-setting": "maildir:\n  paths: *i\n".join(["\n".join(laughs) + "\n", ""]),
        "deep": "checks: " + "[" * 600 + "]" * 600 + "\n",  # past the recursion limit
    }
    for name, text in bombs.items():
        path = tmp_path / f"{name}.yaml"
        path.write_text(text)
        start = time.perf_counter()
        with pytest.raises(ConfigError, match=re.escape(str(path))):
            load_config(path)
        assert time.perf_counter() - start < 5, name
        code, _, err = run_cli(monkeypatch, capsysbinary, ["check", "--config", path])
        assert code == 2 and str(path) in err, (name, err)


def test_plugin_names_reach_entry_points_only(tmp_path, monkeypatch, capsysbinary):
    ck = make_checkpoint(tmp_path / "ck", 0.0)
    for name in ("os:system", "filterd.builtin.lists:ListsCheck", "../../evil", "builtins:exec"):
        path = tmp_path / "config.yaml"
        path.write_text(f"checkpoint: {ck}\nchecks:\n  - name: {json.dumps(name)}\n")
        code, _, err = run_cli(monkeypatch, capsysbinary, ["check", "--config", path])
        assert code == 2 and f"no checks plugin {name!r}" in err


# ------------------------------------------------------------------------------------------
# quarantine

FAKE_ID = "1700000000.0123456789abcdef"


@pytest.fixture
def store(tmp_path) -> Store:
    store = Store(tmp_path / "state" / "filterd" / "quarantine")
    store.add(Mail(b"Subject: held\n\nbody", "s@example.org", ("r@example.org",)), SPAM)
    return store


@pytest.fixture
def outside(tmp_path) -> Path:
    """Files an attacker would like read or deleted: one named like an ID, its details,
    and an old file `expire` would take for debris."""
    folder = tmp_path / "outside"
    folder.mkdir()
    (folder / FAKE_ID).write_text("victim")
    (folder / f"{FAKE_ID}.json").write_text("{}")
    (folder / "old").write_text("old victim")
    os.utime(folder / "old", (0, 0))
    return folder


TRAVERSAL_IDS = ["../../outside/" + FAKE_ID, "/etc/passwd", f"{FAKE_ID}/..", "..", f"{FAKE_ID}\n"]


@pytest.mark.parametrize("qid", TRAVERSAL_IDS)
def test_quarantine_commands_refuse_path_traversal(
    tmp_path, monkeypatch, capsysbinary, store, outside, qid
):
    for argv in (
        ["show", qid],
        ["release", qid],
        ["release", qid, "--to", tmp_path / "inbox"],
        ["delete", qid],
    ):
        code, out, err = run_cli(monkeypatch, capsysbinary, ["quarantine", *argv])
        assert (code, out) == (5, b"") and "not a quarantine ID" in err
    assert sorted(p.name for p in outside.iterdir()) == sorted([FAKE_ID, f"{FAKE_ID}.json", "old"])
    assert not (tmp_path / "inbox").exists()


@pytest.mark.parametrize("folder", ["new", "cur", "tmp", "filterd-meta"])
def test_quarantine_refuses_symlinked_folders(
    tmp_path, monkeypatch, capsysbinary, store, outside, folder
):
    os.rename(store.root / folder, store.root / f"{folder}.moved")
    os.symlink(outside, store.root / folder)
    calls = [
        ["show", FAKE_ID],
        ["release", FAKE_ID],
        ["delete", FAKE_ID],
        ["list"],
        ["expire"],
    ]
    refused = 0
    for argv in calls:
        code, out, err = run_cli(monkeypatch, capsysbinary, ["quarantine", *argv])
        assert b"victim" not in out
        refused += code == 5 and "symlink" in err
    assert refused >= 1
    with pytest.raises(QuarantineError, match="symlink"):
        store.add(Mail(b"x"), SPAM)  # nothing is written through the link either
    assert sorted(p.name for p in outside.iterdir()) == sorted([FAKE_ID, f"{FAKE_ID}.json", "old"])


def test_quarantine_refuses_a_symlinked_message(
    tmp_path, monkeypatch, capsysbinary, store, outside
):
    os.symlink(outside / FAKE_ID, store.root / "cur" / f"{FAKE_ID}:2,S")
    for argv in (["show", FAKE_ID], ["release", FAKE_ID], ["delete", FAKE_ID]):
        code, out, err = run_cli(monkeypatch, capsysbinary, ["quarantine", *argv])
        assert code == 5 and "symlink" in err and b"victim" not in out
    assert (outside / FAKE_ID).read_text() == "victim"


# ------------------------------------------------------------------------------------------
# spoofed headers and forged markers

SPOOFS = [
    b"X-Spam-Flag: NO",
    b"x-spam-flag: no",
    b"X-SPAM-Score: 0.0",
    b"X-Spam-Status: No, score=0.0 required=5.0\n\tprobability=0.001 model=gpt2",
    b"X-Spam-Flag : NO",
    b"X-Spam-Flag\t:NO",
    b"X-Spam-Level:",
    b"X-Spam-Marker: v2 " + b"0" * 64,
    b"X-Spam-Marker: v2 " + b"ab" * 32 + b"\n  continued",
    b"X-Spam-Flag\x00: NO",
    b"X-Spam-Flag NO",
]
FIELDS = [
    b"Subject: cheap pills",
    b"From: Sender <s@example.org>",
    b"Received: from a.example\n\tby b.example",
    b"X-Other: kept",
    b"To: r@example.org",
]
JUNK = [b"not a header line", b"Bad\x00Name: v", b"H\xe9ader: v", b">From x", b"::", b"Subject"]


@st.composite
def spoofed_messages(draw) -> tuple[bytes, bytes]:
    """(message, the same message without its spoofed fields)."""
    parts = draw(
        st.lists(
            st.one_of(
                st.sampled_from(FIELDS).map(lambda f: (f, True)),
                st.sampled_from(SPOOFS).map(lambda f: (f, False)),
                st.sampled_from(JUNK).map(lambda f: (f, True)),
            ),
            min_size=1,
            max_size=10,
        )
    )
    body = draw(st.sampled_from([b"", b"body", b"X-Spam-Flag: NO\nbody", b"\nbody\n"]))
    eol = draw(st.sampled_from([b"\n", b"\r\n"]))
    blank = draw(st.booleans())

    def join(lines: list[bytes]) -> bytes:
        text = b"".join(line.replace(b"\n", eol) + eol for line in lines)
        return text + (eol + body.replace(b"\n", eol) if blank else b"")

    return join([p for p, _ in parts]), join([p for p, keep in parts if keep])


def header_area(raw: bytes) -> list[bytes]:
    """The header lines as procmail and Dovecot see them: everything up to the first empty
    line, continuation lines joined to the line they continue."""
    head = re.split(rb"\r?\n\r?\n", raw, maxsplit=1)[0]
    return re.split(rb"\r?\n(?![ \t])", head)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(message=spoofed_messages(), spam=st.booleans(), unscored=st.booleans())
def test_spoofed_headers_never_survive_tagging(message, spam, unscored):
    raw, clean = message
    tagger = Tagger(KEY)
    verdict = Verdict(0.9 if spam else 0.1, spam, "tag", 0.5, "gpt2-tiny")
    out = tagger.unscored(raw, "test") if unscored else tagger.tag(raw, verdict)
    prefixed = [line for line in header_area(out) if line.lower().startswith(b"x-spam-")]
    names = [line.split(b":", 1)[0] for line in prefixed]
    if unscored:
        assert names == [b"X-Spam-Status", b"X-Spam-Marker"]
        assert prefixed[0].startswith(b"X-Spam-Status: Unscored, reason=test")
    else:
        flag = [b"X-Spam-Flag"] if spam else []
        assert names == [
            *flag,
            b"X-Spam-Status",
            b"X-Spam-Score",
            b"X-Spam-Level",
            b"X-Spam-Marker",
        ]
    ours = len(prefixed)
    eol = b"\r\n" if b"\r\n" in out else b"\n"
    lines = out.split(eol)
    assert eol.join(lines[ours:]) == clean  # everything else kept, byte for byte
    assert (tagger.previous(out) is None) == unscored  # unscored mail is scored again later


def test_forged_copied_and_stale_markers_are_rescored(tmp_path):
    engine = Engine(load_classifier(make_checkpoint(tmp_path, -3.0)), tagger=Tagger(KEY))
    ham, other = b"Subject: a\n\nhello\n", b"Subject: b\n\nbuy now\n"
    spam_verdict = Verdict(0.99, True, "tag", 0.5, "gpt2-tiny")
    tagged = engine.tagger.tag(ham, spam_verdict)
    marker = next(line for line in tagged.split(b"\n") if line.startswith(b"X-Spam-Marker"))
    status = next(line for line in tagged.split(b"\n") if line.startswith(b"X-Spam-Status"))
    forged = {
        "other secret": Tagger(b"j" * 32).tag(ham, spam_verdict),
        "copied to another message": b"\n".join([status, marker, other.decode().strip().encode()]),
        "stale status": tagged.replace(b"Yes, score=9.9", b"No, score=0.1"),
        "edited body": tagged.replace(b"hello", b"hello, click here"),
        "two markers": marker + b"\n" + tagged,
    }
    assert engine.verdicts([Mail(tagged)])[0].decided_by == "marker"
    for name, raw in forged.items():
        (verdict,) = engine.verdicts([Mail(raw)])
        assert verdict.decided_by == "model" and not verdict.is_spam, name
        out = engine.tagger.tag(raw, verdict)
        assert out.count(b"X-Spam-Marker") == 1 and b"X-Spam-Flag" not in out, name
        assert engine.tagger.previous(out) == (False, pytest.approx(verdict.probability, abs=1e-3))
    engine.close()


def test_spoofs_do_not_survive_the_cli_pipe(tmp_path, monkeypatch, capsysbinary):
    ck = make_checkpoint(tmp_path / "ck", -3.0)
    raw = b"".join(s.replace(b"\n", b"\r\n") + b"\r\n" for s in [FIELDS[0], JUNK[1], *SPOOFS])
    raw += b"\r\nX-Spam-Flag: YES in the body stays\r\n"
    code, out, err = run_cli(monkeypatch, capsysbinary, ["score", "--tag", "--checkpoint", ck], raw)
    assert code == 0, err
    prefixed = [line for line in header_area(out) if line.lower().startswith(b"x-spam-")]
    assert [p.split(b":")[0] for p in prefixed] == [
        b"X-Spam-Status",
        b"X-Spam-Score",
        b"X-Spam-Level",
        b"X-Spam-Marker",
    ]
    assert prefixed[0].startswith(b"X-Spam-Status: No, score=0.5 ")
    assert out.endswith(b"Bad\x00Name: v\r\n\r\nX-Spam-Flag: YES in the body stays\r\n")
