"""Text a tenant controls (a path, a pod's message, a file name), made fit for one log line."""

from __future__ import annotations

import time


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


class Sparse:
    """Which of a repeated warning's occurrences to log: the first about a key (an address, a
    pod), then at most one each ``seconds``, so one client repeating what it is refused cannot
    fill the log. :meth:`due` says how many were held back since the last line, or None to hold
    this one back too. At most ``keys`` keys are remembered (past that the quiet ones are
    forgotten, so many addresses cannot fill the memory instead)."""

    def __init__(self, seconds: float = 60.0, keys: int = 10_000) -> None:
        self.seconds, self.keys = seconds, keys
        self._last: dict[object, tuple[float, int]] = {}  # key -> (when logged, held back since)

    def due(self, key: object) -> int | None:
        now = time.monotonic()
        logged = self._last.get(key)
        if logged is not None and now - logged[0] < self.seconds:
            self._last[key] = (logged[0], logged[1] + 1)
            return None
        if logged is None and len(self._last) >= self.keys:
            self._last = {k: v for k, v in self._last.items() if now - v[0] < self.seconds}
            if len(self._last) >= self.keys:
                return None  # as many noisy keys as remembered: the new one waits its turn
        self._last[key] = (now, 0)
        return logged[1] if logged is not None else 0
