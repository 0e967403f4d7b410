"""Modification times and checksums (drive/facts.py, drive/checksums.py) over HTTP and WebDAV:
X-OC-Mtime on PUT/COPY/MOVE, PROPPATCH of {DAV:}lastmodified, OC-Checksum verified before
commit, reported as Last-Modified / OC-Checksum / Digest on HEAD, in JSON listings and as
getlastmodified / oc:checksums in PROPFIND; facts valid only while the object is the one the
gateway committed."""

from __future__ import annotations

import base64
import hashlib
import os
import xml.etree.ElementTree as ET
from datetime import datetime, timezone
from email.utils import formatdate, parsedate_to_datetime

import pytest
import requests

MTIME = 1_600_000_123  # 2020-09-13T12:28:43Z
OC = "{http://owncloud.org/ns}"
ASK_CHECKSUMS = (
    b'<?xml version="1.0"?><d:propfind xmlns:d="DAV:" xmlns:oc="http://owncloud.org/ns"><d:prop>'
    b"<d:getlastmodified/><d:getcontentlength/><d:resourcetype/><oc:checksums/><oc:permissions/>"
    b"</d:prop></d:propfind>"
)


def sha1(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def http_date(seconds: float) -> str:
    return formatdate(seconds, usegmt=True)


def put(stack, account, rel: str, data: bytes, **headers) -> requests.Response:
    return requests.put(f"{stack.base}/v1/files/{rel}", data=data, headers={**account.auth, **headers})


def head(stack, account, rel: str) -> requests.Response:
    reply = requests.head(f"{stack.base}/v1/files/{rel}", headers=account.auth)
    assert reply.status_code == 200, reply.status_code
    return reply


def dav(method: str, url: str, account, **kwargs) -> requests.Response:
    headers = {**account.auth, **kwargs.pop("headers", {})}
    return requests.request(method, url, headers=headers, allow_redirects=False, **kwargs)


def propfind_files(url: str, account, depth: str = "1") -> dict[str, dict[str, str | None]]:
    """href -> {getlastmodified, checksums} of each file in a PROPFIND answer."""
    reply = dav("PROPFIND", url, account, headers={"Depth": depth}, data=ASK_CHECKSUMS)
    assert reply.status_code == 207, reply.text
    found = {}
    for response in ET.fromstring(reply.content).iter("{DAV:}response"):
        href = response.find("{DAV:}href").text
        if href.endswith("/"):
            continue
        values: dict[str, str | None] = {"getlastmodified": None, "checksums": None}
        for propstat in response.iter("{DAV:}propstat"):
            if "200" not in propstat.find("{DAV:}status").text:
                continue
            modified = propstat.find("{DAV:}prop/{DAV:}getlastmodified")
            if modified is not None:
                values["getlastmodified"] = modified.text
            checksum = propstat.find(f"{{DAV:}}prop/{OC}checksums/{OC}checksum")
            if checksum is not None:
                values["checksums"] = checksum.text
        found[href.rsplit("/", 1)[-1]] = values
    return found


def error_code(reply: requests.Response) -> str:
    return reply.json()["error_code"]


def test_put_with_mtime_and_checksum_is_reported_everywhere(stack, user):
    data = os.urandom(3000)
    reply = put(stack, user, "f/a.bin", data, **{"X-OC-Mtime": str(MTIME), "OC-Checksum": f"SHA1:{sha1(data)}"})
    assert reply.status_code == 201, reply.text
    assert reply.headers["X-OC-Mtime"] == "accepted"
    assert reply.json()["sha1"] == sha1(data) and reply.json()["md5"] == md5(data)

    got = head(stack, user, "f/a.bin")
    assert got.headers["Last-Modified"] == http_date(MTIME)
    assert got.headers["OC-Checksum"] == f"SHA1:{sha1(data)}"
    digests = dict(part.split("=", 1) for part in got.headers["Digest"].split(","))
    assert base64.b64decode(digests["SHA"]).hex() == sha1(data)
    assert base64.b64decode(digests["MD5"]).hex() == md5(data)

    listed = requests.get(f"{stack.base}/v1/files/f/?json=1", headers=user.auth).json()["entries"]
    (entry,) = [e for e in listed if e["name"] == "a.bin"]
    assert entry["last_modified"] == "2020-09-13T12:28:43Z"
    assert (entry["sha1"], entry["md5"]) == (sha1(data), md5(data))
    flat = requests.get(f"{stack.base}/v1/files", params={"prefix": "f/"}, headers=user.auth).json()["files"]
    assert flat[0]["last_modified"] == "2020-09-13T12:28:43Z" and flat[0]["sha1"] == sha1(data)

    expected = {"getlastmodified": http_date(MTIME), "checksums": f"SHA1:{sha1(data)} MD5:{md5(data)}"}
    for mount in ("files", "dav"):
        assert propfind_files(f"{stack.base}/v1/{mount}/f/", user)["a.bin"] == expected  # the fast path
        assert propfind_files(f"{stack.base}/v1/{mount}/f/a.bin", user, depth="0")["a.bin"] == expected


@pytest.mark.parametrize("chunked", [False, True], ids=["streamed-put", "multipart"])
def test_big_upload_gets_hashes_that_match_the_content(stack, user, chunked):
    """Over one part: a known length is one streamed PUT whose MD5 is the store's ETag, a
    chunked body a multipart upload hashed here; either way the recorded hashes are the bytes'."""
    data = os.urandom(stack.settings.upload_part_bytes + 12345)
    body = iter([data[: 1 << 20], data[1 << 20 :]]) if chunked else data
    reply = put(stack, user, "big.bin", body, **{"X-OC-Mtime": str(MTIME)})
    assert reply.status_code == 201, reply.text
    assert (reply.json()["parts"] > 0) == chunked
    assert (reply.json()["sha1"], reply.json()["md5"]) == (sha1(data), md5(data))
    got = head(stack, user, "big.bin")
    assert got.headers["OC-Checksum"] == f"SHA1:{sha1(data)}"
    digests = dict(part.split("=", 1) for part in got.headers["Digest"].split(","))
    assert base64.b64decode(digests["MD5"]).hex() == md5(data)
    assert got.headers["Last-Modified"] == http_date(MTIME)


def test_webdav_put_with_mtime_and_checksum(stack, user):
    data = b"webdav body\n" * 100
    reply = dav(
        "PUT",
        f"{stack.base}/v1/dav/w.txt",
        user,
        data=data,
        headers={"X-OC-Mtime": str(MTIME), "OC-Checksum": f"MD5:{md5(data)}"},
    )
    assert reply.status_code == 201, reply.text
    assert reply.headers["X-OC-Mtime"] == "accepted"
    got = head(stack, user, "w.txt")
    assert got.headers["Last-Modified"] == http_date(MTIME)
    assert got.headers["OC-Checksum"] == f"SHA1:{sha1(data)}"


@pytest.mark.parametrize("size_parts", [0, 1])
def test_checksum_mismatch_stores_nothing_and_keeps_the_old_object(stack, user, size_parts):
    old = os.urandom(1000)
    assert put(stack, user, "keep.bin", old, **{"X-OC-Mtime": str(MTIME)}).status_code == 201
    before = head(stack, user, "keep.bin")
    new = os.urandom(1000 + size_parts * stack.settings.upload_part_bytes)
    wrong = f"SHA1:{sha1(new + b'x')}"
    reply = put(stack, user, "keep.bin", new, **{"OC-Checksum": wrong, "X-OC-Mtime": str(MTIME + 5)})
    assert reply.status_code == 400 and error_code(reply) == "checksum_mismatch"
    reply = dav("PUT", f"{stack.base}/v1/dav/keep.bin", user, data=new, headers={"OC-Checksum": f"MD5:{'0' * 32}"})
    assert reply.status_code == 400 and error_code(reply) == "checksum_mismatch", reply.text
    after = head(stack, user, "keep.bin")
    assert after.headers["ETag"] == before.headers["ETag"]
    assert after.headers["Last-Modified"] == http_date(MTIME)
    assert after.headers["OC-Checksum"] == f"SHA1:{sha1(old)}"
    fetched = requests.get(f"{stack.base}/v1/files/keep.bin", headers=user.auth)
    assert fetched.content == old


@pytest.mark.parametrize(
    "name, value, code",
    [
        ("X-OC-Mtime", "yesterday", "bad_mtime"),
        ("X-OC-Mtime", "-5", "bad_mtime"),
        ("X-OC-Mtime", "1e9", "bad_mtime"),
        ("X-OC-Mtime", "99999999999999", "bad_mtime"),
        ("OC-Checksum", "SHA1:xyz", "bad_checksum"),
        ("OC-Checksum", "SHA1:" + "a" * 39, "bad_checksum"),
        ("OC-Checksum", "SHA1", "bad_checksum"),
        ("OC-Checksum", "ADLER32:0a0b0c0d", "bad_checksum"),
        ("OC-Checksum", "SHA1:" + "a" * 40 + " SHA1:" + "b" * 40, "bad_checksum"),
    ],
)
def test_bad_headers_are_refused_before_anything_is_stored(stack, user, name, value, code):
    for url in (f"{stack.base}/v1/files/bad.txt", f"{stack.base}/v1/dav/bad.txt"):
        reply = dav("PUT", url, user, data=b"data", headers={name: value})
        assert reply.status_code == 400, (url, reply.status_code, reply.text)
        assert error_code(reply) == code, (url, reply.text)
    # A mint (POST without a body) reads them the same way (drive/facts.py:client_facts).
    reply = requests.post(f"{stack.base}/v1/files/bad.txt", headers={**user.auth, name: value, "X-Content-Length": "4"})
    assert reply.status_code == 400 and error_code(reply) == code, reply.text
    assert requests.head(f"{stack.base}/v1/files/bad.txt", headers=user.auth).status_code == 404
    assert put(stack, user, "src.txt", b"x").status_code == 201
    for method in ("COPY", "MOVE"):
        if name != "X-OC-Mtime":
            continue
        reply = dav(
            method,
            f"{stack.base}/v1/dav/src.txt",
            user,
            headers={name: value, "Destination": f"{stack.base}/v1/dav/dst.txt"},
        )
        assert reply.status_code == 400 and error_code(reply) == code, reply.text
    assert requests.head(f"{stack.base}/v1/files/dst.txt", headers=user.auth).status_code == 404


def test_an_object_replaced_behind_the_gateway_falls_back_to_the_store(stack, user):
    data = os.urandom(500)
    assert put(stack, user, "r.bin", data, **{"X-OC-Mtime": str(MTIME)}).status_code == 201
    stack.store.put_object(f"users/{user.id}/r.bin", os.urandom(500))  # same size, other bytes
    got = head(stack, user, "r.bin")
    assert "OC-Checksum" not in got.headers and "Digest" not in got.headers
    assert parsedate_to_datetime(got.headers["Last-Modified"]).year >= 2026
    assert propfind_files(f"{stack.base}/v1/files/", user)["r.bin"]["checksums"] is None


def test_delete_forgets_the_facts(stack, user):
    data = b"same bytes"
    assert put(stack, user, "gone/d.txt", data, **{"X-OC-Mtime": str(MTIME)}).status_code == 201
    assert requests.delete(f"{stack.base}/v1/files/gone/d.txt", headers=user.auth).status_code == 204
    stack.store.put_object(f"users/{user.id}/gone/d.txt", data)  # the same ETag and size, written elsewhere
    got = head(stack, user, "gone/d.txt")
    assert got.headers["Last-Modified"] != http_date(MTIME) and "OC-Checksum" not in got.headers
    assert put(stack, user, "gone2/e.txt", data, **{"X-OC-Mtime": str(MTIME)}).status_code == 201
    assert dav("DELETE", f"{stack.base}/v1/dav/gone2/", user).status_code == 204
    stack.store.put_object(f"users/{user.id}/gone2/e.txt", data)
    assert "OC-Checksum" not in head(stack, user, "gone2/e.txt").headers


def test_copy_move_and_proppatch_keep_times_and_hashes(stack, user):
    data = os.urandom(2000)
    assert put(stack, user, "c/one.bin", data, **{"X-OC-Mtime": str(MTIME)}).status_code == 201
    base = f"{stack.base}/v1/files"
    copied = dav("COPY", f"{base}/c/one.bin", user, headers={"Destination": f"{base}/c/two.bin"})
    assert copied.status_code == 201 and "X-OC-Mtime" not in copied.headers
    got = head(stack, user, "c/two.bin")
    assert got.headers["Last-Modified"] == http_date(MTIME) and got.headers["OC-Checksum"] == f"SHA1:{sha1(data)}"

    moved = dav(
        "MOVE", f"{base}/c/two.bin", user, headers={"Destination": f"{base}/c/three.bin", "X-OC-Mtime": str(MTIME + 60)}
    )
    assert moved.status_code == 201 and moved.headers["X-OC-Mtime"] == "accepted"
    got = head(stack, user, "c/three.bin")
    assert got.headers["Last-Modified"] == http_date(MTIME + 60) and got.headers["OC-Checksum"] == f"SHA1:{sha1(data)}"
    assert requests.head(f"{base}/c/two.bin", headers=user.auth).status_code == 404

    # A folder's files keep their own times: a time sent with the folder is not taken (nor accepted).
    folder = dav("COPY", f"{base}/c/", user, headers={"Destination": f"{base}/c2/", "X-OC-Mtime": str(MTIME + 9)})
    assert folder.status_code == 201 and "X-OC-Mtime" not in folder.headers
    assert head(stack, user, "c2/one.bin").headers["Last-Modified"] == http_date(MTIME)
    assert dav("MOVE", f"{base}/c2/", user, headers={"Destination": f"{base}/c3/"}).status_code == 201
    got = head(stack, user, "c3/three.bin")
    assert got.headers["Last-Modified"] == http_date(MTIME + 60) and got.headers["OC-Checksum"] == f"SHA1:{sha1(data)}"

    # rclone's owncloud vendor: PROPPATCH lastmodified, with the checksum it was told.
    body = (
        '<?xml version="1.0" encoding="utf-8" ?><D:propertyupdate xmlns:D="DAV:" xmlns:oc="http://owncloud.org/ns">'
        f'<D:set><D:prop><lastmodified xmlns="DAV:">{MTIME + 3600}</lastmodified>'
        f"<oc:checksums><oc:checksum>SHA1:{sha1(data)}</oc:checksum></oc:checksums></D:prop></D:set>"
        "</D:propertyupdate>"
    )
    patched = dav("PROPPATCH", f"{base}/c3/one.bin", user, data=body.encode())
    assert patched.status_code == 207 and "200 OK" in patched.text and "424" not in patched.text, patched.text
    got = head(stack, user, "c3/one.bin")
    assert got.headers["Last-Modified"] == http_date(MTIME + 3600)
    assert got.headers["OC-Checksum"] == f"SHA1:{sha1(data)}"
    lying = body.replace(sha1(data), "0" * 40).replace(str(MTIME + 3600), str(MTIME + 7200))
    refused = dav("PROPPATCH", f"{base}/c3/one.bin", user, data=lying.encode())
    assert refused.status_code == 207 and "409" in refused.text, refused.text
    assert head(stack, user, "c3/one.bin").headers["Last-Modified"] == http_date(MTIME + 3600)


def test_presigned_uploads_carry_the_time_and_the_stores_md5_but_no_sha1(stack, user):
    """Bytes sent straight to the store: the drive keeps the client's time, and reports the MD5
    the store vouches for (its ETag), never a SHA1 (drive/facts.py proven_md5)."""
    data = os.urandom(4096)
    redirect = requests.put(
        f"{stack.base}/v1/files/p/r.bin",
        data=data,
        headers={**user.auth, "Expect": "100-continue", "X-OC-Mtime": str(MTIME)},
        allow_redirects=False,
    )
    assert redirect.status_code == 307
    assert requests.put(redirect.headers["Location"], data=data).status_code == 200
    got = head(stack, user, "p/r.bin")
    assert got.headers["Last-Modified"] == http_date(MTIME)
    assert got.headers["OC-Checksum"] == f"MD5:{hashlib.md5(data).hexdigest()}" and "SHA=" not in got.headers["Digest"]

    minted = requests.post(
        f"{stack.base}/v1/files/p/m.bin",
        headers={**user.auth, "X-OC-Mtime": str(MTIME + 1), "X-Content-Length": str(len(data))},
    )
    assert minted.status_code == 200, minted.text
    assert requests.put(minted.json()["url"], data=data, headers=minted.json()["headers"]).status_code == 200
    assert head(stack, user, "p/m.bin").headers["Last-Modified"] == http_date(MTIME + 1)

    # Not the announced size: the time does not apply.
    minted = requests.post(
        f"{stack.base}/v1/files/p/s.bin",
        headers={**user.auth, "X-OC-Mtime": str(MTIME), "X-Content-Length": "10"},
    )
    stack.store.put_object(f"users/{user.id}/p/s.bin", b"eleven byte")
    assert head(stack, user, "p/s.bin").headers["Last-Modified"] != http_date(MTIME)
    assert "OC-Checksum" not in head(stack, user, "p/s.bin").headers

    no_length = requests.post(f"{stack.base}/v1/files/p/n.bin", headers={**user.auth, "X-OC-Mtime": str(MTIME)})
    assert no_length.status_code == 400 and error_code(no_length) == "mtime_needs_length"
    unverifiable = requests.post(
        f"{stack.base}/v1/files/p/n.bin", headers={**user.auth, "OC-Checksum": f"SHA1:{sha1(data)}"}
    )
    assert unverifiable.status_code == 400 and error_code(unverifiable) == "checksum_unverifiable"

    # Expect: 100-continue with OC-Checksum: streamed (verified), not redirected.
    streamed = requests.put(
        f"{stack.base}/v1/files/p/v.bin",
        data=data,
        headers={**user.auth, "Expect": "100-continue", "OC-Checksum": f"SHA1:{sha1(data)}"},
        allow_redirects=False,
    )
    assert streamed.status_code == 201 and head(stack, user, "p/v.bin").headers["OC-Checksum"] == f"SHA1:{sha1(data)}"


def test_another_users_facts_never_leak(stack, user):
    other = stack.new_user()
    mine = os.urandom(100)
    assert put(stack, user, "same/name.txt", mine, **{"X-OC-Mtime": str(MTIME)}).status_code == 201
    theirs = os.urandom(100)
    assert put(stack, other, "same/name.txt", theirs).status_code == 201
    got = head(stack, other, "same/name.txt")
    assert got.headers["Last-Modified"] != http_date(MTIME)
    assert got.headers["OC-Checksum"] == f"SHA1:{sha1(theirs)}"
    assert propfind_files(f"{stack.base}/v1/files/same/", other)["name.txt"]["checksums"].startswith(
        f"SHA1:{sha1(theirs)}"
    )
    # The other user's listings and WebDAV never see this user's facts.
    assert head(stack, user, "same/name.txt").headers["OC-Checksum"] == f"SHA1:{sha1(mine)}"
    listed = requests.get(f"{stack.base}/v1/files", headers=other.auth).json()["files"]
    assert [f["sha1"] for f in listed] == [sha1(theirs)]
    assert datetime.fromisoformat(listed[0]["last_modified"].replace("Z", "+00:00")) > datetime(
        2025, 1, 1, tzinfo=timezone.utc
    )
