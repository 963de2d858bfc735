"""Turn a raw email (or an SMS) into the text the model reads.

The trainer and the runtime both call this module, so a message is seen the same way when
it is learned and when it is judged. Anything that would only tell the model *which corpus*
a mail came from (routing headers, addresses) is left out, and every step is capped so a
hostile mail costs bounded time and memory.

Bump TEXT_VERSION whenever the output of message_text or normalize_text changes: a model
trained on one version of the text should not be scored on another.
"""

from __future__ import annotations

import binascii
import codecs
import html as html_lib
import re
import unicodedata
from collections import deque
from dataclasses import dataclass
from email.message import Message

# v2: every default-ignorable code point dropped, Latin look-alikes folded in mixed words,
# and the caps keep the head and the tail (bytes, parts) or flatten (depth) instead of cutting.
TEXT_VERSION: int = 2


@dataclass(frozen=True)
class TextLimits:
    """Caps on work per message, so hostile mail costs bounded time and memory."""

    max_bytes: int = 2_000_000  # raw bytes parsed; the rest is ignored
    max_parts: int = 200  # MIME parts walked
    max_depth: int = 30  # multipart nesting followed
    max_chars: int = 100_000  # characters of text extracted (keep head 3/4 and tail 1/4 when over)


# ---------------------------------------------------------------------------------------------
# plain text

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


_SPACES = re.compile(r"[ \t]+")
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
    text = _SPACES.sub(" ", text)
    text = _TRAILING.sub("\n", text)
    return _BLANKS.sub("\n\n", text).strip()


def _cap(text: str, max_chars: int) -> str:
    """Keep the head and the tail, so a long harmless preamble can't push the payload out."""
    if len(text) <= max_chars:
        return text
    sep = "\n…\n"
    head = max_chars * 3 // 4
    tail = max(max_chars - head - len(sep), 0)
    return text[:head].rstrip() + sep + (text[-tail:].lstrip() if tail else "")


# ---------------------------------------------------------------------------------------------
# bytes -> str

# Labels whose real-world use is a superset of what they promise.
_CHARSET_ALIASES = {
    "us-ascii": "cp1252",
    "ascii": "cp1252",
    "iso-8859-1": "cp1252",
    "latin1": "cp1252",
    "latin-1": "cp1252",
    "gb2312": "gb18030",
    "gbk": "gb18030",
    "ks_c_5601-1987": "cp949",
    "euc-kr": "cp949",
}
# Codecs that are not mail charsets and could be slow or surprising on hostile input.
_BAD_CODECS = {"idna", "punycode", "raw-unicode-escape", "unicode-escape", "undefined"}


def _codec(charset: str | None) -> str | None:
    """A Python codec name for a MIME charset label, or None if we should not trust it."""
    if not charset:
        return None
    label = charset.strip().strip("\"'").lower()
    label = _CHARSET_ALIASES.get(label, label)
    try:
        name = codecs.lookup(label).name
    except (LookupError, ValueError, TypeError):
        return None
    return None if name in _BAD_CODECS else name


def _decode(data: bytes, charset: str | None = None) -> str:
    """Decode bytes whose label may be missing or lying; never fails.

    Mail labelled latin-1 or ascii is very often UTF-8 in fact, and valid UTF-8 is rarely
    produced by accident, so UTF-8 is tried before an ASCII-compatible label.
    """
    codec = _codec(charset)
    if codec == "utf-8":
        codec = None  # failing UTF-8 falls back to Windows-1252, not to U+FFFD everywhere
    if data.isascii():
        if codec:
            try:
                return data.decode(codec)
            except (UnicodeDecodeError, LookupError):
                pass
        return data.decode("ascii", "replace")
    wide = codec is not None and codec.startswith(("utf-16", "utf-32"))
    for name in (codec, "utf-8") if wide else ("utf-8", codec):
        if name:
            try:
                return data.decode(name)
            except (UnicodeDecodeError, LookupError):
                pass
    if codec:
        try:
            return data.decode(codec, "replace")
        except (UnicodeDecodeError, LookupError):
            pass
    return data.decode("cp1252", "replace")


