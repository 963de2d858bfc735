"""HTML to the text a reader sees: hidden elements, scripts and styles dropped, block
structure kept as line breaks, in one linear scan of the markup."""

from __future__ import annotations

import html as html_lib
import re

from filterd.text.plain import SPACES

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
    handlers are called by html_to_text's scan, with tag names lower-cased and character
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
        return _LINE_EDGES.sub("\n", SPACES.sub(" ", "".join(out)))


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


def html_to_text(html: str) -> str:
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
