"""The loader's only evidence: a random GPT-2 from `transformers`, loaded through filterd."""

import hashlib
import http.server
import threading
import time

import pytest
import torch
from safetensors.torch import save_file

from filterd.model import pretrained
from filterd.model.batching import pad_batch
from filterd.model.pretrained import PretrainedError, load_pretrained, read_weights
from filterd.model.tokenizer import ENDOFTEXT, gpt2_tokenizer

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def reference():
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=2, n_head=2, n_embd=64, n_positions=128, attn_implementation="eager"
    )
    model = transformers.GPT2LMHeadModel(config).eval()
    # Random init leaves biases and norms at 0/1; perturb them so a mis-mapped one shows.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.fixture(scope="module")
def batch(sms_lines):
    tokens = [gpt2_tokenizer().encode(text, 100) for _, text in sms_lines[:8]]
    return pad_batch(tokens, ENDOFTEXT)[0]


def _assert_same(folder_or_file, reference, batch):
    ours = load_pretrained(folder_or_file).eval()
    with torch.no_grad():
        expected = reference.transformer(batch).last_hidden_state
        got = ours.hidden_states(batch)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= 1e-4


def test_safetensors_folder_from_save_pretrained(tmp_path, reference, batch):
    reference.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    _assert_same(tmp_path, reference, batch)


def test_safetensors_file_without_prefix_and_without_config(tmp_path, reference, batch):
    state = {k: v.contiguous() for k, v in reference.transformer.state_dict().items()}
    save_file(state, tmp_path / "weights.safetensors")
    _assert_same(tmp_path / "weights.safetensors", reference, batch)


def test_bin_with_prefix(tmp_path, reference, batch):
    reference.config.save_pretrained(tmp_path)
    torch.save(reference.state_dict(), tmp_path / "pytorch_model.bin")
    _assert_same(tmp_path, reference, batch)


def test_bin_without_prefix(tmp_path, reference, batch):
    torch.save(reference.transformer.state_dict(), tmp_path / "pytorch_model.bin")
    _assert_same(tmp_path / "pytorch_model.bin", reference, batch)


class _Evil:
    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path('PWNED').write_text('x')",))


def test_bin_never_unpickles_code(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({"wte.weight": _Evil()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(PretrainedError, match="cannot read weights"):
        read_weights(tmp_path / "pytorch_model.bin")
    assert not (tmp_path / "PWNED").exists()


def test_unknown_source_is_a_clear_error(tmp_path):
    with pytest.raises(PretrainedError, match="neither a file, a folder"):
        load_pretrained(tmp_path / "nope")
    with pytest.raises(PretrainedError, match=r"no model\.safetensors"):
        load_pretrained(tmp_path)


def test_hub_download_fails_fast_and_says_how_when_offline(tmp_path, monkeypatch):
    monkeypatch.setattr(pretrained, "HUB_URL", "http://127.0.0.1:9")  # nothing listens
    monkeypatch.setenv("FILTERD_CACHE", str(tmp_path))
    start = time.monotonic()
    with pytest.raises(PretrainedError) as err:
        load_pretrained("gpt2")
    assert time.monotonic() - start < 5
    message = str(err.value)
    assert "could not download gpt2" in message
    assert "model.safetensors" in message and "config.json" in message
    assert str(tmp_path / "gpt2") in message


def _serve(files: dict[str, bytes], etags: dict[str, str]):
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            name = self.path.rsplit("/", 1)[-1]
            body = files[name]
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("X-Linked-Etag", f'"{etags[name]}"')
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            return

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_hub_download_verifies_checksum_and_caches(tmp_path, monkeypatch, reference, batch):
    src = tmp_path / "src"
    reference.save_pretrained(src)
    files = {n: (src / n).read_bytes() for n in ("config.json", "model.safetensors")}
    etags = {n: hashlib.sha256(b).hexdigest() for n, b in files.items()}
    server = _serve(files, etags)
    monkeypatch.setattr(pretrained, "HUB_URL", f"http://127.0.0.1:{server.server_port}")
    try:
        weights = pretrained.download("gpt2", tmp_path / "cache")
        assert weights == tmp_path / "cache" / "gpt2" / "model.safetensors"
        _assert_same(weights.parent, reference, batch)
        etags["model.safetensors"] = "0" * 64  # a corrupted transfer
        with pytest.raises(PretrainedError, match="sha256"):
            pretrained.download("gpt2", tmp_path / "other")
        assert not (tmp_path / "other" / "gpt2" / "model.safetensors").exists()
    finally:
        server.shutdown()
