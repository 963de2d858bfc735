"""Messages with nothing to read are labelled by `scoring.no_text`, never by the model (which
once called an empty file spam at p = 0.997); input that is not mail is warned about."""

import logging

import pytest

from filterd.config import Config
from filterd.engine import Engine
from filterd.headers import Tagger
from filterd.mail import Mail
from filterd.model.classifier import load_classifier
from tests.test_cli_score import run, spam_ck, state  # noqa: F401 - fixtures
from tests.test_engine import make_checkpoint

NO_TEXT = [
    b"",
    b"\n\n",
    b"From: <ann@example.org>\nTo: bob@example.net\nMessage-ID: <e@x>\n",  # header only
    b"Subject:  \nFrom: ann@example.org\n\n\xe2\x80\x8b\n",  # blank subject, invisible body
]
# An attachment alone is not "no text": the model reads "[attachment: image/png]".


@pytest.fixture(scope="module")
def spam_model(tmp_path_factory):
    return load_classifier(make_checkpoint(tmp_path_factory.mktemp("spam"), 6.0))  # p=0.9975


class Counting:
    def __init__(self, clf):
        self.clf, self.name, self.threshold, self.seen = clf, clf.name, clf.threshold, []

    def score_messages(self, raws, progress=None):
        self.seen += raws
        return self.clf.score_messages(raws)


@pytest.mark.parametrize("label", ["ham", "spam"])
def test_no_text_is_labelled_by_the_setting_not_the_model(spam_model, caplog, label):
    config = Config.model_validate({"scoring": {"no_text": label, "quarantine_threshold": 0.9}})
    engine = Engine(Counting(spam_model), config, Tagger(b"k" * 32))
    caplog.set_level(logging.INFO, "filterd.engine")
    texty = b"Subject: hi\n\nsee you at six\n"
    *verdicts, scored = engine.verdicts(
        [Mail(raw, origin=f"m{i}") for i, raw in enumerate(NO_TEXT)] + [Mail(texty)]
    )
    for v in verdicts:
        assert (v.probability, v.decided_by, v.label, v.action) == (None, "no_text", label, "tag")
    assert scored.decided_by == "model" and scored.probability == pytest.approx(0.9975, abs=1e-4)
    assert caplog.text.count("has no text to score") == len(NO_TEXT)
    tagged = engine.tagger.tag(NO_TEXT[2], verdicts[2])
    assert b"X-Spam-Status: " + (b"Yes" if label == "spam" else b"No") in tagged
    assert b" no_text" in tagged and tagged.endswith(NO_TEXT[2])


def test_cli_scores_empty_input_as_no_text_and_warns(monkeypatch, capsysbinary, spam_ck):  # noqa: F811
    code, out, err = run(monkeypatch, capsysbinary, ["score", "--checkpoint", spam_ck], b"")
    assert (code, out) == (0, b"ham - -\n")
    assert "warning: stdin: empty: nothing to score (labelled by scoring.no_text)" in err
    code, out, err = run(
        monkeypatch, capsysbinary, ["score", "--json", "--checkpoint", spam_ck], b"\x7fELF\x02\x01"
    )
    assert '"decided_by": "model"' not in out.decode()
    assert "warning: stdin: no header block: not a mail message?" in err
    code, out, err = run(
        monkeypatch, capsysbinary, ["score", "--checkpoint", spam_ck], b"Subject: hi\n\nwin\n"
    )
    assert code == 1 and "warning" not in err
