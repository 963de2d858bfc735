import hashlib
import hmac
import os
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from filterd import headers
from filterd.headers import SecretError, Tagger, header_fields, load_secret
from filterd.verdict import Verdict

KEY = b"0123456789abcdef0123456789abcdef"
SPAM = Verdict(0.987, True, "tag", 0.5, "gpt2-tiny")
HAM = Verdict(0.0123, False, "tag", 0.5, "gpt2-tiny")


def ours(raw: bytes, prefix: bytes = b"X-Spam-") -> list[bytes]:
    return [line for line in raw.splitlines() if line.lower().startswith(prefix.lower())]


def without_ours(raw: bytes) -> bytes:
    return re.sub(rb"(?im)^X-Spam-[^\n]*\n", b"", raw)


@pytest.mark.parametrize(
    "raw",
    [
        b"Subject: hi\nFrom: a@example.org\n\nbody line\n",
        b"Subject: hi\r\nFrom: a@example.org\r\n\r\nbody line\r\n",
        b"From a@example.org Mon Jan  1 00:00:00 2024\nSubject: hi\n\nbody",  # mbox, no final EOL
        b"Subject: caf\xc3\xa9 \xff\r\nX-Other: 1\r\n\r\n\x80\x81 8-bit body \xfe",
        b"Subject: no body at all",
        b"\nbody without headers\n",
    ],
)
def test_tagging_adds_headers_and_changes_nothing_else(raw):
    tagged = Tagger(KEY).tag(raw, SPAM)
    added = ours(tagged)
    assert [h.split(b":")[0] for h in added] == [
        b"X-Spam-Flag",
        b"X-Spam-Status",
        b"X-Spam-Score",
        b"X-Spam-Level",
        b"X-Spam-Marker",
    ]
    assert without_ours(tagged.replace(b"\r\n", b"\n")) == raw.replace(b"\r\n", b"\n")
    crlf = b"\r\n" in raw
    for line in added:  # our lines end like the message's own
        end = tagged.index(line) + len(line)
        assert tagged[end : end + 2 if crlf else end + 1] == (b"\r\n" if crlf else b"\n")
    if raw.startswith(b"From "):
        assert tagged.startswith(raw.split(b"\n")[0] + b"\nX-Spam-Flag: YES\n")
    assert tagged.endswith(raw[raw.find(b"\n\n") + 2 :] if b"\n\n" in raw else raw[-5:])


def test_status_fields_are_spamassassin_compatible():
    tagged = Tagger(KEY).tag(b"Subject: x\n\nbody\n", SPAM)
    assert b"X-Spam-Flag: YES\n" in tagged
    assert (
        b"X-Spam-Status: Yes, score=9.9 required=5.0 probability=0.987 model=gpt2-tiny\n" in tagged
    )
    assert b"X-Spam-Score: 9.9\n" in tagged
    assert b"X-Spam-Level: *********\n" in tagged
    ham = Tagger(KEY).tag(b"Subject: x\n\nbody\n", HAM)
    assert b"X-Spam-Flag" not in ham
    assert b"X-Spam-Status: No, score=0.1 required=5.0 probability=0.012" in ham
    assert b"X-Spam-Level:\n" in ham
    listed = Verdict(None, False, "tag", 0.5, "gpt2-tiny", "check:lists", "allowlisted=example.org")
    assert b"No, score=0.0 required=5.0 allowlisted=example.org model=gpt2-tiny" in Tagger(KEY).tag(
        b"Subject: x\n\nb", listed
    )


def test_ten_megabyte_message_is_byte_exact():
    body = (b"A line of an attachment \xe9\xff with 8-bit bytes.\r\n" * 200_000)[: 10 << 20]
    raw = b"Subject: big\r\nX-Spam-Flag: NO\r\n\r\n" + body
    tagged = Tagger(KEY).tag(raw, HAM)
    assert tagged.endswith(b"Subject: big\r\n\r\n" + body)
    assert Tagger(KEY).previous(tagged) == (False, 0.012)


