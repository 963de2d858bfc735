"""`filterd`: score mail from stdin or files, tag it in a pipe, serve, manage the quarantine.

stdout carries only results (verdict lines, JSON, the tagged message); progress, summaries
and diagnostics go to stderr, so filterd fits in pipes and delivery agents. Heavy imports
(the engine, hence torch) wait until a command needs them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from filterd import __version__
from filterd.config import DEFAULT_PATH, Config, ConfigError, load_config

if TYPE_CHECKING:
    from filterd.engine import Engine
    from filterd.headers import Tagger
    from filterd.mail import Mail
    from filterd.plugin_api import Context, Handler
    from filterd.spamd_protocol import Address

# Exit statuses (README "Exit codes" lists them for users).
EX_HAM, EX_SPAM = 0, 1  # `filterd score` of one message, plain output (like spamc -c)
EX_CONFIG = 2  # bad arguments or configuration (argparse uses 2 too)
EX_CHECKPOINT = 3  # the checkpoint cannot be loaded
EX_SOME_FAILED = 4  # some messages could not be read or scored; the rest were reported
EX_QUARANTINE = 5  # a quarantine request failed (bad ID, no such message, release refused)
EX_TEMPFAIL = os.EX_TEMPFAIL  # 75, --tag under the tempfail policy: nothing written, retry later

_CHUNK = 256  # messages read and scored at a time over a folder: bounded memory


def _err(message: str) -> None:
    print(f"filterd: {message}", file=sys.stderr)


def _config(args: argparse.Namespace) -> Config:
    return load_config(args.config)


def _notes(config: Config) -> None:
    """How to update an older config: said by check and serve, not by every pipe run."""
    for note in config.notes():
        _err(f"note: {note}")


def _engine(  # imported lazily: torch
    args: argparse.Namespace, config: Config, child_process: bool = False
) -> Engine:
    from filterd.engine import Engine

    return Engine.from_config(config, args.checkpoint, child_process)


# --- score --------------------------------------------------------------------------------


def _load(
    args: argparse.Namespace, serving: bool = False, config: Config | None = None
) -> tuple[Config, Engine] | int:
    """The config and the engine, or the exit status after saying what is wrong."""
    try:
        config = config or _config(args)
        return config, _engine(args, config, serving and config.daemon.scoring_process)
    except ConfigError as e:
        _err(str(e))
        return EX_CONFIG
    except Exception as e:  # CheckpointError, a bad secret file, ...
        _err(str(e))
        return EX_CHECKPOINT


def _files(paths: list[Path]) -> Iterator[Path]:
    """Each file named, and every file under each folder named (sorted, dotfiles skipped)."""
    for path in paths:
        if path.is_dir():
            for p in sorted(path.rglob("*")):
                if p.is_file() and not any(
                    part.startswith(".") for part in p.relative_to(path).parts
                ):
                    yield p
        else:
            yield path


def _line(path: str | None, verdict=None, error: str | None = None, as_json: bool = False) -> str:
    if as_json:
        record: dict = {} if path is None else {"path": path}
        if error is not None:
            record["error"] = error
        else:
            record |= {
                "label": verdict.label,
                "probability": verdict.probability,
                "threshold": verdict.threshold,
            }
            if verdict.decided_by != "model":
                record |= {"decided_by": verdict.decided_by, "reason": verdict.reason}
        return json.dumps(record)
    if error is not None:
        return f"error {error} {path or '-'}"
    p = "-" if verdict.probability is None else f"{verdict.probability:.4f}"
    return f"{verdict.label} {p} {path or '-'}"


def cmd_score(args: argparse.Namespace) -> int:
    if args.connect is not None and not args.tag:
        _err("--connect goes with --tag (the daemon tags the message)")
        return EX_CONFIG
    if args.tag:
        return _score_tag(args)
    loaded = _load(args)
    if isinstance(loaded, int):
        return loaded
    _, engine = loaded
    from filterd.mail import Mail

    if not args.paths:
        mail = Mail(sys.stdin.buffer.read(), origin="-")
        _warn_if_not_mail(mail)
        verdict = engine.verdicts([mail])[0]
        print(_line(None, verdict, as_json=args.json), flush=True)
        return EX_SPAM if verdict.is_spam and not args.json else EX_HAM

    files = list(_files(args.paths))
    counts = {"spam": 0, "ham": 0, "error": 0}
    start = time.perf_counter()
    with _Progress(len(files)) as advance:
        for i in range(0, len(files), _CHUNK):
            mails, lines = [], {}
            for n, path in enumerate(files[i : i + _CHUNK]):
                try:
                    mail = Mail(path.read_bytes(), origin=str(path))
                except OSError as e:
                    lines[n] = _line(str(path), error=e.strerror or str(e), as_json=args.json)
                    counts["error"] += 1
                    continue
                _warn_if_not_mail(mail)
                mails.append((n, mail))
            advance(len(lines))  # the unreadable ones
            verdicts = engine.verdicts([m for _, m in mails], progress=advance)
            for (n, mail), verdict in zip(mails, verdicts, strict=True):
                lines[n] = _line(mail.origin, verdict, as_json=args.json)
                counts[verdict.label] += 1
            sys.stdout.write("".join(lines[n] + "\n" for n in sorted(lines)))
            sys.stdout.flush()
    elapsed = time.perf_counter() - start
    total = len(files)
    if total > 1:
        print(
            f"{total} messages: {counts['spam']} spam, {counts['ham']} ham, "
            f"{counts['error']} errors in {elapsed:.1f} s "
            f"({total / max(elapsed, 1e-9):.1f} msgs/s)",
            file=sys.stderr,
        )
    if counts["error"]:
        return EX_SOME_FAILED
    if total == 1 and not args.json:
        return EX_SPAM if counts["spam"] else EX_HAM
    return EX_HAM


def _warn_if_not_mail(mail: Mail) -> None:
    """A binary or a bare text piped in by mistake would get a verdict like any mail."""
    if not mail.has_header:
        where = "stdin" if mail.origin == "-" else mail.origin
        if mail.raw.strip():
            _err(f"warning: {where}: no header block: not a mail message? (scored as one)")
        else:
            _err(f"warning: {where}: empty: nothing to score (labelled by scoring.no_text)")


class _Progress:
    """A rich progress bar on stderr when it is a terminal; nothing otherwise. It moves as
    each micro-batch is scored. Results printed meanwhile stay on stdout: rich shows them
    above the bar only when stdout is the same kind of terminal, and otherwise leaves
    stdout alone (redirected into its display, they would never reach a file or pipe)."""

    def __init__(self, total: int):
        self.total = total
        self.bar = None

    def __enter__(self):
        from rich.console import Console
        from rich.progress import MofNCompleteColumn, Progress

        console = Console(file=sys.stderr)
        if console.is_terminal and self.total > 1:
            self.bar = Progress(
                *Progress.get_default_columns(),
                MofNCompleteColumn(),
                console=console,
                redirect_stdout=sys.stdout.isatty(),
            )
            self.bar.start()
            task = self.bar.add_task("scoring", total=self.total)
            return lambda n: self.bar.update(task, advance=n)
        return lambda n: None

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.stop()


def _score_tag(args: argparse.Namespace) -> int:
    """The pipe filter: the whole message out with headers added, or exit 75 under tempfail.
    With --connect the running daemon scores it (spamd PROCESS) and no model is loaded."""
    from filterd import plugin_api
    from filterd.config import PluginChoice
    from filterd.plugin_api import Context

    if args.paths:
        _err("--tag reads one message from stdin; it takes no FILE arguments")
        return EX_CONFIG
    address = None
    if args.connect:
        from filterd.spamd_protocol import parse_address

        try:
            address = parse_address(args.connect)
        except ValueError as e:
            _err(f"--connect: {e}")
            return EX_CONFIG
    config = Config()
    try:
        config = _config(args)
        if args.connect is not None:
            handle, context = _spamd_handler(config, address)
        else:
            engine = _engine(args, config)
            handle, context = engine.handle, engine.context
    except Exception as e:
        why = f"{type(e).__name__}: {e}"
        _err(f"not scoring: {why}")
        context = Context(config, _tagger(config))

        async def handle(mail, **_):
            return context.failure(mail, why)

    source = plugin_api.load("sources", PluginChoice(name="stdin"), "sources.stdin", config)
    return asyncio.run(source.run(handle, context))


def _tagger(config: Config) -> Tagger:
    """The config's tagger; without the marker (none written, none trusted) when this user
    cannot read the secret, so the failure policy still writes its header."""
    from filterd.headers import Tagger, load_secret

    headers = config.headers
    try:
        return Tagger(load_secret(headers.secret_path()), headers.prefix, headers.subject_prefix)
    except Exception:
        return Tagger(None, headers.prefix, headers.subject_prefix)


def _spamd_handler(config: Config, address: Address | None) -> tuple[Handler, Context]:
    """A Handler that has the daemon's spamd source tag the message (PROCESS); when the
    daemon is unreachable or errs, this config's failure policy decides, here."""
    from filterd.plugin_api import Context, Outcome
    from filterd.spamd_protocol import EX_DATAERR, SpamdError, process

    address = address or _spamd_address(config)
    context = Context(config, _tagger(config))
    timeout = config.scoring.timeout_seconds + 10  # the daemon answers within its own

    async def handle(mail, **_):
        try:
            tagged, _ = process(address, mail.raw, timeout)  # one message: blocking is fine
        except SpamdError as e:
            _err(f"not scored: {e}")
            if e.code == EX_DATAERR:  # over the daemon's size cap: a retry cannot help
                return Outcome("deliver", context.tagger.unscored(mail.raw, str(e)))
            return context.failure(mail, str(e))
        return Outcome("deliver", tagged)

    return handle, context


