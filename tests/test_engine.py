import asyncio
import threading
import time

import pytest
import torch

from filterd.config import Config, ConfigError
from filterd.engine import INLINE_BYTES, Engine, ScoringTimeout
from filterd.headers import Tagger
from filterd.mail import Mail
from filterd.model.checkpoint import CheckpointMeta, save_checkpoint
from filterd.model.classifier import load_classifier
from filterd.model.gpt2 import ARCHITECTURES, GPT2Classifier
from filterd.plugin_api import Action, Options, Outcome

HAM = b"Subject: lunch\n\nSee you at noon.\n"


def make_checkpoint(path, logit: float, threshold: float = 0.5):
    """A gpt2-tiny checkpoint whose every message scores sigmoid(logit)."""
    torch.manual_seed(0)
    model = GPT2Classifier(ARCHITECTURES["gpt2-tiny"]).eval()
    with torch.no_grad():
        model.score.weight.zero_()
        model.score.bias.copy_(torch.tensor([0.0, logit]))
    meta = CheckpointMeta(arch="gpt2-tiny", config=model.config.to_dict(), threshold=threshold)
    return save_checkpoint(path, model, meta)


def config(**scoring) -> Config:
    return Config.model_validate({"scoring": scoring})


@pytest.fixture(scope="module")
def spam_clf(tmp_path_factory):
    return load_classifier(make_checkpoint(tmp_path_factory.mktemp("spam"), 2.0))  # p=0.8808


def test_thresholds_pick_actions(spam_clf):
    mail = [Mail(HAM)]
    cases = [
        ({}, True, "tag"),
        ({"threshold": 0.9}, False, "tag"),
        ({"quarantine_threshold": 0.85}, True, "quarantine"),
        ({"quarantine_threshold": 0.6, "reject_threshold": 0.88}, True, "reject"),
        ({"quarantine_threshold": 0.6, "reject_threshold": 0.89}, True, "quarantine"),
    ]
    for scoring, spam, action in cases:
        (v,) = Engine(spam_clf, config(**scoring)).verdicts(mail)
        assert (v.is_spam, v.action) == (spam, action), scoring
        assert v.probability == pytest.approx(0.8808, abs=1e-4)
        assert v.decided_by == "model" and v.model == "gpt2-tiny"
        assert v.threshold == scoring.get("threshold", 0.5)
        assert v.points == 8.8


def test_checkpoint_threshold_must_respect_order(tmp_path, spam_clf):
    high = load_classifier(make_checkpoint(tmp_path, 2.0, threshold=0.95))
    with pytest.raises(ConfigError, match=r"quarantine_threshold .* threshold"):
        Engine(high, config(quarantine_threshold=0.9))
    engine = Engine(spam_clf, config(quarantine_threshold=0.9))
    with pytest.raises(ConfigError):
        engine.swap(high)
    assert engine.classifier is spam_clf


def test_swap_changes_the_model(tmp_path, spam_clf):
    engine = Engine(spam_clf)
    assert engine.verdicts([Mail(HAM)])[0].is_spam
    engine.swap(load_classifier(make_checkpoint(tmp_path, -2.0)))
    assert not engine.verdicts([Mail(HAM)])[0].is_spam


class Counting:
    """A classifier stand-in recording each batch, optionally slow."""

    name, threshold = "stub", 0.5

    def __init__(self, delay: float = 0.0):
        self.batches: list[int] = []
        self.delay = delay
        self.thread: str = ""
        self.running = self.most_at_once = 0
        self.closed = False
        self._lock = threading.Lock()

    def score_messages(self, raws, progress=None):
        assert not self.closed, "scored after close()"
        self.thread = threading.current_thread().name
        with self._lock:
            self.batches.append(len(raws))
            self.running += 1
            self.most_at_once = max(self.most_at_once, self.running)
        time.sleep(self.delay)
        with self._lock:
            self.running -= 1
        return [0.9 if b"spam" in r else 0.1 for r in raws]

    def close(self, wait: float = 0.0) -> None:
        self.closed = True


