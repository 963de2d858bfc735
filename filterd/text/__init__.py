"""Turn a raw email (or an SMS) into the text the model reads.

`message_text` (mime.py) walks the MIME structure and calls the layers below it: header
fields (fields.py), bytes to str (charset.py), HTML to visible text (html.py), and the
plain-text normalization every text goes through last (plain.py); past the byte cap,
cut.py chooses what of the raw message is read. The trainer and the runtime both call it,
so a message is seen the same way when learned and when judged.
"""

from filterd.text.cut import cut_file, head_and_tail
from filterd.text.mime import TEXT_VERSION, TextLimits, message_text
from filterd.text.plain import normalize_text

__all__ = [
    "TEXT_VERSION",
    "TextLimits",
    "cut_file",
    "head_and_tail",
    "message_text",
    "normalize_text",
]
