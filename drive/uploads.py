"""Streaming an upload body through to the object store, exactly once.

Bodies are never buffered whole, and go on to the store as they arrive, a block of 1 MiB
per worker-thread call that hashes it and sends it (no copy). One whose length is known
and larger than one part (up to 5 GiB) goes up as a single PUT, two blocks in memory at
most; the store then computes its MD5 (its ETag) and the gateway only its SHA1. Any other
body (a chunked one, one over 5 GiB) ends within its first part, held, and is one PUT, or
is a multipart upload whose parts all have the same size except the last (R2 refuses
anything else), at most 10,000 of them, each a PUT sent as the blocks arrive: one part's
bytes in memory, kept in case the body ends inside it; its MD5 is computed here.

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
    (:class:`_OnePut`), any other in parts (:class:`_Parts`); either way a block at a time, each
    hashed and sent by one worker-thread call while the next arrives (:func:`_pump`). The MD5 of
    one PUT is the store's ETag where the store says it is (``put_etag_is_md5``), unless the client
    announced an MD5 to check first; a multipart upload's is computed here. ``idle_timeout``
    defaults to :data:`BODY_IDLE_TIMEOUT`."""
    watch = _IdleWatch(BODY_IDLE_TIMEOUT if idle_timeout is None else idle_timeout)
    body = _checked(chunks, watch, content_length, max_bytes)
    announced_md5 = any(c.algorithm == "MD5" for c in expected)
    put_md5 = getattr(store, "put_etag_is_md5", False) and not announced_md5
    sink: _OnePut | _Parts
    if content_length is not None and part_size < content_length <= SINGLE_PUT_MAX:
        sink = _OnePut(store, key, content_length, content_type, Hashes(md5=not put_md5))
    else:
        sink = _Parts(store, key, part_size, content_type, Hashes(), getattr(store, "multipart_etag_is_md5", False))
    try:
        return await _pump(body, sink, content_length, expected)
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


async def _pump(
    body: AsyncIterator[bytes], sink: _OnePut | _Parts, size: int | None, expected: tuple[Checksum, ...]
) -> UploadResult:
    """The body's chunks gathered into blocks of :data:`BLOCK_BYTES` (sooner after
    :data:`FLUSH_SECONDS`, so the store's connection idles no longer than the client), each handed
    to ``sink.write`` in a worker thread while the next is gathered (one at a time: the sink sees
    them in order); nothing is copied. The block holding the body's last byte (of ``size``, where
    known) goes to ``sink.close``, which checks the hashes and commits, only once the body has
    arrived whole. Any failure: ``sink.abort``, and nothing stored or replaced."""
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
            if (size is None or received < size) and (
                block_size >= BLOCK_BYTES or loop.time() - sent_at > FLUSH_SECONDS
            ):
                if in_flight is not None:
                    await in_flight
                in_flight = asyncio.ensure_future(run_in_threadpool(sink.write, block))
                block, block_size, sent_at = [], 0, loop.time()
        if in_flight is not None:
            await in_flight
            in_flight = None
        return await run_in_threadpool(sink.close, block, expected)
    except BaseException:
        if in_flight is not None:
            with contextlib.suppress(BaseException):
                await in_flight  # the thread finishes its block before the connection closes
        await run_in_threadpool(sink.abort)
        raise


class _OnePut:
    """A body of known length as one PUT (signed for that length) sent as it arrives, opened with
    its first block: no store connection waits for a late client. Until the last block, which
    :meth:`close` sends only once the hashes are the expected ones, the store has fewer bytes than
    the signed length, and closing the connection (:meth:`abort`) leaves no object. Its methods
    block, and come one at a time from worker threads."""

    def __init__(self, store: ObjectStore, key: str, size: int, content_type: str | None, hashes: Hashes):
        self.store, self.key, self.size, self.content_type, self.hashes = store, key, size, content_type, hashes
        self.put: StreamedPut | None = None

    def write(self, chunks: list[bytes]) -> None:
        self.hashes.update(chunks)
        self._open().send(chunks)

    def close(self, chunks: list[bytes], expected: tuple[Checksum, ...]) -> UploadResult:
        self.hashes.update(chunks)
        self.hashes.check(expected)  # before the store has the last byte: a mismatch stores nothing
        put = self._open()
        put.send(chunks)
        etag = put.finish()
        md5 = self.hashes.md5 or md5_of_etag(etag) or None
        return UploadResult(size=self.size, etag=etag, parts=0, sha1=self.hashes.sha1, md5=md5)

    def abort(self) -> None:
        if self.put is not None:
            self.put.abort()

    def _open(self) -> StreamedPut:
        if self.put is None:
            self.put = self.store.open_put(self.key, self.size, self.content_type)
        return self.put


