"""Streaming an upload body through to the object store, exactly once.

Bodies are never buffered whole. One whose length is known and larger than one part (up
to 5 GiB) goes up as a single PUT sent as it arrives, two blocks of 1 MiB in memory at
most; the store then computes its MD5 (its ETag) and the gateway only its SHA1. Any other
body is collected a part at a time while the previous part is being sent: one that ends
within its first part is a single PUT, a longer one (a chunked body, one over 5 GiB) a
multipart upload whose parts all have the same size except the last (R2 refuses anything
else), at most 10,000 of them, about three parts of memory.

A body is complete only when the HTTP layer has seen its end (the last chunk of a
chunked body, or as many bytes as Content-Length said) and exactly that many bytes
arrived: a client that goes away, or a body that stops short, leaves no object behind
and replaces none (a started multipart upload is aborted, a streamed PUT closed before
its last bytes). :func:`receive_body` is that
rule for an ASGI ``receive`` (Starlette's ``request.stream()`` follows it too), and
:func:`stream_to_store` checks the length and commits only then. A client that sends
nothing for :data:`BODY_IDLE_TIMEOUT` seconds is cut off (:class:`BodyTimeout`).
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from typing import AsyncIterator

from starlette.concurrency import run_in_threadpool

from drive.checksums import Checksum, Hashes, md5_of_etag
from drive.store import ObjectStore, StoreError, StreamedPut, UploadedPart

MiB = 1 << 20
MAX_PARTS = 10_000
SINGLE_PUT_MAX = 5 << 30  # the largest body one PUT may carry (S3, R2)
BLOCK_BYTES = 1 * MiB  # a streamed PUT's body is hashed and sent a block per worker-thread call
FLUSH_SECONDS = 1.0  # a slow client's bytes go on to the store at least this often
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
    md5: str | None = ""  # None: unknown (a store whose ETag of a single PUT was no MD5 after all)


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
    otherwise). A body of known length over one part goes up as one PUT sent as it arrives
    (:func:`_streamed_put`), any other in parts (:func:`_in_parts`). Hashes are computed in
    worker threads, a block or a part per call, beside the upload; the MD5 of a single PUT is
    the store's ETag where the store says so (``put_etag_is_md5``), unless the client announced
    an MD5 to check first. ``idle_timeout`` defaults to :data:`BODY_IDLE_TIMEOUT`."""
    watch = _IdleWatch(BODY_IDLE_TIMEOUT if idle_timeout is None else idle_timeout)
    body = _checked(chunks, watch, content_length, max_bytes)
    store_md5 = getattr(store, "put_etag_is_md5", False) and not any(c.algorithm == "MD5" for c in expected)
    try:
        if content_length is not None and part_size < content_length <= SINGLE_PUT_MAX:
            return await _streamed_put(store, key, body, content_length, content_type, expected, store_md5)
        return await _in_parts(store, key, body, part_size, content_type, expected, store_md5)
    except asyncio.CancelledError:
        if not watch.fired:
            raise
        watch.task.uncancel()
        raise BodyTimeout(f"the client sent nothing for {watch.seconds:g} s in the middle of its body") from None
    finally:
        watch.close()
        await body.aclose()


async def _checked(
    chunks: AsyncIterator[bytes], watch: _IdleWatch, content_length: int | None, max_bytes: int | None
) -> AsyncIterator[bytes]:
    """The body's non-empty chunks, ending only where it ends whole: :class:`UploadTooLarge` past
    ``max_bytes``, :class:`IncompleteBody` past its Content-Length or short of it, and the idle
    watch armed while waiting for each chunk."""
    received = 0
    iterator = chunks.__aiter__()
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
        yield chunk
    if content_length is not None and received != content_length:
        raise IncompleteBody(f"body ended after {received} of {content_length} bytes")


