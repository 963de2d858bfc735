"""Evasion: the tricks spammers use to hide a payload from a filter. Each test shows that
the text the model sees, and the tokens it is given (head and tail of 256), still hold the
payload.

Homoglyphs: NFKC folds fullwidth and mathematical letters but not Cyrillic, Greek, Armenian,
Lisu or Cherokee look-alikes, so `normalize_text` folds those onto Latin inside any word
that also holds an ASCII letter (TEXT_VERSION 2). A word made only of look-alikes (all
Cyrillic "раураl" minus the l) is left alone: it cannot be told from real Cyrillic text.
"""

from __future__ import annotations

import base64
import os
import random
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from filterd.model.tokenizer import gpt2_encoding, gpt2_tokenizer
from filterd.text import TEXT_VERSION, TextLimits, head_and_tail, message_text, normalize_text
from filterd.text.plain import _CONFUSABLE_FROM as LOOKALIKES
from filterd.text.plain import _CONFUSABLE_TO as LATIN

PAYLOAD = "VIAGRA cheap pills at pharma-deals.example order now"
MAX_TOKENS = 256
# Examples per hypothesis property; raise it for a long fuzz run (README "Robustness").
EXAMPLES = int(os.environ.get("FILTERD_FUZZ_EXAMPLES", "200"))


def mail(headers: list[str], body: bytes | str) -> bytes:
    data = body.encode("utf-8") if isinstance(body, str) else body
    return "\r\n".join(headers).encode() + b"\r\n\r\n" + data


def seen(raw: bytes) -> tuple[str, str]:
    """What the model reads: the extracted text, and its tokens decoded back to text."""
    text = message_text(raw)
    return text, gpt2_encoding().decode(gpt2_tokenizer().encode(text, MAX_TOKENS))


def assert_payload_seen(raw: bytes, payload: str = PAYLOAD) -> str:
    text, tokens = seen(raw)
    assert payload in text, text[-500:]
    assert payload in tokens, tokens[-500:]
    return text


def test_text_version_was_bumped_for_the_new_alternative_choice():
    assert TEXT_VERSION == 4


# ------------------------------------------------------------------------------------------
# hidden HTML text

HIDING = [
    '<div style="display:none">{}</div>',
    '<span style="DISPLAY : none !important">{}</span>',
    '<p style="visibility:hidden">{}</p>',
    '<font style="font-size:0px">{}</font>',
    '<div style="font-size: 0">{}</div>',
    '<div style="opacity:0.0">{}</div>',
    "<div hidden>{}</div>",
    "<!-- {} -->",
    "<script>var s = '{}';</script>",
    "<style>/* {} */</style>",
    "<title>{}</title>",
    '<div style="display:none"><p><b>{}</b></p>',  # never closed: hidden to the end of the parent
]
SALAD = "meeting agenda quarterly report invoice attached regards"


@pytest.mark.parametrize("hiding", HIDING)
def test_hidden_html_salad_is_dropped_and_the_payload_kept(hiding):
    html = f"<html><body><div>{hiding.format(SALAD)}</div><p>{PAYLOAD}</p></body></html>"
    text = assert_payload_seen(mail(["Content-Type: text/html"], html))
    assert "quarterly" not in text


def test_payload_split_by_hidden_spans_is_joined_again():
    html = '<p>VI<span style="display:none">zz</span>AG<!-- x -->RA cheap pills</p>'
    text, tokens = seen(mail(["Content-Type: text/html"], html))
    assert "VIAGRA cheap pills" in text and "VIAGRA cheap pills" in tokens


def test_white_on_white_is_not_hidden_but_the_payload_still_counts():
    """Colour tricks are not detected (a known gap): the salad stays, the payload too."""
    html = f'<p style="color:#fff;background:#fff">{SALAD}</p><p>{PAYLOAD}</p>'
    text = assert_payload_seen(mail(["Content-Type: text/html"], html))
    assert "quarterly" in text


# ------------------------------------------------------------------------------------------
# zero-width and other invisible characters

