"""A fleet of daemons (README "A fleet of daemons"): two real `filterd serve` processes
sharing one checkpoint path and one marker secret, a checkpoint replaced the way rsync
does reaching both, a marker from one accepted by the other; both behind one throwaway
Postfix (tests/postfix.py), the second taking the mail while the first is down; and the
feedback stores of several hosts merged for `filterd learn --stats` and `filterd retrain`
(real files, real processes)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import smtplib
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from filterd.config import Config, ConfigError, load_config
from filterd.headers import Tagger, load_secret
from filterd.learning import stores
from filterd.model.checkpoint import checkpoint_path
from filterd.retrainer import Retrainer
from filterd.store.feedback import FeedbackStore, newest, text_key
from filterd.text import message_text
from filterd.verdict import Verdict
from tests import postfix
from tests.postfix import AFTER_QUEUE_MASTER_CF, FLEET_MAIN_CF, Postfix, free_port
from tests.test_daemon import Daemon, wait_until
from tests.test_engine import make_checkpoint
from tests.test_learning import SPAM, filterd, mail, parent_checkpoint, write_config
from tests.test_metrics import sample, scrape, sha
from tests.test_smtp_proxy import MSG as SMTP_MSG
from tests.test_spamd import LISTENING, MSG, spamc

README = Path(__file__).resolve().parents[1] / "README.md"

# The README's config of the first instance behind one Postfix (the second: its own two
# ports), and Prometheus scraping both.
FLEET_CONFIG = """\
# /etc/filterd/a.yaml
checkpoint: /var/lib/filterd/model        # where the trainer host's checkpoints arrive
headers:
  secret_file: /var/lib/filterd/secret    # the same file (mode 0600) on every host
learning:
  fleet_store: /var/lib/filterd/feedback  # this host writes its own subfolder
relay:
  port: 10026                             # back into Postfix
sources:
  - name: smtp
    options: {{port: {smtp_port}, mode: after_queue}}
metrics:
  enabled: true
  port: {metrics_port}
"""
SCRAPE_CONFIG = """\
scrape_configs:
  - job_name: filterd
    static_configs:
      - targets: ["127.0.0.1:9847", "127.0.0.1:9848"]
