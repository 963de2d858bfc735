"""The scoring engine: one loaded model, thresholds and checks, for every way mail comes in.

`verdicts()` scores a list at once (the CLI). `verdict()` is for asyncio servers: each
call joins a queue; an idle model takes what is queued at once, and while it is busy,
arrivals share the next micro-batch of at most `scoring.max_batch`, handed over when the
model is done or the first of them waited `scoring.batch_wait_ms`. The model runs in
worker threads so the event loop never waits on it. Two micro-batches go to the model at
once: while one is scored, the next is read and tokenized (or waits in the scoring
process), so the model does not sit idle while the messages of the last batch are
relayed. A caller waits at most `scoring.timeout_seconds`
and then gets ScoringTimeout, which it maps onto its failure policy (`failure()`).
`swap()` replaces the model between batches, for reloads.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from filterd import plugin_api
from filterd.config import Config, ConfigError, PluginChoice
from filterd.headers import Tagger, load_secret
from filterd.mail import Mail
from filterd.model.checkpoint import checkpoint_path
from filterd.model.classifier import Progress, Scorer, load_classifier
from filterd.model.scoring_process import ProcessClassifier
from filterd.plugin_api import Action, Check, Context, Decision, Outcome
from filterd.verdict import Verdict, action_for

log = logging.getLogger("filterd.engine")

ACTIONS = ("tag", "quarantine", "reject")
PIPELINE = 2  # micro-batches with the model at once
INLINE_BYTES = 256 * 1024  # an inline action runs on the event loop up to this size


def _actions(config: Config) -> dict[str, Action]:
    """The action plugins a verdict names, found through the registry."""
    return {
        name: plugin_api.load("actions", PluginChoice(name=name), f"actions.{name}", config)
        for name in ACTIONS
    }


class ScoringTimeout(TimeoutError):
    """No verdict came within scoring.timeout_seconds."""


class Engine:
    def __init__(
        self,
        classifier: Scorer,
        config: Config | None = None,
        tagger: Tagger | None = None,
        checks: Sequence[Check] = (),
        actions: dict[str, Action] | None = None,
    ):
        config = config or Config()
        self.config = config
        self.tagger = tagger or Tagger(None, config.headers.prefix, config.headers.subject_prefix)
        self.checks = list(checks)
        self.actions = _actions(config) if actions is None else actions
        self.context = Context(config, self.tagger)  # all that actions and sources get
        self._classifier = self._checked(classifier)
        self._executor = ThreadPoolExecutor(PIPELINE, thread_name_prefix="filterd-model")
        self._pending: list[tuple[Mail, asyncio.Future, float]] = []
        self._batcher: asyncio.Task | None = None
        self._scoring: dict[asyncio.Task, Scorer] = {}  # batches with the model, and which
        self._full: asyncio.Event | None = None
        self._waiting = 0  # verdict() calls not yet answered

    @classmethod
    def from_config(
        cls, config: Config, checkpoint: Path | None = None, child_process: bool = False
    ) -> Engine:
        """Load checkpoint (else config's), plugins and secret; errors name the setting.
        With child_process, the model is loaded and run in a process of its own."""
        path = checkpoint or config.checkpoint
        if path is None:
            raise ConfigError("checkpoint: not set (pass --checkpoint or set it in the config)")
        if not checkpoint_path(path).is_file():
            raise ConfigError(f"checkpoint: {checkpoint_path(path)}: no such file")
        checks = [
            plugin_api.load("checks", choice, f"checks[{i}]", config)
            for i, choice in enumerate(config.checks)
        ]
        headers = config.headers
        tagger = Tagger(load_secret(headers.secret_path()), headers.prefix, headers.subject_prefix)
        device = config.device
        if device == "auto":
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
        loader = ProcessClassifier if child_process else load_classifier
        clf = loader(path, device, config.limits.text_limits(), config.precision)
        try:
            return cls(clf, config, tagger, checks)
        except ConfigError:  # the checkpoint's threshold breaks the configured ones
            clf.close()
            raise

    # --- the model ---------------------------------------------------------------------

    @property
    def classifier(self) -> Scorer:
        return self._classifier

    def _checked(self, classifier: Scorer) -> Scorer:
        try:
            self.config.scoring.check_order(self.threshold_of(classifier))
        except ValueError as e:
            raise ConfigError(f"scoring: {e} (threshold from the checkpoint)") from e
        return classifier

    def threshold_of(self, classifier: Scorer) -> float:
        configured = self.config.scoring.threshold
        return classifier.threshold if configured is None else configured

    def swap(self, classifier: Scorer) -> None:
        """Use another model from the next batch on; refused if it breaks the thresholds.
        The old one is closed once no batch in flight uses it."""
        old, self._classifier = self._classifier, self._checked(classifier)
        self._retire(old)

    def _retire(self, classifier: Scorer) -> None:
        if classifier is not self._classifier and classifier not in self._scoring.values():
            classifier.close()

    # --- deciding ----------------------------------------------------------------------

    def verdicts(
        self,
        mails: Sequence[Mail],
        classifier: Scorer | None = None,
        progress: Progress | None = None,
    ) -> list[Verdict]:
        """Verdicts for a list of messages, scored in length-bucketed micro-batches;
        `progress(n)` hears of each group of n done (for a progress bar)."""
        clf = self._classifier if classifier is None else classifier  # one for the whole list
        threshold = self.threshold_of(clf)
        scoring = self.config.scoring
        out: list[Verdict | None] = []
        for mail in mails:
            previous = self.tagger.previous(mail.raw)
            if previous is not None:
                spam, p = previous
                out.append(Verdict(p, spam, "tag", threshold, clf.name, "marker", "already scored"))
            else:
                out.append(self._run_checks("pre", mail, None, threshold, clf.name))
        todo = [i for i, v in enumerate(out) if v is None]
        if progress and len(todo) < len(mails):
            progress(len(mails) - len(todo))
        probabilities = clf.score_messages([mails[i].raw for i in todo], progress) if todo else []
        for i, p in zip(todo, probabilities, strict=True):
            if p is None:  # nothing to read: the setting labels it, not a guess of the model
                spam = scoring.no_text == "spam"
                out[i] = Verdict(None, spam, "tag", threshold, clf.name, "no_text", "no_text")
                log.info(
                    "message_id=%s origin=%s has no text to score: %s (scoring.no_text)",
                    mails[i].header("Message-ID") or "-",
                    mails[i].origin or "-",
                    scoring.no_text,
                )
                continue
            action = action_for(p, scoring.quarantine_threshold, scoring.reject_threshold)
            verdict = Verdict(p, p >= threshold, action, threshold, clf.name)
            out[i] = self._run_checks("post", mails[i], verdict, threshold, clf.name) or verdict
        return out  # type: ignore[return-value]

    def _run_checks(
        self, stage: str, mail: Mail, verdict: Verdict | None, threshold: float, model: str
    ) -> Verdict | None:
        for check in self.checks:
            if check.stage == stage:
                decision: Decision | None = check.check(mail, verdict)
                if decision is not None:
                    return Verdict(
                        None,
                        decision.is_spam,
                        decision.action,
                        threshold,
                        model,
                        f"check:{check.name}",
                        decision.reason,
                    )
        return None

    async def verdict(self, mail: Mail) -> Verdict:
        """One message's verdict, batched with whatever else arrives meanwhile."""
        self._waiting += 1
        try:
            return await self._verdict(mail)
        finally:
            self._waiting -= 1

    @property
    def queue_depth(self) -> int:
        """Messages waiting for their verdict (queued or being scored): what the metrics
        show, so a model falling behind is seen before messages time out."""
        return self._waiting

    async def _verdict(self, mail: Mail) -> Verdict:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Verdict] = loop.create_future()
        self._pending.append((mail, future, loop.time()))
        if self._batcher is None or self._batcher.done():
            self._full = asyncio.Event()
            self._batcher = loop.create_task(self._batches(self._full))
        if len(self._pending) >= self.config.scoring.max_batch:
            self._full.set()
        timeout = self.config.scoring.timeout_seconds
        try:
            return await asyncio.wait_for(future, timeout)
        except TimeoutError:  # wait_for cancelled the future: the batcher skips it
            raise ScoringTimeout(
                f"no verdict within {timeout:g} s (scoring.timeout_seconds)"
            ) from None

    async def _batches(self, full: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        wait = self.config.scoring.batch_wait_ms / 1000
        size = self.config.scoring.max_batch
        while self._pending:
            while len(busy := {t for t in self._scoring if not t.done()}) >= PIPELINE:
                await asyncio.wait(busy, return_when=asyncio.FIRST_COMPLETED)
            # An idle model takes what is there at once: waiting for company only adds
            # latency then. While a batch is scored, arrivals gather into the next until
            # it is full, the first of them waited `wait`, or the model is done (then it
            # would sit idle). Those that already waited go at once.
            remaining = self._pending[0][2] + wait - loop.time()
            if busy and remaining > 0 and len(self._pending) < size:
                full.clear()
                filled = loop.create_task(full.wait())
                await asyncio.wait(
                    {filled, *busy}, timeout=remaining, return_when=asyncio.FIRST_COMPLETED
                )
                filled.cancel()
            batch = [p for p in self._pending[:size] if not p[1].done()]
            del self._pending[:size]
            if batch:
                task = loop.create_task(self._score(batch, self._classifier))
                self._scoring[task] = self._classifier  # in use from now: a swap keeps it open
                task.add_done_callback(self._scored)

    def _scored(self, task: asyncio.Task) -> None:
        self._retire(self._scoring.pop(task))

    async def _score(self, batch: list[tuple[Mail, asyncio.Future, float]], clf: Scorer) -> None:
        loop = asyncio.get_running_loop()
        mails = [mail for mail, _, _ in batch]
        try:
            results = await loop.run_in_executor(self._executor, self.verdicts, mails, clf)
        except Exception as e:  # the model failed: every waiter learns why
            for _, future, _ in batch:
                if not future.done():
                    future.set_exception(e)
        else:
            for (_, future, _), verdict in zip(batch, results, strict=True):
                if not future.done():
                    future.set_result(verdict)

    # --- acting ------------------------------------------------------------------------

    async def handle(
        self, mail: Mail, *, can_reject: bool = False, tag_only: bool = False
    ) -> Outcome:
        """The sources' Handler: verdict, then its action (or only tagging); any failure
        goes to the policy. Where mail was already accepted (`can_reject` False), a reject
        is quarantined: refusing it then would bounce to a possibly forged sender."""
        try:
            verdict = await self.verdict(mail)
            name = "tag" if tag_only else verdict.action
            if name == "reject" and not can_reject:
                name = "quarantine"
            action = self.actions[name]
            if action.inline and len(mail.raw) <= INLINE_BYTES:
                outcome = action.apply(mail, verdict, self.context)
            else:
                outcome = await asyncio.to_thread(action.apply, mail, verdict, self.context)
            return dataclasses.replace(outcome, verdict=verdict)
        except Exception as e:
            return self.context.failure(mail, f"{type(e).__name__}: {e}")

    def close(self) -> None:
        """The last close: batches finish, the model (and its process) is released."""
        self._executor.shutdown(wait=True)
        for classifier in {self._classifier, *self._scoring.values()}:
            classifier.close(wait=10.0)
