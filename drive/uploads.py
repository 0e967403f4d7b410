"""Streaming an upload body through to the object store, exactly once.

Bodies are never buffered whole: up to one part is collected in memory while
the previous part is being sent, so a 1 GiB upload costs about three parts of
memory. Anything larger than one part goes up as a multipart upload whose
parts all have the same size except the last (R2 refuses anything else), at
most 10,000 of them.

A body is complete only when the HTTP layer has seen its end (the last chunk of a
chunked body, or as many bytes as Content-Length said) and exactly that many bytes
arrived: a client that goes away, or a body that stops short, leaves no object behind
and replaces none (a started multipart upload is aborted). :func:`receive_body` is that
rule for an ASGI ``receive`` (Starlette's ``request.stream()`` follows it too), and
:func:`stream_to_store` checks the length and commits only then. A client that sends
nothing for :data:`BODY_IDLE_TIMEOUT` seconds is cut off (:class:`BodyTimeout`).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import AsyncIterator

from starlette.concurrency import run_in_threadpool

from drive.checksums import Checksum, Hashes
from drive.store import ObjectStore, StoreError, UploadedPart

MiB = 1 << 20
MAX_PARTS = 10_000
BODY_IDLE_TIMEOUT = 60.0  # seconds a client may send nothing in the middle of a body


class UploadTooLarge(Exception):
    """The body grew past the byte budget it was given (quota)."""


class WriteBusy(Exception):
    """Another request writes the same key, or a folder around it, and did not finish soon
    enough (gateway/quota.py holds the keys of every write: a 423 ``busy``, retry)."""


class IncompleteBody(Exception):
    """The body did not arrive whole: fewer or more bytes than its Content-Length promised,
    a client that went away, or one that stopped sending (the subclasses)."""


class ClientGone(IncompleteBody):
    """The connection ended before the body did (a chunked body without its final chunk too)."""


class BodyTimeout(IncompleteBody):
    """The client sent nothing for the idle timeout in the middle of its body."""


async def receive_body(receive) -> AsyncIterator[bytes]:
    """The chunks of a request body from an ASGI ``receive``, ending only where the body
    ends; :class:`ClientGone` if the connection ends first (the server answers a malformed
    chunked body by closing it, so that ends here too)."""
    while True:
        message = await receive()
        if message["type"] != "http.request":
            raise ClientGone("the client went away before the body was complete")
        yield message.get("body", b"")
        if not message.get("more_body", False):
            return


class _IdleWatch:
    """Cancels the task that made it when it has waited ``seconds`` for the client's next
    chunk. One timer per upload, re-armed at most once per ``seconds`` (a timeout around
    every chunk would cost a timer, or a task, per 64 KiB)."""

    def __init__(self, seconds: float):
        self.loop = asyncio.get_running_loop()
        self.task = asyncio.current_task()
        self.seconds = seconds
        self.waiting_since: float | None = None  # set while waiting for the client
        self.fired = False
        self._handle = self.loop.call_later(seconds, self._check)

    def _check(self) -> None:
        delay = self.seconds
        if self.waiting_since is not None:
            idle = self.loop.time() - self.waiting_since
            if idle >= self.seconds:
                self.fired = True
                self.task.cancel()
                return
            delay -= idle
        self._handle = self.loop.call_later(delay, self._check)

    def close(self) -> None:
        self._handle.cancel()


@dataclass(frozen=True)
class UploadResult:
    size: int
    etag: str  # as the store lists the object (after a multipart upload, read back: stores differ)
    parts: int  # 0 for a single PUT
    sha1: str = ""
    md5: str = ""


def choose_part_size(content_length: int | None, part_size: int, unknown_length_part_size: int) -> int:
    """Equal part size for a body: ``part_size`` unless 10,000 parts would not hold it."""
    if content_length is None:
        return unknown_length_part_size
    needed = -(-content_length // MAX_PARTS)
    size = max(part_size, needed)
    return -(-size // MiB) * MiB


async def stream_to_store(
    store: ObjectStore,
    key: str,
    chunks: AsyncIterator[bytes],
    *,
    content_length: int | None,
    content_type: str | None,
    part_size: int,
    max_bytes: int | None = None,
    idle_timeout: float | None = None,
    expected: tuple[Checksum, ...] = (),
) -> UploadResult:
    """Stream ``chunks`` to ``key``; the object is created or replaced only if the body
    is complete, and its SHA1 and MD5 are the ``expected`` ones (:class:`ChecksumMismatch`
    otherwise). Each part's SHA1 and MD5 are computed in worker threads of their own while a
    third uploads it (one part is in flight at a time, so they see the parts in order).
    ``idle_timeout`` defaults to :data:`BODY_IDLE_TIMEOUT`."""
    pending: list[bytes] = []  # chunks of the part being collected, joined once when it is full
    pending_size = 0
    received = 0
    upload_id: str | None = None
    parts: list[UploadedPart] = []
    in_flight: asyncio.Future | None = None
    hashes = Hashes()

    async def upload_and_hash(number: int, data: bytes) -> UploadedPart:
        # Three threads: the part's upload, its SHA1 and its MD5 (the next part waits for all three).
        part, _, _ = await asyncio.gather(
            run_in_threadpool(store.upload_part, key, upload_id, number, data),
            run_in_threadpool(hashes.update_sha1, data),
            run_in_threadpool(hashes.update_md5, data),
        )
        return part

    def check_then_put(data: bytes) -> str:
        hashes.update(data)
        hashes.check(expected)  # before the store sees a byte: a mismatch stores nothing
        return store.put_object(key, data, content_type)

    async def send_part(data: bytes) -> None:
        nonlocal upload_id, in_flight
        if upload_id is None:
            upload_id = await run_in_threadpool(store.create_multipart, key, content_type)
        if in_flight is not None:
            parts.append(await in_flight)
        number = len(parts) + 1
        if number > MAX_PARTS:
            raise UploadTooLarge(f"body needs more than {MAX_PARTS} parts of {part_size} bytes")
        in_flight = asyncio.ensure_future(upload_and_hash(number, data))

    watch = _IdleWatch(BODY_IDLE_TIMEOUT if idle_timeout is None else idle_timeout)
    iterator = chunks.__aiter__()
    try:
        while True:
            watch.waiting_since = watch.loop.time()
            try:
                chunk = await iterator.__anext__()
            except StopAsyncIteration:
                break
            finally:
                watch.waiting_since = None
            if not chunk:
                continue
            received += len(chunk)
            if max_bytes is not None and received > max_bytes:
                raise UploadTooLarge("upload exceeds the drive quota")
            if content_length is not None and received > content_length:
                raise IncompleteBody("body is longer than its Content-Length")
            while pending_size + len(chunk) >= part_size:
                needed = part_size - pending_size
                pending.append(chunk[:needed])
                chunk = chunk[needed:]
                data = b"".join(pending)
                pending, pending_size = [], 0
                await send_part(data)
                del data
            if chunk:
                pending.append(chunk)
                pending_size += len(chunk)
        if content_length is not None and received != content_length:
            raise IncompleteBody(f"body ended after {received} of {content_length} bytes")
        rest = b"".join(pending)
        pending = []
        if upload_id is None:
            etag = await run_in_threadpool(check_then_put, rest)
            return UploadResult(size=received, etag=etag, parts=0, sha1=hashes.sha1, md5=hashes.md5)
        if rest:
            await send_part(rest)
        del rest
        if in_flight is not None:
            parts.append(await in_flight)
            in_flight = None
        hashes.check(expected)  # the parts are aborted below: a mismatch stores nothing
        etag = await run_in_threadpool(store.complete_multipart, key, upload_id, parts)
        upload_id = None  # committed: nothing to abort any more
        try:
            listed = await run_in_threadpool(store.head, key)
        except StoreError:
            listed = None  # committed all the same; its facts will simply not match
        if listed is not None and listed.size == received:
            etag = listed.etag
        return UploadResult(size=received, etag=etag, parts=len(parts), sha1=hashes.sha1, md5=hashes.md5)
    except BaseException as exc:
        timed_out = watch.fired and isinstance(exc, asyncio.CancelledError)
        if timed_out:
            watch.task.uncancel()
        if in_flight is not None:
            in_flight.cancel()
            try:
                await in_flight
            except BaseException:
                pass
        if upload_id is not None:
            try:
                await run_in_threadpool(store.abort_multipart, key, upload_id)
            except Exception:
                pass  # the store expires abandoned uploads; the original error matters more
        if timed_out:
            raise BodyTimeout(f"the client sent nothing for {watch.seconds:g} s in the middle of its body") from None
        raise
    finally:
        watch.close()
