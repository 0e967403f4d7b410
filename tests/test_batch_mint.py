"""Batch mints (``POST FOLDER/?mint``, docs/my-drive.md "Many files at once"): presigned PUTs for
many files in one request, each by the single mint's rules, tried the way a hostile tenant would:
paths outside the drive, names twice, a batch past the quota, twenty batches racing for it, a
batch over the cap. Every refused file gets its own error and holds nothing."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from drive.listing import FOLDER_MARKER
from drive.store import iter_objects
from gateway.models import DriveUsage, QuotaHold

pytestmark = pytest.mark.parametrize("stack", ["rclone-sqlite", "rclone-postgres"], indirect=True)

MiB = 1 << 20


def mint(stack, user, files, folder: str = "", **kwargs) -> requests.Response:
    return requests.post(f"{stack.base}/v1/files/{folder}", params={"mint": ""}, json={"files": files},
                         headers=user.auth, timeout=60, **kwargs)


def reserved(stack, user) -> int:
    with stack.server.app.state.sessions() as session:
        row = session.get(DriveUsage, f"users/{user.id}/")
        return row.reserved_bytes if row is not None else 0


def holds(stack, user) -> int:
    with stack.server.app.state.sessions() as session:
        return session.query(QuotaHold).filter(QuotaHold.prefix == f"users/{user.id}/").count()


def stored(stack, user) -> dict[str, int]:
    prefix = f"users/{user.id}/"
    return {info.key[len(prefix):]: info.size for info in iter_objects(stack.store, prefix)}


def test_a_batch_mints_each_file_with_its_time_and_md5(stack, user):
    payloads = {f"b/{n}.bin": os.urandom(1000 + n) for n in range(3)}
    files = [{"path": path, "size": len(data), "mtime": 1600000000 + n, "md5": hashlib.md5(data).hexdigest()}
             for n, (path, data) in enumerate(payloads.items())]
    reply = mint(stack, user, files)
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert (body["minted"], body["refused"]) == (3, 0)
    assert [grant["path"] for grant in body["files"]] == list(payloads)
    assert reserved(stack, user) == sum(len(d) for d in payloads.values())
    for n, (grant, data) in enumerate(zip(body["files"], payloads.values())):
        assert grant["method"] == "PUT"
        assert grant["headers"]["Content-MD5"] == base64.b64encode(hashlib.md5(data).digest()).decode()
        # The length and the MD5 are signed in: other bytes are refused.
        assert requests.put(grant["url"], data=data[:-1], headers=grant["headers"]).status_code in (400, 403)
        assert requests.put(grant["url"], data=data, headers=grant["headers"]).status_code == 200
        head = requests.head(f"{stack.base}/v1/files/{grant['path']}", headers=user.auth)
        assert head.headers["OC-Checksum"] == f"MD5:{hashlib.md5(data).hexdigest()}"
        assert head.headers["Last-Modified"] == f"Sun, 13 Sep 2020 12:26:{40 + n} GMT"
    listing = requests.get(f"{stack.base}/v1/files", headers=user.auth).json()
    assert listing["quota"]["used_bytes"] == sum(len(d) for d in payloads.values())
    assert reserved(stack, user) == 0


def test_paths_are_relative_to_the_folder_the_post_names(stack, user):
    reply = mint(stack, user, [{"path": "x/y.bin", "size": 3}], folder="deep/er/")
    assert reply.status_code == 200, reply.text
    assert requests.put(reply.json()["files"][0]["url"], data=b"abc").status_code == 200
    assert stored(stack, user) == {"deep/er/x/y.bin": 3}
    on_a_file = mint(stack, user, [{"path": "z.bin", "size": 1}], folder="deep/er/x/y.bin")
    assert (on_a_file.status_code, on_a_file.json()["error_code"]) == (400, "not_a_folder")


def test_each_bad_file_gets_its_own_error_and_the_others_are_minted(stack, user):
    assert requests.put(f"{stack.base}/v1/files/taken/inside.bin", data=b"x", headers=user.auth).status_code == 201
    files = [
        {"path": "ok/1.bin", "size": 10},
        {"path": "../escape.bin", "size": 10},
        {"path": "/abs.bin", "size": 10},
        {"path": "a/../../b.bin", "size": 10},
        {"path": "folder/", "size": 10},
        {"path": f"x/{FOLDER_MARKER}", "size": 10},
        {"path": "bad\x00nul", "size": 10},
        {"path": "neg.bin", "size": -1},
        {"path": "str.bin", "size": "10"},
        {"path": "when.bin", "size": 10, "mtime": "yesterday"},
        {"path": "md5.bin", "size": 10, "md5": "not-an-md5"},
        {"path": "ok/1.bin", "size": 10},  # the second time
        {"path": "ok/2.bin", "size": 10},
        {"path": "ok/2.bin/under.bin", "size": 10},  # under a file of this batch
        {"path": "taken", "size": 10},  # a folder's name
        {"path": "taken/inside.bin/deeper.bin", "size": 10},  # under a file in the drive
        "not an object",
        {"size": 10},
    ]
    reply = mint(stack, user, files)
    assert reply.status_code == 200, reply.text
    answers = reply.json()["files"]
    assert len(answers) == len(files)
    codes = [a["error"]["error_code"] if "error" in a else "minted" for a in answers]
    assert codes == [
        "minted", "invalid_path", "invalid_path", "invalid_path", "is_a_folder", "reserved_name", "invalid_path",
        "bad_content_length", "bad_content_length", "bad_mtime", "bad_md5", "duplicate_path", "minted",
        "name_conflict", "name_conflict", "name_conflict", "bad_mint", "bad_mint",
    ]
    statuses = {a["error"]["error_code"]: a["error"]["status"] for a in answers if "error" in a}
    assert statuses["name_conflict"] == 409 and statuses["invalid_path"] == 400
    assert all(a["error"]["message"] for a in answers if "error" in a)
    assert reply.json()["minted"] == 2 and reply.json()["refused"] == 16
    # Only the two minted files hold room, and nothing of the refused ones reached the store.
    assert reserved(stack, user) == 20 and holds(stack, user) == 2
    assert stored(stack, user) == {"taken/inside.bin": 1}


@pytest.mark.parametrize(
    "body",
    [b"not json", b"[]", b'{"files": []}', b'{"files": {"path": "a"}}', b'{"other": 1}'],
)
def test_a_bad_body_is_a_400_envelope(stack, user, body):
    reply = requests.post(f"{stack.base}/v1/files/", params={"mint": ""}, data=body,
                          headers={**user.auth, "Content-Type": "application/json"})
    assert reply.status_code == 400
    assert reply.json()["error_code"] == "bad_mint" and reply.json()["trace_id"]
    assert holds(stack, user) == 0


def test_a_batch_over_the_cap_holds_nothing(stack, user):
    files = [{"path": f"cap/{n}.bin", "size": 1} for n in range(1001)]
    reply = mint(stack, user, files)
    assert (reply.status_code, reply.json()["error_code"]) == (400, "too_many_files")
    huge = json.dumps({"files": [{"path": "p" * 250 + f"/{n}", "size": 1} for n in range(9000)]}).encode()
    assert len(huge) > 2 * MiB
    reply = requests.post(f"{stack.base}/v1/files/", params={"mint": ""}, data=huge,
                          headers={**user.auth, "Content-Type": "application/json"})
    assert (reply.status_code, reply.json()["error_code"]) == (400, "bad_mint")
    assert holds(stack, user) == 0 and reserved(stack, user) == 0
    assert mint(stack, user, files[:1000]).json()["minted"] == 1000  # the cap itself is allowed


def test_a_batch_past_the_quota_mints_what_fits_in_order(stack, user, monkeypatch):
    monkeypatch.setattr(stack.settings, "user_quota_bytes", 4 * MiB + 100)
    files = [{"path": f"q/{n:02d}.bin", "size": MiB} for n in range(6)] + [{"path": "q/small.bin", "size": 10}]
    answers = mint(stack, user, files).json()["files"]
    codes = [a["error"]["error_code"] if "error" in a else "minted" for a in answers]
    # The first four fit; the next two do not, each refused alone; the small one still fits.
    assert codes == ["minted"] * 4 + ["quota_exceeded"] * 2 + ["minted"]
    assert answers[4]["error"]["status"] == 413
    assert reserved(stack, user) == 4 * MiB + 10
    again = mint(stack, user, [{"path": "q/more.bin", "size": MiB}]).json()["files"][0]
    assert again["error"]["error_code"] == "quota_exceeded"
    assert reserved(stack, user) == 4 * MiB + 10


def test_twenty_batches_at_once_never_pass_the_quota(stack, user, monkeypatch):
    quota = 4 * MiB
    monkeypatch.setattr(stack.settings, "user_quota_bytes", quota)
    requests.request("MKCOL", f"{stack.base}/v1/dav/race/", headers=user.auth)  # see test_quota_concurrency
    start = threading.Barrier(20)

    def batch(n: int) -> list[tuple[dict, bytes]]:
        files = [{"path": f"race/{n:02d}-{i}.bin", "size": MiB // 2} for i in range(3)]
        start.wait()
        reply = mint(stack, user, files)
        assert reply.status_code == 200, reply.text
        return [(answer, os.urandom(MiB // 2)) for answer in reply.json()["files"] if "error" not in answer]

    with ThreadPoolExecutor(max_workers=20) as pool:
        granted = [item for items in pool.map(batch, range(20)) for item in items]
    assert len(granted) * (MiB // 2) <= quota
    assert len(granted) == quota // (MiB // 2)  # every byte of room went to some batch
    assert reserved(stack, user) <= quota
    for answer, data in granted:
        assert requests.put(answer["url"], data=data, headers=answer["headers"]).status_code == 200
    assert sum(stored(stack, user).values()) <= quota
    listing = requests.get(f"{stack.base}/v1/files", headers=user.auth).json()
    assert listing["quota"]["used_bytes"] <= quota


def test_a_reader_of_a_shared_drive_mints_nothing(stack, user):
    member = stack.new_user()
    slug = stack.new_org(user, member=member)
    files = {"files": [{"path": "x.bin", "size": 1}]}
    reply = requests.post(f"{stack.base}/v1/shared/{slug}/", params={"mint": ""}, json=files, headers=member.auth)
    assert (reply.status_code, reply.json()["error_code"]) == (403, "read_only")
    owner = requests.post(f"{stack.base}/v1/shared/{slug}/", params={"mint": ""}, json=files, headers=user.auth)
    assert owner.status_code == 200 and owner.json()["minted"] == 1, owner.text
    assert requests.put(owner.json()["files"][0]["url"], data=b"z").status_code == 200
    assert requests.head(f"{stack.base}/v1/shared/{slug}/x.bin", headers=user.auth).status_code == 200


def test_a_batch_asks_the_store_about_each_folder_above_its_files_once(stack, user, monkeypatch):
    asked: list[str] = []
    head = stack.store.head
    monkeypatch.setattr(stack.store, "head", lambda key: asked.append(key) or head(key))
    files = [{"path": f"deep/er/f{n}.bin", "size": 1} for n in range(12)] + [{"path": "deep/top.bin", "size": 1}]
    assert mint(stack, user, files).json()["minted"] == 13
    prefix = f"users/{user.id}/"
    assert asked.count(prefix + "deep") == 1 and asked.count(prefix + "deep/er") == 1
    # deep/top.bin, alone in its folder, is asked about itself (what it replaces).
    assert prefix + "deep/top.bin" in asked


def test_a_folder_of_many_files_in_a_batch_is_listed_once_not_asked_twice_a_file(stack, user, monkeypatch):
    """Twelve files of one folder: one listing of the folder answers what each replaces and whether
    a folder has its name, by the single mint's rules and in its words."""
    auth = user.auth
    assert requests.put(f"{stack.base}/v1/files/many/old.bin", data=b"x" * 100, headers=auth).status_code == 201
    assert requests.put(f"{stack.base}/v1/files/many/sub/inside.bin", data=b"y", headers=auth).status_code == 201
    single = requests.post(f"{stack.base}/v1/files/many/sub", headers={**auth, "X-Content-Length": "5"}, timeout=30)
    assert single.status_code == 409, single.text
    listed: list[str] = []
    asked: list[str] = []
    list_page, head = stack.store.list_page, stack.store.head
    monkeypatch.setattr(stack.store, "list_page", lambda prefix, *a, **k: listed.append(prefix) or list_page(prefix, *a, **k))
    monkeypatch.setattr(stack.store, "head", lambda key: asked.append(key) or head(key))
    files = [{"path": f"many/f{n}.bin", "size": 10} for n in range(10)]
    files += [{"path": "many/old.bin", "size": 30}, {"path": "many/sub", "size": 5}]
    reply = mint(stack, user, files)
    assert reply.status_code == 200, reply.text
    answers = reply.json()["files"]
    assert [a.get("error", {}).get("error_code", "minted") for a in answers] == ["minted"] * 11 + ["name_conflict"]
    assert answers[-1]["error"]["message"] == single.json()["message"]
    prefix = f"users/{user.id}/"
    assert prefix + "many/" in listed  # (a settle of the drive's URLs may list it again)
    assert not [p for p in listed if p.startswith(prefix + "many/f")]  # no folder_named listing a file
    assert not [key for key in asked if key.startswith(prefix + "many/f")]  # nor a HEAD of one
    # old.bin (100 bytes) is known as what 30 bytes replace: they need no more room; 10 x 10 new bytes do.
    assert reserved(stack, user) == 10 * 10



