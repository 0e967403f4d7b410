"""Uploads from this machine into a drive (``kgpu cp LOCAL kgpu:…``, my drive or a shared one):
each file goes straight to the object store, by URLs the server mints, ``transfers`` at a time.

* a file below :data:`MULTIPART_THRESHOLD` (``KGPU_MULTIPART_THRESHOLD``, bytes): one presigned PUT,
  minted with many others in one request (``POST /v1/files/?mint``, each file's path, size and
  modification time);
* a larger one: a multipart upload the server starts (``?uploads``), its parts' URLs minted one by
  one (``?uploadId=&partNumber=``) and sent in parallel with the other files, and which the server
  completes (``?uploadId=`` with the parts' ETags) with the file's time; aborted on failure.

The client computes no hash: the drive reports the MD5 the store computed (its ETag), never one
a client merely says (drive/facts.py ``proven_md5``).

Every PUT has a deadline, and a failed one (the network, the store's 5xx or 429: client/retry.py)
is sent again, up to :data:`ATTEMPTS` times; the first refusal (the quota, a name) stops what has
not started, and what was uploaded stays. Like ``rclone copy``, a file already in the drive with the same size and
modification time is skipped, and symbolic links are not followed.
"""

from __future__ import annotations

import http.client
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from client import retry
from client.api import Api
from client.errors import ApiError, TransferFailed

MULTIPART_THRESHOLD = int(os.environ.get("KGPU_MULTIPART_THRESHOLD") or 64 << 20)
ATTEMPTS = 3
MINT_BATCH = 256  # files one batch mint asks for (the server takes up to 1000)
BLOCK = 1 << 20  # bytes read from the file and sent at a time
PUT_TIMEOUT = 120  # seconds the store may stay silent during one PUT
MTIME_SLACK = 1.0  # seconds: the drive keeps whole seconds, as rclone's owncloud dialect does


@dataclass(frozen=True)
class LocalFile:
    path: Path
    route: str  # the HTTP path in the drive: /v1/files/a/b.bin, /v1/shared/ORG/a/b.bin
    size: int
    mtime: int  # whole seconds since the epoch


def plan(source: Path, base: str, into_folder: bool) -> list[LocalFile]:
    """The files to send: a folder's regular files under ``base`` (the HTTP path of the
    destination folder) by their relative paths; one file at ``base``, or inside it."""

    def route(relative: str) -> str:
        return "/".join(p for p in (base.rstrip("/"), relative) if p)

    def entry(path: Path, to: str) -> LocalFile:
        stat = path.stat()
        return LocalFile(path, to, stat.st_size, int(stat.st_mtime))

    if source.is_dir():
        found = (p for p in sorted(source.rglob("*")) if p.is_file() and not p.is_symlink())
        return [entry(p, route(p.relative_to(source).as_posix())) for p in found]
    return [entry(source, route(source.name) if into_folder else base)]


def unchanged(files: list[LocalFile], present: dict[str, tuple[int, float]]) -> list[LocalFile]:
    """The files to send: those not already in the drive (``present``: route -> size, mtime) with
    the same size and modification time."""
    def same(f: LocalFile) -> bool:
        there = present.get(f.route)
        return there is not None and there[0] == f.size and abs(there[1] - f.mtime) <= MTIME_SLACK

    return [f for f in files if not same(f)]


class _Progress:
    """Bytes sent, reported as rclone's stats are (so the same progress bar draws them)."""

    def __init__(self, files: list[LocalFile], on_stats: Callable[[dict], None]):
        self.total = sum(f.size for f in files)
        self.count = len(files)
        self.on_stats = on_stats
        self.started = time.monotonic()
        self.sent = self.done = 0
        self.lock = threading.Lock()
        self.shown = 0.0

    def add(self, n: int, file_done: bool = False) -> None:
        with self.lock:
            self.sent += n
            self.done += file_done
            now = time.monotonic()
            if not file_done and now - self.shown < 0.2:
                return
            self.shown = now
            speed = self.sent / max(now - self.started, 1e-6)
            stats = {"bytes": self.sent, "totalBytes": self.total, "transfers": self.done,
                     "totalTransfers": self.count, "speed": speed}
            if speed and self.total > self.sent:
                stats["eta"] = (self.total - self.sent) / speed
        self.on_stats(stats)

    def taken_back(self, n: int) -> None:
        """A PUT that failed and will be sent again: its bytes count once."""
        with self.lock:
            self.sent -= n


