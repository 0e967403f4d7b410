"""drive.uploads on a real store: a known length over one part is one streamed PUT, an unknown one
a single PUT below one part and equal parts above; hashes kept; nothing left on failure."""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
import uuid

import pytest
import requests

import drive.uploads
from drive.checksums import Checksum, ChecksumMismatch
from drive.store.s3 import S3ObjectStore
from drive.uploads import MAX_PARTS, MiB, IncompleteBody, UploadTooLarge, choose_part_size, stream_to_store
from gateway.app import open_store
from gateway.settings import Settings


class Recorder:
    """The real store, with the size of every part sent to it written down."""

    def __init__(self, store):
        self.store = store
        self.part_sizes: list[int] = []
        self.aborted = 0
        self.streamed: list[int] = []  # the size of each send of a streamed PUT
        self.part_sends: list[tuple[int, int]] = []  # (part number, size) of each send of a part

    def __getattr__(self, name):
        return getattr(self.store, name)

    def open_part(self, key, upload_id, number, size):
        recorder, put = self, self.store.open_part(key, upload_id, number, size)

        class Part:
            def send(self, chunks):
                recorder.part_sends.append((number, sum(map(len, chunks))))
                put.send(chunks)

            def finish(self):
                recorder.part_sizes.append(size)  # as stored: a part dropped half-way is not
                return put.finish()

            def abort(self):
                put.abort()

        return Part()

    def abort_multipart(self, key, upload_id):
        self.aborted += 1
        return self.store.abort_multipart(key, upload_id)

    def open_put(self, key, size, content_type=None):
        recorder, put = self, self.store.open_put(key, size, content_type)

        class Recorded:
            def send(self, chunks):
                recorder.streamed.append(sum(map(len, chunks)))
                put.send(chunks)

            def finish(self):
                return put.finish()

            def abort(self):
                recorder.aborted += 1
                put.abort()

        return Recorded()


async def chunks_of(data: bytes, sizes):
    position, n = 0, 0
    while position < len(data):
        size = sizes[n % len(sizes)]
        yield data[position : position + size]
        position += size
        n += 1


def upload(store, key, data, *, length, part_size=5 * MiB, max_bytes=None, sizes=(65536, 1, 300_001), expected=()):
    return asyncio.run(
        stream_to_store(
            store, key, chunks_of(data, list(sizes)),
            content_length=length, content_type="application/x-test", part_size=part_size, max_bytes=max_bytes,
            expected=expected,
        )
    )


def stored(store, key) -> bytes:
    return requests.get(store.presign_get(key, 60)).content


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


def test_unknown_length_goes_up_in_equal_parts(store):
    data = os.urandom(3 * 5 * MiB + 12345)
    recorder = Recorder(store)
    result = upload(recorder, "u/big", data, length=None)
    assert result.parts == 4
    assert recorder.part_sizes == [5 * MiB] * 3 + [12345]
    assert hashlib.sha256(stored(store, "u/big")).digest() == hashlib.sha256(data).digest()
    assert (result.sha1, result.md5) == (hashlib.sha1(data).hexdigest(), hashlib.md5(data).hexdigest())


def test_parts_go_up_as_the_blocks_arrive(store):
    """Only the first part is held (the body might end within it); the others are sent a block
    at a time, and the short last one is sent again with its own length."""
    data = os.urandom(3 * 5 * MiB + 12345)
    recorder = Recorder(store)
    upload(recorder, "u/blocks", data, length=None)
    sends = recorder.part_sends
    assert [size for number, size in sends if number == 1] == [5 * MiB]
    assert max(size for number, size in sends if number in (2, 3)) <= drive.uploads.BLOCK_BYTES + 300_001
    assert sends[-1] == (4, 12345) and stored(store, "u/blocks") == data


@pytest.mark.parametrize("announced", [False, True])
def test_parts_on_a_store_that_lists_their_md5(embedded_target, announced):
    """rclone serve s3 lists a multipart object's MD5 as its ETag. The gateway computes it as the
    parts go up (and checks it before committing, where the client announced one), and reports it
    as the object's ETag without a HEAD: there, a HEAD reads the whole object again to compute it,
    after the body, while the client waits for its answer."""
    store = embedded_target.store("t" + os.urandom(6).hex())
    assert store.multipart_etag_is_md5
    data = os.urandom(2 * 5 * MiB + 777)
    md5 = hashlib.md5(data).hexdigest()
    expected = (Checksum("MD5", md5),) if announced else ()
    heads = []
    recorder = Recorder(store)
    recorder.head = lambda key: heads.append(key) or store.head(key)
    result = upload(recorder, "u/listed", data, length=None, expected=expected)
    assert result.parts == 3 and (result.sha1, result.md5) == (hashlib.sha1(data).hexdigest(), md5)
    assert heads == [] and result.etag.strip('"') == md5
    assert store.head("u/listed").etag.strip('"') == md5  # what the store lists, as reported
    if announced:
        with pytest.raises(ChecksumMismatch):
            upload(store, "u/listed", os.urandom(len(data)), length=None, expected=expected)
        assert stored(store, "u/listed") == data