def test_async_arrivals_share_a_batch_off_the_loop():
    clf = Counting(delay=0.2)
    engine = Engine(clf, config(batch_wait_ms=50))

    async def main():
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        tick = asyncio.create_task(ticker())
        mails = [Mail(b"Subject: spam\n\nx"), Mail(HAM), Mail(HAM)]
        verdicts = await asyncio.gather(*(engine.verdict(m) for m in mails))
        tick.cancel()
        return verdicts, ticks

    verdicts, ticks = asyncio.run(main())
    assert [v.is_spam for v in verdicts] == [True, False, False]
    assert clf.batches == [3]
    assert clf.thread.startswith("filterd-model")
    assert ticks >= 10  # the loop kept running while the model worked for 0.2 s
    engine.close()


def test_batches_are_capped_and_two_go_to_the_model_at_once():
    clf = Counting(delay=0.2)
    engine = Engine(clf, config(batch_wait_ms=0, max_batch=2))

    async def main():
        start = time.monotonic()
        await asyncio.gather(*(engine.verdict(Mail(HAM)) for _ in range(6)))
        return time.monotonic() - start

    elapsed = asyncio.run(main())
    assert clf.batches == [2, 2, 2]
    assert clf.most_at_once == 2  # the next batch is ready while one is scored, no more
    assert elapsed < 0.55  # three batches of 0.2 s, two at a time: 0.4 s, not 0.6
    engine.close()


def test_a_swapped_out_model_is_closed_after_its_batch():
    old, new = Counting(delay=0.3), Counting()
    engine = Engine(old, config(batch_wait_ms=0))

    async def main():
        first = asyncio.create_task(engine.verdict(Mail(HAM)))
        await asyncio.sleep(0.1)  # the batch is with the old model
        engine.swap(new)
        assert not old.closed
        await first
        assert old.closed
        await engine.verdict(Mail(HAM))

    asyncio.run(main())
    assert old.batches == [1] and new.batches == [1]
    engine.swap(Counting())  # nothing in flight: closed at once
    assert new.closed
    engine.close()


def test_timeout_and_failure_policies(tmp_path):
    clf = Counting(delay=0.5)
    tagger = Tagger(b"k" * 32)

    async def one(engine):
        with pytest.raises(ScoringTimeout, match="timeout_seconds"):
            await engine.verdict(Mail(HAM))
        return await engine.handle(Mail(HAM))

    for policy, disposition in (("fail_open", "deliver"), ("tempfail", "tempfail")):
        cfg = config(timeout_seconds=0.05, failure_policy=policy, batch_wait_ms=0)
        outcome = asyncio.run(one(Engine(clf, cfg, tagger)))
        assert outcome.disposition == disposition
        assert "ScoringTimeout" in outcome.note
        if policy == "fail_open":
            assert outcome.data.startswith(b"X-Spam-Status: Unscored, reason=ScoringTimeout")
            assert outcome.data.endswith(HAM)
        else:
            assert outcome.data is None


def test_model_error_reaches_every_waiter():
    class Broken(Counting):
        def score_messages(self, raws, progress=None):
            raise RuntimeError("out of memory")

    engine = Engine(Broken(), config(batch_wait_ms=10))

    async def main():
        return await asyncio.gather(
            *(engine.verdict(Mail(HAM)) for _ in range(3)), return_exceptions=True
        )

    results = asyncio.run(main())
    assert all(isinstance(r, RuntimeError) for r in results)


def test_inline_actions_run_on_the_loop_for_small_messages_only():
    threads = []

    class Where(Action):
        inline = True

        def apply(self, mail, verdict, engine):
            threads.append(threading.current_thread().name)
            return Outcome("deliver", mail.raw)

    tag = Where(Options(), Config())
    engine = Engine(Counting(), config(batch_wait_ms=0), actions={"tag": tag})
    big = HAM + b"x" * INLINE_BYTES

    async def main():
        return [(await engine.handle(Mail(raw))).data for raw in (HAM, big)]

    assert asyncio.run(main()) == [HAM, big]
    assert threads[0] == threading.main_thread().name
    assert threads[1] != threading.main_thread().name
    engine.close()