INVISIBLE = [
    "\u200b",  # zero width space
    "\u200c",  # zero width non-joiner
    "\u200d",  # zero width joiner
    "\u2060",  # word joiner
    "\ufeff",  # zero width no-break space
    "\u00ad",  # soft hyphen
    "\u034f",  # combining grapheme joiner
    "\u061c",  # arabic letter mark
    "\u115f",  # hangul choseong filler
    "\u3164",  # hangul filler
    "\u17b4",  # khmer vowel inherent aq
    "\u180e",  # mongolian vowel separator
    "\u200e",  # left-to-right mark
    "\u202e",  # right-to-left override
    "\u2066",  # left-to-right isolate
    "\ufe0f",  # variation selector 16
    "\U000e0041",  # tag latin capital letter a
    "\U0001d173",  # musical symbol begin beam
    "\x00",
    "\x1b",
]


@pytest.mark.parametrize("char", INVISIBLE, ids=[f"U+{ord(c):04X}" for c in INVISIBLE])
def test_invisible_characters_inside_words_are_removed(char):
    spiked = char.join(PAYLOAD.split(" ")[0]) + PAYLOAD[6:]
    assert spiked != PAYLOAD
    assert_payload_seen(mail(["Content-Type: text/plain; charset=utf-8"], spiked))


@settings(max_examples=EXAMPLES, deadline=None)
@given(st.lists(st.tuples(st.integers(0, len(PAYLOAD)), st.sampled_from(INVISIBLE)), max_size=30))
def test_any_sprinkling_of_invisibles_normalizes_away(insertions):
    text = PAYLOAD
    for at, char in sorted(insertions, reverse=True):
        text = text[:at] + char + text[at:]
    assert normalize_text(text) == PAYLOAD


# ------------------------------------------------------------------------------------------
# homoglyphs

TO_LOOKALIKES: dict[str, list[str]] = {}
for fake, real in zip(LOOKALIKES, LATIN, strict=True):
    TO_LOOKALIKES.setdefault(real, []).append(fake)


@pytest.mark.parametrize(
    "spoofed",
    [
        "VІАGRА cheap pills at pharma-deals.example order now",  # Cyrillic І А
        "VIAGRA сheap рills at рharma-dеals.еxamрle оrder nоw",  # Cyrillic lower case
        "VΙΑGRΑ cheap pills at pharma-deals.example order now",  # Greek Ι Α
        "VIAGRA cheap pills at pharma-deals.example օrder now",  # Armenian օ
        "ꓦIAGRA cheap pills at pharma-deals.example order now",  # Lisu ꓦ
        "ＶＩＡＧＲＡ cheap pills at pharma-deals.example order now",  # fullwidth (NFKC)
        "𝐕𝐈𝐀𝐆𝐑𝐀 cheap pills at pharma-deals.example order now",  # mathematical bold (NFKC)
    ],
)
def test_homoglyphs_fold_to_latin(spoofed):
    assert spoofed != PAYLOAD
    assert_payload_seen(mail(["Content-Type: text/plain; charset=utf-8"], spoofed))
    assert_payload_seen(mail(["Content-Type: text/html; charset=utf-8"], f"<p>{spoofed}</p>"))
    subject = "=?utf-8?B?" + base64.b64encode(spoofed.encode()).decode() + "?="
    assert PAYLOAD in message_text(mail([f"Subject: {subject}"], ""))


def test_real_cyrillic_and_greek_text_is_left_alone():
    for text in ("Привет, как дела? Скидка сегодня", "Καλημέρα σας, ΟΚ", "Ереван"):
        assert normalize_text(text) == text