# Leading lines made only of base64 characters; whatever follows (a list footer appended
# by a mailing list, say) is plain text and stays as it is.
_B64_LINES = re.compile(rb"(?:[ \t]*[A-Za-z0-9+/=]*[ \t]*(?:\r?\n|\Z))*")
# A line of base64 with stray characters in it (mail clients skip those, so a spammer can
# sprinkle them in): one word, mostly of base64 characters.
_B64_JUNK_LINE = re.compile(rb"[ \t]*(\S+)[ \t]*(?:\r?\n|\Z)")
_NOT_B64 = re.compile(rb"[^A-Za-z0-9+/]")
_NOT_B64_OR_PAD = re.compile(rb"[^A-Za-z0-9+/=]")


def _b64_end(data: bytes) -> int:
    """Where the leading base64 lines (clean, or mostly base64 in one word) end."""
    end = 0
    while True:
        end = _B64_LINES.match(data, end).end()
        junk = _B64_JUNK_LINE.match(data, end)
        if not junk or end >= len(data):
            return end
        word = junk[1]
        if len(_NOT_B64_OR_PAD.sub(b"", word)) * 4 < len(word) * 3:
            return end
        end = junk.end()


def _b64(data: bytes) -> bytes:
    """Lenient base64 that never raises: bad padding is repaired, stray characters are
    skipped as mail clients skip them, trailing text is kept raw."""
    end = _b64_end(data)
    clean = _NOT_B64.sub(b"", data[:end])
    if not clean:
        return data  # not base64 at all: the label lied
    extra = len(clean) % 4
    if extra == 1:
        clean = clean[:-1]
    elif extra:
        clean += b"=" * (4 - extra)
    try:
        decoded = binascii.a2b_base64(clean)
    except (binascii.Error, ValueError):
        return data
    rest = data[end:]
    return decoded + b"\n" + rest if rest.strip() else decoded


def _transfer_decode(body: bytes, cte: str) -> bytes:
    cte = cte.strip().lower()
    if cte == "base64":
        return _b64(body)
    if cte == "quoted-printable":
        try:
            return binascii.a2b_qp(body)
        except (binascii.Error, ValueError):
            return body
    return body


# ---------------------------------------------------------------------------------------------
# headers

# A header block ends at the first line that is neither "Name: value" nor a continuation,
# the way the stdlib feedparser decides it; one regex keeps it linear.
# A continuation line with no field before it is body text, not a header to drop.
_HEADER_BLOCK = re.compile(rb"(?:[\x21-\x39\x3b-\x7e]+:[^\n]*(?:\n|\Z)(?:[ \t][^\n]*(?:\n|\Z))*)*")
_FOLD = re.compile(rb"\r?\n(?=[ \t])")
_WANTED = re.compile(
    rb"^(subject|from|content-type|content-disposition|content-transfer-encoding)[ \t]*:(.*)",
    re.I | re.M,
)
_MAX_HEADER = 4096  # bytes kept of a header; the stdlib param parser is quadratic in it

_ENCODED_WORD = re.compile(r"=\?([^?\s]+)\?([bBqQ])\?([^?\s]*)\?=")


def _split_headers(data: bytes) -> tuple[dict[str, str], bytes]:
    """Headers we use (first occurrence wins) and the body.

    Only the headers the text needs are kept at all: routing headers such as Received or
    Delivered-To identify the collection a mail came from, not whether it is spam.
    """
    end = _HEADER_BLOCK.match(data).end()
    block, body = data[:end], data[end:]
    if body.startswith(b"\r\n"):
        body = body[2:]
    elif body.startswith(b"\n"):
        body = body[1:]
    headers: dict[str, str] = {}
    for m in _WANTED.finditer(_FOLD.sub(b"", block)):
        key = m[1].lower().decode("ascii")
        if key not in headers:
            headers[key] = _decode(m[2][:_MAX_HEADER].strip())
    return headers, body


