"""Streaming an upload body through to the object store, exactly once.

Bodies are never buffered whole: up to one part is collected in memory while
the previous part is being sent, so a 1 GiB upload costs about three parts of
memory. Anything larger than one part goes up as a multipart upload whose
parts all have the same size except the last (R2 refuses anything else), at
most 10,000 of them.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import AsyncIterator

from starlette.concurrency import run_in_threadpool

from drive.store import ObjectStore, UploadedPart

MiB = 1 << 20
MAX_PARTS = 10_000


class UploadTooLarge(Exception):
    """The body grew past the byte budget it was given (quota)."""


class IncompleteBody(Exception):
    """The client sent fewer or more bytes than its Content-Length promised."""


@dataclass(frozen=True)
class UploadResult:
    size: int
    etag: str
    parts: int  # 0 for a single PUT


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
) -> UploadResult:
    pending: list[bytes] = []  # chunks of the part being collected, joined once when it is full
    pending_size = 0
    received = 0
    upload_id: str | None = None
    parts: list[UploadedPart] = []
    in_flight: asyncio.Future | None = None

    async def send_part(data: bytes) -> None:
        nonlocal upload_id, in_flight
        if upload_id is None:
            upload_id = await run_in_threadpool(store.create_multipart, key, content_type)
        if in_flight is not None:
            parts.append(await in_flight)
        number = len(parts) + 1
        if number > MAX_PARTS:
            raise UploadTooLarge(f"body needs more than {MAX_PARTS} parts of {part_size} bytes")
        in_flight = asyncio.ensure_future(run_in_threadpool(store.upload_part, key, upload_id, number, data))

    try:
        async for chunk in chunks:
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
            etag = await run_in_threadpool(store.put_object, key, rest, content_type)
            return UploadResult(size=received, etag=etag, parts=0)
        if rest:
            await send_part(rest)
        del rest
        if in_flight is not None:
            parts.append(await in_flight)
            in_flight = None
        etag = await run_in_threadpool(store.complete_multipart, key, upload_id, parts)
        return UploadResult(size=received, etag=etag, parts=len(parts))
    except BaseException:
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
        raise
