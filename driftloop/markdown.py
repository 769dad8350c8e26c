"""Text from outside (column names of an input file, a source path, a device name) put
into a markdown artifact as text: never markup.

A column named ``![x](https://tracker.example/p.png)`` would make the Prefect UI load an
image from that host for everyone who opens the artifact; ``[help](javascript:...)`` would
be a link; a newline and ``#`` a heading, a ``|`` a new table cell. :func:`md_text`
backslash-escapes every ASCII punctuation character (CommonMark allows exactly that, and
an escaped ``<`` starts no HTML) and folds line breaks; :func:`md_code` makes a code span
the value cannot close."""

from __future__ import annotations

import re
import string

_PUNCTUATION = re.compile("([" + re.escape(string.punctuation) + "])")
_LINE_BREAKS = re.compile(r"[\r\n\u2028\u2029\x0b\x0c]+")


def md_text(value: object) -> str:
    """``value`` as literal markdown text, safe in a paragraph, a list item or a table cell."""
    return _PUNCTUATION.sub(r"\\\1", _LINE_BREAKS.sub(" ", str(value)))


def md_code(value: object) -> str:
    """``value`` as an inline code span it cannot leave: fenced by more backticks than its
    longest run of them, on one line. (In a table cell use :func:`md_text`: GFM splits
    cells at ``|`` even inside code spans.)"""
    text = _LINE_BREAKS.sub(" ", str(value))
    fence = "`" * (max((len(run) for run in re.findall("`+", text)), default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") or not text.strip() else ""
    return f"{fence}{pad}{text}{pad}{fence}"
