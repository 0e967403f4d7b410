"""One access-log line per request, cheap on the event loop.

The line is ``key=value`` pairs (method, path, status, ms, request_id, client): the path
without its query string (escaped, and cut to PATH_LIMIT characters) and no header at all, so neither a token nor a presigned URL's
signature ever reaches the log. While :func:`start`'s writer runs, a request only puts a
tuple on a queue (no ``LogRecord``, no formatting, no lock, nothing woken): the writer's
thread formats what came every 0.2 s (the handler's formatter applied once a second, each
line's milliseconds and fields put in) and writes it in one write. Otherwise (tests) each line is an
ordinary record of the ``kgpu.access`` logger.
"""

from __future__ import annotations

import logging
import queue
import threading
import time

from starlette.types import Scope

from gateway.log_line import one_line

access = logging.getLogger("kgpu.access")

_FORMAT = "method=%s path=%s status=%d ms=%.2f request_id=%s client=%s"
_MARK = "\x00kgpu-access-line\x00"  # where a formatted record's message goes
_queue: queue.SimpleQueue | None = None
# A path's characters in its line (the middle of a longer one elided): any client, signed in or not,
# sends a URL of up to uvicorn's limit (tens of KiB), which would otherwise be logged whole.
PATH_LIMIT = 512


class Writer:
    """The thread that writes the queued lines through ``handler``'s formatter and stream."""

    def __init__(self, lines: queue.SimpleQueue, handler: logging.StreamHandler, interval: float):
        self._lines = lines
        self._handler = handler
        self._interval = interval
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kgpu-access-log", daemon=True)
        if handler.formatter is None:
            handler.setFormatter(logging.Formatter())
        self._uses_time = handler.formatter.usesTime()
        self._second = -1  # the second of self._cut: (before the milliseconds, after, tail, whether they go in)
        self._cut: tuple[str, str, str, bool] | None = None
        self._moment = -1  # the millisecond of self._head_tail, for a time of another shape
        self._head_tail = ("", "")

    def _run(self) -> None:
        while not self._stopping.wait(self._interval):
            self.flush()
        self.flush()

    def flush(self) -> None:
        batch = []
        while True:
            try:
                created, args = self._lines.get_nowait()
            except queue.Empty:
                break
            head, tail = self._around(created)
            batch.append(f"{head}{_FORMAT % args}{tail}")
        if batch:
            self._handler.stream.write("".join(batch))
            self._handler.flush()

    def _around(self, created: float) -> tuple[str, str]:
        """What the handler's formatter writes before and after the message of a line made at
        ``created``. The formatter runs once a second (most of the log's cost was a record
        formatted per line): its line for the second's first millisecond, with this line's
        milliseconds put where that one's are; once a millisecond for a time of another shape."""
        second = int(created)
        if second != self._second:
            self._second = second
            head, tail = self._formatted(float(second))
            if not self._uses_time:
                self._cut = (head, "", tail, False)
            else:
                stamp, later = (self._handler.formatter.formatTime(self._record(second + s)) for s in (0.0, 0.5))
                if later == stamp[:-3] + "500" and stamp.endswith("000") and head.count(stamp) == 1:
                    before, _, after = head.partition(stamp)
                    self._cut = (before + stamp[:-3], after, tail, True)
                else:
                    self._cut = None
        cut = self._cut
        if cut is None:
            moment = int(created * 1000)
            if moment != self._moment:
                self._moment, self._head_tail = moment, self._formatted(created)
            return self._head_tail
        before, after, tail, with_msecs = cut
        return (f"{before}{int(created % 1 * 1000):03d}{after}" if with_msecs else before), tail

    def _record(self, created: float) -> logging.LogRecord:
        record = access.makeRecord(access.name, logging.INFO, "", 0, _MARK, None, None)
        record.created, record.msecs = created, created % 1 * 1000
        return record

    def _formatted(self, created: float) -> tuple[str, str]:
        record = self._record(created)
        try:
            head, _, tail = self._handler.format(record).partition(_MARK)
        except Exception:  # noqa: BLE001 - a formatter that fails is reported, and the bare line written
            self._handler.handleError(record)
            head, tail = "", ""
        return head, tail + self._handler.terminator


def start(handler: logging.StreamHandler, interval: float = 0.2) -> Writer:
    """Write the access log to ``handler``'s stream from a thread of its own, until :func:`stop`."""
    global _queue
    writer = Writer(queue.SimpleQueue(), handler, interval)
    writer._thread.start()
    _queue = writer._lines
    return writer


def stop(writer: Writer) -> None:
    """Write what is queued; later lines are ordinary records again."""
    global _queue
    _queue = None
    writer._stopping.set()
    writer._thread.join()


def record(scope: Scope, status: int, request_id: str, seconds: float) -> None:
    lines = _queue
    if lines is None and not access.isEnabledFor(logging.INFO):
        return
    raw = (scope.get("raw_path") or scope["path"].encode()).split(b"?", 1)[0]
    path = one_line(raw.decode("latin-1"), PATH_LIMIT)  # one short line, whatever was sent
    client = scope.get("client")
    args = (scope["method"], path, status, seconds * 1000, request_id, client[0] if client else "-")
    if lines is not None:
        lines.put((time.time(), args))
    else:
        access.handle(access.makeRecord(access.name, logging.INFO, "", 0, _FORMAT, args, None))