"""


def instance(folder: Path, shared: Path, source: dict) -> dict:
    """One daemon's settings: the fleet's checkpoint and secret, its own state."""
    return {
        "checkpoint": str(shared / "model"),
        "headers": {"secret_file": str(shared / "secret")},
        "quarantine": {"path": str(folder / "quarantine")},
        "daemon": {"reload_check_seconds": 0.2},
        "scoring": {"batch_wait_ms": 1},
        "metrics": {"enabled": True, "port": 0},
        "sources": [source],
    }


def start(configs: dict[Path, dict]) -> list[Daemon]:
    """Daemons started at once (folder: settings), each with its metrics port found in its
    ready line; if one fails to start, the others are stopped."""
    with ThreadPoolExecutor(len(configs)) as pool:
        futures = []
        for folder, settings in configs.items():
            folder.mkdir()
            futures.append(pool.submit(Daemon, folder, settings, smtp=False))
    daemons = [f.result() for f in futures if f.exception() is None]
    if len(daemons) < len(futures):
        for daemon in daemons:
            daemon.kill()
        raise next(f.exception() for f in futures if f.exception() is not None)
    for daemon in daemons:
        daemon.metrics = int(daemon.wait_for(r"ready: .*, metrics on 127\.0\.0\.1:(\d+)")[1])
    return daemons


def with_id(raw: bytes, mid: str) -> bytes:
    return raw.replace(b"<spamd1@example.org>", mid.encode())


def test_a_new_checkpoint_reaches_both_daemons_and_each_trusts_the_others_marker(tmp_path):
    shared = tmp_path / "shared"
    make_checkpoint(shared / "model", -2.0)  # ham: p = 0.1192
    load_secret(shared / "secret")  # created once (0600), then the same file for both
    spamd = {"name": "spamd", "options": {"port": 0}}
    a, b = start({tmp_path / n: instance(tmp_path / n, shared, spamd) for n in ("a", "b")})
    try:
        port = {d: int(LISTENING.search("".join(d.lines))[1].rpartition(":")[2]) for d in (a, b)}
        for daemon in (a, b):
            checked = spamc(port[daemon], "-c")
            assert (checked.returncode, checked.stdout) == (0, b"1.2/5.0\n")
        tagged_by_a = spamc(port[a], data=with_id(MSG, "<from-a@example.org>")).stdout
        assert b"X-Spam-Status: No, score=1.2" in tagged_by_a

        # The trainer host's new checkpoint arrives as rsync writes it: a temporary name
        # in the same folder, renamed over the old file.
        built = make_checkpoint(tmp_path / "trainer" / "model", 2.0)  # spam: p = 0.8808
        arriving = shared / "model" / ".model.safetensors.Xa1b2c"
        shutil.copyfile(built, arriving)
        os.replace(arriving, checkpoint_path(shared / "model"))
        for daemon in (a, b):
            daemon.wait_for(r"reload \(checkpoint file changed\): gpt2-tiny")
            wait_until(  # the new file's hash is taken after the reload is logged
                lambda d=daemon: (
                    sample(
                        scrape(d.metrics),
                        "filterd_checkpoint_info",
                        name="gpt2-tiny",
                        sha256=sha(built),
                    )
                    == 1
                )
            )
            assert sample(scrape(daemon.metrics), "filterd_model_reloads_total", result="ok") == 1
            checked = spamc(port[daemon], "-c")
            assert (checked.returncode, checked.stdout) == (1, b"8.8/5.0\n")

        # B passes A's message on untouched: A's marker vouches for A's verdict (ham, from
        # the old model), so B does not score it again.
        assert spamc(port[b], data=tagged_by_a).stdout == tagged_by_a
        b.wait_for(r"message_id=<from-a@example\.org> .*label=ham decided_by=marker score=-")
        # One marked with another secret is no verdict: B scores it and tags it anew.
        forged = Tagger(os.urandom(32)).tag(
            with_id(MSG, "<forged@example.org>"), Verdict(0.1, False, "tag", 0.5, "gpt2-tiny")
        )
        retagged = spamc(port[b], data=forged).stdout
        assert retagged != forged and b"X-Spam-Flag: YES" in retagged
        assert Tagger(load_secret(shared / "secret")).previous(retagged)[0] is True
        b.wait_for(r"message_id=<forged@example\.org> .*label=spam score=0\.8808")
        got = scrape(b.metrics)
        assert sample(got, "filterd_verdicts_total", label="ham", decided_by="marker") == 1
        assert sample(got, "filterd_verdicts_total", label="spam", decided_by="model") == 2
        for daemon in (a, b):
            assert daemon.stop() == 0
    finally:
        for daemon in (a, b):
            daemon.kill()


def test_postfix_hands_the_mail_to_the_second_instance_while_the_first_is_down(tmp_path):
    """The README's main.cf line and a.yaml / b.yaml, with this test's ports and paths."""
    if why := postfix.available():  # CI runs as root with Postfix installed: this runs
        pytest.fail(f"needs a throwaway Postfix: {why}", pytrace=False)
    shared = tmp_path / "shared"
    make_checkpoint(shared / "model", -2.0)
    secret = load_secret(shared / "secret")
    ports = {k: free_port() for k in ("in", "back", "a", "b")}
    configs = {}
    for name in ("a", "b"):
        settings = yaml.safe_load(FLEET_CONFIG.format(smtp_port=ports[name], metrics_port=0))
        settings["checkpoint"] = str(shared / "model")
        settings["headers"]["secret_file"] = str(shared / "secret")
        settings["learning"]["fleet_store"] = str(shared / "feedback")
        settings["relay"]["port"] = ports["back"]
        configs[tmp_path / name] = settings
    cleanup = contextlib.ExitStack()
    mta = Postfix(
        f"127.0.0.1:{ports['in']} inet n - n - - smtpd\n"
        + AFTER_QUEUE_MASTER_CF.format(reinject_port=ports["back"]),
        FLEET_MAIN_CF.format(proxy_port=ports["a"], second_port=ports["b"]),
    )
    cleanup.callback(mta.stop)

    def send(mid: str) -> bytes:
        with smtplib.SMTP("127.0.0.1", ports["in"], timeout=30) as smtp:
            raw = SMTP_MSG.replace(b"<m1@example.org>", mid.encode())
            smtp.sendmail("ann@example.org", ["box@example.test"], raw)
        wait_until(lambda: any(mid.encode() in m for m in mta.delivered()), 30, mta.log)
        return next(m for m in mta.delivered() if mid.encode() in m)

    def delivered(daemon: Daemon) -> float:
        got = scrape(daemon.metrics)
        return sample(got, "filterd_messages_total", source="smtp", outcome="deliver")

    with cleanup:
        a, b = start(configs)
        cleanup.callback(b.kill)
        cleanup.callback(a.kill)
        first = send("<first@example.org>")
        assert (delivered(a), delivered(b)) == (1, 0)  # the first next hop takes it
        assert a.stop() == 0
        second = send("<second@example.org>")  # a refuses connections: b takes it
        assert delivered(b) == 1
        assert mta.logged(
            rf"connect to 127\.0\.0\.1\[127\.0\.0\.1\]:{ports['a']}: Connection refused"
        )
        for message in (first, second):  # tagged once, with the fleet's marker
            assert message.count(b"X-Spam-Status:") == 1
            assert Tagger(secret).previous(message) == (False, pytest.approx(0.119, abs=1e-3))
        assert b.stop() == 0


def test_the_readme_shows_the_tested_fleet_setup():
    """The snippets as a reader pastes them; both configs pass the schema, and Prometheus
    scrapes both metrics ports."""
    readme = README.read_text()
    assert f"```\n{FLEET_MAIN_CF.format(proxy_port=10025, second_port=10027)}```\n" in readme
    a = FLEET_CONFIG.format(smtp_port=10025, metrics_port=9847)
    assert f"```yaml\n{a}```\n" in readme
    assert f"```yaml\n{SCRAPE_CONFIG}```\n" in readme
    targets = []
    for smtp_port, metrics_port in ((10025, 9847), (10027, 9848)):
        config = Config.model_validate(
            yaml.safe_load(FLEET_CONFIG.format(smtp_port=smtp_port, metrics_port=metrics_port))
        )
        assert config.sources[0].options["port"] == smtp_port
        targets.append(f"{config.metrics.host}:{config.metrics.port}")
    (job,) = yaml.safe_load(SCRAPE_CONFIG)["scrape_configs"]
    assert job["static_configs"][0]["targets"] == targets


# --- the feedback stores of several hosts -------------------------------------------------


def host_config(tmp_path: Path, host: str, **learning) -> Path:
    """The config of one host of a fleet whose stores lie under tmp_path/fleet."""
    (tmp_path / host).mkdir()
    fleet = {"store": str(tmp_path / "fleet" / host), "fleet_store": str(tmp_path / "fleet")}
    return write_config(tmp_path / host, learning=fleet | learning)


def test_the_newest_label_wins_across_host_stores_whatever_their_order(tmp_path):
    fleet = tmp_path / "fleet"
    mx1, mx2 = FeedbackStore(fleet / "mx1"), FeedbackStore(fleet / "mx2")
    early, late = "2026-01-01T00:00:00+00:00", "2026-01-02T00:00:00+00:00"
    mx1.add(mail("prize"), "prize", "spam", "learn", when=early, host="mx1")
    mx2.add(mail("prize"), "prize", "ham", "learn", when=late, host="mx2")  # changed mind
    mx2.add(mail("meeting"), "meeting", "ham", "learn", when=early, host="mx2")
    mx1.add(mail("meeting"), "meeting", "spam", "learn", when=late, host="mx1")
    mx1.add(mail("tie"), "tie", "spam", "learn", when=early, host="mx1")
    mx2.add(mail("tie"), "tie", "ham", "learn", when=early, host="mx2")  # the greater host
    # A hidden folder (an NFS server's .snapshot) is no host's store.
    FeedbackStore(fleet / ".snapshot").add(mail("old"), "old", "spam", "learn", host="mx1")
    winners = {"prize": ("ham", "mx2"), "meeting": ("spam", "mx1"), "tie": ("ham", "mx2")}
    expected = {text_key(text): winner for text, winner in winners.items()}
    for order in ([mx1, mx2], [mx2, mx1]):
        merged = newest(order)
        assert {r.key: (r.label, store.root.name) for store, r in merged} == expected
    # Each host merges the same set, its own store first: `filterd learn --stats` says so.
    for host in ("mx1", "mx2"):
        run = filterd("learn", "--stats", "--json", config=host_config(tmp_path, host))
        assert run.returncode == 0, run.stderr
        assert json.loads(run.stdout)["by_label"] == {"feedback ham": 2, "feedback spam": 1}
    # Forgetting is each host's own: mx2 cannot forget what only mx1 holds, and says where.
    only_mx1 = tmp_path / "only-mx1.eml"
    only_mx1.write_bytes(mail("weekly report"))
    mx1.add(mail("weekly report"), message_text(mail("weekly report")), "ham", "learn")
    run = filterd("learn", "--forget", only_mx1, config=tmp_path / "mx2" / "config.yaml")
    assert run.returncode != 0
    assert f"labelled in {fleet / 'mx1'}: forget it on that host" in run.stderr.decode()
    assert (
        filterd("learn", "--forget", only_mx1, config=tmp_path / "mx1" / "config.yaml").returncode
        == 0
    )


def test_two_hosts_learning_at_once_lose_no_label(tmp_path):
    """Two `filterd learn` processes, each writing its own store (one named, one the
    default <fleet_store>/<host name>), while a third host reads the fleet over and over."""
    configs = {
        "mx1": host_config(tmp_path, "mx1"),
        "here": write_config(
            tmp_path, learning={"store": None, "fleet_store": str(tmp_path / "fleet")}
        ),
        "reader": host_config(tmp_path, "reader"),
    }
    batches = {"mx1": ("--spam", SPAM[100:150]), "here": ("--ham", SPAM[130:180])}
    learn = [sys.executable, "-m", "filterd.cli", "learn"]
    writers = {
        host: subprocess.Popen(
            [*learn, label, *files, "--config", configs[host]], stderr=subprocess.PIPE
        )
        for host, (label, files) in batches.items()
    }
    totals = []
    while any(w.poll() is None for w in writers.values()):
        run = filterd("learn", "--stats", "--json", config=configs["reader"])
        assert run.returncode == 0, run.stderr
        totals.append(json.loads(run.stdout)["total"])
    for writer in writers.values():
        assert writer.wait() == 0, writer.stderr.read()
    assert totals == sorted(totals)  # never one less: no label vanished meanwhile
    limits = Config().limits.text_limits()

    def keys(files: list[Path]) -> set[str]:
        return {text_key(message_text(p.read_bytes(), limits)) for p in files}

    mx1 = FeedbackStore(tmp_path / "fleet" / "mx1")
    here = FeedbackStore(tmp_path / "fleet" / socket.gethostname())
    for store, (_, files) in zip((mx1, here), batches.values(), strict=True):
        assert {r.key for r in store.records()} == keys(files)
    merged = newest(stores(load_config(configs["reader"])))
    assert {r.key for _, r in merged} == keys(SPAM[100:180])
    for _, record in merged:  # where both labelled a message, the later label won
        rivals = [s.get(record.key) for s in (mx1, here)]
        assert record.timestamp == max(r.timestamp for r in rivals if r is not None)


def test_retrain_reads_every_hosts_store_and_writes_none_but_its_own(tmp_path):
    """mx1 retrains on its own labels and mx2's (a message both labelled counts once, by
    the later label); mx3's store is arriving: a label whose message is not there yet is
    skipped. The other hosts' stores are left as they were."""
    parent_checkpoint(tmp_path / "model", lr=1e-2)
    gate = {"holdout_min": 5, "fpr_tolerance": 1.0, "epochs": 3}
    configs = {}
    for host in ("mx1", "mx2", "mx3"):
        configs[host] = host_config(tmp_path, host, **gate)
        settings = json.loads(configs[host].read_text()) | {"checkpoint": str(tmp_path / "model")}
        configs[host].write_text(json.dumps(settings))
    for host, label, files in [
        ("mx1", "--ham", SPAM[56:57]),  # then mx2 says spam: the later label wins
        ("mx1", "--spam", SPAM[50:56]),
        ("mx2", "--spam", SPAM[56:62]),
        ("mx3", "--spam", SPAM[62:63]),
    ]:
        run = filterd("learn", label, *files, config=configs[host])
        assert run.returncode == 0, run.stderr
    for message in (tmp_path / "fleet" / "mx3" / "messages").iterdir():
        message.unlink()  # as rsync leaves it: labels/ sent, messages/ not yet

    def others() -> dict[Path, bytes]:
        return {
            p: p.read_bytes()
            for host in ("mx2", "mx3")
            for p in (tmp_path / "fleet" / host).rglob("*")
            if p.is_file()
        }

    before = others()
    run = filterd("retrain", config=configs["mx1"])
    assert run.returncode == 0, run.stderr
    assert b"skipped 1 label(s) whose message is not in its store (yet)" in run.stderr
    report = json.loads(run.stdout)
    assert report["feedback"]["train"] == {"ham": 0, "spam": 7}
    assert report["feedback"]["holdout"] == {"ham": 0, "spam": 5}
    assert others() == before
    assert (tmp_path / "fleet" / "mx1" / "retrain.lock").exists()


