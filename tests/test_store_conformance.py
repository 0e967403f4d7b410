"""The object-store conformance suite: every ObjectStore backend must pass all of it.

Runs on the embedded ``rclone serve s3`` through the S3 store class and through
``EmbeddedStore`` (what ``kgpu serve`` uses with no S3 configured), and on moto
(``s3_target`` is parametrised here). Signature checks only mean something on a
store that verifies them (rclone, like R2); moto accepts anything, so those
cases skip there.
"""

from __future__ import annotations

import hashlib
import os
from datetime import datetime, timedelta, timezone

import pytest
import requests

from drive.store import CommonPrefix, ObjectInfo, ObjectNotFound, ObjectStore, UploadedPart, iter_entries, iter_objects
from drive.store.embedded import EmbeddedStore
from drive.uploads import MiB


@pytest.fixture(scope="session", params=["rclone", "embedded", "moto"])
def s3_target(request):
    return request.getfixturevalue(f"{request.param}_target")


def test_the_embedded_target_is_the_embedded_store_class(s3_target, store):
    assert isinstance(store, EmbeddedStore) == (s3_target.name == "embedded")


def test_is_an_object_store(store):
    assert isinstance(store, ObjectStore)


def test_put_then_head(store):
    etag = store.put_object("dir/hello.txt", b"hello", "text/plain")
    info = store.head("dir/hello.txt")
    assert info is not None
    assert info.size == 5
    assert info.etag == etag == '"' + hashlib.md5(b"hello").hexdigest() + '"'
    assert info.content_type == "text/plain"
    assert abs(info.last_modified - datetime.now(timezone.utc)) < timedelta(minutes=5)


def test_head_missing_is_none(store):
    assert store.head("nope/missing.bin") is None


def test_empty_object(store):
    store.put_object("empty", b"")
    assert store.head("empty").size == 0


def test_list_with_delimiter_gives_folders_and_files(store):
    for key in ["top.txt", "a/one.txt", "a/two.txt", "a/deep/three.txt", "b/four.txt"]:
        store.put_object(key, key.encode())
    page = store.list_page("", delimiter="/")
    folders = sorted(e.prefix for e in page.entries if isinstance(e, CommonPrefix))
    files = sorted(e.key for e in page.entries if isinstance(e, ObjectInfo))
    assert folders == ["a/", "b/"]
    assert files == ["top.txt"]
    inner = store.list_page("a/", delimiter="/")
    assert sorted(e.prefix for e in inner.entries if isinstance(e, CommonPrefix)) == ["a/deep/"]
    assert sorted(e.key for e in inner.entries if isinstance(e, ObjectInfo)) == ["a/one.txt", "a/two.txt"]


def test_list_flat_has_sizes_and_etags(store):
    store.put_object("x/1", b"a" * 10)
    store.put_object("x/y/2", b"b" * 20)
    found = {o.key: o for o in iter_objects(store, "x/")}
    assert set(found) == {"x/1", "x/y/2"}
    assert found["x/1"].size == 10 and found["x/y/2"].size == 20
    assert found["x/1"].etag.strip('"') == hashlib.md5(b"a" * 10).hexdigest()


def test_listing_pages(store):
    for n in range(25):
        store.put_object(f"many/{n:03d}", b"x")
    page = store.list_page("many/", max_keys=10)
    assert len(page.entries) == 10 and page.next_token
    keys = [e.key for e in iter_entries(store, "many/", page_size=10)]
    assert keys == [f"many/{n:03d}" for n in range(25)]


def test_prefix_does_not_match_sibling_names(store):
    store.put_object("users/1/a", b"1")
    store.put_object("users/10/a", b"10")
    assert [o.key for o in iter_objects(store, "users/1/")] == ["users/1/a"]


def test_unicode_and_odd_names_round_trip(store):
    names = ["sp ace.txt", "hash#.txt", "per%cent.txt", "plus+.txt", "한글/파일.txt", "emoji-🚀.bin", "q?mark"]
    for name in names:
        store.put_object(f"odd/{name}", name.encode())
    assert sorted(o.key for o in iter_objects(store, "odd/")) == sorted(f"odd/{n}" for n in names)
    for name in names:
        reply = requests.get(store.presign_get(f"odd/{name}", 60))
        assert reply.status_code == 200, (name, reply.status_code)
        assert reply.content == name.encode()


def test_delete_and_delete_many(store):
    for n in range(5):
        store.put_object(f"del/{n}", b"x")
    store.delete("del/0")
    assert store.head("del/0") is None
    store.delete_many([f"del/{n}" for n in range(1, 5)])
    assert list(iter_objects(store, "del/")) == []
    store.delete("del/never-existed")  # deleting a missing key is not an error (S3 semantics)


def test_copy(store):
    store.put_object("src/a.bin", b"copy me", "application/x-test")
    store.copy("src/a.bin", "dst/b.bin")
    assert store.head("dst/b.bin").size == 7
    assert store.head("src/a.bin") is not None
    with pytest.raises(ObjectNotFound):
        store.copy("src/missing", "dst/c.bin")


