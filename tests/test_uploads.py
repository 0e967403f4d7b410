"""drive.uploads on a real store: single PUT below one part, equal parts above, nothing left on failure."""

from __future__ import annotations

import asyncio
import hashlib
import os
import time

import pytest
import requests

from drive.uploads import MAX_PARTS, MiB, IncompleteBody, UploadTooLarge, choose_part_size, stream_to_store


class Recorder:
    """The real store, with the size of every part sent to it written down."""

    def __init__(self, store):
        self.store = store
        self.part_sizes: list[int] = []
        self.aborted = 0

    def __getattr__(self, name):
        return getattr(self.store, name)

    def upload_part(self, key, upload_id, number, data):
        self.part_sizes.append(len(data))
        return self.store.upload_part(key, upload_id, number, data)

    def abort_multipart(self, key, upload_id):
        self.aborted += 1
        return self.store.abort_multipart(key, upload_id)


async def chunks_of(data: bytes, sizes):
    position, n = 0, 0
    while position < len(data):
        size = sizes[n % len(sizes)]
        yield data[position : position + size]
        position += size
        n += 1


def upload(store, key, data, *, length, part_size=5 * MiB, max_bytes=None, sizes=(65536, 1, 300_001)):
    return asyncio.run(
        stream_to_store(
            store, key, chunks_of(data, list(sizes)),
            content_length=length, content_type="application/x-test", part_size=part_size, max_bytes=max_bytes,
        )
    )


def test_part_size_choice():
    assert choose_part_size(1000, 8 * MiB, 16 * MiB) == 8 * MiB
    assert choose_part_size(None, 8 * MiB, 16 * MiB) == 16 * MiB
    huge = 200 * (1 << 30)
    size = choose_part_size(huge, 8 * MiB, 16 * MiB)
    assert size % MiB == 0 and size * MAX_PARTS >= huge


def test_small_body_is_one_put(store):
    recorder = Recorder(store)
    result = upload(recorder, "u/small", b"x" * 1000, length=1000)
    assert result.parts == 0 and result.size == 1000 and recorder.part_sizes == []


@pytest.mark.parametrize("length_known", [True, False])
def test_large_body_goes_up_in_equal_parts(store, length_known):
    data = os.urandom(3 * 5 * MiB + 12345)
    recorder = Recorder(store)
    result = upload(recorder, "u/big", data, length=len(data) if length_known else None)
    assert result.parts == 4
    assert recorder.part_sizes == [5 * MiB] * 3 + [12345]
    body = requests.get(store.presign_get("u/big", 60)).content
    assert hashlib.sha256(body).digest() == hashlib.sha256(data).digest()


def test_exact_multiple_has_no_empty_last_part(store):
    data = os.urandom(2 * 5 * MiB)
    recorder = Recorder(store)
    assert upload(recorder, "u/exact", data, length=len(data)).parts == 2
    assert recorder.part_sizes == [5 * MiB, 5 * MiB]


def test_short_body_is_refused_and_leaves_nothing(store):
    data = os.urandom(6 * MiB)
    recorder = Recorder(store)
    with pytest.raises(IncompleteBody):
        upload(recorder, "u/short", data, length=len(data) + 1)
    assert recorder.aborted == 1 and store.head("u/short") is None


def test_budget_stops_the_upload(store):
    recorder = Recorder(store)
    with pytest.raises(UploadTooLarge):
        upload(recorder, "u/over", os.urandom(11 * MiB), length=None, max_bytes=7 * MiB)
    assert recorder.aborted == 1 and store.head("u/over") is None


def test_a_starting_server_aborts_the_uploads_a_dead_one_left(rclone_target, tmp_path, monkeypatch):
    """A server killed mid-upload leaves an unfinished multipart upload: the next start aborts it."""
    import gateway.app
    from tests.conftest import LiveServer, make_settings

    monkeypatch.setattr(gateway.app, "STALE_UPLOAD_SECONDS", 0)
    settings = make_settings(tmp_path, rclone_target)
    store = rclone_target.store(settings.s3_bucket)
    upload = store.create_multipart("users/1/left-behind.bin")
    store.upload_part("users/1/left-behind.bin", upload, 1, b"x" * (5 << 20))
    server = LiveServer(settings).start()
    try:
        deadline = time.monotonic() + 10
        while _uploads(store):
            assert time.monotonic() < deadline, "the left-behind upload is still there"
            time.sleep(0.1)
    finally:
        server.stop()


def _uploads(store) -> list:
    from botocore.exceptions import ClientError

    try:
        return store._client.list_multipart_uploads(Bucket=store.bucket).get("Uploads") or []
    except ClientError as exc:  # rclone serve s3 answers NoSuchUpload when there is none
        if exc.response.get("Error", {}).get("Code") == "NoSuchUpload":
            return []
        raise
