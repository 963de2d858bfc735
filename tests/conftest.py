from __future__ import annotations

from pathlib import Path

import pytest
import torch

from filterd.model.gpt2 import ARCHITECTURES, GPT2Classifier

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
SMS_FILE = SHARED / "datasets" / "sms-spam-collection" / "SMSSpamCollection"
SPAMASSASSIN = SHARED / "datasets" / "spamassassin-public-corpus"


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