@settings(max_examples=EXAMPLES, deadline=None)
@given(st.randoms(use_true_random=False), st.floats(0.1, 0.9))
def test_random_lookalike_substitution_folds_back(rng: random.Random, share: float):
    words = []
    for word in PAYLOAD.split(" "):
        letters = [i for i, c in enumerate(word) if c in TO_LOOKALIKES]
        keep = rng.choice(letters) if letters else None  # an ASCII letter stays in each word
        chars = [
            rng.choice(TO_LOOKALIKES[c])
            if i != keep and c in TO_LOOKALIKES and rng.random() < share
            else c
            for i, c in enumerate(word)
        ]
        words.append("".join(chars))
    assert normalize_text(" ".join(words)) == PAYLOAD


# ------------------------------------------------------------------------------------------
# a long harmless preamble before the payload

HARMLESS = "Thank you for your order. Your parcel will arrive on Tuesday. "


def test_megabyte_of_harmless_text_before_the_payload():
    body = HARMLESS * (1_000_000 // len(HARMLESS)) + PAYLOAD
    assert_payload_seen(mail(["Subject: your order"], body))


def test_harmless_html_preamble_before_the_payload():
    html = "<p>" + HARMLESS * 20_000 + "</p><p>" + PAYLOAD + "</p>"
    assert_payload_seen(mail(["Content-Type: text/html"], html))


def test_many_empty_parts_before_the_payload_part():
    parts = b"".join(b"--b\r\nContent-Type: text/plain\r\n\r\n\r\n" for _ in range(1000))
    body = parts + b"--b\r\nContent-Type: text/plain\r\n\r\n" + PAYLOAD.encode() + b"\r\n--b--\r\n"
    assert_payload_seen(mail(['Content-Type: multipart/mixed; boundary="b"'], body))


def test_big_attachment_before_the_text_part():
    blob = base64.encodebytes(bytes(3_000_000)).replace(b"\n", b"\r\n")
    body = (
        b"--b\r\nContent-Type: application/pdf\r\nContent-Transfer-Encoding: base64\r\n\r\n"
        + blob
        + b"--b\r\nContent-Type: text/plain\r\n\r\n"
        + PAYLOAD.encode()
        + b"\r\n--b--\r\n"
    )
    assert_payload_seen(mail(['Content-Type: multipart/mixed; boundary="b"'], body))


def test_payload_nested_past_the_depth_cap():
    raw = b"Content-Type: text/plain\r\n\r\n" + PAYLOAD.encode()
    for i in range(60):
        raw = mail(
            [f'Content-Type: multipart/mixed; boundary="n{i}"'], f"--n{i}\r\n".encode() + raw
        )
    assert_payload_seen(raw)


# ------------------------------------------------------------------------------------------
# the byte cap (limits.max_bytes, 2 MB): what lies around the cut points must survive it

LAST = "LAST CHANCE casino-bonus.example claim your prize"
ZIP = 'Content-Type: application/zip; name="a.zip"\r\nContent-Transfer-Encoding: base64'
HTML = "Content-Type: text/html; charset=utf-8"


def attachment(size: int) -> bytes:
    """size bytes of base64 lines (CRLF), of bytes that are no text."""
    lines = base64.encodebytes(bytes(range(256)) * (size * 3 // 4 // 256 + 1)).splitlines()
    return b"\r\n".join(lines)[:size].rsplit(b"\r\n", 1)[0] + b"\r\n"


def html_part(size: int, first: str = "", last: str = PAYLOAD) -> bytes:
    """size bytes of harmless HTML paragraphs, first and last in their own paragraphs."""
    filler = f"<p>{HARMLESS}</p>\r\n".encode()
    return (
        f"<html><body><p>{first}</p>\r\n".encode()
        + filler * (size // len(filler))
        + f"<p>{last}</p></body></html>\r\n".encode()
    )


def parts(boundary: str, entities: list[tuple[str, bytes]]) -> bytes:
    """A multipart body: each entity is (header lines, body ending in a line break)."""
    body = b"".join(f"--{boundary}\r\n{h}\r\n\r\n".encode() + b for h, b in entities)
    return body + f"--{boundary}--\r\n".encode()


def nested(boundary: str, entities: list, subtype: str = "mixed") -> tuple[str, bytes]:
    """A multipart entity to put inside another."""
    return f'Content-Type: multipart/{subtype}; boundary="{boundary}"', parts(boundary, entities)


def multipart(boundary: str, entities: list, headers: list[str] = ()) -> bytes:
    ctype, body = nested(boundary, entities)
    return mail([*headers, ctype], body)


def assert_no_base64(text: str) -> None:
    """Nothing of the attachment is read as text (a base64 line is 76 characters)."""
    assert not re.search(r"[A-Za-z0-9+/]{40,}", text), re.search(r"[A-Za-z0-9+/]{40,}", text)


@pytest.mark.parametrize("size", [2_100_000, 5_000_000])
def test_a_line_longer_than_the_cut_keeps_its_head_and_tail(size):
    """One body line spanning both cut points used to be dropped whole (the model read the
    Subject alone); now it keeps its first 3/4 and last 1/4 like the message."""
    line = f"{PAYLOAD} " + HARMLESS * (size // len(HARMLESS)) + LAST
    raw = mail(["Subject: your order"], line + "\r\n")
    assert len(raw) > size
    text = assert_payload_seen(raw)
    assert_payload_seen(raw, LAST)
    assert text.startswith(f"Subject: your order\n\n{PAYLOAD}")


def test_a_base64_line_longer_than_the_cut_decodes_at_both_ends():
    """The two ends of a long line are cut at multiples of 4 bytes from its start, so a
    one-line base64 body still decodes on both sides of the cut."""
    text = f"{PAYLOAD} " + HARMLESS * (2_400_000 // len(HARMLESS)) + LAST
    raw = mail(["Content-Transfer-Encoding: base64"], base64.b64encode(text.encode()))
    assert_payload_seen(raw)
    assert_payload_seen(raw, LAST)


def test_html_part_behind_a_big_attachment_keeps_its_header():
    """1.9 MB of base64 zip, then a 0.6 MB HTML part: the tail starts inside the HTML part,
    whose header lay in the cut middle. It used to be glued onto the zip (p 0.57 against
    0.9965 for the HTML part alone, from a trained gpt2); now it is read as HTML."""
    raw = multipart("b", [(ZIP, attachment(1_900_000)), (HTML, html_part(600_000))])
    text = assert_payload_seen(raw)
    assert "[attachment: a.zip]" in text
    assert "<p>" not in text and HARMLESS.strip() in text  # rendered, not markup
    assert_no_base64(text)
    # What the scoring process sends its child reads the same, and clipping again is a no-op.
    clip = head_and_tail(raw, TextLimits().max_bytes)
    assert len(clip) <= TextLimits().max_bytes
    assert head_and_tail(clip, TextLimits().max_bytes) == clip
    assert message_text(clip) == text


def test_html_part_before_a_big_attachment():
    raw = multipart("b", [(HTML, html_part(600_000, first=LAST)), (ZIP, attachment(1_900_000))])
    text = assert_payload_seen(raw)
    assert_payload_seen(raw, LAST)
    assert "[attachment: a.zip]" in text
    assert_no_base64(text)


def test_html_part_between_two_attachments_in_the_kept_bytes():
    """The head ends in the first zip, the tail starts in the second: the HTML part lies
    wholly in the tail, and the second zip is read as an attachment again."""
    parts = [(ZIP, attachment(1_900_000)), (HTML, html_part(100_000)), (ZIP, attachment(300_000))]
    text = assert_payload_seen(multipart("b", parts))
    assert text.count("[attachment: a.zip]") >= 2
    assert_no_base64(text)


def test_innocent_plain_alternative_does_not_hide_the_html_a_client_shows():
    """multipart/alternative: clients show the HTML; its plain twin is where a spammer
    puts the innocent words (v3 read only the plain one: the payload was never seen)."""
    for plain in ("Lunch at noon? Bring the slides for the budget review.", "HTML message"):
        entities = [("Content-Type: text/plain", f"{plain}\r\n".encode()), (HTML, html_part(400))]
        ctype, body = nested("alt", entities, "alternative")
        text = assert_payload_seen(mail(["Subject: hi", ctype], body))
        assert plain not in text


NESTED = {
    # the text part in a multipart/alternative, its plain version in the cut middle
    "alternative": lambda: multipart(
        "b",
        [
            (ZIP, attachment(1_900_000)),
            nested(
                "alt",
                [("Content-Type: text/plain", b"harmless plain\r\n"), (HTML, html_part(600_000))],
                "alternative",
            ),
        ],
    ),
    # the attachment in one branch, the text part in another
    "two-branches": lambda: multipart(
        "outer",
        [
            nested("z", [(ZIP, attachment(1_900_000))]),
            nested("rel", [(HTML, html_part(600_000))], "related"),
        ],
    ),
    # a forwarded message whose own body is a multipart holding the HTML part
    "forwarded": lambda: multipart(
        "b",
        [
            (ZIP, attachment(1_900_000)),
            ("Content-Type: message/rfc822", multipart("fw", [(HTML, html_part(600_000))])),
        ],
    ),
    # the attachment and the HTML part are siblings three levels down
    "three-deep": lambda: multipart(
        "l1",
        [
            ("Content-Type: text/plain", b"hello\r\n"),
            nested(
                "l2", [nested("l3", [(ZIP, attachment(1_900_000)), (HTML, html_part(600_000))])]
            ),
        ],
    ),
}


@pytest.mark.parametrize("case", sorted(NESTED))
def test_html_part_behind_a_big_attachment_in_nested_multiparts(case):
    raw = NESTED[case]()
    assert len(raw) > 2_400_000
    text = assert_payload_seen(raw)
    assert "[attachment: a.zip]" in text
    assert "<p>" not in text
    assert_no_base64(text)


# ------------------------------------------------------------------------------------------
# base64-wrapped text


def b64(text: str, codec: str = "utf-8") -> bytes:
    return base64.encodebytes(text.encode(codec)).replace(b"\n", b"\r\n")


@pytest.mark.parametrize(
    "raw",
    [
        mail(["Content-Transfer-Encoding: base64"], b64(PAYLOAD)),
        mail(
            ["Content-Type: text/html", "Content-Transfer-Encoding: base64"],
            b64(f"<b>{PAYLOAD}</b>"),
        ),
        mail(
            ["Content-Type: text/plain; charset=utf-16", "Content-Transfer-Encoding: base64"],
            b64(PAYLOAD, "utf-16"),
        ),
        mail(["Content-Transfer-Encoding: Base64 "], b64(PAYLOAD).replace(b"\r\n", b"")),
        mail(
            ["Content-Transfer-Encoding: base64"],
            b"!" + b64(PAYLOAD)[:20] + b"*" + b64(PAYLOAD)[20:],
        ),
        mail(["Content-Transfer-Encoding: base64"], b64(PAYLOAD).rstrip(b"=\r\n")),
        mail(
            ["Content-Transfer-Encoding: quoted-printable"],
            b"VIA=\r\nGRA=20cheap pills at pharma-deals.example order now",
        ),
        mail(
            ['Content-Type: multipart/mixed; boundary="b"'],
            b"--b\r\nContent-Type: message/rfc822\r\n\r\n"
            + mail(["Content-Transfer-Encoding: base64"], b64(PAYLOAD))
            + b"\r\n--b--\r\n",
        ),
        mail(["Subject: =?utf-8?B?" + base64.b64encode(PAYLOAD.encode()).decode() + "?="], ""),
        mail(["Content-Type: text/plain; charset=utf-7"], PAYLOAD.encode("utf-7")),
    ],
    ids=[
        "plain",
        "html",
        "utf-16",
        "one-line-odd-label",
        "stray-characters",
        "no-padding",
        "quoted-printable-split",
        "forwarded-message",
        "encoded-word-subject",
        "utf-7",
    ],
)
def test_wrapped_text_is_unwrapped(raw):
    assert_payload_seen(raw)
