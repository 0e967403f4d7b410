"""Uploads a client sends straight to the store (drive/direct.py, docs/my-drive.md "Direct uploads"):
a mint's declared MD5, and multipart uploads the gateway starts, mints parts for and completes,
each tried the way a hostile tenant would."""

from __future__ import annotations

import base64
import hashlib
import os
from datetime import timedelta

import pytest
import requests
from sqlalchemy import update

from drive.store import ObjectNotFound
from gateway.models import QuotaHold, utcnow

pytestmark = pytest.mark.parametrize("stack", ["rclone-sqlite", "rclone-postgres"], indirect=True)

PART = 5 << 20  # the test stacks' upload_part_bytes


def md5_hex(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def start(stack, user, path: str, size: int, **headers) -> requests.Response:
    return requests.post(f"{stack.base}/v1/files/{path}", params={"uploads": ""},
                         headers={**user.auth, "X-Content-Length": str(size), **headers})


def part_url(stack, user, path: str, upload_id: str, number, **headers) -> requests.Response:
    return requests.post(f"{stack.base}/v1/files/{path}", params={"uploadId": upload_id, "partNumber": number},
                         headers={**user.auth, **headers})


def complete(stack, user, path: str, upload_id: str, parts, **headers) -> requests.Response:
    return requests.post(f"{stack.base}/v1/files/{path}", params={"uploadId": upload_id}, json={"parts": parts},
                         headers={**user.auth, **headers})


def send_parts(stack, user, path: str, upload_id: str, payload: bytes) -> list[dict]:
    parts = []
    for number, offset in enumerate(range(0, len(payload), PART), start=1):
        grant = part_url(stack, user, path, upload_id, number)
        assert grant.status_code == 200, grant.text
        sent = requests.put(grant.json()["url"], data=payload[offset:offset + PART])
        assert sent.status_code == 200, sent.text
        parts.append({"number": number, "etag": sent.headers["ETag"].strip('"')})
    return parts


def usage(stack, user) -> dict:
    return requests.get(f"{stack.base}/v1/files", params={"prefix": "no-such/"}, headers=user.auth).json()["quota"]


def test_a_minted_md5_is_checked_by_the_store_and_reported_only_when_it_vouches(stack, user):
    payload = os.urandom(100_000)
    other = os.urandom(100_000)
    mint = requests.post(f"{stack.base}/v1/files/md5/a.bin", headers={
        **user.auth, "X-Content-Length": str(len(payload)), "X-Content-MD5": md5_hex(payload), "X-OC-Mtime": "1600000000"})
    assert mint.status_code == 200, mint.text
    grant = mint.json()
    assert grant["headers"]["Content-MD5"] == base64.b64encode(hashlib.md5(payload).digest()).decode()
    # Other bytes under the declared MD5: the store refuses them; without the header, the signature.
    assert requests.put(grant["url"], data=other, headers=grant["headers"]).status_code == 400
    no_header = {k: v for k, v in grant["headers"].items() if k != "Content-MD5"}
    assert requests.put(grant["url"], data=other, headers=no_header).status_code == 403
    assert requests.head(f"{stack.base}/v1/files/md5/a.bin", headers=user.auth).status_code == 404
    assert requests.put(grant["url"], data=payload, headers=grant["headers"]).status_code == 200
    head = requests.head(f"{stack.base}/v1/files/md5/a.bin", headers=user.auth)
    assert head.headers["OC-Checksum"] == f"MD5:{md5_hex(payload)}"
    assert head.headers["Last-Modified"] == "Sun, 13 Sep 2020 12:26:40 GMT"

    # A claim the bytes do not bear out is never reported: a second URL for the key declares an
    # MD5, but the bytes that land come through the first URL (declared nothing).
    first = requests.post(f"{stack.base}/v1/files/md5/b.bin", headers={**user.auth, "X-Content-Length": "100000"}).json()
    lie = requests.post(f"{stack.base}/v1/files/md5/b.bin", headers={
        **user.auth, "X-Content-Length": "100000", "X-Content-MD5": md5_hex(payload)})
    assert lie.status_code == 200
    assert requests.put(first["url"], data=other, headers=first["headers"]).status_code == 200
    head = requests.head(f"{stack.base}/v1/files/md5/b.bin", headers=user.auth)
    assert md5_hex(payload) not in head.headers.get("OC-Checksum", "") + head.headers.get("Digest", "")


@pytest.mark.parametrize("value", ["abc", "z" * 32, md5_hex(b"x")[:31], "A" * 23 + "=", "=" * 24])
def test_a_bad_md5_is_a_400(stack, user, value):
    reply = requests.post(f"{stack.base}/v1/files/md5/bad.bin",
                          headers={**user.auth, "X-Content-Length": "3", "X-Content-MD5": value})
    assert (reply.status_code, reply.json()["error_code"]) == (400, "bad_md5")


def test_md5_without_a_length_is_a_400(stack, user):
    reply = requests.post(f"{stack.base}/v1/files/md5/c.bin", headers={**user.auth, "X-Content-MD5": md5_hex(b"")})
    assert (reply.status_code, reply.json()["error_code"]) == (400, "md5_needs_length")


def test_a_multipart_upload_sent_straight_to_the_store(stack, user):
    payload = os.urandom(2 * PART + 1000)
    before = usage(stack, user)["used_bytes"]
    started = start(stack, user, "mp/w.bin", len(payload))
    assert started.status_code == 201, started.text
    plan = started.json()
    assert (plan["parts"], plan["part_bytes"], plan["size"]) == (3, PART, len(payload))
    upload_id = plan["upload_id"]
    # The declared size is held while the parts travel.
    held = usage(stack, user)
    parts = send_parts(stack, user, "mp/w.bin", upload_id, payload)
    done = complete(stack, user, "mp/w.bin", upload_id, parts, **{"X-OC-Mtime": "1650000000",
                                                                  "X-Content-MD5": md5_hex(payload)})
    assert done.status_code == 201, done.text
    assert done.json()["size"] == len(payload) and done.json()["md5"] == md5_hex(payload)
    assert requests.get(f"{stack.base}/v1/files/mp/w.bin", headers=user.auth).content == payload
    assert usage(stack, user)["used_bytes"] == before + len(payload)
    assert held["used_bytes"] == before
    # Done: its id no longer mints, completes or aborts anything.
    assert part_url(stack, user, "mp/w.bin", upload_id, 1).status_code == 404
    assert complete(stack, user, "mp/w.bin", upload_id, parts).status_code == 404
    gone = requests.delete(f"{stack.base}/v1/files/mp/w.bin", params={"uploadId": upload_id}, headers=user.auth)
    assert (gone.status_code, gone.json()["error_code"]) == (404, "no_such_upload")


def test_a_part_url_holds_its_part_to_its_length_and_its_upload(stack, user):
    upload_id = start(stack, user, "mp/h.bin", PART + 10).json()["upload_id"]
    for number in ("0", "3", "-1", "abc", "1" * 9):
        reply = part_url(stack, user, "mp/h.bin", upload_id, number)
        assert (reply.status_code, reply.json()["error_code"]) == (400, "bad_part"), number
    # Another file's name, another upload id, another user: no such upload.
    assert part_url(stack, user, "mp/other.bin", upload_id, 1).status_code == 404
    assert part_url(stack, user, "mp/h.bin", "not-an-upload", 1).status_code == 404
    stranger = stack.new_user()
    assert part_url(stack, stranger, "mp/h.bin", upload_id, 1).status_code == 404
    # The last part is exactly 10 bytes: more, or fewer, are refused by the store.
    url = part_url(stack, user, "mp/h.bin", upload_id, 2).json()["url"]
    assert requests.put(url, data=b"x" * (PART + 10)).status_code == 403
    assert requests.put(url, data=b"x" * 9).status_code == 403
    assert requests.put(url, data=b"x" * 10).status_code == 200


@pytest.mark.parametrize("body", [
    {"parts": [{"number": 1, "etag": "x"}]},  # one missing
    {"parts": [{"number": 2, "etag": "x"}, {"number": 1, "etag": "x"}]},  # out of order
    {"parts": [{"number": 1, "etag": "x"}, {"number": 1, "etag": "x"}, {"number": 2, "etag": "x"}]},
    {"parts": [{"number": "1", "etag": "x"}, {"number": 2, "etag": "x"}]},
    {"parts": [{"number": 1, "etag": ""}, {"number": 2, "etag": "x"}]},
    {"parts": "all"},
    ["no"],
])
def test_a_bad_completion_is_a_400_and_the_upload_stays(stack, user, body):
    payload = os.urandom(PART + 10)
    upload_id = start(stack, user, "mp/c.bin", len(payload)).json()["upload_id"]
    reply = requests.post(f"{stack.base}/v1/files/mp/c.bin", params={"uploadId": upload_id}, json=body,
                          headers=user.auth)
    assert (reply.status_code, reply.json()["error_code"]) == (400, "bad_parts"), reply.text
    parts = send_parts(stack, user, "mp/c.bin", upload_id, payload)
    assert complete(stack, user, "mp/c.bin", upload_id, parts).status_code == 201


def test_parts_the_store_refuses_end_the_upload_and_its_hold(stack, user):
    payload = os.urandom(PART + 10)
    before = usage(stack, user)["used_bytes"]
    upload_id = start(stack, user, "mp/r.bin", len(payload)).json()["upload_id"]
    parts = send_parts(stack, user, "mp/r.bin", upload_id, payload)
    wrong = [parts[0], {"number": 2, "etag": md5_hex(b"not it")}]
    refused = complete(stack, user, "mp/r.bin", upload_id, wrong)
    assert (refused.status_code, refused.json()["error_code"]) == (400, "bad_parts"), refused.text
    assert requests.head(f"{stack.base}/v1/files/mp/r.bin", headers=user.auth).status_code == 404
    assert complete(stack, user, "mp/r.bin", upload_id, parts).status_code == 404
    assert usage(stack, user)["used_bytes"] == before
    with stack.server.app.state.sessions() as session:
        assert session.query(QuotaHold).filter(QuotaHold.upload_id == upload_id).count() == 0
    upload_id = start(stack, user, "mp/r.bin", len(payload)).json()["upload_id"]
    garbage = requests.post(f"{stack.base}/v1/files/mp/r.bin", params={"uploadId": upload_id},
                            data=b"{" * (2 << 20), headers=user.auth)
    assert garbage.status_code in (400, 404)


@pytest.mark.parametrize("size", [None, "0", "-5", "1e9", "9" * 19])
def test_a_multipart_upload_needs_a_size(stack, user, size):
    headers = {**user.auth, **({"X-Content-Length": size} if size is not None else {})}
    reply = requests.post(f"{stack.base}/v1/files/mp/s.bin", params={"uploads": ""}, headers=headers)
    assert (reply.status_code, reply.json()["error_code"]) == (400, "bad_content_length")


def test_the_quota_holds_a_multipart_upload_whole_and_an_abort_gives_it_back(stack, user, monkeypatch):
    monkeypatch.setattr(stack.settings, "user_quota_bytes", 3 * PART)
    refused = start(stack, user, "mp/q.bin", 3 * PART + 1)
    assert (refused.status_code, refused.json()["error_code"]) == (413, "quota_exceeded")
    upload_id = start(stack, user, "mp/q.bin", 2 * PART).json()["upload_id"]
    # The room it holds is not there for anything else...
    other = requests.put(f"{stack.base}/v1/files/mp/other.bin", data=os.urandom(PART + 1), headers=user.auth)
    assert other.status_code == 413
    # ...until it is aborted: its parts go from the store too.
    url = part_url(stack, user, "mp/q.bin", upload_id, 1).json()["url"]
    aborted = requests.delete(f"{stack.base}/v1/files/mp/q.bin", params={"uploadId": upload_id}, headers=user.auth)
    assert aborted.status_code == 204
    assert requests.put(url, data=os.urandom(PART)).status_code == 404
    assert requests.put(f"{stack.base}/v1/files/mp/other.bin", data=os.urandom(PART + 1),
                        headers=user.auth).status_code == 201


def test_a_drive_keeps_a_bounded_number_of_multipart_uploads_open(stack, user, monkeypatch):
    from drive import direct

    monkeypatch.setattr(direct, "MAX_OPEN_UPLOADS", 2)
    ids = [start(stack, user, f"mp/n{i}.bin", 10).json()["upload_id"] for i in range(2)]
    refused = start(stack, user, "mp/n2.bin", 10)
    assert (refused.status_code, refused.json()["error_code"]) == (429, "too_many_uploads")
    assert requests.delete(f"{stack.base}/v1/files/mp/n0.bin", params={"uploadId": ids[0]},
                           headers=user.auth).status_code == 204
    assert start(stack, user, "mp/n2.bin", 10).status_code == 201


def test_an_expired_multipart_upload_is_aborted_and_cannot_complete(stack, user):
    payload = os.urandom(PART + 10)
    upload_id = start(stack, user, "mp/e.bin", len(payload)).json()["upload_id"]
    parts = send_parts(stack, user, "mp/e.bin", upload_id, payload)
    with stack.server.app.state.sessions.begin() as session:
        session.execute(update(QuotaHold).where(QuotaHold.upload_id == upload_id)
                        .values(expires_at=utcnow() - timedelta(seconds=1)))
    assert usage(stack, user)["used_bytes"] >= 0  # reading the usage settles the drive's holds
    assert complete(stack, user, "mp/e.bin", upload_id, parts).status_code == 404
    user_key = f"users/{user.id}/mp/e.bin"
    with pytest.raises(ObjectNotFound):
        stack.store.upload_part(user_key, upload_id, 1, b"late")


def test_a_reader_of_a_shared_drive_starts_no_upload(stack, user):
    member = stack.new_user()
    slug = stack.new_org(user, member=member)
    reply = requests.post(f"{stack.base}/v1/shared/{slug}/x.bin", params={"uploads": ""},
                          headers={**member.auth, "X-Content-Length": "10"})
    assert (reply.status_code, reply.json()["error_code"]) == (403, "read_only")
    # Its writer does, with no quota to hold.
    payload = os.urandom(PART + 5)
    started = requests.post(f"{stack.base}/v1/shared/{slug}/x.bin", params={"uploads": ""},
                            headers={**user.auth, "X-Content-Length": str(len(payload))})
    assert started.status_code == 201, started.text
    upload_id = started.json()["upload_id"]
    parts = []
    for number, offset in ((1, 0), (2, PART)):
        grant = requests.post(f"{stack.base}/v1/shared/{slug}/x.bin",
                              params={"uploadId": upload_id, "partNumber": number}, headers=user.auth).json()
        sent = requests.put(grant["url"], data=payload[offset:offset + PART])
        parts.append({"number": number, "etag": sent.headers["ETag"].strip('"')})
    done = requests.post(f"{stack.base}/v1/shared/{slug}/x.bin", params={"uploadId": upload_id},
                         json={"parts": parts}, headers=user.auth)
    assert done.status_code == 201, done.text
    assert requests.get(f"{stack.base}/v1/shared/{slug}/x.bin", headers=member.auth).content == payload
