"""One end of a pipe, or a pty's master, read and written on the event loop by its number alone.

No file object is handed to the loop: uvloop closes the descriptor of a pipe given to
``connect_read_pipe``/``connect_write_pipe`` as a file object, and the file object then closes
the same number again, which by then may be another tenant's socket or a database connection.
Here the descriptor is closed once, by :meth:`FdStream.close`, after the loop stops watching it.
"""

from __future__ import annotations

import asyncio
import errno
import os


class FdStream:
    """A non-blocking descriptor this object owns; reads and writes wait on the running loop."""

    def __init__(self, fd: int):
        os.set_blocking(fd, False)
        self.fd = fd
        self._loop = asyncio.get_running_loop()
        self._waiting: set[asyncio.Future] = set()

    async def read(self, n: int) -> bytes:
        """Up to ``n`` bytes; b"" at the end (a pty's master reads EIO once its other side is gone)."""
        while self.fd >= 0:
            try:
                return os.read(self.fd, n)
            except BlockingIOError:
                await self._ready(self._loop.add_reader, self._loop.remove_reader)
            except OSError as exc:
                if exc.errno == errno.EIO:
                    return b""
                raise
        return b""

    async def write(self, data: bytes) -> None:
        """All of ``data``; BrokenPipeError once the other side has closed, or this one has."""
        view = memoryview(data)
        while view:
            if self.fd < 0:
                raise BrokenPipeError(errno.EPIPE, "closed")
            try:
                view = view[os.write(self.fd, view):]
            except BlockingIOError:
                await self._ready(self._loop.add_writer, self._loop.remove_writer)
            except OSError as exc:
                if exc.errno == errno.EIO:
                    raise BrokenPipeError(errno.EPIPE, "the terminal's other side is gone") from None
                raise

    async def _ready(self, watch, unwatch) -> None:
        fd = self.fd
        ready = self._loop.create_future()
        watch(fd, lambda: ready.done() or ready.set_result(None))
        self._waiting.add(ready)
        try:
            await ready
        finally:
            self._waiting.discard(ready)
            if self.fd == fd:  # closed meanwhile: close() has unwatched it, and the number may be another's now
                unwatch(fd)

    def close(self) -> None:
        """Stop watching the descriptor, then close it (once; later calls do nothing). A read
        waiting on it ends (b""), a write raises BrokenPipeError."""
        if self.fd < 0:
            return
        fd, self.fd = self.fd, -1
        self._loop.remove_reader(fd)
        self._loop.remove_writer(fd)
        os.close(fd)
        for ready in self._waiting:
            if not ready.done():
                ready.set_result(None)