def test_the_daemon_counts_labels_arriving_from_other_hosts(tmp_path):
    """`learning.retrain.after_labels` counts every store a retrain reads, a label copied
    in with its sender's older file times (rsync -a) too."""
    config = load_config(host_config(tmp_path, "mx1", retrain={"after_labels": 2}))
    retrainer = Retrainer(config, tmp_path / "model", None, reload=None)
    retrainer.last = time.time() - 1  # file times are coarser than time.time()
    FeedbackStore(tmp_path / "fleet" / "mx1").add(mail("one"), "one", "spam", "learn")
    assert retrainer.due(time.time()) is None
    copied = FeedbackStore(tmp_path / "fleet" / "mx2")
    copied.add(mail("two"), "two", "spam", "learn", host="mx2")
    for path in copied.root.rglob("*"):
        os.utime(path, (0, 0))
    assert retrainer.due(time.time()) == "2 new labels"


def without_root_powers() -> list[str]:
    """A command prefix under which permission bits hold for root too (CI runs as root)."""
    if os.geteuid() != 0:
        return []
    caps = "-dac_override,-dac_read_search"
    return ["setpriv", f"--bounding-set={caps}", f"--inh-caps={caps}", "--"]


def test_a_folder_in_the_fleet_that_cannot_be_read_is_named_and_skipped(tmp_path):
    """lost+found at the root of a mounted fleet folder, or a store copied in as another
    user: `learn --stats` names it and counts the rest; the daemon's schedule goes on."""
    config = host_config(tmp_path, "mx1", retrain={"after_labels": 2})
    fleet = tmp_path / "fleet"
    FeedbackStore(fleet / "mx1").add(mail("one"), "one", "spam", "learn")
    FeedbackStore(fleet / "mx2").add(mail("two"), "two", "ham", "learn", host="mx2")
    locked = fleet / "lost+found"
    (locked / "labels").mkdir(parents=True)
    (fleet / "odd").mkdir()
    (fleet / "odd" / "labels").write_text("")  # not a folder
    if os.geteuid() == 0:
        os.chown(locked, 65534, 65534)
    locked.chmod(0o700)
    command = [sys.executable, "-m", "filterd.cli", "learn", "--stats", "--json"]
    try:
        run = subprocess.run(
            [*without_root_powers(), *command, "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        locked.chmod(0o755)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["total"] == 2
    assert f"{locked}: cannot read (Permission denied): not read as a store" in run.stderr
    assert f"{fleet / 'odd'}: cannot read (Not a directory)" in run.stderr
    retrainer = Retrainer(load_config(config), tmp_path / "model", None, reload=None)
    retrainer.last = 0
    assert retrainer.due(time.time()) == "2 new labels"


@pytest.mark.parametrize("store", ["fleet", ".", "fleet/mx1"])
def test_a_hosts_store_is_its_own_folder_in_the_fleet(tmp_path, monkeypatch, store):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps({"learning": {"fleet_store": "fleet", "store": store}}))
    if store == "fleet/mx1":
        assert load_config(path).learning.store_path() == Path("fleet/mx1")
        path.write_text(json.dumps({"learning": {"fleet_store": "fleet"}}))
        assert load_config(path).learning.store_path() == Path("fleet") / socket.gethostname()
        return
    with pytest.raises(
        ConfigError, match=r"learning: .*learning\.store \(.*\) is learning\.fleet_store"
    ):
        load_config(path)