class _Section:
    """``length`` bytes of a file from ``offset``, read a block at a time, counted as they go."""

    def __init__(self, handle, length: int, progress: _Progress):
        self.handle, self.left, self.progress, self.read_bytes = handle, length, progress, 0

    def read(self, n: int = -1) -> bytes:
        n = self.left if n < 0 else min(n, self.left)
        data = self.handle.read(n) if n else b""
        self.left -= len(data)
        self.read_bytes += len(data)
        self.progress.add(len(data))
        return data


class StoreRefused(retry.Refusal):
    """The object store's answer to a PUT, other than a success; status 0: it gave none."""

    def __init__(self, status: int, text: str, retry_after: float | None = None):
        said = f"answered {status}: {text[:300]}" if status else f"did not answer: {text}"
        super().__init__(f"the object store {said}", status, retry_after)


def put(url: str, headers: dict, path: Path, offset: int, length: int, progress: _Progress) -> str:
    """One presigned PUT of a section of a file; the ETag the store answers."""
    parts = urlsplit(url)
    kind = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    connection = kind(parts.netloc, timeout=PUT_TIMEOUT, blocksize=BLOCK)
    section = None
    try:
        with open(path, "rb") as handle:
            handle.seek(offset)
            section = _Section(handle, length, progress)
            try:
                connection.request("PUT", f"{parts.path}?{parts.query}", body=section,
                                   headers={**headers, "Content-Length": str(length)})
                reply = connection.getresponse()
                text = reply.read(64 << 10).decode(errors="replace")
            except (OSError, http.client.HTTPException) as exc:
                raise StoreRefused(0, str(exc) or type(exc).__name__) from None
        if reply.status >= 300:
            raise StoreRefused(reply.status, text, retry.retry_after(reply.getheader("Retry-After")))
        return (reply.getheader("ETag") or "").strip('"')
    except BaseException:
        if section is not None:
            progress.taken_back(section.read_bytes)
        raise
    finally:
        connection.close()


def _attempts(action: Callable[[], str], stop: threading.Event) -> str:
    """``action`` (a mint or a PUT), sent again as client/retry.py says, :data:`ATTEMPTS` times at
    most, and not once another file failed for good (``stop``)."""
    return retry.attempts(action, tries=ATTEMPTS, give_up=stop.is_set)


class _Multipart:
    """One large file as a multipart upload: started by the server, its parts sent by the pool."""

    def __init__(self, api: Api, f: LocalFile):
        self.api, self.file = api, f
        started = api.call("POST", f.route, params={"uploads": ""}, headers={"X-Content-Length": str(f.size)})
        self.upload_id = started["upload_id"]
        self.part_bytes, self.count = started["part_bytes"], started["parts"]
        self.etags: dict[int, str] = {}

    def send_part(self, number: int, progress: _Progress, stop: threading.Event) -> None:
        offset = (number - 1) * self.part_bytes
        length = min(self.part_bytes, self.file.size - offset)

        def once() -> str:
            grant = self.api.call("POST", self.file.route,
                                  params={"uploadId": self.upload_id, "partNumber": str(number)})
            return put(grant["url"], grant["headers"], self.file.path, offset, length, progress)

        if stop.is_set():
            return
        try:
            self.etags[number] = _attempts(once, stop)
        except BaseException:
            stop.set()
            raise

    def complete(self, progress: _Progress) -> None:
        parts = [{"number": n, "etag": self.etags[n]} for n in range(1, self.count + 1)]
        self.api.call("POST", self.file.route, params={"uploadId": self.upload_id}, body={"parts": parts},
                      headers={"X-OC-Mtime": str(self.file.mtime)})
        progress.add(0, file_done=True)

    def abort(self) -> None:
        try:
            self.api.call("DELETE", self.file.route, params={"uploadId": self.upload_id})
        except ApiError:
            pass  # gone already; the server aborts it when its hold expires in any case


def _mint(api: Api, f: LocalFile, stop: threading.Event) -> dict:
    headers = {"X-Content-Length": str(f.size), "X-OC-Mtime": str(f.mtime)}
    return _attempts(lambda: api.call("POST", f.route, headers=headers), stop)