def _decode_words(value: str) -> str:
    """Decode RFC 2047 encoded words, joining adjacent ones so split multibyte chars survive."""
    out: list[str] = []
    run: list[bytes] = []
    run_charset = None
    pos = 0
    for m in _ENCODED_WORD.finditer(value):
        gap = value[pos : m.start()]
        charset = m[1].split("*", 1)[0]  # RFC 2231 adds *language
        joined = bool(run) and (not gap or gap.isspace())  # space between words is dropped
        if run and not (joined and charset.lower() == run_charset.lower()):
            out.append(_decode(b"".join(run), run_charset))
            run = []
        if not joined:
            out.append(gap)
        payload = m[3].encode("latin-1", "replace")
        run.append(_b64(payload) if m[2] in "bB" else binascii.a2b_qp(payload, header=True))
        run_charset = charset
        pos = m.end()
    if run:
        out.append(_decode(b"".join(run), run_charset))
    out.append(value[pos:])
    return " ".join("".join(out).split())


def _display_name(value: str) -> str:
    """The sender's display name, never the address: addresses name the corpus, not spam."""
    if "<" in value:
        name = value[: value.index("<")]
    elif "(" in value and ")" in value:
        name = value[value.index("(") + 1 : value.rindex(")")]
    else:
        return ""
    name = _decode_words(name.strip().strip("\"'").replace('\\"', '"'))
    return " ".join(word for word in name.split() if "@" not in word).strip("\"' ")


def _content_info(headers: dict[str, str], default: str) -> Message:
    """A stdlib Message holding only the MIME headers, for its parameter parsing."""
    info = Message()
    info.set_default_type(default)
    for key in ("content-type", "content-disposition"):
        if key in headers:
            info[key] = headers[key]
    return info


# ---------------------------------------------------------------------------------------------
# HTML

_VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "param"}
_VOID |= {"source", "track", "wbr", "keygen"}
# Block boundaries ask for a line break (_LINE) or a blank line (_PARAGRAPH); adjacent
# boundaries merge to the largest ask, as rendered margins do, while each <br> adds one.
_PARAGRAPH = {"p", "h1", "h2", "h3", "h4", "h5", "h6", "table", "ul", "ol", "dl", "pre", "hr"}
_PARAGRAPH |= {"blockquote", "center", "form", "address", "fieldset"}
_LINE = {"div", "tr", "li", "dt", "dd", "section", "article", "header", "footer", "caption"}
_LINE |= {"body", "html", "main", "nav", "aside", "figure", "option", "legend"}
_CELL = {"td", "th"}
_UNSEEN = {"script", "style", "head", "title", "template"}
_HEAD_ONLY = {"meta", "link", "title", "style", "script", "base", "noscript", "template"}
# Starting one of these closes an open <p>, as in HTML; otherwise one hidden <p> would
# hide every paragraph after it.
_CLOSES_P = _PARAGRAPH | {"div", "li", "section", "article", "header", "footer"}
_HIDING_STYLE = re.compile(
    r"display:none|visibility:hidden|font-size:0+(?:\.0*)?(?![0-9.])|opacity:0+(?:\.0*)?(?![0-9.])"
)
_WS = re.compile(r"\s+")
_LINE_MARK, _PARA_MARK = "\ue000", "\ue001"  # private-use stand-ins, removed from data
_LINE_EDGES = re.compile(r" ?\n ?")


