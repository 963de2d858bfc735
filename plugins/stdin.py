"""One message on stdin, the result on stdout: `filterd score --tag` as a mail pipe."""

from __future__ import annotations

import asyncio
import sys
from typing import BinaryIO

from filterd.config import Config
from filterd.mail import Mail
from filterd.plugin_api import Handler, Options, Source

EX_TEMPFAIL = 75  # sysexits.h: delivery agents retry later


class StdinSource(Source):
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

    async def run(self, handle: Handler) -> int:
        """Whole message in, whole message out (never part of one); 75 to retry later."""
        raw = await asyncio.to_thread(self.stdin.read)
        outcome = await handle(Mail(raw, origin="-"))
        if outcome.disposition == "tempfail":
            return EX_TEMPFAIL
        if outcome.data is not None:
            self.stdout.write(outcome.data)
            self.stdout.flush()
        return 0