async def _streamed_put(
    store: ObjectStore,
    key: str,
    body: AsyncIterator[bytes],
    size: int,
    content_type: str | None,
    expected: tuple[Checksum, ...],
    store_md5: bool,
) -> UploadResult:
    """One PUT of ``size`` bytes (signed), its body sent as it arrives: chunks gathered into
    blocks of :data:`BLOCK_BYTES` (sooner after :data:`FLUSH_SECONDS`, so the store's connection
    idles no longer than the client), each block hashed and sent by one worker-thread call while
    the next is gathered; nothing is copied. The body's last bytes are held back until it has
    arrived whole and its checksums are the expected ones: until then the store has fewer bytes
    than the signed length, and closing the connection (``abort``) leaves no object."""
    hashes = Hashes(md5=not store_md5)
    put: StreamedPut | None = None  # opened with the first block: no store connection waits for a late client
    block: list[bytes] = []
    block_size = received = 0
    in_flight: asyncio.Future | None = None
    loop = asyncio.get_running_loop()
    sent_at = loop.time()
    try:
        async for chunk in body:
            block.append(chunk)
            block_size += len(chunk)
            received += len(chunk)
            if received < size and (block_size >= BLOCK_BYTES or loop.time() - sent_at > FLUSH_SECONDS):
                if in_flight is not None:
                    await in_flight
                if put is None:
                    put = await run_in_threadpool(store.open_put, key, size, content_type)
                in_flight = asyncio.ensure_future(run_in_threadpool(_hash_and_send, put, hashes, block))
                block, block_size, sent_at = [], 0, loop.time()
        if in_flight is not None:
            await in_flight
            in_flight = None
        if put is None:
            put = await run_in_threadpool(store.open_put, key, size, content_type)
        etag = await run_in_threadpool(_send_last, put, hashes, block, expected)
    except BaseException:
        if in_flight is not None:
            with contextlib.suppress(BaseException):
                await in_flight  # the thread finishes its block before the connection closes
        if put is not None:
            put.abort()
        raise
    return UploadResult(size=size, etag=etag, parts=0, sha1=hashes.sha1, md5=hashes.md5 or md5_of_etag(etag) or None)


def _hash_and_send(put: StreamedPut, hashes: Hashes, block: list[bytes]) -> None:
    hashes.update(block)
    put.send(block)


def _send_last(put: StreamedPut, hashes: Hashes, block: list[bytes], expected: tuple[Checksum, ...]) -> str:
    hashes.update(block)
    hashes.check(expected)  # before the store has the last byte: a mismatch stores nothing
    put.send(block)
    return put.finish()


async def _in_parts(
    store: ObjectStore,
    key: str,
    body: AsyncIterator[bytes],
    part_size: int,
    content_type: str | None,
    expected: tuple[Checksum, ...],
    store_md5: bool,
) -> UploadResult:
    """A body gathered a part at a time: one that ends within its first part is one PUT
    (checked before the store sees a byte); a longer one a multipart upload, each part uploaded
    in one worker thread while another hashes it and the next is gathered (one part in flight,
    so the hashes see the parts in order)."""
    pending: list[bytes] = []  # chunks of the part being collected, joined once when it is full
    pending_size = 0
    received = 0
    upload_id: str | None = None
    parts: list[UploadedPart] = []
    in_flight: asyncio.Future | None = None
    hashes = Hashes()  # a multipart upload's ETag is no MD5 of its bytes

    async def upload_and_hash(number: int, data: bytes) -> UploadedPart:
        part, _ = await asyncio.gather(
            run_in_threadpool(store.upload_part, key, upload_id, number, data),
            run_in_threadpool(hashes.update, (data,)),
        )
        return part

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

    try:
        async for chunk in body:
            received += len(chunk)
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
        rest = b"".join(pending)
        pending = []
        if upload_id is None:
            single = Hashes(md5=not store_md5)
            etag = await run_in_threadpool(_check_then_put, store, key, rest, content_type, single, expected)
            md5 = single.md5 or md5_of_etag(etag) or None
            return UploadResult(size=received, etag=etag, parts=0, sha1=single.sha1, md5=md5)
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
    except BaseException:
        if in_flight is not None:
            in_flight.cancel()
            with contextlib.suppress(BaseException):
                await in_flight
        if upload_id is not None:
            try:
                await run_in_threadpool(store.abort_multipart, key, upload_id)
            except Exception:
                pass  # the store expires abandoned uploads; the original error matters more
        raise


def _check_then_put(
    store: ObjectStore, key: str, data: bytes, content_type: str | None, hashes: Hashes, expected: tuple[Checksum, ...]
) -> str:
    hashes.update((data,))
    hashes.check(expected)  # before the store sees a byte: a mismatch stores nothing
    return store.put_object(key, data, content_type)