def _mount(route: str) -> str:
    """The drive's own route of a file's: ``/v1/files/`` or ``/v1/shared/ORG/``."""
    parts = route.split("/")
    return "/".join(parts[: 3 if parts[2] == "files" else 4]) + "/"


def _mint_batch(api: Api, batch: list[LocalFile], stop: threading.Event) -> tuple[list[dict], ApiError | None]:
    """Presigned PUTs for the files of ``batch`` (one drive), in one request (``POST
    /v1/files/?mint``): the grants up to the first file refused, and that refusal. A server
    without batch mints answers is_a_folder: one mint a file then."""
    mount = _mount(batch[0].route)
    asked = [{"path": f.route[len(mount):], "size": f.size, "mtime": f.mtime} for f in batch]
    try:
        reply = _attempts(lambda: api.call("POST", mount, params={"mint": ""}, body={"files": asked}), stop)
    except ApiError as exc:
        if exc.error_code != "is_a_folder":
            raise
        return [_mint(api, f, stop) for f in batch], None
    grants: list[dict] = []
    for grant in reply["files"]:
        if "error" in grant:
            error = grant["error"]
            return grants, ApiError(error["status"], error["error_code"], f"{grant['path']}: {error['message']}")
        grants.append(grant)
    return grants, None


def _batches(files: list[LocalFile], first: int) -> Iterator[list[LocalFile]]:
    """``files`` cut for batch mints: ``first`` at first (so the first PUTs start at once), then
    :data:`MINT_BATCH` at a time."""
    start, size = 0, max(1, first)
    while start < len(files):
        yield files[start : start + size]
        start, size = start + size, MINT_BATCH


def _send_whole(f: LocalFile, grant: dict, progress: _Progress, stop: threading.Event) -> None:
    if stop.is_set():
        return
    try:
        _attempts(lambda: put(grant["url"], grant["headers"], f.path, 0, f.size, progress), stop)
    except BaseException:
        stop.set()  # the thread that mints stops handing out more
        raise
    progress.add(0, file_done=True)


def upload(api: Api, files: list[LocalFile], transfers: int, on_stats: Callable[[dict], None]) -> dict:
    """Send every file, ``transfers`` PUTs at a time; the first refusal stops the rest and is
    raised (ApiError, TransferFailed), with every multipart upload it leaves unfinished aborted.

    This thread mints the URLs ahead of the PUTs the pool sends, many files a request (a batch
    mint: the server holds their room in one transaction), the first batch only as many as
    go at once, so the first PUTs start soon; mints never queue on each other."""
    progress = _Progress(files, on_stats)
    stop = threading.Event()
    multiparts: list[_Multipart] = []
    with ThreadPoolExecutor(max_workers=max(1, transfers), thread_name_prefix="kgpu-put") as pool:
        futures: list[Future] = []
        try:
            for batch in _batches([f for f in files if f.size < MULTIPART_THRESHOLD], transfers):
                if stop.is_set():
                    break
                grants, refusal = _mint_batch(api, batch, stop)
                futures += [pool.submit(_send_whole, f, grant, progress, stop) for f, grant in zip(batch, grants)]
                if refusal is not None:
                    raise refusal
            for f in files:
                if stop.is_set() or f.size < MULTIPART_THRESHOLD:
                    continue
                big = _Multipart(api, f)
                multiparts.append(big)
                futures += [pool.submit(big.send_part, n, progress, stop) for n in range(1, big.count + 1)]
            done, _ = wait(futures, return_when=FIRST_EXCEPTION)
            for future in done:
                future.result()
            for big in multiparts:
                big.complete(progress)
                multiparts = [m for m in multiparts if m is not big]
        except BaseException as exc:
            stop.set()
            for future in futures:
                future.cancel()
            wait(futures)
            for big in multiparts:
                big.abort()
            if isinstance(exc, (StoreRefused, OSError, http.client.HTTPException)):
                raise TransferFailed(f"cp failed: {exc}") from None
            raise
    return {"bytes": progress.sent, "files": progress.done, "multipart": sum(f.size >= MULTIPART_THRESHOLD for f in files),
            "seconds": round(time.monotonic() - progress.started, 3)}