class _HTMLText:
    """Visible text of an HTML part: what the reader sees, not what the spammer hides.

    Hidden text (display:none, zero font size, ...) is a classic way to feed a filter
    innocent words, so it is dropped together with everything nested inside it. The
    handlers are called by _html_to_text's scan, with tag names lower-cased and character
    references already decoded.
    """

    def __init__(self) -> None:
        self.pieces: list[str] = []
        self.stack: list[tuple[str, bool]] = []  # open elements and whether each hides
        self.open: dict[str, int] = {}  # open count per tag: keeps unmatched end tags O(1)
        self.hidden = 0  # open elements that hide their content
        self.pre = 0

    def _hides(self, tag: str, attrs: list[tuple[str, str | None]]) -> bool:
        if tag in _UNSEEN:
            return True
        for name, value in attrs:
            if name == "hidden":
                return True
            if name == "style" and value and _HIDING_STYLE.search(_WS.sub("", value).lower()):
                return True
        return False

    def _close(self, tag: str) -> bool | None:
        """Pop up to and including the nearest open `tag`; unclosed children end with it.

        Returns whether that element hid its content, None if it was not open.
        """
        if not self.open.get(tag):
            return None
        while self.stack:
            name, hides = self.stack.pop()
            self.open[name] -= 1
            self.hidden -= hides
            self.pre -= name == "pre"
            if name == tag:
                return hides
        return None

    def _boundary(self, tag: str) -> None:
        if tag in _PARAGRAPH:
            self.pieces.append(_PARA_MARK)
        elif tag in _LINE:
            self.pieces.append(_LINE_MARK)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if self.open.get("head") and tag not in _HEAD_ONLY:
            self._close("head")  # <body> or any content ends an unclosed <head>
        if tag in _CLOSES_P:
            self._close("p")
        if tag == "li":
            self._close("li")
        hides = tag not in _VOID and self._hides(tag, attrs)
        if not self.hidden and not hides:
            if tag == "br":
                self.pieces.append("\n")
            elif tag in _CELL:
                self.pieces.append(" ")
            else:
                self._boundary(tag)
        if tag in _VOID:
            return
        self.stack.append((tag, hides))
        self.open[tag] = self.open.get(tag, 0) + 1
        self.hidden += hides
        self.pre += tag == "pre"

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.handle_starttag(tag, attrs)
        if tag not in _VOID:
            self.handle_endtag(tag)

    def handle_endtag(self, tag: str) -> None:
        if not self._close(tag) and not self.hidden:
            self._boundary(tag)

    def handle_data(self, data: str) -> None:
        if not self.hidden:
            data = data.replace(_LINE_MARK, "").replace(_PARA_MARK, "")
            if not self.pre:  # whitespace runs read as one space (most runs are only that)
                data = " " if data.isspace() else _WS.sub(" ", data)
            self.pieces.append(data)

    def text(self) -> str:
        out: list[str] = []
        breaks = 0  # newlines owed before the next text
        for piece in self.pieces:
            if piece in (_LINE_MARK, _PARA_MARK):
                breaks = max(breaks, 1 if piece == _LINE_MARK else 2)
            elif piece == "\n":
                breaks += 1
            elif not (breaks and piece.isspace()):
                out.append("\n" * breaks + piece)
                breaks = 0
        return _LINE_EDGES.sub("\n", _SPACES.sub(" ", "".join(out)))


# One start or end tag as an HTML5 tokenizer reads it: quoted values may hold '>'.
# Possessive/atomic pieces make a failed match (a tag left open at EOF) cost one pass.
_WHOLE_TAG = re.compile(
    r"""<(/?)([A-Za-z][^\t\n\f\r />]*+)(
        (?>[\t\n\f\r /]++
          |[^\t\n\f\r />][^\t\n\f\r /=>]*+
           (?>[\t\n\f\r ]*+=[\t\n\f\r ]*+
              (?>"[^"]*+"|'[^']*+'|[^\t\n\f\r >"'][^\t\n\f\r >]*+))?
        )*+)>""",
    re.X,
)
_ATTR = re.compile(
    r"""([^\t\n\f\r />][^\t\n\f\r /=>]*)"""
    r"""(?:[\t\n\f\r ]*=[\t\n\f\r ]*("[^"]*"|'[^']*'|[^\t\n\f\r >"'][^\t\n\f\r >]*))?"""
)
_RAW_END = {"script": re.compile(r"</script", re.I), "style": re.compile(r"</style", re.I)}
# The text once came from CPython 3.11's HTMLParser reading a cleaned copy of the markup;
# what it made of odd tags is kept so the text stays the same (TEXT_VERSION): an end tag's
# name loses trailing whitespace ("</div\xa0>") or ends at a NUL, a start tag whose name
# holds a NUL is text, and only a plain "</script>" ("</style>") ends a script body.
_END_NAME = re.compile(r"([a-zA-Z][-.a-zA-Z0-9:_]*)\s*")


def _end_name(name: str) -> str:
    """The name of an end tag that HTMLParser read as plain ("div\xa0" as "div"), else ""."""
    m = _END_NAME.fullmatch(name)
    return m[1] if m else ""


