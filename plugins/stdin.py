"""One message on stdin, the result on stdout: `filterd score --tag` as a mail pipe."""

from __future__ import annotations

import asyncio
import os
import sys
from typing import BinaryIO

from filterd.config import Config
from filterd.mail import Mail
from filterd.plugin_api import Context, Handler, Options, Source


class StdinSource(Source):
    """A one-shot source: whole message in, whole message out (never part of one)."""

    one_shot = True

    def __init__(
        self,
        options: Options,
        config: Config,
        stdin: BinaryIO | None = None,
        stdout: BinaryIO | None = None,
    ):
        super().__init__(options, config)
        self.stdin = stdin or sys.stdin.buffer
        self.stdout = stdout or sys.stdout.buffer
        self._done: asyncio.Task[int] | None = None

    async def start(self, handle: Handler, context: Context) -> None:
        self._done = asyncio.create_task(self._one(handle))

    async def _one(self, handle: Handler) -> int:
        raw = await asyncio.to_thread(self.stdin.read)
        outcome = await handle(Mail(raw, origin="-"), tag_only=True)
        if outcome.disposition == "tempfail":
            return os.EX_TEMPFAIL  # sysexits.h: delivery agents retry later
        if outcome.data is not None:
            self.stdout.write(outcome.data)
            self.stdout.flush()
        return 0

    async def finished(self) -> int:
        """0 once the message is written; 75 (retry later) under the tempfail policy."""
        assert self._done is not None
        return await self._done

    async def stop_accepting(self) -> None:
        """Nothing to refuse: it takes one message."""

    async def drain(self, timeout: float) -> None:
        if self._done is not None:
            await asyncio.wait([self._done], timeout=timeout)
