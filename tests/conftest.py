from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from filterd.model.gpt2 import ARCHITECTURES, GPT2Classifier

# The corpora the tests read: ../shared beside the checkout, or $FILTERD_TEST_DATA.
SHARED = Path(os.environ.get("FILTERD_TEST_DATA") or Path(__file__).resolve().parents[2] / "shared")
SMS_FILE = SHARED / "datasets" / "sms-spam-collection" / "SMSSpamCollection"
SPAMASSASSIN = SHARED / "datasets" / "spamassassin-public-corpus"


def pytest_configure(config: pytest.Config) -> None:
    """Without the corpora, say so once instead of failing dozens of tests one by one."""
    missing = [p for p in (SMS_FILE, SPAMASSASSIN) if not p.exists()]
    if missing:
        pytest.exit(
            f"test data missing: {', '.join(map(str, missing))}. The tests read the SMS Spam "
            "Collection and the SpamAssassin public corpus from ../shared beside this checkout "
            "(README, Quick start); put them there or point FILTERD_TEST_DATA at a copy.",
            returncode=4,
        )


@pytest.fixture(autouse=True)
def _state_dir(tmp_path, monkeypatch):
    """filterd's state (secret, quarantine, feedback store) in the test's own folder, never
    in the home of whoever runs the tests."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))


@pytest.fixture(scope="session")
def sms_lines() -> list[tuple[str, str]]:
    """(label, text) pairs of the SMS Spam Collection."""
    rows = []
    for line in SMS_FILE.read_text(encoding="utf-8").splitlines():
        label, text = line.split("\t", 1)
        rows.append((label, text))
    return rows


@pytest.fixture
def tiny_model() -> GPT2Classifier:
    torch.manual_seed(0)
    return GPT2Classifier(ARCHITECTURES["gpt2-tiny"]).eval()


@pytest.fixture(scope="module")
def ham(tmp_path_factory):
    """A gpt2-tiny classifier that scores every message 0.1192."""
    from filterd.model.classifier import load_classifier
    from tests.test_engine import make_checkpoint

    return load_classifier(make_checkpoint(tmp_path_factory.mktemp("ham"), -2.0))


@pytest.fixture(scope="module")
def spam(tmp_path_factory):
    """A gpt2-tiny classifier that scores every message 0.8808."""
    from filterd.model.classifier import load_classifier
    from tests.test_engine import make_checkpoint

    return load_classifier(make_checkpoint(tmp_path_factory.mktemp("spam"), 2.0))


@pytest.fixture(scope="module")
def sms_slice(tmp_path_factory, sms_lines):
    """120 ham and 120 spam lines of the real collection."""
    ham = [t for label, t in sms_lines if label == "ham"][:120]
    spam = [t for label, t in sms_lines if label == "spam"][:120]
    path = tmp_path_factory.mktemp("sms") / "SMSSlice"
    path.write_text("".join(f"ham\t{t}\n" for t in ham) + "".join(f"spam\t{t}\n" for t in spam))
    return path