class _Parts:
    """A body of unknown length (or over 5 GiB). Its first ``part_size`` bytes are held: one that
    ends there is one PUT, checked before the store sees a byte. A longer one is a multipart upload
    whose parts all have ``part_size`` bytes but the last (R2 refuses anything else), each one PUT
    of that length sent as the blocks arrive (:meth:`StreamedPut.send`, nothing gathered or copied:
    a chunk across two parts is cut into two views of it). The part the body ends in is shorter
    than its PUT said: that PUT is dropped and the part's bytes, kept until its end, sent again
    with their own length. So at most one part's bytes are held, plus the blocks in hand. A full
    part's answer (its ETag) is read only at the next part's end: by then the store has sent it,
    and the body never waits for it (two parts' PUTs open at most).
    Its MD5 is computed here, as on R2 (whose listed ETag of it is "…-N"). ``listed_md5``: the
    store lists that MD5 as the object's ETag (rclone serve s3), so it is not asked for it: a HEAD
    there reads the whole object again to compute it, after the body, while the client waits. Its
    methods block, and come one at a time from worker threads."""

    def __init__(
        self, store: ObjectStore, key: str, part_size: int, content_type: str | None, hashes: Hashes, listed_md5: bool
    ):
        self.store, self.key, self.part_size, self.content_type = store, key, part_size, content_type
        self.hashes, self.listed_md5 = hashes, listed_md5
        self.kept: list[bytes | memoryview] = []  # the current part's bytes
        self.kept_size = 0
        self.upload_id: str | None = None
        self.put: StreamedPut | None = None  # the current part's PUT
        self.sent: StreamedPut | None = None  # the previous part's, all its bytes sent, its answer unread
        self.parts: list[UploadedPart] = []
        self.size = 0

    def write(self, chunks: list[bytes]) -> None:
        self.hashes.update(chunks)
        for chunk in chunks:
            length, offset = len(chunk), 0
            while offset < length:
                if self.kept_size == self.part_size:  # full, and more follows: the part is done
                    self._part_done()
                take = min(length - offset, self.part_size - self.kept_size)
                piece = chunk if take == length else memoryview(chunk)[offset : offset + take]
                if self.upload_id is not None:
                    self._part_put(self.part_size).send((piece,))
                self.kept.append(piece)
                self.kept_size += take
                offset += take
            self.size += length

    def close(self, chunks: list[bytes], expected: tuple[Checksum, ...]) -> UploadResult:
        self.write(chunks)
        self.hashes.check(expected)  # before anything is committed: a mismatch stores nothing
        if self.upload_id is None:
            etag = self.store.put_object(self.key, b"".join(self.kept), self.content_type)
            return UploadResult(size=self.size, etag=etag, parts=0, sha1=self.hashes.sha1, md5=self.hashes.md5)
        if self.kept_size < self.part_size:  # the last part: sent again with its own length
            if self.put is not None:
                self.put.abort()
                self.put = None
            self._part_put(self.kept_size).send(self.kept)
        self._part_done()
        self._answered()
        etag = self.store.complete_multipart(self.key, self.upload_id, self.parts)
        self.upload_id = None  # committed: nothing to abort any more
        if self.listed_md5:
            etag = f'"{self.hashes.md5}"'
        else:
            try:
                listed = self.store.head(self.key)
            except StoreError:
                listed = None  # committed all the same; its facts will simply not match
            if listed is not None and listed.size == self.size:
                etag = listed.etag
        return UploadResult(size=self.size, etag=etag, parts=len(self.parts), sha1=self.hashes.sha1, md5=self.hashes.md5)

    def abort(self) -> None:
        for put in (self.sent, self.put):
            if put is not None:
                put.abort()
        if self.upload_id is not None:
            try:
                self.store.abort_multipart(self.key, self.upload_id)
            except Exception:
                pass  # the store expires abandoned uploads; the original error matters more

    def _part_put(self, size: int) -> StreamedPut:
        if self.put is None:
            number = len(self.parts) + (self.sent is not None) + 1
            if number > MAX_PARTS:
                raise UploadTooLarge(f"body needs more than {MAX_PARTS} parts of {self.part_size} bytes")
            self.put = self.store.open_part(self.key, self.upload_id, number, size)
        return self.put

    def _part_done(self) -> None:
        """The current part's bytes are all sent (the first part's now, with the upload started,
        once the body is known to be longer); the previous part's answer is read."""
        if self.upload_id is None:
            self.upload_id = self.store.create_multipart(self.key, self.content_type)
            self._part_put(self.part_size).send(self.kept)
        self._answered()
        self.sent, self.put = self.put, None
        self.kept, self.kept_size = [], 0

    def _answered(self) -> None:
        if self.sent is not None:
            self.parts.append(UploadedPart(number=len(self.parts) + 1, etag=self.sent.finish()))
            self.sent = None
