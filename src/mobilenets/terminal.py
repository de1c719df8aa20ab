"""Text from files (labels, file names, messages that quote them) as it may reach a terminal.

A label or a file name is data: one holding an escape sequence would clear the
screen or retitle the window, and one holding a newline would fake a result
line.  Table output and error lines show such characters escaped, as Python's
``repr`` writes them; JSON output stays exact (its encoder escapes them itself).
"""

from __future__ import annotations


def printable(text: str) -> str:
    """``text`` with every character Python calls unprintable (controls, format characters such as the
    right-to-left override, separators other than the space) written as its escape (``\\x1b``, ``\\n``,
    ``\\u202e``); anything else, accented letters included, unchanged."""
    text = str(text)
    return text if text.isprintable() else "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