def _attrs(text: str) -> list[tuple[str, str | None]]:
    """The attributes the text extraction reads, hidden and style, values decoded."""
    low = text.lower()
    if "hidden" not in low and "style" not in low:
        return []
    out: list[tuple[str, str | None]] = []
    for a in _ATTR.finditer(text):
        key = a[1].lower()
        if key == "hidden":
            out.append(("hidden", None))
        elif key == "style" and a[2]:
            out.append(("style", html_lib.unescape(a[2].strip("\"'"))))
    return out


def _as_text(attrs: list[tuple[str, str | None]], ending: str) -> str:
    """What follows the NUL of a start tag read as text: the attributes as HTMLParser saw
    them, still escaped (the text they join is decoded as a whole)."""
    kept = [" hidden" if v is None else f' style="{html_lib.escape(v)}"' for _, v in attrs]
    return "".join(kept) + ending


def _html_to_text(html: str) -> str:
    """Visible text of an HTML document, read in one pass that stays linear on hostile
    markup (hundreds of KB of "<a " or "<!--" cost one search each, not one per construct).

    It follows the HTML5 tokenizer: comments and declarations go, a '<' that starts no tag
    is text, a tag still open at the end of the document drops the rest (as browsers do),
    and script/style bodies are skipped without being read as markup.
    """
    parser = _HTMLText()
    text: list[str] = []  # text since the last tag, decoded as one run (refs may span a comment)
    raw = ""  # script or style still open: nothing counts until its plain end tag
    pos = 0
    size = len(html)
    while (lt := html.find("<", pos)) >= 0:
        if lt > pos:
            text.append(html[pos:lt])
        tag = _WHOLE_TAG.match(html, lt)
        if tag:
            if text and not raw:
                parser.handle_data(html_lib.unescape("".join(text)))
            text = []
            close, name, rest = tag.groups()
            name = name.lower()
            pos = tag.end()
            if close:
                plain = name if name.isalnum() else _end_name(name)  # most names are plain
                if not raw:
                    parser.handle_endtag(plain or name.partition("\0")[0])
                elif plain == raw:
                    parser.handle_endtag(raw)
                    raw = ""
                continue
            if not raw:
                attrs = _attrs(rest) if rest else []
                empty = rest.rstrip().endswith("/")  # <br/>
                if "\0" in name:
                    head, _, tail = name.partition("\0")
                    parser.handle_data("<" + head)
                    text.append("\0" + tail + _as_text(attrs, "/>" if empty else ">"))
                elif empty:
                    parser.handle_startendtag(name, attrs)
                else:
                    parser.handle_starttag(name, attrs)
                    raw = name if name in _RAW_END else ""
            raw_end = _RAW_END.get(name)
            if raw_end:
                found = raw_end.search(html, pos)
                pos = found.start() if found else size
            continue
        nxt = html[lt + 1 : lt + 2]
        letter = nxt.isascii() and nxt.isalpha()
        if html.startswith("<!--", lt):
            end = html.find("-->", lt + 4)
            pos = end + 3 if end >= 0 else size
        elif nxt in ("!", "?", "/") or letter:  # declaration, bogus comment, open tag
            end = html.find(">", lt + 1) if not letter else -1
            pos = end + 1 if end >= 0 else size
        else:
            text.append("<")
            pos = lt + 1
    if pos < size:
        text.append(html[pos:])
    if text and not raw:
        parser.handle_data(html_lib.unescape("".join(text)))
    return parser.text()


# ---------------------------------------------------------------------------------------------
# MIME