def test_multipart_equal_parts(store):
    part = 5 * MiB
    data = [os.urandom(part), os.urandom(part), os.urandom(1234)]
    upload = store.create_multipart("mp/big.bin", "application/octet-stream")
    parts = [store.upload_part("mp/big.bin", upload, n + 1, chunk) for n, chunk in enumerate(data)]
    store.complete_multipart("mp/big.bin", upload, parts)
    assert store.head("mp/big.bin").size == 2 * part + 1234
    body = requests.get(store.presign_get("mp/big.bin", 60)).content
    assert hashlib.sha256(body).digest() == hashlib.sha256(b"".join(data)).digest()


def test_multipart_abort_leaves_nothing(store):
    upload = store.create_multipart("mp/aborted.bin")
    store.upload_part("mp/aborted.bin", upload, 1, os.urandom(5 * MiB))
    store.abort_multipart("mp/aborted.bin", upload)
    assert store.head("mp/aborted.bin") is None


def test_presigned_get_and_ranges(store):
    payload = os.urandom(10_000)
    store.put_object("p/r.bin", payload)
    url = store.presign_get("p/r.bin", 60)
    assert requests.get(url).content == payload
    ranged = requests.get(url, headers={"Range": "bytes=100-199"})
    assert ranged.status_code in (200, 206)  # rclone answers 200 with Content-Range (FACTS.md)
    assert ranged.content == payload[100:200]
    assert ranged.headers["Content-Range"] == "bytes 100-199/10000"


def test_presigned_put(store):
    payload = os.urandom(50_000)
    reply = requests.put(store.presign_put("p/up.bin", 60), data=payload)
    assert reply.status_code == 200
    assert requests.get(store.presign_get("p/up.bin", 60)).content == payload


def test_presigned_parts_and_md5(store, s3_target):
    """A client's direct upload (drive/direct.py): parts PUT to presigned URLs, completed by the
    gateway; a URL that signs Content-MD5 takes only those bytes; the ETag of one PUT is its MD5."""
    import base64
    import hashlib

    payload = os.urandom(5 * MiB + 100)
    upload = store.create_multipart("pp/w.bin")
    parts = []
    for number, chunk in ((1, payload[:5 * MiB]), (2, payload[5 * MiB:])):
        url = store.presign_part("pp/w.bin", upload, number, 60, len(chunk))
        reply = requests.put(url, data=chunk)
        assert reply.status_code == 200, reply.text
        parts.append(UploadedPart(number, reply.headers["ETag"]))
    store.complete_multipart("pp/w.bin", upload, parts)
    assert requests.get(store.presign_get("pp/w.bin", 60)).content == payload

    small = os.urandom(1000)
    digest = base64.b64encode(hashlib.md5(small).digest()).decode()
    url = store.presign_put("pp/s.bin", 60, content_length=len(small), content_md5=digest)
    if s3_target.checks_signatures:
        assert requests.put(url, data=os.urandom(1000), headers={"Content-MD5": digest}).status_code == 400
    assert requests.put(url, data=small, headers={"Content-MD5": digest}).status_code == 200
    assert store.put_etag_is_md5 and store.head("pp/s.bin").etag.strip('"') == hashlib.md5(small).hexdigest()


def test_presigned_get_of_missing_key_is_404(store):
    assert requests.get(store.presign_get("p/missing.bin", 60)).status_code == 404


def test_tampered_signature_is_refused(store, s3_target):
    if not s3_target.checks_signatures:
        pytest.skip(f"{s3_target.name} does not check presigned signatures")
    store.put_object("sig/a", b"secret")
    url = store.presign_get("sig/a", 60)
    tampered = url[:-4] + ("0000" if not url.endswith("0000") else "1111")
    assert requests.get(tampered).status_code == 403
    other_key = url.replace("/sig/a?", "/sig/b?")
    assert requests.get(other_key).status_code == 403
    put_url = store.presign_put("sig/a", 60)
    assert requests.get(put_url).status_code == 403  # presigned URLs are per method


def test_expired_url_is_refused(store, s3_target):
    if not s3_target.checks_signatures:
        pytest.skip(f"{s3_target.name} does not check expiry")
    store.put_object("exp/a", b"x")
    old = datetime.now(timezone.utc) - timedelta(minutes=10)
    url = store._presigner.presign("GET", "exp/a", 60, now=old)
    assert requests.get(url).status_code in (400, 403)


def test_chunked_presigned_put_is_refused(store, s3_target):
    if not s3_target.checks_signatures:
        pytest.skip(f"{s3_target.name} accepts chunked presigned PUTs")
    reply = requests.put(store.presign_put("p/chunked", 60), data=iter([b"a" * 100, b"b" * 100]))
    assert reply.status_code in (411, 501)


def test_stale_multipart_uploads_are_aborted(store, s3_target):
    """What a server killed mid-upload leaves behind goes at the next start; fresh ones stay."""
    key = "mp/left-behind.bin"
    upload = store.create_multipart(key)
    store.upload_part(key, upload, 1, os.urandom(5 * MiB))
    if s3_target.name != "moto":  # moto reports every upload as started in 2010
        assert store.abort_stale_multiparts(3600) == 0  # an upload in progress is left alone
    assert store.abort_stale_multiparts(0) >= 1
    with pytest.raises(Exception):  # the upload is gone
        store.complete_multipart(key, upload, [])
    assert store.head(key) is None
    assert store.abort_stale_multiparts(0) == 0
