from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from filterd.config import Config, ConfigError, load_config

CONFIG_YAML = Path(__file__).resolve().parents[1] / "config.yaml"


def _keys(model: type[BaseModel], prefix: str = "") -> set[str]:
    keys = set()
    for name, field in model.model_fields.items():
        keys.add(prefix + name)
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            keys |= _keys(field.annotation, f"{prefix}{name}.")
    return keys


def _yaml_keys(data: dict, prefix: str = "") -> set[str]:
    keys = set()
    for name, value in data.items():
        keys.add(prefix + name)
        if isinstance(value, dict):
            keys |= _yaml_keys(value, f"{prefix}{name}.")
    return keys


def test_config_yaml_documents_every_setting_with_its_default():
    data = yaml.safe_load(CONFIG_YAML.read_text())
    assert _yaml_keys(data) == _keys(Config)
    assert load_config(CONFIG_YAML) == Config()


def test_missing_default_file_means_defaults_but_a_named_one_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setattr("filterd.config.DEFAULT_PATH", tmp_path / "absent.yaml")
    assert load_config() == Config()
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "absent.yaml")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("scoring:\n  treshold: 0.5\n", r"scoring\.treshold: Extra inputs"),
        ("colour: red\n", r"colour: Extra inputs"),
        ("scoring:\n  threshold: high\n", r"scoring\.threshold: Input should be a valid number"),
        (
            "scoring:\n  quarantine_threshold: 1.5\n",
            r"scoring\.quarantine_threshold: .*less than or equal to 1",
        ),
        ("relay:\n  port: 0\n", r"relay\.port: .*greater than or equal to 1"),
        (
            "scoring:\n  threshold: 0.8\n  quarantine_threshold: 0.6\n",
            r"scoring: .*quarantine_threshold \(0\.6\) must be >= threshold \(0\.8\)",
        ),
        (
            "scoring:\n  quarantine_threshold: 0.9\n  reject_threshold: 0.7\n",
            r"reject_threshold \(0\.7\) must be >= quarantine_threshold \(0\.9\)",
        ),
        ("scoring:\n  failure_policy: drop\n", r"scoring\.failure_policy: .*fail_open"),
        ("headers:\n  prefix: 'X Spam:'\n", r"headers\.prefix: String should match"),
        ("headers:\n  subject_prefix: |\n    [SPAM]\n", r"headers\.subject_prefix: String should"),
        (
            'headers:\n  subject_prefix: "[SPAM]\\r\\nBcc: x@example.org "\n',
            r"headers\.subject_prefix: String should match",
        ),
        ('headers:\n  subject_prefix: "a\\tb"\n', r"headers\.subject_prefix: String should"),
        ("checks:\n  - options: {}\n", r"checks\.0\.name: Field required"),
        ("- a list\n", "mapping of settings"),
        ("scoring: [\n", "cannot read config"),
    ],
)
def test_errors_name_the_key(tmp_path, text, message):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as info:
        load_config(path)
    assert str(path) in str(info.value)


def test_defaults_live_in_the_state_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    config = Config()
    assert config.headers.secret_path() == tmp_path / "filterd" / "secret"
    assert config.quarantine.store_path() == tmp_path / "filterd" / "quarantine"
    monkeypatch.delenv("XDG_STATE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert Config().headers.secret_path() == tmp_path / "home/.local/state/filterd/secret"


def test_old_smtp_and_maildir_sections_become_sources():
    old = Config.model_validate(
        {"smtp": {"enabled": True, "port": 0}, "maildir": {"paths": ["/m"], "rescan_seconds": 5}}
    )
    assert [(c.name, c.options) for c in old.sources] == [
        ("smtp", {"port": 0}),
        ("maildir", {"paths": ["/m"], "rescan_seconds": 5}),
    ]
    assert [where for where, _, _ in old.source_choices()] == ["smtp", "maildir"]
    assert len(old.notes()) == 2 and "sources: [{name: smtp" in old.notes()[0]
    new = Config.model_validate(
        {
            "sources": [
                {"name": "smtp", "options": {"port": 0}},
                {"name": "maildir", "options": {"paths": ["/m"], "rescan_seconds": 5}},
            ]
        }
    )
    assert new.sources == old.sources and new.notes() == []
    assert [k for _, _, k in new.source_choices()] == ["sources[0].options", "sources[1].options"]
    off = Config.model_validate({"smtp": {"enabled": False, "port": 1}, "maildir": {"paths": []}})
    assert off.sources == [] and off.notes() == []


def test_an_old_section_beside_its_new_entry_is_an_error(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("smtp: {enabled: true}\nsources: [{name: smtp}]\n")
    with pytest.raises(ConfigError, match="smtp: set it as a `smtp` entry of sources only"):
        load_config(path)


def test_config_yaml_documents_every_builtin_source_option_with_its_default():
    """The commented `sources:` example lists each built-in source's options: the same
    names as the plugin's schema, with its defaults (paths, which has none, aside)."""
    from filterd.builtin.maildir_source import MaildirOptions
    from filterd.builtin.milter import MilterOptions
    from filterd.builtin.smtp_proxy import SmtpOptions
    from filterd.builtin.spamd import SpamdOptions

    text = CONFIG_YAML.read_text()
    block = text[text.index("#   sources:") : text.index("\nsources:")]
    example = yaml.safe_load("\n".join(line[2:] for line in block.splitlines()))
    documented = {entry["name"]: entry["options"] for entry in example["sources"]}
    schemas = {
        "smtp": SmtpOptions,
        "maildir": MaildirOptions,
        "spamd": SpamdOptions,
        "milter": MilterOptions,
    }
    assert set(documented) == set(schemas)
    for name, schema in schemas.items():
        assert set(documented[name]) == set(schema.model_fields), name
        given = {k: v for k, v in documented[name].items() if k != "paths"}
        # Validated, so "::1/128" and the network it means compare equal.
        required = {"paths": ["/m"]} if name == "maildir" else {}
        parsed = schema.model_validate(required | given)
        defaults = schema.model_construct().model_dump()
        for key in given:
            assert getattr(parsed, key) == defaults[key], (name, key)
