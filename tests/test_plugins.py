import sys
import textwrap

import pytest

from filterd import plugin_api
from filterd.config import Config, ConfigError, PluginChoice
from filterd.engine import Engine
from filterd.headers import Tagger
from filterd.mail import Mail
from tests.test_engine import Counting

KEY = b"k" * 32


def lists(**options):
    choice = PluginChoice(name="lists", options=options)
    return plugin_api.load("checks", choice, "checks[0]", Config())


def engine_with(*checks):
    return Engine(Counting(), Config(), Tagger(KEY), checks)


def mail(sender: str = "x@example.com", envelope: str | None = None) -> Mail:
    raw = f"From: Someone <{sender}>\nSubject: spam offer\n\nbody\n".encode()
    return Mail(raw, mail_from=envelope, rcpt_tos=("me@here.example",))


def test_builtins_are_registered_by_name():
    assert {"lists"} <= set(plugin_api.available("checks"))
    assert {"tag", "quarantine", "reject"} <= set(plugin_api.available("actions"))
    assert "stdin" in plugin_api.available("sources")


def test_lists_decide_without_the_model_by_from_or_envelope():
    check = lists(allow=["Friends.example", "boss@work.example"], block=["spam.example"])
    engine = engine_with(check)
    cases = [
        (mail("a@friends.example"), False, "allowlisted=friends.example"),
        (mail("a@mail.friends.example"), False, "allowlisted=friends.example"),  # subdomain
        (mail("boss@work.example"), False, "allowlisted=boss@work.example"),
        (
            mail("x@other.example", envelope="<bounce@spam.example>"),
            True,
            "blocklisted=spam.example",
        ),
        # a forged allowlisted From does not carry a blocklisted envelope sender through
        (mail("boss@work.example", envelope="a@spam.example"), True, "blocklisted=spam.example"),
    ]
    verdicts = engine.verdicts([m for m, _, _ in cases])
    for (_, spam, reason), v in zip(cases, verdicts, strict=True):
        assert (v.is_spam, v.reason, v.probability) == (spam, reason, None)
        assert v.decided_by == "check:lists"
    assert engine.classifier.batches == []  # the model was not even called
    tagged = Tagger(KEY).tag(cases[0][0].raw, verdicts[0])
    assert b"X-Spam-Status: No, score=0.0 required=5.0 allowlisted=friends.example" in tagged
    # not listed, or only "worker.example" which is not a subdomain of work.example
    (v,) = engine.verdicts([mail("boss@worker.example")])
    assert v.decided_by == "model" and v.probability == 0.9


def test_block_action_and_option_errors_name_the_key():
    engine = engine_with(lists(block=["spam.example"], block_action="quarantine"))
    assert engine.verdicts([mail("a@spam.example")])[0].action == "quarantine"
    with pytest.raises(ConfigError, match=r"checks\[0\]\.options\.allow\.0"):
        lists(allow=[7])
    with pytest.raises(ConfigError, match=r"checks\[0\]\.options\.block: .*not an address"):
        lists(block=["not a domain"])
    with pytest.raises(ConfigError, match=r"checks\[0\]\.options\.alow: Extra inputs"):
        lists(alow=["x.example"])
    with pytest.raises(ConfigError, match=r"checks\[0\]\.name: no checks plugin 'nope'.*lists"):
        plugin_api.load("checks", PluginChoice(name="nope"), "checks[0]", Config())


def test_third_party_plugin_installs_and_is_selected_from_config(tmp_path, monkeypatch):
    (tmp_path / "acme_filter.py").write_text(
        textwrap.dedent(
            """
            from filterd.plugin_api import Check, Decision, Options

            class SubjectOptions(Options):
                word: str

            class SubjectCheck(Check):
                Options = SubjectOptions
                stage = "post"

                def check(self, mail, verdict):
                    if self.options.word.encode() in mail.raw:
                        return Decision(True, f"subject-word={self.options.word}", "reject")
                    return None

            class NotAPlugin:
                pass
            """
        )
    )
    dist = tmp_path / "acme_filter-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-filter\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(
        "[filterd.checks]\nacme = acme_filter:SubjectCheck\nbroken = acme_filter:NotAPlugin\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "acme" in plugin_api.available("checks")
    config = Config.model_validate({"checks": [{"name": "acme", "options": {"word": "offer"}}]})
    check = plugin_api.load("checks", config.checks[0], "checks[0]", config)
    engine = engine_with(check)
    v1, v2 = engine.verdicts([mail(), Mail(b"Subject: hi\n\nnothing")])
    assert (v1.is_spam, v1.action, v1.reason, v1.decided_by) == (
        True,
        "reject",
        "subject-word=offer",
        "check:acme",
    )
    assert v2.decided_by == "model"
    with pytest.raises(ConfigError, match=r"checks\[0\]\.options\.word: Field required"):
        plugin_api.load("checks", PluginChoice(name="acme"), "checks[0]", config)
    with pytest.raises(ConfigError, match="not a filterd Check"):
        plugin_api.load("checks", PluginChoice(name="broken"), "checks[0]", config)
    sys.modules.pop("acme_filter", None)