class _Walker:
    """Collects the text blocks of one message, counting parts against the limits."""

    def __init__(self, limits: TextLimits) -> None:
        self.limits = limits
        self.parts = 0
        self.blocks: list[str] = []

    def message(self, data: bytes, depth: int) -> None:
        headers, body = _split_headers(data)
        lines = []
        subject = _decode_words(headers.get("subject", ""))
        if subject:
            lines.append(f"Subject: {subject}")
        name = _display_name(headers.get("from", ""))
        if name:
            lines.append(f"From: {name}")
        if lines:
            self.blocks.append("\n".join(lines))
        self.part(headers, body, depth, "text/plain")

    def part(self, headers: dict[str, str], body: bytes, depth: int, default: str) -> None:
        if self.parts >= self.limits.max_parts:
            return
        self.parts += 1
        if depth > self.limits.max_depth:
            # Too deep to walk: its text with the MIME scaffolding removed, so nesting a
            # payload past the cap does not hide it.
            self.blocks.append(_MIME_LINE.sub("", _decode(body)))
            return
        try:
            self._part(headers, body, depth, default)
        except RecursionError:
            raise
        except Exception:  # one broken part should not cost the rest of the message
            pass

    def _part(self, headers: dict[str, str], body: bytes, depth: int, default: str) -> None:
        if "content-type" not in headers and default == "text/plain":
            # A MIME body whose Content-Type header went missing (common in old spam):
            # reading it as the parts it plainly is beats showing the model base64.
            boundary = _sniff_boundary(body[:1024])
            if boundary:
                headers = {**headers, "content-type": f'multipart/mixed; boundary="{boundary}"'}
        info = _content_info(headers, default)
        ctype = info.get_content_type()
        main = ctype.split("/", 1)[0]
        cte = headers.get("content-transfer-encoding", "")
        if main == "multipart":
            self.multipart(info, body, depth)
        elif ctype in ("message/rfc822", "message/global", "text/rfc822-headers"):
            self.message(_transfer_decode(body, cte), depth + 1)
        elif main != "text" or info.get_content_disposition() == "attachment":
            name = _decode_words(info.get_filename() or "")[:200]
            self.blocks.append(f"[attachment: {name or ctype}]")
        else:
            text = _decode(_transfer_decode(body, cte), info.get_content_charset())
            # HTML sent as text/plain is rendered as HTML by the clients spammers target.
            if ctype == "text/html" or (ctype == "text/plain" and _HTML_START.match(text)):
                # Markup outweighs text many times over; past this the parse costs seconds.
                text = _html_to_text(_cap(text, 4 * self.limits.max_chars))
            self.blocks.append(text)

    def multipart(self, info: Message, body: bytes, depth: int) -> None:
        room = self.limits.max_parts - self.parts
        kids = _split_multipart(body, info.get_boundary(), room)
        if kids is None:  # boundary missing or wrong: look for the one the body uses
            kids = _split_multipart(body, _sniff_boundary(body[:65536]), room)
        if kids is None:  # no parts at all: the stdlib also keeps such a body as text
            self.blocks.append(_MIME_LINE.sub("", _decode(body)))
            return
        subtype = info.get_content_subtype()
        default = "message/rfc822" if subtype == "digest" else "text/plain"
        kids = [_split_headers(kid) for kid in kids]
        if subtype != "alternative":
            for headers, body in kids:
                self.part(headers, body, depth + 1, default)
            return
        # multipart/alternative: the plain version if it says anything, else the richest.
        plain, rich = [], []
        for kid in kids:
            kind = _content_info(kid[0], default)
            inline = kind.get_content_disposition() != "attachment"
            is_plain = kind.get_content_type() == "text/plain" and inline
            (plain if is_plain else rich).append(kid)
        for headers, body in plain + rich[::-1]:
            mark = len(self.blocks)
            self.part(headers, body, depth + 1, default)
            if any(not block.isspace() and block for block in self.blocks[mark:]):
                return
            del self.blocks[mark:]


def _split_multipart(body: bytes, boundary: str | None, room: int) -> list[bytes] | None:
    """Raw bytes of at most `room` body parts; None if the boundary never appears. Past
    `room` parts, the first 3/4 and the last 1/4 are kept: a payload after a run of empty
    parts is still read.

    Some mailers put spaces into the delimiter lines that the boundary parameter lacks, so
    when the exact delimiter is absent a whitespace-blind one is tried.
    """
    if not boundary:
        return None
    if room <= 0:
        return []
    mark = boundary.encode("utf-8", "replace")
    kids = _cut(body, re.escape(mark), room)
    if kids is None:
        loose = rb"[ \t]*".join(re.escape(bytes([c])) for c in mark if c not in b" \t")
        kids = _cut(body, rb"[ \t]*" + loose, room)
    return kids