def test_spoofed_headers_are_stripped_case_insensitively_with_folds():
    raw = (
        b"Subject: hi\n"
        b"x-spam-flag: NO\n"
        b"X-SPAM-Status: No, score=-100\n"
        b"\tfolded continuation\n"
        b"  and another\n"
        b"X-Spammy-Other: kept\n"
        b"X-Spam-Marker: v2 " + b"0" * 64 + b"\n"
        b"\nbody\n"
    )
    tagged = Tagger(KEY).tag(raw, SPAM)
    assert b"NO" not in tagged and b"-100" not in tagged and b"folded" not in tagged
    assert b"and another" not in tagged and b"0" * 64 not in tagged
    assert tagged.count(b"X-Spam-Flag") == 1 and b"X-Spammy-Other: kept\n" in tagged
    assert tagged.endswith(b"Subject: hi\nX-Spammy-Other: kept\n\nbody\n")


def test_custom_prefix_leaves_spamassassin_headers_alone():
    raw = b"X-Spam-Flag: YES\nSubject: hi\n\nbody\n"
    tagged = Tagger(KEY, prefix="X-Filterd-").tag(raw, HAM)
    assert tagged.endswith(raw)
    assert tagged.startswith(b"X-Filterd-Status: No, ")
    assert b"X-Filterd-Marker: v2 " in tagged


def test_valid_marker_passes_through_and_forgeries_do_not():
    tagger = Tagger(KEY)
    raw = b"Subject: hello\nFrom: a@example.org\n\nbody\n"
    tagged = tagger.tag(raw, SPAM)
    assert tagger.previous(tagged) == (True, 0.987)
    # transport may prepend trace headers and turn LF into CRLF: still ours
    relayed = (b"Received: from x\n" + tagged).replace(b"\n", b"\r\n")
    assert tagger.previous(relayed) == (True, 0.987)
    # the same headers on another message, an edited verdict, another key: all stale
    other = tagged.replace(b"body\n", b"buy now\n")
    flipped = tagged.replace(b"X-Spam-Flag: YES\n", b"").replace(b"Status: Yes", b"Status: No")
    assert tagger.previous(other) is None
    assert tagger.previous(flipped) is None
    assert Tagger(b"another key, also 32 bytes long!").previous(tagged) is None
    assert tagger.previous(raw) is None
    # a stale marker is removed with the rest and the message tagged afresh
    retagged = tagger.tag(other, HAM)
    assert retagged.count(b"X-Spam-Marker") == 1 and b"X-Spam-Flag" not in retagged
    assert tagger.previous(retagged) == (False, 0.012)


def test_unscored_header_strips_spoofs_and_keeps_scored_mail():
    tagger = Tagger(KEY)
    raw = b"X-Spam-Flag: NO\r\nSubject: hi\r\n\r\nbody"
    out = tagger.unscored(raw, "model\nbroke")
    assert out.startswith(b"X-Spam-Status: Unscored, reason=model broke\r\n")
    assert out.endswith(b"Subject: hi\r\n\r\nbody") and b"Flag" not in out
    assert tagger.previous(out) is None  # scored again next time
    scored = tagger.tag(raw, SPAM)
    assert tagger.unscored(scored, "x") == scored
    assert Tagger(None).unscored(raw, "no key").count(b"Marker") == 0


def test_subject_prefix_is_optional_and_only_for_spam():
    raw = b"Subject:  Cheap pills\n\tfolded\nFrom: x@y\n\nbody\n"
    assert b"Subject:  Cheap" in Tagger(KEY).tag(raw, SPAM)
    tagger = Tagger(KEY, subject_prefix="[SPAM] ")
    tagged = tagger.tag(raw, SPAM)
    assert b"Subject: [SPAM] Cheap pills\n\tfolded\n" in tagged
    assert tagger.tag(tagged.replace(b"X-Spam-Marker", b"X-Old"), SPAM).count(b"[SPAM]") == 1
    assert b"[SPAM]" not in tagger.tag(raw, HAM)
    assert tagger.previous(tagged) == (True, 0.987)


def test_secret_is_created_private_and_refused_when_readable(tmp_path):
    path = tmp_path / "state" / "secret"
    key = load_secret(path)
    assert len(key) == 32 and load_secret(path) == key
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert os.stat(path.parent).st_mode & 0o777 == 0o700
    os.chmod(path, 0o644)
    with pytest.raises(SecretError, match=r"secret_file.*readable by others"):
        load_secret(path)
    short = tmp_path / "short"
    short.write_bytes(b"tiny")
    os.chmod(short, 0o600)
    with pytest.raises(SecretError, match="too short"):
        load_secret(short)


