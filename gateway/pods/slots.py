"""Calls in flight, capped: at most ``per_pod`` calls into one pod at once and, with ``per_caller``,
at most that many of one caller's calls across all its pods. The rest are refused at once
(PodBusy, CallerBusy) rather than queued behind a pod that may never answer, or left to one tenant
with many pods.

Two ways to count, one rule (:meth:`CallSlots.hold`): :class:`CountedSlots` counts in this
process's memory; :class:`LockedSlots` holds each slot as a lock on a file in a folder, so every
process that names the folder (the parent and the workers of one ``kgpu serve``) shares one cap,
and the kernel gives back the slots of a process that dies, however it dies.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import threading
from collections.abc import Hashable, Iterator
from pathlib import Path

from gateway.data_dir import make_private_dir
from gateway.pods import PodError

CALLS_PER_POD = 8  # a pod's calls in flight at once, across every request


class PodBusy(PodError):
    """The pod already has as many calls in flight as one pod may."""


class CallerBusy(Exception):
    """The caller already has as many calls in flight, across all its pods, as one caller may
    (not the pod's doing: no PodError)."""


class CallSlots:
    """The caps and the rule; a subclass says how one slot of one key is taken and given back."""

    def __init__(self, per_pod: int = CALLS_PER_POD, per_caller: int | None = None):
        self.per_pod = per_pod
        self.per_caller = per_caller

    @contextlib.contextmanager
    def hold(self, ref: str, caller: Hashable | None = None) -> Iterator[None]:
        """A slot of pod ``ref`` (and of ``caller``, where callers are capped) until the block ends,
        however it ends; a refusal takes none."""
        with contextlib.ExitStack() as held:
            held.enter_context(self._slot("pod", ref, self.per_pod))
            if caller is not None and self.per_caller is not None:
                held.enter_context(self._slot("caller", caller, self.per_caller))
            yield

    @contextlib.contextmanager
    def _slot(self, kind: str, key: Hashable, cap: int) -> Iterator[None]:
        taken = self._take(kind, key, cap)
        if taken is None:
            if kind == "pod":
                raise PodBusy(f"the pod already has {cap} calls in flight; try again shortly")
            raise CallerBusy(f"the caller already has {cap} calls in flight across its pods")
        try:
            yield
        finally:
            self._give(taken)

    def _take(self, kind: str, key: Hashable, cap: int) -> object | None:
        """One of ``key``'s ``cap`` slots, or None when all are held."""
        raise NotImplementedError

    def _give(self, taken: object) -> None:
        raise NotImplementedError


class CountedSlots(CallSlots):
    """Slots counted in this process's memory: the cap holds among its threads alone."""

    def __init__(self, per_pod: int = CALLS_PER_POD, per_caller: int | None = None):
        super().__init__(per_pod, per_caller)
        self._held: dict[tuple[str, Hashable], int] = {}  # ("pod", ref) or ("caller", who): calls in flight
        self._lock = threading.Lock()

    def _take(self, kind: str, key: Hashable, cap: int) -> tuple[str, Hashable] | None:
        with self._lock:
            held = self._held.get((kind, key), 0)
            if held >= cap:
                return None
            self._held[(kind, key)] = held + 1
        return (kind, key)

    def _give(self, taken: tuple[str, Hashable]) -> None:
        with self._lock:
            left = self._held[taken] - 1
            if left:
                self._held[taken] = left
            else:
                del self._held[taken]


class LockedSlots(CallSlots):
    """Slot ``n`` of a key is an exclusive ``flock`` on the file ``{kind}-{sha256 of key}-{n}`` in
    ``folder``, tried in turn without waiting: every process (and thread) that opens the file
    contends for it, and a dead holder's lock goes with its descriptors.

    A holder removes its file before it lets go, so the folder holds only files in use (and those
    of holders that died, taken again by the next caller). Whoever locks a file then checks that it
    is still the one at its name: one removed meanwhile is let go and the name tried again.

    Each take is a few system calls on a local folder, none of which waits for another process
    (``LOCK_NB``): cheap enough for the event loop, where pod-file transfers take theirs.
    """

    def __init__(self, folder: Path, per_pod: int = CALLS_PER_POD, per_caller: int | None = None):
        super().__init__(per_pod, per_caller)
        self.folder = Path(folder)
        make_private_dir(self.folder)

    def _take(self, kind: str, key: Hashable, cap: int) -> tuple[int, Path] | None:
        name = hashlib.sha256(str(key).encode()).hexdigest()
        for n in range(cap):
            path = self.folder / f"{kind}-{name}-{n}"
            while True:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    if _still_named(fd, path):
                        return fd, path
                except BlockingIOError:
                    os.close(fd)
                    break  # held: the next slot
                except BaseException:
                    os.close(fd)
                    raise
                os.close(fd)  # its holder removed it as we opened it: the name again
        return None

    def _give(self, taken: tuple[int, Path]) -> None:
        fd, path = taken
        try:
            with contextlib.suppress(FileNotFoundError):  # the folder cleared under a running server
                os.unlink(path)  # while locked: no one else holds this name now
        finally:
            os.close(fd)


def _still_named(fd: int, path: Path) -> bool:
    try:
        named = os.stat(path)
    except FileNotFoundError:
        return False
    opened = os.fstat(fd)
    return (named.st_dev, named.st_ino) == (opened.st_dev, opened.st_ino)


def call_slots(
    purpose: str, per_pod: int = CALLS_PER_POD, per_caller: int | None = None, *, shared_in: Path | None = None
) -> CallSlots:
    """Slots for one ``purpose`` (pod calls, pod-file transfers): shared by every process of one
    server through ``shared_in`` (settings.slots_dir), or counted in this process without one (a
    backend or PodFiles made on its own, as tests and benchmarks do)."""
    if shared_in is None:
        return CountedSlots(per_pod, per_caller)
    make_private_dir(Path(shared_in))
    return LockedSlots(Path(shared_in) / purpose, per_pod, per_caller)
