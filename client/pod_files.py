"""``kgpu cp`` with a rented GPU on one side (``gpu-…:PATH``): one file up or down through
/v1/gpus/{id}/files (docs/pod-files.md), streamed; a folder is scp's or rsync's job.

The server refuses a transfer at once when the pod or you have too many going (503, 429, with
``Retry-After``): every request here is sent again as client/retry.py says, for a few minutes at
most, an upload read again from the start of the local file, a download written again from the
start of its temporary file."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from client import retry
from client.errors import ApiError, UsageError
from client.locations import PodSide, pod_side
from client.output import emit_json, human_bytes, notice
from client.session import Session

T = TypeVar("T")
TRIES = 100  # the most times one request is sent
MOST_WAITED_S = 300.0  # the most one request waits, all its waits together, for a busy pod or server


def cp(session: Session, source: str, destination: str, recursive: bool) -> int:
    src, dst = pod_side(source), pod_side(destination)
    if src and dst:
        raise UsageError("kgpu cp copies between here and one GPU: download, then upload")
    if recursive:
        raise UsageError("kgpu cp -r with a GPU side: copy a folder with scp -r or rsync (docs/ssh.md)")
    started = time.monotonic()
    if dst:
        local = Path(source)
        if not local.is_file():
            raise UsageError(f"{source}: no such file (a folder needs scp -r or rsync)")
        target = _into_folder(session, dst, local.name)
        answer = _sent(session, lambda: session.api.put_file(target.route, local))
        size, where = answer.get("size", local.stat().st_size), f"{target.gpu_id}:{answer.get('path', target.path)}"
    else:
        name = src.path.rstrip("/").rsplit("/", 1)[-1]
        if not name or src.path.endswith("/"):
            raise UsageError(f"{source} is a folder: kgpu cp copies one file from a GPU")
        local = Path(destination)
        if destination.endswith(os.sep) or local.is_dir():
            local = local / name
        size, where = _sent(session, lambda: session.api.download(src.route, local)), str(local)
    seconds = round(time.monotonic() - started, 3)
    if session.as_json:
        emit_json({"source": source, "destination": where, "bytes": size, "files": 1, "seconds": seconds})
    else:
        print(f"cp: 1 file, {human_bytes(size)} in {seconds} s → {where}")
    return 0


def _into_folder(session: Session, side: PodSide, name: str) -> PodSide:
    """Like cp(1): a file copied onto a folder (an existing one, or a path ending in /) lands inside it."""
    if side.path == "" or side.path.endswith("/"):
        return PodSide(side.gpu_id, side.path + name)
    try:
        _sent(session, lambda: session.api.call("GET", side.route + "/"))
    except ApiError as exc:
        if exc.status in (404, 409):  # no such folder, or a file there: the path names the file
            return side
        raise
    return PodSide(side.gpu_id, f"{side.path}/{name}")


def _sent(session: Session, request: Callable[[], T]) -> T:
    """``request()``, sent again while its answer says to wait (a person is told each wait)."""

    def told(refusal: retry.Refusal, seconds: float) -> None:
        if not session.as_json:  # with --json, stderr holds only a failure's envelope
            notice(f"{refusal} (trying again in {seconds:.0f} s)")

    return retry.attempts(request, tries=TRIES, most_waited_s=MOST_WAITED_S, on_wait=told)