def _spamd_address(config: Config) -> Address:
    """Where the config's spamd source listens; spamd's own 127.0.0.1:783 without one."""
    from filterd import plugin_api
    from filterd.spamd_protocol import DEFAULT_PORT

    for where, choice, options_key in config.source_choices():
        if choice.name == "spamd":
            options = plugin_api.load("sources", choice, where, config, options_key).options
            if options.socket is not None:
                return str(options.socket.expanduser())
            if not options.port:
                raise ConfigError(f"{options_key}.port: 0 (any free port): give --connect")
            return options.host, options.port
    return "127.0.0.1", DEFAULT_PORT


# --- check --------------------------------------------------------------------------------


def cmd_check(args: argparse.Namespace) -> int:
    """Validate the config, checkpoint, plugins and secret; report what is wrong."""
    loaded = _load(args)
    if isinstance(loaded, int):
        return loaded
    config, engine = loaded
    from filterd.daemon import load_sources

    _notes(config)
    try:
        sources = load_sources(config)
    except ConfigError as e:
        _err(str(e))
        return EX_CONFIG
    clf = engine.classifier
    print(f"config: {args.config or (DEFAULT_PATH if DEFAULT_PATH.exists() else 'defaults')}")
    path = args.checkpoint or config.checkpoint
    print(
        f"checkpoint: {path} ({clf.name}, {config.precision}, "
        f"threshold {engine.threshold_of(clf):.4f})"
    )
    print(f"checks: {', '.join(c.name for c in engine.checks) or 'none'}")
    print(f"sources: {', '.join(s.name for s in sources) or 'none (filterd score only)'}")
    print(f"secret: {config.headers.secret_path()}")
    print(f"quarantine: {config.quarantine.store_path()}")
    print("ok")
    return 0


