"""Plain-text normalization: what every text, mail or SMS, goes through last.

Invisible characters are dropped, Latin look-alikes folded inside mixed words, whitespace
squashed and the length capped (head and tail), so tricks that only change bytes do not
change what the model reads."""

from __future__ import annotations

import re
import unicodedata

# Invisible characters that spammers sprinkle inside words to break up tokens the filter
# would otherwise recognise: Unicode's Default_Ignorable_Code_Point set (zero-width spaces
# and joiners, bidi controls, soft hyphen, Hangul fillers, variation selectors, tag
# characters, ...), plus every C0/C1 control but \t and \n.
_INVISIBLE = [0x00AD, 0x034F, 0x061C, 0x115F, 0x1160, 0x17B4, 0x17B5, *range(0x180B, 0x1810)]
_INVISIBLE += [*range(0x200B, 0x2010), *range(0x202A, 0x202F), *range(0x2060, 0x2070), 0x3164]
_INVISIBLE += [*range(0xFE00, 0xFE10), 0xFEFF, 0xFFA0, *range(0xFFF0, 0xFFF9)]
_INVISIBLE += [*range(0x1BCA0, 0x1BCA4), *range(0x1D173, 0x1D17B), *range(0xE0000, 0xE1000)]
_CONTROLS = [c for c in [*range(0x20), *range(0x7F, 0xA0)] if c not in (0x09, 0x0A)]
_DELETE = dict.fromkeys(_INVISIBLE + _CONTROLS)

# Letters of other scripts that look like Latin ones (NFKC keeps them apart). They are
# folded only inside a run of non-space characters that also holds an ASCII letter ("Vіаgrа"
# with Cyrillic і and а, "pharma-ԁеаӏѕ.example"), so Russian or Greek text stays as it is.
_CONFUSABLE_FROM = (
    "аеорсухіјѕԁԛԝһӏүАВЕЅІЈКМНОРСТХУҮԚԜӀ"  # Cyrillic
    "ΑΒΕΖΗΙΚΜΝΟΡΤΥΧοναικρυϲϳ"  # Greek
    "օսհոցզ"  # Armenian
    "ıȷɑɡɩ"  # Latin letters outside ASCII
    "ꓮꓐꓚꓓꓰꓝꓖꓧꓲꓙꓗꓡꓟꓠꓳꓑꓣꓢꓔꓴꓦꓪꓫꓬꓜ"  # Lisu
    "ᎪᏴᏟᎬᎻᎫᏦᏞᎷᏢᏚᎢᏙᏔᏃ"  # Cherokee
)
_CONFUSABLE_TO = (
    "aeopcyxijsdqwhlyABESIJKMHOPCTXYYQWI"
    "ABEZHIKMNOPTYXovaikpucj"
    "ouhngq"
    "ijagi"
    "ABCDEFGHIJKLMNOPRSTUVWXYZ"
    "ABCEHJKLMPSTVWZ"
)
# Folding runs after NFKC, which turns some look-alikes into others (lunate sigma into final
# sigma): those forms are folded too.
_CONFUSABLES = {
    ord(form): real
    for fake, real in zip(_CONFUSABLE_FROM, _CONFUSABLE_TO, strict=True)
    for form in (fake, unicodedata.normalize("NFKC", fake))
    if len(form) == 1 and not form.isascii()
}
_HAS_CONFUSABLE = re.compile(f"[{re.escape(''.join(map(chr, _CONFUSABLES)))}]")
_WORD = re.compile(r"\S+")
_ASCII_LETTER = re.compile(r"[A-Za-z]")


def _fold_word(m: re.Match[str]) -> str:
    word = m[0]
    if _ASCII_LETTER.search(word) and _HAS_CONFUSABLE.search(word):
        return word.translate(_CONFUSABLES)
    return word


def fold_confusables(text: str) -> str:
    """Latin look-alikes from other scripts made Latin, in words that mix them with ASCII
    (a word: a run of non-space characters, so a domain or a hyphenated word is one)."""
    if not _HAS_CONFUSABLE.search(text):
        return text
    return _WORD.sub(_fold_word, text)


SPACES = re.compile(r"[ \t]+")
_TRAILING = re.compile(r" +\n")
_BLANKS = re.compile(r"\n{3,}")


def normalize_text(text: str) -> str:
    """Canonical form of any text, so look-alike tricks and layout noise map to one string.

    NFKC folds fullwidth and other compatibility forms onto plain letters, and Latin
    look-alikes from other scripts are folded in mixed words; invisible and control
    characters go; whitespace is squeezed so layout does not spend model context.
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n").translate(_DELETE)
    text = fold_confusables(unicodedata.normalize("NFKC", text))
    text = SPACES.sub(" ", text)
    text = _TRAILING.sub("\n", text)
    return _BLANKS.sub("\n\n", text).strip()


def cap(text: str, max_chars: int) -> str:
    """Keep the head and the tail, so a long harmless preamble can't push the payload out."""
    if len(text) <= max_chars:
        return text
    sep = "\n…\n"
    head = max_chars * 3 // 4
    tail = max(max_chars - head - len(sep), 0)
    return text[:head].rstrip() + sep + (text[-tail:].lstrip() if tail else "")