_names = st.sampled_from([b"Subject", b"From", b"To", b"X-Spam-Flag", b"x-spam-level", b"Date"])
_values = st.binary(max_size=30).map(lambda b: b.replace(b"\n", b"").replace(b"\r", b""))


@settings(max_examples=150, deadline=None)
@given(
    fields=st.lists(st.tuples(_names, _values), max_size=6),
    body=st.binary(max_size=200),
    eol=st.sampled_from([b"\n", b"\r\n"]),
    mbox=st.booleans(),
)
def test_tagging_only_removes_prefixed_fields_and_adds_ours(fields, body, eol, mbox):
    head = b"".join(name + b": " + value + eol for name, value in fields)
    raw = (b"From x@y Mon" + eol if mbox else b"") + head + eol + body
    tagger = Tagger(KEY)
    tagged = tagger.tag(raw, SPAM)
    kept = b"".join(n + b": " + v + eol for n, v in fields if not n.lower().startswith(b"x-spam"))
    added = b"".join(line + eol for line in ours(tagged)[:5])
    assert tagged == (b"From x@y Mon" + eol if mbox else b"") + added + kept + eol + body
    assert tagger.previous(tagged) == (True, 0.987)


# ------------------------------------------------------------------------------------------
# issue 12: what the marker covers

MIME = (
    b"Received: from mx.example.org\n"
    b"Subject: hello\n"
    b"From: a@example.org\n"
    b"To: b@example.org\n"
    b"MIME-Version: 1.0\n"
    b'Content-Type: multipart/mixed; boundary="b  1"; charset=us-ascii\n'
    b"Content-Transfer-Encoding: 7bit\n"
    b"Content-Disposition: inline\n"
    b"\n"
    b"--b  1\nContent-Type: text/plain\n\nhello\n--b  1--\n"
)


def edit(raw: bytes, old: bytes, new: bytes) -> bytes:
    assert raw.count(old) == 1, old
    return raw.replace(old, new)


def test_marker_covers_every_field_that_changes_decoding():
    """Spam sent as `7bit` that is really base64 must not keep its marker once the header
    says base64: whatever changes how a part is decoded or shown voids it."""
    tagger = Tagger(KEY)
    tagged = tagger.tag(MIME, HAM)
    assert tagger.previous(tagged) == (False, 0.012)
    edits = {
        "CTE": edit(tagged, b"Encoding: 7bit", b"Encoding: base64"),
        "CTE, name in lower case": edit(
            tagged, b"Content-Transfer-Encoding: 7bit", b"content-transfer-encoding: base64"
        ),
        "Content-Type": edit(tagged, b"multipart/mixed", b"text/plain"),
        "boundary": edit(tagged, b'boundary="b  1"', b'boundary="b  2"'),
        "white space inside the boundary": edit(tagged, b'boundary="b  1"', b'boundary="b 1"'),
        "charset": edit(tagged, b"charset=us-ascii", b"charset=utf-7"),
        "MIME-Version": edit(tagged, b"MIME-Version: 1.0", b"MIME-Version: 1.1"),
        "MIME-Version removed": edit(tagged, b"MIME-Version: 1.0\n", b""),
        "Content-Disposition": edit(tagged, b"Disposition: inline", b"Disposition: attachment"),
        "a second CTE at the bottom": edit(
            tagged, b"inline\n\n", b"inline\nContent-Transfer-Encoding: base64\n\n"
        ),
        "Content-Location added": edit(
            tagged, b"inline\n\n", b"inline\nContent-Location: http://spam.example/\n\n"
        ),
        "Content-Base added": edit(
            tagged, b"inline\n\n", b"inline\nContent-Base: http://spam.example/\n\n"
        ),
        "a second Subject at the bottom": edit(tagged, b"inline\n\n", b"inline\nSubject: x\n\n"),
        "Date added at the bottom": edit(tagged, b"inline\n\n", b"inline\nDate: today\n\n"),
    }
    for name, raw in edits.items():
        assert tagger.previous(raw) is None, name
        retagged = tagger.tag(raw, SPAM)  # scored again: one fresh marker
        assert retagged.count(b"X-Spam-Marker") == 1, name
        assert tagger.previous(retagged) == (True, 0.987), name