def test_settling_many_uploads_of_one_folder_lists_it_once(stack, user, monkeypatch):
    """Twelve presigned PUTs landed in one folder, one still out and one replaced: the next reading
    of the usage settles them from one listing of the folder (not a HEAD each), counting exactly
    what arrived and keeping the hold of the one not sent yet."""
    assert requests.put(f"{stack.base}/v1/files/set/old.bin", data=b"o" * 50, headers=user.auth).status_code == 201
    files = [{"path": f"set/f{n}.bin", "size": 10 + n} for n in range(12)] + [{"path": "set/old.bin", "size": 80}]
    files.append({"path": "set/later.bin", "size": 7})
    grants = mint(stack, user, files).json()["files"]
    for grant, asked in zip(grants, files):
        if asked["path"] != "set/later.bin":
            body = b"o" * 80 if asked["path"] == "set/old.bin" else os.urandom(asked["size"])
            assert requests.put(grant["url"], data=body, headers=grant["headers"], timeout=30).status_code == 200
    listed: list[str] = []
    asked_keys: list[str] = []
    list_page, head = stack.store.list_page, stack.store.head
    monkeypatch.setattr(stack.store, "list_page", lambda prefix, *a, **k: listed.append(prefix) or list_page(prefix, *a, **k))
    monkeypatch.setattr(stack.store, "head", lambda key: asked_keys.append(key) or head(key))
    quota = requests.get(f"{stack.base}/v1/files", params={"prefix": "none/"}, headers=user.auth).json()["quota"]
    assert quota["used_bytes"] == sum(10 + n for n in range(12)) + 80
    prefix = f"users/{user.id}/"
    assert listed.count(prefix + "set/") == 1
    assert not [key for key in asked_keys if key.startswith(prefix + "set/")]
    assert holds(stack, user) == 1 and reserved(stack, user) == 7  # later.bin: still out


def test_the_folders_of_a_batch_are_listed_at_once_not_one_after_another(stack, user, monkeypatch):
    """A batch over three folders of four files each: their three listings are in flight together
    (each waits for the other two here, which listings made one after another never see)."""
    prefix = f"users/{user.id}/"
    folders = [f"{prefix}spread/{name}/" for name in ("a", "b", "c")]
    together = threading.Barrier(len(folders), timeout=20)
    list_page = stack.store.list_page

    def listing(folder, *args, **kwargs):
        if folder in folders:
            together.wait()  # BrokenBarrierError unless all three are being listed at once
        return list_page(folder, *args, **kwargs)

    monkeypatch.setattr(stack.store, "list_page", listing)
    files = [{"path": f"spread/{name}/f{n}.bin", "size": 3} for name in ("a", "b", "c") for n in range(4)]
    reply = mint(stack, user, files)
    assert reply.status_code == 200, reply.text
    assert reply.json()["minted"] == 12
    assert not together.broken