# --- quarantine ---------------------------------------------------------------------------


def cmd_quarantine(args: argparse.Namespace) -> int:
    """List, show, release, delete or expire held messages (README "Quarantine"). A release
    is re-tagged as ham by a person's decision (Store.released) with a fresh marker under
    this config's secret, so the Maildir watcher and Sieve leave it where it goes."""
    from datetime import datetime

    from filterd.headers import Tagger, load_secret
    from filterd.store.quarantine import QuarantineError, Store

    try:
        config = _config(args)
    except ConfigError as e:
        _err(str(e))
        return EX_CONFIG
    q = config.quarantine
    store = Store(q.store_path(), q.retention_days)
    problems: list[str] = []
    try:
        if args.action == "list":
            entries = store.list(problems)
            for e in entries:
                when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e.time))
                p = "-" if e.probability is None else f"{e.probability:.4f}"
                rcpts = ",".join(e.rcpt_tos) or "-"
                print(f"{e.id}\t{when}\t{p}\t{e.mail_from or '-'}\t{rcpts}\t{e.reason}")
            if not entries and not problems:  # on stderr: stdout stays empty for scripts
                _err(f"the quarantine is empty ({store.root})")
        elif args.action == "show":
            e = store.get(args.id)
            for key, value in vars(e).items():
                if key == "time":
                    value = datetime.fromtimestamp(value).astimezone().isoformat(timespec="seconds")
                print(f"{key}: {value}")
        elif args.action == "release":
            original = store.read(args.id)  # before a release removes it
            h = config.headers
            tagger = Tagger(load_secret(h.secret_path()), h.prefix, h.subject_prefix)
            threshold = 0.5 if config.scoring.threshold is None else config.scoring.threshold
            if args.to:
                print(store.release_to_maildir(args.id, args.to, tagger, threshold))
            elif args.smtp:
                r = config.relay
                store.release_smtp(args.id, r.host, r.port, r.timeout_seconds, tagger, threshold)
                print(f"released {args.id} to {r.host}:{r.port}")
            else:  # stdout cannot confirm it kept the message, so the store keeps it too
                sys.stdout.buffer.write(store.released(args.id, tagger, threshold))
                sys.stdout.flush()
            if not args.no_learn:
                _learn_released(original, config)
        elif args.action == "delete":
            store.delete(args.id)
        else:
            for qid in store.expire(problems=problems):
                print(qid)
    except (QuarantineError, OSError) as e:
        _err(str(e))
        return EX_QUARANTINE
    finally:
        for problem in problems:
            _err(f"quarantine: {problem}")
    return 0