def _cut(body: bytes, mark: bytes, room: int) -> list[bytes] | None:
    delimiter = re.compile(rb"^--" + mark + rb"(--)?[ \t]*\r?$", re.M)
    tail_room = room // 4
    head: list[tuple[int, int]] = []  # spans, not slices: bytes are copied once, at the end
    tail: deque[tuple[int, int]] = deque(maxlen=tail_room or None)
    start = None
    for m in delimiter.finditer(body):
        if start is not None:
            end = m.start()  # the line break before a delimiter belongs to it
            if body[end - 1 : end] == b"\n":
                end -= 1
            if body[end - 1 : end] == b"\r":
                end -= 1
            if len(head) < room - tail_room:
                head.append((start, max(end, start)))
            elif tail_room:
                tail.append((start, max(end, start)))
            else:
                break
        if m[1]:  # closing delimiter: the epilogue is not part of the message
            start = None
            break
        start = m.end() + (body[m.end() : m.end() + 1] == b"\n")
    else:
        if start is None:
            return None
    if start is not None:  # the last part, never closed
        if len(head) < room - tail_room:
            head.append((start, len(body)))
        elif tail_room:
            tail.append((start, len(body)))
    return [body[a:b] for a, b in [*head, *tail]]


_SNIFF = re.compile(
    rb'^--([^\s"]{1,200})[ \t]*\r?\nContent-(?:Type|Transfer-Encoding):', re.M | re.I
)
_HTML_START = re.compile(
    r"\s*<(?:!--|(?:!doctype|x-html|html|head|body|font|center|table|div|p|b)\b)", re.I
)
_MIME_LINE = re.compile(r"^--\S*[ \t]*$|^Content-[\w-]+:.*$", re.M | re.I)


def _sniff_boundary(head: bytes) -> str | None:
    """The boundary of the first delimiter line followed by a MIME header, if any."""
    m = _SNIFF.search(head)
    return m[1].decode("latin-1") if m else None


def _fallback(raw: bytes) -> str:
    """Last resort when parsing fails: the body bytes as text, minus MIME scaffolding."""
    try:
        _, body = _split_headers(raw)
    except Exception:
        body = raw
    return _MIME_LINE.sub("", _decode(body))


def head_and_tail(raw: bytes, max_bytes: int) -> bytes:
    """At most max_bytes: the first 3/4 and the last 1/4, cut at line starts, so a text
    part behind a big attachment is still read. Cutting again changes nothing."""
    if len(raw) <= max_bytes:
        return bytes(raw)
    head = max_bytes * 3 // 4
    cut = raw.rfind(b"\n", 0, head) + 1 or head
    tail = len(raw) - (max_bytes - cut)
    resume = raw.find(b"\n", tail - 1) + 1 or tail
    return bytes(raw[:cut]) + bytes(raw[resume:])


def message_text(raw: bytes, limits: TextLimits = TextLimits()) -> str:
    """The text the model reads for one raw RFC 5322 / MIME message.

    `Subject: ...`, `From: <display name>`, a blank line, then the visible body text, all
    normalized and capped. Never raises: a spam filter must not crash on the mail it is
    meant to judge.
    """
    try:
        if isinstance(raw, str):  # be forgiving to callers that already decoded the mail
            raw = raw.encode("utf-8", "replace")
        # One line-ending convention, so bare-CR mail cannot fold the body into a header.
        raw = head_and_tail(raw, limits.max_bytes).replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        if raw.startswith(b"From "):  # mbox separator line
            newline = raw.find(b"\n")
            raw = raw[newline + 1 :] if newline >= 0 else b""
        raw = raw.lstrip(b"\n")  # else the headers would be read as body text
        try:
            walker = _Walker(limits)
            walker.message(raw, 0)
            text = "\n\n".join(walker.blocks)
        except Exception:  # RecursionError on absurd limits, anything on hostile bytes
            text = _fallback(raw)
        if len(text) > 4 * limits.max_chars:  # bound the cost of normalizing
            text = _cap(text, 4 * limits.max_chars)
        return _cap(normalize_text(text), limits.max_chars)
    except Exception:
        return ""
