"""A throwaway Postfix instance for tests: its own config, queue and data folders under a
temporary directory, listening on loopback ports only, delivering every recipient at
example.test to one Maildir. Never the system Postfix, never port 25. Needs root (Postfix's
master runs as root and drops to the postfix user) and Debian's postfix package; .ci/run
installs it.

The main.cf and master.cf lines filterd's README shows for each way to plug in are the
ones `MILTER_MAIN_CF`, `PROXY_MASTER_CF` etc. hold, filled in and written here, so the
documented snippets are the tested ones.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

POSTFIX = "/usr/sbin/postfix"

# The README's snippets, with the ports as placeholders (tests/test_postfix.py checks the
# README holds them, filled in with the defaults, verbatim).
MILTER_MAIN_CF = """\
smtpd_milters = inet:127.0.0.1:{milter_port}
non_smtpd_milters = $smtpd_milters
milter_default_action = tempfail
milter_protocol = 6
"""
AFTER_QUEUE_MAIN_CF = """\
content_filter = filterd:[127.0.0.1]:{proxy_port}
"""
AFTER_QUEUE_MASTER_CF = """\
# To filterd: at most 10 at once (keep it <= smtp.max_connections and smtp.max_queue).
filterd   unix  -       -       n       -       10      smtp
  -o syslog_name=postfix/filterd
  -o smtp_data_done_timeout=1200s
  -o disable_mime_output_conversion=yes
  -o smtp_generic_maps=
# Back from filterd: no filter again, no checks done twice, loopback only. Its process
# limit (10) must be at least the filterd transport's (10 above): each message filterd
# relays holds one of these smtpd processes; with fewer, filterd's relays wait for a free
# one and its clients get "451 Next hop unavailable" (raising only the transport to 20
# gave 40 such deferrals and 5.6x the time in a test).
127.0.0.1:{reinject_port} inet  n       -       n       -       10      smtpd
  -o syslog_name=postfix/reinject
  -o content_filter=
  -o receive_override_options=no_unknown_recipient_checks,no_header_body_checks,no_milters
  -o smtpd_helo_restrictions=
  -o smtpd_client_restrictions=
  -o smtpd_sender_restrictions=
  -o smtpd_relay_restrictions=permit_mynetworks,reject
  -o smtpd_recipient_restrictions=permit_mynetworks,reject
  -o mynetworks=127.0.0.0/8
"""
# Two filterd instances (README "A fleet of daemons"): Postfix tries the next hops in order.
FLEET_MAIN_CF = """\
content_filter = filterd:[127.0.0.1]:{proxy_port}, [127.0.0.1]:{second_port}
"""
BEFORE_QUEUE_MAIN_CF = """\
# Postfix's wait for each of filterd's answers (default 100s).
smtpd_proxy_timeout = 100s
"""
BEFORE_QUEUE_MASTER_CF = """\
# Public port 25: each session through filterd. Keep the process limit (20) within
# smtp.max_connections.
{listen:<9} inet  n       -       n       -       20      smtpd
  -o smtpd_proxy_filter=127.0.0.1:{proxy_port}
# Back from filterd: the checks ran on port 25 already.
127.0.0.1:{reinject_port} inet  n       -       n       -       -       smtpd
  -o syslog_name=postfix/reinject
  -o smtpd_client_restrictions=
  -o smtpd_helo_restrictions=
  -o smtpd_sender_restrictions=
  -o smtpd_relay_restrictions=
  -o smtpd_recipient_restrictions=permit_mynetworks,reject
  -o smtpd_data_restrictions=
  -o mynetworks=127.0.0.0/8
  -o receive_override_options=no_unknown_recipient_checks
"""

_BASE_MASTER_CF = """\
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
virtual   unix  -       n       n       -       -       virtual
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def available() -> str | None:
    """Why a throwaway Postfix cannot run here, or None."""
    if not Path(POSTFIX).exists():
        return "Debian's postfix package is not installed (.ci/run installs it)"
    if os.geteuid() != 0:
        return "Postfix's master process must start as root"
    return None


class Postfix:
    """One instance; `services` are master.cf lines (the smtpd listeners), `main` extra
    main.cf lines."""

    def __init__(self, services: str, main: str = ""):
        self.root = Path(tempfile.mkdtemp(prefix="filterd-postfix-"))
        os.chmod(self.root, 0o755)  # the postfix and nobody users reach their folders
        self.etc, self.mail = self.root / "etc", self.root / "mail"
        for folder in ("etc", "queue", "data", "mail"):
            (self.root / folder).mkdir()
        nobody = pwd.getpwnam("nobody")
        os.chown(self.mail, nobody.pw_uid, nobody.pw_gid)
        os.chown(self.root / "data", pwd.getpwnam("postfix").pw_uid, -1)
        (self.etc / "main.cf").write_text(
            f"""\
compatibility_level = 3.6
queue_directory = {self.root}/queue
data_directory = {self.root}/data
meta_directory = /etc/postfix
mail_owner = postfix
setgid_group = postdrop
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
myhostname = mx.filterd.test
mydestination =
mynetworks = 127.0.0.0/8
virtual_mailbox_domains = example.test
virtual_mailbox_base = {self.mail}
virtual_mailbox_maps = static:box/
virtual_uid_maps = static:{nobody.pw_uid}
virtual_gid_maps = static:{nobody.pw_gid}
maillog_file_prefixes = {self.root}
maillog_file = {self.root}/maillog
alias_maps =
alias_database =
smtp_dns_support_level = disabled
message_size_limit = 30000000
{main}"""
        )
        (self.etc / "master.cf").write_text(services + _BASE_MASTER_CF)
        self._postfix("check")
        self._postfix("start")
        self.box = self.mail / "box"

    def _postfix(self, *command: str) -> None:
        done = subprocess.run(
            [POSTFIX, "-c", str(self.etc), *command], capture_output=True, text=True, timeout=60
        )
        if done.returncode:
            raise RuntimeError(f"postfix {' '.join(command)} failed:\n{self.log()}")

    def reload(self, main: str | None = None) -> None:
        if main is not None:
            text = (self.etc / "main.cf").read_text()
            (self.etc / "main.cf").write_text(text + main)
        self._postfix("reload")
        time.sleep(1)

    def log(self) -> str:
        path = self.root / "maillog"
        return path.read_text(errors="replace") if path.exists() else "(no maillog)"

    def delivered(self) -> list[bytes]:
        """Every message in the Maildir, oldest first."""
        new = self.box / "new"
        if not new.is_dir():
            return []
        files = sorted(new.iterdir(), key=lambda p: (p.stat().st_mtime_ns, p.name))
        return [p.read_bytes() for p in files]

    def wait_delivered(self, count: int, timeout: float = 30) -> list[bytes]:
        deadline = time.monotonic() + timeout
        while len(found := self.delivered()) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"{len(found)} of {count} delivered; log:\n{self.log()}")
            time.sleep(0.1)
        return found

    def queue(self) -> list[dict]:
        """The queue as `postqueue -j` lists it (queue_name: active, deferred, hold...)."""
        done = subprocess.run(
            ["postqueue", "-c", str(self.etc), "-j"], capture_output=True, text=True, timeout=30
        )
        return [json.loads(line) for line in done.stdout.splitlines() if line.strip()]

    def logged(self, pattern: str) -> list[str]:
        return [line for line in self.log().splitlines() if re.search(pattern, line)]

    def stop(self) -> None:
        subprocess.run([POSTFIX, "-c", str(self.etc), "stop"], capture_output=True, timeout=60)
        shutil.rmtree(self.root, ignore_errors=True)
