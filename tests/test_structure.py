"""The shape of the code: layers, no import cycles, plugins that load without torch, and
sources and actions that plug in through the registry alone."""

import ast
import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from filterd.config import Config
from filterd.daemon import load_sources
from filterd.engine import Engine
from filterd.headers import Tagger
from filterd.model.classifier import load_classifier
from filterd.plugin_api import Action, Outcome
from filterd.store import maildir
from tests.test_engine import make_checkpoint

ROOT = Path(__file__).resolve().parents[1]
# Repository folders and the package names they install as.
PACKAGES = {"filterd": "filterd", "plugins": "filterd.builtin", "trainer": "filterd.trainer"}

# Lowest first: a module may import modules of its own layer and of the layers below.
LAYERS = [
    # text extraction, the records passed around, listening addresses, the config schema
    (
        "filterd.text",
        "filterd.verdict",
        "filterd.mail",
        "filterd.headers",
        "filterd.listen",
        "filterd.config",
    ),
    # ... and the files of mail people keep, the feedback store's ways in
    # ... the spamd protocol's wire form (its server is a plugin, its client the CLI's)
    (
        "filterd.store",
        "filterd.download",
        "filterd.mailfiles",
        "filterd.learning",
        "filterd.spamd_protocol",
    ),
    # tokenizers and model families
    (
        "filterd.model.tokenizer",
        "filterd.model.family",
        "filterd.model.layers",
        "filterd.model.gpt2",
    ),
    # checkpoint, pretrained weights, int8, the classifier and its child process
    ("filterd.model",),
    (
        "filterd.plugin_api",
        "filterd.engine",
        "filterd.learn_socket",
        "filterd.retrainer",
        "filterd.metrics",
    ),
    ("filterd.builtin", "filterd.daemon"),
    ("filterd.cli",),
]
TRAINER_MAX_LAYER = 3  # beside the engine: the model layers and below, never engine or CLI
# Built-in plugins are written as a third party would: the interfaces and the bottom layers.
BUILTIN_MAY_IMPORT = ("filterd.plugin_api", *LAYERS[0], *LAYERS[1])


def modules() -> dict[str, Path]:
    found = {}
    for folder, package in PACKAGES.items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([package, *parts])] = path
    return found


def imports(path: Path, known: set[str]) -> set[str]:
    """Every filterd module a file imports, wherever the statement stands (in functions,
    under TYPE_CHECKING): a cycle or a wrong-way import is one even when deferred."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != "filterd":  # the package root: __version__ and a facade
                found.add(name)
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: imports(path, known) - {name} for name, path in mods.items()}


def layer(module: str) -> int:
    best, rank = "", -1
    for i, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > len(best):
                best, rank = prefix, i
    return rank


def within(module: str, prefixes) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def test_every_module_has_a_layer():
    unplaced = [m for m in modules() if m != "filterd" and not m.startswith("filterd.trainer")]
    assert [m for m in unplaced if layer(m) < 0] == []


def test_imports_follow_the_layers():
    wrong = []
    for module, targets in graph().items():
        if module == "filterd":
            continue
        for target in targets:
            if module.startswith("filterd.trainer"):
                ok = target.startswith("filterd.trainer") or 0 <= layer(target) <= TRAINER_MAX_LAYER
            elif target.startswith(("filterd.trainer", "filterd.builtin")):
                ok = module.startswith("filterd.builtin") and target.startswith("filterd.builtin")
            elif module.startswith("filterd.builtin"):
                ok = within(target, BUILTIN_MAY_IMPORT)
            else:
                ok = layer(target) <= layer(module)
            if not ok:
                wrong.append(f"{module} -> {target}")
    assert wrong == []


def test_no_import_cycles():
    edges = graph()
    cycles = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join([*path[path.index(nxt) :], nxt]))
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert cycles == []


def test_the_layer_rules_catch_a_wrong_way_import(tmp_path):
    """The checks above are not vacuous: an engine import in text code is caught."""
    bad = tmp_path / "bad.py"
    bad.write_text("from filterd.engine import Engine\nimport filterd.model.gpt2\n")
    found = imports(bad, set(modules()))
    assert found == {"filterd.engine", "filterd.model.gpt2"}
    assert [t for t in found if layer(t) > layer("filterd.text")] != []


@pytest.mark.parametrize(
    "module", ["actions", "lists", "stdin", "smtp_proxy", "maildir_source", "milter", "spamd"]
)
def test_builtin_plugins_load_no_torch(module):
    run = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", f"import filterd.builtin.{module}"],
        capture_output=True,
        text=True,
        check=True,
    )
    loaded = {line.rsplit("|", 1)[-1].strip() for line in run.stderr.splitlines()}
    assert f"filterd.builtin.{module}" in loaded
    assert not [name for name in loaded if name.split(".")[0] == "torch"]


# --- sources and actions through the registry ---------------------------------------------

DROPBOX = '''
"""A third party's source: message files dropped into a folder, results written beside."""
import asyncio
from pathlib import Path

from filterd.mail import Mail
from filterd.plugin_api import Options, Source


class DropOptions(Options):
    inbox: Path
    outbox: Path