# --- learn --------------------------------------------------------------------------------


def _messages(paths: list[Path]) -> Iterator[tuple[str, bytes | OSError]]:
    """(origin, bytes) of each message named, or of stdin; (origin, error) for what cannot
    be read, so one bad file does not stop the others."""
    from filterd.mailfiles import raw_messages

    for path in paths or [Path("-")]:
        if str(path) == "-":
            yield "-", sys.stdin.buffer.read()
            continue
        try:
            yield from raw_messages(path)
        except OSError as e:
            yield str(path), e


def cmd_learn(args: argparse.Namespace) -> int:
    """Labels into the feedback store, as `sa-learn --spam/--ham/--forget` (README "Learning
    from corrections"); the summary on stderr, `--stats` on stdout."""
    from filterd.learn_socket import HandoffError
    from filterd.learning import open_store, stores
    from filterd.store.feedback import FeedbackError, newest, stats

    try:
        config = _config(args)
    except ConfigError as e:
        _err(str(e))
        return EX_CONFIG
    store = open_store(config)
    if args.stats:  # a fleet's stores merged, as a retrain reads them
        problems: list[str] = []
        read = stores(config, problems)
        counts = stats(record for _, record in newest(read, problems))
        for problem in problems:
            _err(problem)
        if args.json:
            print(json.dumps(counts))
        else:
            where = ", ".join(str(s.root) for s in read)
            print(f"{counts['total']} labelled messages in {where}")
            for title in ("by_label", "by_source"):
                for key, n in sorted(counts[title].items()):
                    print(f"{n:8d}  {key}")
        return 0
    label = "spam" if args.spam else "ham"
    kind = "replay" if args.replay else "feedback"
    try:
        record = _recorder(config, store.root, args)
    except ConfigError as e:
        _err(str(e))
        return EX_CONFIG
    counts: dict[str, int] = {}
    failed = 0
    for origin, raw in _messages(args.paths):
        if isinstance(raw, OSError):  # the message's file
            _err(str(raw))
            failed += 1
            continue
        try:
            outcome = record(raw)
        except FeedbackError as e:
            _err(f"{origin}: {e}")
            failed += 1
            continue
        except HandoffError as e:  # the daemon is not there: the rest would fail alike
            _err(f"{e}; stopped")
            return EX_SOME_FAILED
        except OSError as e:  # the store: a full disk, no permission; what is in it stays
            _err(f"cannot write the feedback store {store.root}: {e.strerror or e}; stopped")
            return EX_SOME_FAILED
        counts[outcome] = counts.get(outcome, 0) + 1
    if not args.forget and os.access(store.root, os.W_OK):
        store.prune()
    done = ", ".join(f"{n} {outcome}" for outcome, n in counts.items()) or "none recorded"
    what = "forget" if args.forget else f"{kind} {label}"
    _err(f"learn ({what}): {done}" + (f", {failed} failed" if failed else ""))
    return EX_SOME_FAILED if failed else 0


