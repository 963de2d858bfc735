"""Fetching a file over HTTP(S), for the few things a user may download once.

Each fetch has a short connect/read timeout, so with no network it fails in seconds
instead of hanging, streams into a `.part` file with a progress bar on stderr, checks
its sha256, and only then renames it into place.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
import urllib.request
from pathlib import Path

from rich.console import Console
from rich.progress import DownloadColumn, Progress, TransferSpeedColumn

TIMEOUT_S = 10.0


class ChecksumError(OSError):
    """The bytes that arrived are not the ones expected."""


def cache_dir() -> Path:
    """Where downloads live: $FILTERD_CACHE, else $XDG_CACHE_HOME/filterd, else ~/.cache."""
    if os.environ.get("FILTERD_CACHE"):
        return Path(os.environ["FILTERD_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "filterd"


def fetch(url: str, target: Path, sha256: str | None = None) -> Path:
    """Download url to target; without sha256, a hub etag that is one is checked."""
    request = urllib.request.Request(url, headers={"User-Agent": "filterd"})
    partial = target.with_name(target.name + ".part")
    digest = hashlib.sha256()
    with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
        etag = response.headers.get("X-Linked-Etag") or response.headers.get("ETag") or ""
        etag = etag.removeprefix("W/").strip('"').lower()
        expected = sha256 or (etag if re.fullmatch(r"[0-9a-f]{64}", etag) else None)
        total = int(response.headers.get("Content-Length") or 0) or None
        columns = (*Progress.get_default_columns(), DownloadColumn(), TransferSpeedColumn())
        with (
            open(partial, "wb") as out,
            Progress(*columns, console=Console(file=sys.stderr)) as bar,
        ):
            task = bar.add_task(f"downloading {target.name}", total=total)
            while chunk := response.read(1 << 20):
                out.write(chunk)
                digest.update(chunk)
                bar.update(task, advance=len(chunk))
            out.flush()
            os.fsync(out.fileno())
    if expected and digest.hexdigest() != expected:
        partial.unlink()
        raise ChecksumError(f"{url}: sha256 {digest.hexdigest()} is not the expected {expected}")
    os.replace(partial, target)
    return target