def test_marker_covers_mime_fields_absent_when_tagged():
    tagger = Tagger(KEY)
    tagged = tagger.tag(b"Subject: hi\nFrom: a@example.org\n\naGVsbG8=\n", HAM)
    for field in [
        b"Content-Transfer-Encoding: base64",
        b"Content-Type: text/html",
        b"MIME-Version: 1.0",
        b"Content-Disposition: attachment",
    ]:
        added = edit(tagged, b"\n\n", b"\n" + field + b"\n\n")
        assert tagger.previous(added) is None, field


def test_marker_survives_harmless_changes_in_transit():
    tagger = Tagger(KEY)
    tagged = tagger.tag(MIME, SPAM)
    harmless = {
        "Received at the top": b"Received: from relay.example\n\tby mx\n" + tagged,
        "Return-Path and Delivered-To": b"Return-Path: <a@example.org>\nDelivered-To: b@x\n"
        + tagged,
        "a field appended at the bottom": edit(
            tagged, b"inline\n\n", b"inline\nX-Virus-Scanned: clean\nResent-Date: now\n\n"
        ),
        "CRLF line ends": tagged.replace(b"\n", b"\r\n"),
        "Content-Type folded at a space": edit(tagged, b"; boundary", b";\n boundary"),
        "Subject re-folded": edit(tagged, b"Subject: hello", b"Subject:\n\thello"),
        "trailing empty lines": tagged + b"\n\n\n",
    }
    for name, raw in harmless.items():
        assert tagger.previous(raw) == (True, 0.987), name


def _v1_marker(raw: bytes) -> bytes:
    """`raw` with the marker filterd wrote before issue 12 (v1, its algorithm copied here):
    the five identity fields, first occurrence, white space squeezed, and the body."""
    head, _, body = raw.partition(b"\n\n")
    fields = header_fields(head + b"\n")
    h = hmac.new(KEY, b"filterd-marker/v1", hashlib.sha256)
    for _, field in fields:
        if field.lower().startswith(b"x-spam-"):
            h.update(b"\0" + b" ".join(field.split()))
    for name in (b"subject", b"from", b"to", b"date", b"message-id"):
        value = next((f.partition(b":")[2] for n, f in fields if n == name), b"")
        h.update(b"\0" + name + b":" + b" ".join(value.split()))
    h.update(b"\0\0" + body.replace(b"\r\n", b"\n").rstrip(b"\n"))
    return head + b"\nX-Spam-Marker: v1 " + h.hexdigest().encode() + b"\n\n" + body


def test_old_marker_version_is_treated_as_absent():
    tagger = Tagger(KEY)
    raw = b"Subject: hi\nFrom: a@example.org\nContent-Transfer-Encoding: 7bit\n\nbody\n"
    ours = b"X-Spam-Status: No, score=0.1 required=5.0 probability=0.012 model=gpt2-tiny\n"
    old = _v1_marker(ours + b"X-Spam-Score: 0.1\nX-Spam-Level:\n" + raw)
    assert tagger.previous(old) is None
    assert tagger.unscored(old, "x").count(b"X-Spam-Marker") == 1
    retagged = tagger.tag(edit(old, b"7bit", b"base64"), SPAM)
    assert retagged.count(b"X-Spam-Marker") == 1 and b"Marker: v1 " not in retagged
    assert tagger.previous(retagged) == (True, 0.987)


@settings(max_examples=300, deadline=None)
@given(body=st.text("ab\r\n", max_size=40).map(str.encode), chunk=st.integers(2, 8))
def test_body_hash_ignores_line_end_style_and_trailing_line_ends(body, chunk):
    """The body part of the marker is body.replace(CRLF, LF).rstrip(LF), whatever the chunk
    boundaries: a bare CR stays significant, so it cannot turn a line into a MIME delimiter."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(headers, "_BODY_CHUNK", chunk)
        mp.setattr(headers, "_SCAN_CHUNK", chunk)
        got = hmac.new(KEY, b"", hashlib.sha256)
        headers._hash_body(got, b"Subject: x\n\n" + body, 12)
    want = hmac.new(KEY, body.replace(b"\r\n", b"\n").rstrip(b"\n"), hashlib.sha256)
    assert got.hexdigest() == want.hexdigest()
