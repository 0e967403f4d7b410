"""Text a tenant controls (a path, a pod's message, a file name), made fit for one log line."""

from __future__ import annotations


def one_line(text: str, limit: int = 200) -> str:
    """``text`` for a log line: at most ``limit`` characters (its middle elided, shown by "..."),
    control and non-ASCII characters escaped, so a tenant's path or message can neither start a
    line of its own nor make one as long as it likes."""
    text = _elided(text, limit)  # first: escaping a long text whole would cost for nothing
    if not (text.isascii() and text.isprintable()) or "\\" in text:
        text = _elided(text.encode("unicode_escape").decode("ascii"), limit)  # escapes lengthen it
    return text


def _elided(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    return text[: limit // 2] + "..." + text[len(text) - limit // 2:]