class DropSource(Source):
    Options = DropOptions

    async def start(self, handle, context):
        self.handle, self.stopping, self.tasks = handle, False, set()
        self.poller = asyncio.create_task(self.poll())
        print("dropbox: started", flush=True)

    async def poll(self):
        while not self.stopping:
            for path in sorted(self.options.inbox.iterdir()):
                raw = path.read_bytes()
                path.unlink()
                task = asyncio.create_task(self.one(path.name, raw))
                self.tasks.add(task)
            await asyncio.sleep(0.05)

    async def one(self, name, raw):
        outcome = await self.handle(Mail(raw, origin=name))
        (self.options.outbox / f"{name}.{outcome.disposition}").write_bytes(outcome.data or b"")

    async def stop_accepting(self):
        self.stopping = True
        await self.poller

    async def drain(self, timeout):
        await asyncio.wait_for(asyncio.gather(*self.tasks), timeout)
        (self.options.outbox / "drained").write_text("yes")
'''


def install_plugin(root: Path, module: str, code: str, entry_points: str) -> Path:
    """A package installed as pip would leave it: the module and its dist-info."""
    root.mkdir(parents=True, exist_ok=True)
    (root / f"{module}.py").write_text(textwrap.dedent(code))
    dist = root / f"{module}-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module}\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(entry_points)
    return root


def test_a_source_plugin_registered_by_entry_point_runs_under_filterd_serve(tmp_path):
    site = install_plugin(
        tmp_path / "site",
        "acme_dropbox",
        DROPBOX,
        "[filterd.sources]\ndropbox = acme_dropbox:DropSource\n",
    )
    inbox, outbox = tmp_path / "in", tmp_path / "out"
    inbox.mkdir()
    outbox.mkdir()
    settings = {
        "checkpoint": str(make_checkpoint(tmp_path / "model", 2.0)),  # p = 0.8808
        "headers": {"secret_file": str(tmp_path / "secret")},
        "daemon": {"scoring_process": False},
        "sources": [{"name": "dropbox", "options": {"inbox": str(inbox), "outbox": str(outbox)}}],
    }
    config = tmp_path / "config.yaml"
    config.write_text(json.dumps(settings))
    env = os.environ | {"PYTHONPATH": str(site), "XDG_STATE_HOME": str(tmp_path / "state")}
    serve = [sys.executable, "-m", "filterd.cli", "serve", "--config", str(config)]
    proc = subprocess.Popen(serve, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    try:
        (inbox / "msg1").write_bytes(b"Subject: hello\n\nWin a prize now\n")
        deadline = time.monotonic() + 60
        while not (outbox / "msg1.deliver").exists():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=30)[0].decode()
    finally:
        proc.kill()
    assert proc.returncode == 0, out
    tagged = (outbox / "msg1.deliver").read_bytes()
    assert tagged.startswith(b"X-Spam-Flag: YES\n") and tagged.endswith(b"Win a prize now\n")
    assert (outbox / "drained").read_text() == "yes"  # stopped through the lifecycle
    assert "dropbox: started" in out and "stopped" in out

    # Its options are checked by its own schema, and the error names the key.
    settings["sources"][0]["options"] = {"inbx": str(inbox), "outbox": str(outbox)}
    config.write_text(json.dumps(settings))
    run = subprocess.run(serve, capture_output=True, text=True, env=env, timeout=60)
    assert run.returncode == 2
    assert re.search(r"sources\[0\]\.options\.inbox: Field required", run.stderr)
    assert re.search(r"sources\[0\]\.options\.inbx: Extra inputs", run.stderr)


class Stamp(Action):
    """A custom action: delivers the message with a header of its own."""

    inline = True

    def apply(self, mail, verdict, context):
        return Outcome("deliver", b"X-Acme: %.4f\n" % verdict.probability + mail.raw)


class HoldAll(Action):
    """A custom action that asks the source to hold what it is given."""

    def apply(self, mail, verdict, context):
        return Outcome("quarantine", b"X-Acme: held\n" + mail.raw)


@pytest.mark.parametrize("custom", [Stamp, HoldAll])
def test_maildir_mail_reaches_a_custom_action(tmp_path, custom):
    md = maildir.ensure(tmp_path / "Maildir")
    config = Config.model_validate(
        {"sources": [{"name": "maildir", "options": {"paths": [str(md)], "rescan_seconds": 0.1}}]}
    )
    clf = load_classifier(make_checkpoint(tmp_path / "model", -2.0))  # p = 0.1192: tag
    action = custom(custom.Options(), config)
    engine = Engine(clf, config, Tagger(b"k" * 32), actions={"tag": action})
    (source,) = load_sources(config)

    def stamped() -> list[Path]:
        return [p for p in md.glob("**/new/*") if p.read_bytes().startswith(b"X-Acme")]

    async def run():
        await source.start(engine.handle, engine.context)
        maildir.deliver(md, b"Subject: hi\n\nsee you at six\n", "1700000001.M1P1.host")
        deadline = time.monotonic() + 10
        while not stamped():
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        await source.stop_accepting()
        await source.drain(10)

    asyncio.run(run())
    placed = stamped()
    assert len(placed) == 1
    if custom is Stamp:
        assert placed[0].parent == md / "new"
        assert placed[0].read_bytes() == b"X-Acme: 0.1192\nSubject: hi\n\nsee you at six\n"
    else:  # held where the Maildir source holds mail: its Junk folder
        assert placed[0].parent == md / ".Junk" / "new"
        assert list((md / "new").iterdir()) == []


def test_the_suite_says_once_when_its_data_folder_is_missing(tmp_path):
    env = os.environ | {"FILTERD_TEST_DATA": str(tmp_path / "absent")}
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_config.py"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert run.returncode == 4
    out = run.stdout + run.stderr
    assert out.count("test data missing:") == 1 and "FILTERD_TEST_DATA" in out
    assert "passed" not in out and "error" not in out.lower().replace("test data missing", "")