def _recorder(config: Config, root: Path, args: argparse.Namespace):
    """What records one message: into the store, or through the daemon's socket when
    asked to (--via-daemon) or when this user may not write the store and
    learning.socket is set."""
    from filterd.learning import forget, learn

    action = "forget" if args.forget else "spam" if args.spam else "ham"
    existing = next(p for p in (root, *root.parents) if p.exists())
    if args.via_daemon and not config.learning.socket:
        raise ConfigError("--via-daemon: learning.socket is not set in the config")
    if args.via_daemon or (config.learning.socket and not os.access(existing, os.W_OK)):
        from filterd.learn_socket import send

        source = "" if args.source == "learn" else args.source
        return lambda raw: send(config.learning.socket, action, raw, args.replay, source)
    kind = "replay" if args.replay else "feedback"

    def here(raw: bytes) -> str:
        if args.forget:
            forget(raw, config)
            return "forgotten"
        return learn(raw, action, source=args.source, kind=kind, config=config, prune=False)

    return here


def _learn_released(raw: bytes, config: Config) -> None:
    """A released message is a false positive a person confirmed: feedback labelled ham.
    The release stands if this fails; it is said on stderr."""
    from filterd.learning import learn
    from filterd.store.feedback import FeedbackError

    try:
        learn(raw, "ham", source="quarantine-release", config=config)
    except (FeedbackError, OSError) as e:
        _err(f"released, but not recorded as ham in the feedback store: {e}")


def cmd_retrain(args: argparse.Namespace) -> int:
    """Run the retrain as a process of its own (as the daemon does): a crash there leaves
    the running model alone. Its exit status: 0 installed, 1 kept the old model, 2 error,
    75 another retrain is running."""
    import subprocess

    command = [sys.executable, "-m", "filterd.trainer.retrain"]
    if args.config:
        command += ["--config", str(args.config)]
    if args.checkpoint:
        command += ["--checkpoint", str(args.checkpoint)]
    if args.no_replay:
        command.append("--no-replay")
    return subprocess.run(command).returncode


def cmd_rollback(args: argparse.Namespace) -> int:
    """The checkpoint a retrain replaced goes back in place (a running daemon reloads it)."""
    from filterd.model.history import HistoryError, rollback

    try:
        config = _config(args)
    except ConfigError as e:
        _err(str(e))
        return EX_CONFIG
    checkpoint = args.checkpoint or config.checkpoint
    if checkpoint is None:
        _err("no checkpoint: set `checkpoint:` in the config or give --checkpoint")
        return EX_CONFIG
    try:
        restored = rollback(checkpoint)
    except (HistoryError, OSError) as e:
        _err(str(e))
        return EX_CHECKPOINT
    _err(f"rolled back to {restored.name}")
    return 0


