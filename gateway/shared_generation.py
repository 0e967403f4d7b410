"""A value the processes of one server share through a file of its data directory, mapped into
memory: any process changes it, every other sees the change at its next read, with no system
call. The token cache (gateway/auth.py) uses it so that a revocation through one worker process
of ``kgpu serve --workers N`` holds in all of them at once, as it does in a single process."""

from __future__ import annotations

import mmap
import os
import secrets
from pathlib import Path

SIZE = 8


class SharedGeneration:
    def __init__(self, path: Path):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if os.fstat(fd).st_size < SIZE:  # new (or made this moment by another process): zeros either way
                os.ftruncate(fd, SIZE)
            self._map = mmap.mmap(fd, SIZE)
        finally:
            os.close(fd)

    def read(self) -> bytes:
        return self._map[:SIZE]

    def bump(self) -> None:
        """A new value, never one seen before: two processes bumping at once both change it."""
        self._map[:SIZE] = secrets.token_bytes(SIZE)
