"""The daemon's own retraining (`learning.retrain`): after enough new labels, or every so
many hours, it starts `filterd retrain` as a separate process at idle priority, one at a
time, and logs the gate's verdict. Scoring never waits for it: the child runs at
SCHED_IDLE (nice 19 where that is missing), and the new checkpoint arrives by the atomic
replace the daemon reloads anyway; a retrain that crashes or is killed changes nothing."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import time
from pathlib import Path

from filterd.config import Config
from filterd.learning import stores

log = logging.getLogger("filterd")

CHECK_SECONDS = 5.0  # how often the store is looked at (a directory listing)


def new_labels(labels_dir: Path, since: float) -> int:
    """Label files that arrived after `since` (a replaced label counts again: it is news).
    By the inode's change time: a copy from another host (rsync -a) keeps its older mtime.
    A store that cannot be read counts none (the retrain, when it runs, says why)."""
    try:
        with os.scandir(labels_dir) as it:
            return sum(1 for e in it if e.name.endswith(".json") and e.stat().st_ctime > since)
    except OSError:
        return 0


class Retrainer:
    def __init__(self, config: Config, checkpoint: Path, config_path: Path | None, reload):
        self.config = config
        self.schedule = config.learning.retrain
        self.checkpoint = checkpoint
        self.config_path = config_path
        self.reload = reload  # the daemon's Reloader.reload: the new model, at once
        self.last = time.time()  # labels before the daemon started count at the first hour
        self.running = False

    @property
    def enabled(self) -> bool:
        return bool(self.schedule.after_labels or self.schedule.every_hours)

    def due(self, now: float) -> str | None:
        """Why a retrain is due now, or None. New labels count in every store a retrain
        reads (learning.fleet_store), not only this host's."""
        fresh = sum(new_labels(s.root / "labels", self.last) for s in stores(self.config))
        after, hours = self.schedule.after_labels, self.schedule.every_hours
        if after and fresh >= after:
            return f"{fresh} new labels"
        if hours and fresh and now - self.last >= hours * 3600:
            return f"{hours} h passed with {fresh} new labels"
        return None

    async def watch(self) -> None:
        while True:
            await asyncio.sleep(CHECK_SECONDS)
            # A stat of every label file of every host's store: off the event loop.
            why = await asyncio.to_thread(self.due, time.time())
            if why and not self.running:
                await self.run(why)

    async def run(self, why: str) -> int:
        """One retrain in a child process; its exit status."""
        self.running = True
        self.last = time.time()
        command = [sys.executable, "-m", "filterd.trainer.retrain", "--idle"]
        command += ["--checkpoint", str(self.checkpoint)]
        if self.config_path:
            command += ["--config", str(self.config_path)]
        log.info("retrain (%s): started", why)
        child = await asyncio.create_subprocess_exec(
            *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        try:
            out, err = await child.communicate()
        except asyncio.CancelledError:  # the daemon stops: so does the retrain, harmlessly
            child.kill()
            await child.wait()
            raise
        finally:
            self.running = False
        for line in err.decode(errors="replace").splitlines()[-5:]:
            log.info("retrain: %s", line.removeprefix("filterd retrain: "))
        if child.returncode in (0, 1):
            report = json.loads(out.splitlines()[-1])
            gate = report["gate"]
            log.info(
                "retrain %s in %.0f s: %s",
                "installed a new model" if report["installed"] else "kept the running model",
                report["seconds"],
                gate["reason"],
            )
            if report["installed"]:
                await self.reload("retrain installed a new model", changed_only=True)
        else:
            log.error("retrain failed (exit %s); the running model stays", child.returncode)
        return child.returncode