# --- serve --------------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    """The daemon: the configured sources, until SIGTERM (README "filterd serve")."""
    import logging

    from filterd.daemon import load_sources, run

    try:
        config = _config(args)
        _notes(config)
        # Before the model loads: a wrong setting fails at once.
        sources = load_sources(config, serving=True)
    except ConfigError as e:
        _err(str(e))
        return EX_CONFIG
    loaded = _load(args, serving=True, config=config)
    if isinstance(loaded, int):
        return loaded
    engine = loaded[1]
    logging.basicConfig(
        level=config.daemon.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("mail.log").setLevel(logging.WARNING)  # aiosmtpd: a line per command
    try:
        config_path = args.config or (DEFAULT_PATH if DEFAULT_PATH.exists() else None)
        return run(engine, config, args.checkpoint or config.checkpoint, sources, config_path)
    except ConfigError as e:  # a source could not start: which setting is wrong
        _err(str(e))
        return EX_CONFIG


# --- parser -------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="filterd", description="A local, private spam filter.")
    top.add_argument("--version", action="version", version=f"filterd {__version__}")
    sub = top.add_subparsers(dest="command", required=True)
    config_help = f"config file (default {DEFAULT_PATH} if it exists, else built-in defaults)"

    score = sub.add_parser("score", help="score messages from stdin, files or folders")
    score.add_argument("paths", nargs="*", type=Path, metavar="FILE|DIR")
    score.add_argument("--checkpoint", type=Path, help="overrides the config's checkpoint")
    score.add_argument("--config", type=Path, help=config_help)
    score.add_argument("--json", action="store_true", help="one JSON object per message")
    score.add_argument("--tag", action="store_true", help="stdin to stdout with headers added")
    score.add_argument(
        "--connect",
        nargs="?",
        const="",
        metavar="HOST:PORT|SOCKET",
        help="with --tag: have the running daemon's spamd source score it (default: where "
        "the config's spamd source listens, else 127.0.0.1:783); no model is loaded here",
    )
    score.set_defaults(run=cmd_score)

    check = sub.add_parser("check", help="validate the config and the checkpoint")
    check.add_argument("--checkpoint", type=Path, help="overrides the config's checkpoint")
    check.add_argument("--config", type=Path, help=config_help)
    check.set_defaults(run=cmd_check)

    serve = sub.add_parser(
        "serve", help="run the daemon: the configured sources (smtp, milter, spamd, maildir)"
    )
    serve.add_argument("--checkpoint", type=Path, help="overrides the config's checkpoint")
    serve.add_argument("--config", type=Path, help=config_help)
    serve.set_defaults(run=cmd_serve)

    learn = sub.add_parser(
        "learn", help="record messages as spam or ham for retraining (like sa-learn)"
    )
    learn.add_argument("paths", nargs="*", type=Path, metavar="FILE|DIR|MAILDIR|MBOX")
    label = learn.add_mutually_exclusive_group(required=True)
    label.add_argument("--spam", action="store_true", help="these are spam")
    label.add_argument("--ham", action="store_true", help="these are ham")
    label.add_argument("--forget", action="store_true", help="remove their labels")
    label.add_argument(
        "--stats", action="store_true", help="counts per label and source (a fleet's stores merged)"
    )
    learn.add_argument(
        "--replay",
        action="store_true",
        help="examples to keep knowing (trained on, never held out), not corrections",
    )
    learn.add_argument("--source", default="learn", help="who says so (default learn)")
    learn.add_argument(
        "--via-daemon",
        action="store_true",
        help="hand the labels to the running daemon (learning.socket); the default when "
        "this user cannot write the store",
    )
    learn.add_argument("--json", action="store_true", help="--stats as JSON")
    learn.add_argument("--config", type=Path, help=config_help)
    learn.set_defaults(run=cmd_learn)

    retrain = sub.add_parser(
        "retrain", help="fine-tune on the feedback store; install the result if the gate agrees"
    )
    rollback = sub.add_parser("rollback", help="put back the checkpoint a retrain replaced")
    for command in (retrain, rollback):
        command.add_argument("--checkpoint", type=Path, help="overrides the config's checkpoint")
        command.add_argument("--config", type=Path, help=config_help)
    retrain.add_argument("--no-replay", action="store_true", help="train on the feedback alone")
    retrain.set_defaults(run=cmd_retrain)
    rollback.set_defaults(run=cmd_rollback)

    quarantine = sub.add_parser("quarantine", help="list, show, release, delete, expire")
    quarantine.add_argument("--config", type=Path, help=config_help)
    # --config after the action too, as with every other command; SUPPRESS: when absent
    # there, the action's parser leaves what was given before the action alone.
    after = argparse.ArgumentParser(add_help=False)
    after.add_argument("--config", type=Path, default=argparse.SUPPRESS, help=config_help)
    actions = quarantine.add_subparsers(dest="action", required=True)
    actions.add_parser("list", parents=[after], help="held messages, oldest first")
    for name, text in (("show", "details of one message"), ("delete", "delete one message")):
        actions.add_parser(name, parents=[after], help=text).add_argument("id")
    release = actions.add_parser(
        "release", parents=[after], help="to stdout (kept), a Maildir or the relay"
    )
    release.add_argument("id")
    where = release.add_mutually_exclusive_group()
    where.add_argument("--to", type=Path, metavar="MAILDIR", help="deliver into this Maildir")
    where.add_argument("--smtp", action="store_true", help="re-inject to the configured relay")
    release.add_argument(
        "--no-learn", action="store_true", help="do not record it as ham in the feedback store"
    )
    actions.add_parser(
        "expire", parents=[after], help="delete what is older than quarantine.retention_days"
    )
    quarantine.set_defaults(run=cmd_quarantine)
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
