"""Tagging and marker checks cost time and memory linear in the message, whatever its shape.

Issue 12: a body ending in a long run of empty lines took 0.25 s per MB and 120 bytes of memory
per trailing byte in the marker's body hash (a backtracking regex search for the final line
ends). Every shape here is measured against ordinary 80-byte lines of the same size and line
ends, in the same test, so a loaded machine slows both alike.
"""

from __future__ import annotations

import time
import tracemalloc

from filterd.headers import Tagger
from filterd.verdict import Verdict

KEY = b"0123456789abcdef0123456789abcdef"
HAM = Verdict(0.0123, False, "tag", 0.5, "gpt2-tiny")
SIZE = 20 << 20


def _seconds(tagger: Tagger, raw: bytes) -> float:
    """Seconds to tag `raw` and verify the result's marker, as `score --tag` does for a
    message and the engine for the copy that comes back."""
    start = time.perf_counter()
    out = tagger.tag(raw, HAM)
    assert tagger.previous(out) == (False, 0.012)
    return time.perf_counter() - start


def _peak(tagger: Tagger, raw: bytes) -> int:
    """Peak bytes allocated while doing the same (the message itself excluded)."""
    tracemalloc.start()
    try:
        out = tagger.tag(raw, HAM)
        assert tagger.previous(out) == (False, 0.012)
        del out
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_trailing_line_ends_cost_no_more_than_ordinary_lines():
    tagger = Tagger(KEY)
    lf_lines = b"Subject: x\n\n" + (b"x" * 79 + b"\n") * (SIZE // 80)
    crlf_lines = b"Subject: x\r\n\r\n" + (b"x" * 78 + b"\r\n") * (SIZE // 80)
    # Each shape beside ordinary mail with its line ends (CR LF costs more to canonicalise).
    shapes = {
        "trailing LF run": (b"Subject: x\n\none line of text\n" + b"\n" * SIZE, lf_lines),
        "trailing CRLF run": (
            b"Subject: x\r\n\r\none line of text\r\n" + b"\r\n" * (SIZE // 2),
            crlf_lines,
        ),
        "only newlines": (b"Subject: x\n\n" + b"\n" * SIZE, lf_lines),
        "alternating CRLF LF": (
            b"Subject: x\r\n\r\ntext\r\n" + b"\r\n\n" * (SIZE // 3),
            crlf_lines,
        ),
        "trailing CR run": (b"Subject: x\n\ntext\n" + b"\r" * SIZE, lf_lines),
        "CR before the final LF run": (b"Subject: x\n\ntext\r" + b"\n" * SIZE, lf_lines),
    }
    base_peak = max(_peak(tagger, lf_lines), _peak(tagger, crlf_lines))
    assert base_peak < 3 * SIZE, base_peak
    for name, (raw, ordinary) in shapes.items():
        # Best of 3, each beside a run of ordinary mail: a loaded machine slows both alike.
        runs = [(_seconds(tagger, ordinary), _seconds(tagger, raw)) for _ in range(3)]
        base_s, seconds = min(r[0] for r in runs), min(r[1] for r in runs)
        peak = _peak(tagger, raw)
        figures = f"{name}: {seconds:.3f} s, {peak >> 20} MiB"
        figures += f"; ordinary lines: {base_s:.3f} s, {base_peak >> 20} MiB"
        print(figures)
        # The goal is 2x ordinary mail; a 0.05 s floor absorbs scheduling noise on small times.
        assert seconds < 2 * base_s + 0.05, figures
        assert peak < 2 * base_peak, figures
        assert seconds < 10 and peak < 3 * SIZE, figures  # generous absolute caps


def test_dense_line_ends_inside_the_body_cost_linear_time():
    """Line ends that are not trailing are hashed: CR LF -> LF is a bytes.replace whose cost
    grows with the number of pairs (2-3x ordinary CRLF mail when every other byte is
    one; 2x in `score --tag` as a whole). Linear still: a quadratic search would be 100x."""
    tagger = Tagger(KEY)
    crlf_lines = b"Subject: x\r\n\r\n" + (b"x" * 78 + b"\r\n") * (SIZE // 80)
    shapes = {
        "CRLF run, then text": b"Subject: x\r\n\r\n" + b"\r\n" * (SIZE // 2) + b"x",
        "CR CR LF run": b"Subject: x\r\n\r\n" + b"\r\r\n" * (SIZE // 3),
        "CR runs between LF": b"Subject: x\r\n\r\n" + (b"\r" * 999 + b"\n") * (SIZE // 1000),
    }
    for name, raw in shapes.items():
        runs = [(_seconds(tagger, crlf_lines), _seconds(tagger, raw)) for _ in range(2)]
        base_s, seconds = min(r[0] for r in runs), min(r[1] for r in runs)
        figures = f"{name}: {seconds:.3f} s; ordinary CRLF lines: {base_s:.3f} s"
        print(figures)
        assert seconds < 10 * base_s + 0.05, figures
        assert _peak(tagger, raw) < 3 * SIZE, figures