def test_known_length_is_one_streamed_put_whose_md5_the_store_computed(store):
    data = os.urandom(3 * 5 * MiB + 12345)
    recorder = Recorder(store)
    result = upload(recorder, "u/streamed", data, length=len(data))
    assert result.parts == 0 and recorder.part_sizes == [] and sum(recorder.streamed) == len(data)
    assert max(recorder.streamed) <= drive.uploads.BLOCK_BYTES + 300_001  # blocks, never the whole body
    assert hashlib.sha256(stored(store, "u/streamed")).digest() == hashlib.sha256(data).digest()
    # The MD5 recorded is the store's ETag: it must be the content's.
    assert (result.sha1, result.md5) == (hashlib.sha1(data).hexdigest(), hashlib.md5(data).hexdigest())
    assert store.head("u/streamed").etag.strip('"') == result.md5


KMS_ETAG = '"' + "ab" * 16 + '"'  # S3 under SSE-KMS or SSE-C: a PUT's ETag, but not the MD5 of its bytes


class KmsEtags:
    """The real store, answering a streamed PUT with an ETag that is not its MD5."""

    def __init__(self, store):
        self.store = store

    def __getattr__(self, name):
        return getattr(self.store, name)

    def open_put(self, key, size, content_type=None):
        put = self.store.open_put(key, size, content_type)
        finish = put.finish
        put.finish = lambda: (finish(), KMS_ETAG)[1]
        return put


@pytest.mark.parametrize("etag_is_md5", [True, False])
def test_the_md5_of_one_put_is_its_etag_only_where_the_store_is_said_to_make_it_so(rclone_target, etag_is_md5):
    target = rclone_target
    store = S3ObjectStore(target.endpoint, target.access_key, target.secret_key, "t" + uuid.uuid4().hex[:12],
                          put_etag_is_md5=etag_is_md5)
    store.ensure_bucket()
    data = os.urandom(6 * MiB + 7)  # one streamed PUT
    result = upload(KmsEtags(store), "u/kms", data, length=len(data))
    assert result.parts == 0 and result.etag == KMS_ETAG
    # true: the ETag is taken for the MD5 (the gateway hashes nothing); false: the gateway's own MD5
    assert result.md5 == ("ab" * 16 if etag_is_md5 else hashlib.md5(data).hexdigest())
    assert result.sha1 == hashlib.sha1(data).hexdigest()


@pytest.mark.parametrize("value, expected", [(None, True), ("false", False), ("true", True)])
def test_kgpu_s3_put_etag_is_md5_reaches_the_configured_store(monkeypatch, value, expected):
    if value is not None:
        monkeypatch.setenv("KGPU_S3_PUT_ETAG_IS_MD5", value)
    settings = Settings(s3_endpoint_url="http://127.0.0.1:9", s3_access_key_id="k", s3_secret_access_key="s")
    store, embedded = open_store(settings)
    assert embedded is None and store.put_etag_is_md5 is expected


def test_exact_multiple_has_no_empty_last_part(store):
    data = os.urandom(2 * 5 * MiB)
    recorder = Recorder(store)
    assert upload(recorder, "u/exact", data, length=None).parts == 2
    assert recorder.part_sizes == [5 * MiB, 5 * MiB]


@pytest.mark.parametrize("length", [6 * MiB + 1, 100])
def test_short_body_is_refused_and_replaces_nothing(store, length):
    """A streamed PUT (over one part) or a single one: the old object stays as it was."""
    store.put_object("u/short", b"old")
    recorder = Recorder(store)
    with pytest.raises(IncompleteBody):
        upload(recorder, "u/short", os.urandom(length - 1), length=length)
    assert recorder.aborted == (1 if length > 5 * MiB else 0) and stored(store, "u/short") == b"old"


def test_a_body_cut_short_before_its_first_block_never_reaches_the_store(store):
    recorder = Recorder(store)
    with pytest.raises(IncompleteBody):
        upload(recorder, "u/early", os.urandom(100_000), length=6 * MiB)
    assert recorder.streamed == [] and recorder.aborted == 0 and store.head("u/early") is None


@pytest.mark.parametrize("length_known", [True, False])
def test_a_wrong_checksum_stores_nothing(store, length_known):
    data = os.urandom(6 * MiB)
    store.put_object("u/sum", b"old")
    wrong = Checksum("SHA1", hashlib.sha1(b"other").hexdigest())
    with pytest.raises(ChecksumMismatch):
        upload(Recorder(store), "u/sum", data, length=len(data) if length_known else None, expected=(wrong,))
    assert stored(store, "u/sum") == b"old"


def test_an_announced_md5_is_checked_by_the_gateway(store):
    data = os.urandom(6 * MiB)
    right = Checksum("MD5", hashlib.md5(data).hexdigest())
    assert upload(store, "u/md5", data, length=len(data), expected=(right,)).md5 == right.hex
    wrong = Checksum("MD5", hashlib.md5(b"other").hexdigest())
    with pytest.raises(ChecksumMismatch):
        upload(store, "u/md5", os.urandom(6 * MiB), length=len(data), expected=(wrong,))
    assert hashlib.md5(stored(store, "u/md5")).hexdigest() == right.hex


def test_a_slow_client_s_bytes_go_on_to_the_store(store, monkeypatch):
    """The store's connection never waits for a whole block from a slow client."""
    monkeypatch.setattr(drive.uploads, "FLUSH_SECONDS", 0)
    data = os.urandom(6 * MiB)
    recorder = Recorder(store)
    upload(recorder, "u/slow", data, length=len(data), sizes=(1 << 20,))
    assert recorder.streamed == [1 << 20] * 6 and stored(store, "u/slow") == data


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
