"""Pod files (issue 22, item 1): a rental's files read, written and listed by its owner (or its
in-pod token) through the gateway, streamed both ways. The pod-side protocol and the path's
checks are gateway/pods/files.py; here: which rental, how many transfers a pod, and a user across
all their pods, take at once, and what each refusal means to the caller (docs/pod-files.md)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterable, AsyncIterator, Iterator
from datetime import datetime, timezone
from pathlib import Path

from gateway.domain_errors import (
    BadInput, Busy, Conflict, Forbidden, NoSpace, NotFound, RangeNotSatisfiable, Unavailable,
)
from gateway.pods.slots import CallerBusy, call_slots
from gateway.pods.files import (
    Download, PodFileError, PodPath, Written, list_folder, pod_path, reading, write_file,
)
from gateway.principal import Principal
from gateway.runs import Runs

TRANSFERS_PER_POD = 4  # a pod's file transfers at once; more are refused (503) until one ends
TRANSFERS_PER_USER = 8  # one user's, across all their pods (KGPU_POD_FILES_PER_USER); more: 429


def _refusal(error: PodFileError, path: PodPath | None = None):
    """The domain's error for a refusal from the pod (or from the path's own checks)."""
    kind, message = error.kind, error.message
    if path is not None and kind not in ("badpath", "range", "short"):
        message = f"{path.text}: {message}"
    if kind == "range":
        return RangeNotSatisfiable(f"the file holds {error.size} bytes: a write may start at {error.size} at most", error.size or 0)
    if kind == "notfound":
        return NotFound("pod_file_not_found", message)
    if kind in ("badpath", "symlink", "special"):
        code = {"badpath": "invalid_path", "symlink": "symlink_refused", "special": "not_a_regular_file"}[kind]
        return BadInput(code, message)
    if kind == "isdir":
        return Conflict("is_a_folder", f"{message}; a folder's path ends with / (GET lists it)")
    if kind == "notdir":
        return Conflict("not_a_folder", message)
    if kind in ("denied", "readonly"):
        return Forbidden("pod_file_denied", message)
    if kind == "nospace":
        return NoSpace("pod_disk_full", message)
    if kind == "short":
        return BadInput("body_cut", message)
    return Unavailable("pod_file_error", message or "the pod could not do it")


@contextlib.contextmanager
def refusals(path: PodPath | None = None) -> Iterator[None]:
    try:
        yield
    except PodFileError as exc:
        raise _refusal(exc, path) from None


def _iso(seconds: int) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat().replace("+00:00", "Z")


class PodFiles:
    """Files in the caller's rented pods. ``pod`` is blocking (the database); the transfers are
    coroutines, each a process in the pod whose every read and write waits at most ``idle_s``,
    and each holds a slot of its pod's ``per_pod`` and of its user's ``per_user`` from its start to
    its end, however it ends: in every process of the server that shares ``slots_dir``, else in
    this one."""

    def __init__(
        self, runs: Runs, idle_s: float, per_pod: int = TRANSFERS_PER_POD, per_user: int = TRANSFERS_PER_USER,
        slots_dir: Path | None = None,
    ):
        self.runs = runs
        self.idle_s = idle_s
        self.slots = call_slots("pod-files", per_pod, per_caller=per_user, shared_in=slots_dir)

    @staticmethod
    def path(text: str, *, folder_ok: bool = True) -> PodPath:
        """A request's path in a pod, held to the allowed folders (BadInput otherwise)."""
        with refusals():
            return pod_path(text, folder_ok=folder_ok)

    def pod(self, principal: Principal, rental_id: str) -> str:
        """The pod of the caller's ready rental (the rule runs use); using its files is activity."""
        ref = self.runs.pod(principal, rental_id, must_be_ready=True)
        self.runs.rentals.touch(rental_id)
        return ref

    @contextlib.contextmanager
    def _transfer(self, principal: Principal, ref: str, path: PodPath) -> Iterator[None]:
        """One transfer into pod ``ref``: its slots until it ends, or a refusal at once (the pod's
        ``per_pod`` going: PodBusy, a 503; the user's ``per_user`` across their pods: Busy, a 429),
        and the pod's refusals in the domain's words."""
        # A pod's own token counts as its owner; the environment admin token (no user) as one caller.
        caller = principal.user_id if principal.user_id is not None else principal.email
        with contextlib.ExitStack() as held:
            try:
                held.enter_context(self.slots.hold(ref, caller))
            except CallerBusy:
                raise Busy(
                    "too_many_transfers",
                    f"you have {self.slots.per_caller} pod-file transfers going, the most one user may at once; "
                    "try again once one ends",
                ) from None
            with refusals(path):
                yield

    @contextlib.asynccontextmanager
    async def opened(self, principal: Principal, ref: str, path: PodPath) -> AsyncIterator[Download]:
        """The file at ``path`` open in the pod for reading (its size, then any span of it)."""
        with self._transfer(principal, ref, path):
            async with reading(self._backend, ref, path, self.idle_s) as download:
                yield download

    async def write(
        self, principal: Principal, ref: str, path: PodPath, body: AsyncIterable[bytes], length: int,
        start: int | None = None,
    ) -> Written:
        """``length`` bytes of ``body`` into the file (whole, or at ``start``: gateway/pods/files.py)."""
        with self._transfer(principal, ref, path):
            return await write_file(self._backend, ref, path, body, length, self.idle_s, start)

    async def listing(self, principal: Principal, ref: str, path: PodPath) -> dict:
        with self._transfer(principal, ref, path):
            entries, more = await list_folder(self._backend, ref, path, self.idle_s)
        return {
            "path": path.text,
            "entries": [{"name": e.name, "type": e.type, "size": e.size, "mtime": _iso(e.mtime)} for e in entries],
            "truncated": more,
        }

    @property
    def _backend(self):
        return self.runs.rentals.backend
