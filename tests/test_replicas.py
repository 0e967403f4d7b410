"""Gateway replicas: two `kgpu serve` processes, each with a data directory of its own (as two
machines would have), on one PostgreSQL. What one books, reissues or grants, the other sees."""

from __future__ import annotations

import json
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Iterator

import psycopg
import pytest
import requests

from tests.conftest import passable
from tests.test_serve import Served

ADMIN = {"Authorization": "Bearer serve-test-admin"}
INVENTORY = json.dumps([{"node": "n1", "gpu_model": "TestGPU", "count": 2, "price_per_hour_credits": 10}])


@pytest.fixture
def replicas(tmp_path, postgres_url):
    settings = {"KGPU_DATABASE_URL": postgres_url, "KGPU_GPU_INVENTORY": INVENTORY, "KGPU_LOCAL_POD_MOUNTS": "false"}
    base = passable(tmp_path)
    first = Served(base / "one", settings)
    second = Served(base / "two", settings)
    yield first, second
    for server in (first, second):
        server.process.terminate()
        server.process.wait(timeout=15)
    # Pods outlive their gateway by design; the suite's (a sandbox and a disk each) must not.
    from gateway.pods.local import LocalPodBackend

    for folder in (base / "one" / "pods", base / "two" / "pods"):
        if folder.is_dir():
            backend = LocalPodBackend(folder)
            for ref in backend.adopt().values():
                backend.destroy(ref)


def on_one_bucket(postgres_url: str, rclone_target, bucket: str, **extra: str) -> dict[str, str]:
    """The settings of replicas that share a bucket of the test store as well as the database."""
    return {
        "KGPU_DATABASE_URL": postgres_url, "KGPU_GPU_INVENTORY": INVENTORY, "KGPU_LOCAL_POD_MOUNTS": "false",
        "KGPU_S3_ENDPOINT_URL": rclone_target.endpoint, "KGPU_S3_ACCESS_KEY_ID": rclone_target.access_key,
        "KGPU_S3_SECRET_ACCESS_KEY": rclone_target.secret_key, "KGPU_S3_BUCKET": bucket, **extra,
    }


def test_no_gpu_is_booked_twice_across_replicas(replicas):
    first, second = replicas
    tokens = []
    for i in range(10):
        reply = requests.post(f"{first.base}/v1/admin/users", json={"email": f"renter{i}@lab.example"}, headers=ADMIN)
        tokens.append(reply.json()["token"])

    def rent(i):
        server = (first, second)[i % 2]
        return requests.post(f"{server.base}/v1/gpus", json={"name": f"r{i}", "gpu_count": 1},
                             headers={"Authorization": f"Bearer {tokens[i]}"}, timeout=60)

    with ThreadPoolExecutor(10) as pool:
        replies = list(pool.map(rent, range(10)))
    booked = [r.json() for r in replies if r.status_code == 201]
    refused = [r.json()["error_code"] for r in replies if r.status_code != 201]
    assert len(booked) == 2, [r.text for r in replies]
    assert refused == ["no_capacity"] * 8
    assert len({b["gpu_id"] for b in booked}) == 2


def test_exactly_one_live_token_after_concurrent_reissues(replicas, postgres_url):
    first, second = replicas
    user_id = requests.post(f"{first.base}/v1/admin/users", json={"email": "reissued@lab.example"}, headers=ADMIN).json()["user"]["id"]

    def reissue(i):
        server = (first, second)[i % 2]
        return requests.post(f"{server.base}/v1/admin/users/{user_id}/token", headers=ADMIN, timeout=60)

    with ThreadPoolExecutor(20) as pool:
        replies = list(pool.map(reissue, range(40)))
    assert all(r.status_code == 201 for r in replies), [r.text for r in replies if r.status_code != 201]
    url = postgres_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(url) as conn:
        live = conn.execute(
            "SELECT count(*) FROM api_tokens WHERE user_id = %s AND revoked_at IS NULL AND rental_id IS NULL", (user_id,)
        ).fetchone()[0]
    assert live == 1


def test_a_balance_never_goes_below_zero_under_concurrent_grants(replicas):
    first, second = replicas
    user_id = requests.post(f"{first.base}/v1/admin/users", json={"email": "granted@lab.example", "credits": 1000}, headers=ADMIN).json()["user"]["id"]

    def grant(i):
        server = (first, second)[i % 2]
        return requests.post(f"{server.base}/v1/admin/users/{user_id}/credits", json={"credits": -30}, headers=ADMIN, timeout=60)

    with ThreadPoolExecutor(25) as pool:
        replies = list(pool.map(grant, range(50)))
    accepted = sum(r.status_code == 200 for r in replies)
    assert all(r.status_code in (200, 422) for r in replies), [r.text for r in replies]
    listed = requests.get(f"{second.base}/v1/admin/users", headers=ADMIN).json()["users"]
    balance = next(u["credits"] for u in listed if u["id"] == user_id)
    assert balance == 1000 - 30 * accepted and balance >= 0
    assert accepted == 1000 // 30


def test_neither_replica_ends_the_others_rentals(tmp_path, postgres_url):
    """Each gateway sees only its own pods: the other's reaper leaves them alone, and a return
    asked of the other is handed to the one that runs the pod (which flushes and removes it)."""
    own_node = json.dumps([{"node": "n2", "gpu_model": "OtherGPU", "count": 1, "price_per_hour_credits": 10}])
    settings = {  # a node of its own: the session's database keeps the other tests' rentals
        "KGPU_DATABASE_URL": postgres_url, "KGPU_GPU_INVENTORY": own_node, "KGPU_LOCAL_POD_MOUNTS": "false",
        "KGPU_REAPER_INTERVAL_SECONDS": "0.3",
    }
    base = passable(tmp_path)
    first, second = Served(base / "one", settings), Served(base / "two", settings)
    try:
        token = requests.post(f"{first.base}/v1/admin/users", json={"email": "owner@lab.example"}, headers=ADMIN).json()["token"]
        auth = {"Authorization": f"Bearer {token}"}
        rented = requests.post(f"{first.base}/v1/gpus", json={"name": "mine"}, headers=auth)
        assert rented.status_code == 201, rented.text
        gpu = rented.json()["gpu_id"]
        pod = base / "one" / "pods" / gpu
        time.sleep(3)  # ten ticks of each reaper
        state = requests.get(f"{second.base}/v1/gpus/{gpu}", headers=auth).json()
        assert state.get("phase") == "Running" and state.get("ended_at") is None, state
        assert pod.is_dir()
        handed = requests.delete(f"{second.base}/v1/gpus/{gpu}", headers=auth)
        assert handed.status_code == 200 and handed.json()["phase"] in ("Terminating", "Ended"), handed.text
        deadline = time.monotonic() + 30
        while requests.get(f"{second.base}/v1/gpus/{gpu}", headers=auth).json()["phase"] != "Ended":
            assert time.monotonic() < deadline, "the gateway that runs the pod never finished the return"
            time.sleep(0.2)
        assert not pod.exists()
        ended = requests.get(f"{first.base}/v1/gpus/{gpu}", headers=auth).json()
        assert ended["end_reason"] == "returned", ended
    finally:
        for server in (first, second):
            server.process.terminate()
            server.process.wait(timeout=15)


LOCK_BODY = (
    b'<?xml version="1.0"?><D:lockinfo xmlns:D="DAV:"><D:lockscope><D:exclusive/></D:lockscope>'
    b"<D:locktype><D:write/></D:locktype><D:owner>replica test</D:owner></D:lockinfo>"
)
PATCH_BODY = (
    b'<?xml version="1.0"?><D:propertyupdate xmlns:D="DAV:" xmlns:K="urn:kgpu:replica">'
    b"<D:set><D:prop><K:colour>teal</K:colour></D:prop></D:set></D:propertyupdate>"
)


def test_webdav_locks_and_properties_are_shared_by_replicas(tmp_path, postgres_url, rclone_target):
    """Both gateways on one database and one bucket: a lock or a dead property written through one
    holds through the other."""
    settings = on_one_bucket(postgres_url, rclone_target, "replicas-dav")
    base = passable(tmp_path)
    first, second = Served(base / "one", settings), Served(base / "two", settings)
    try:
        token = requests.post(f"{first.base}/v1/admin/users", json={"email": "davlock@lab.example"}, headers=ADMIN).json()["token"]
        auth = {"Authorization": f"Bearer {token}"}
        a, b = f"{first.base}/v1/files/shared.txt", f"{second.base}/v1/files/shared.txt"
        assert requests.put(a, data=b"v1", headers=auth).status_code == 201

        locked = requests.request("LOCK", a, data=LOCK_BODY, headers={**auth, "Timeout": "Second-600"})
        assert locked.status_code == 200, locked.text
        lock_token = locked.headers["Lock-Token"]
        refused = requests.put(b, data=b"v2", headers=auth)
        assert refused.status_code == 423 and refused.json()["error_code"] == "locked", refused.text
        assert requests.request("PUT", f"{second.base}/v1/dav/shared.txt", data=b"v2", headers=auth).status_code == 423
        assert requests.put(b, data=b"v2", headers={**auth, "If": f"({lock_token})"}).status_code == 200

        assert requests.request("PROPPATCH", a, data=PATCH_BODY, headers={**auth, "If": f"({lock_token})"}).status_code == 207
        seen = requests.request("PROPFIND", b, headers={**auth, "Depth": "0"})
        assert seen.status_code == 207 and b"teal" in seen.content and lock_token.strip("<>").encode() in seen.content

        assert requests.request("UNLOCK", b, headers={**auth, "Lock-Token": lock_token}).status_code == 204
        assert requests.put(a, data=b"v3", headers=auth).status_code == 200
        assert requests.get(b, headers=auth).content == b"v3"

        def lock(i):  # the same file, at once, through both
            url = (a, b)[i % 2]
            return requests.request("LOCK", url, data=LOCK_BODY, headers={**auth, "Timeout": "Second-600"}, timeout=60)

        with ThreadPoolExecutor(12) as pool:
            statuses = sorted(reply.status_code for reply in pool.map(lock, range(12)))
        assert statuses == [200] + [423] * 11, statuses
    finally:
        for server in (first, second):
            server.process.terminate()
            server.process.wait(timeout=15)


def test_writes_of_one_file_through_both_replicas_count_it_once(tmp_path, postgres_url, rclone_target):
    """Issue 19, item 11, across gateways: an overwrite streamed through one replica while the
    other MOVEs the same file; then DELETEs of one file through both at once. Writes to one key
    are one at a time across replicas (the drive_writes leases, taken under a PostgreSQL advisory
    lock): the MOVE is refused (423 busy) while the PUT runs, the file is freed once, and the
    quota counts what the drive holds."""
    quota = 4 << 20
    settings = on_one_bucket(postgres_url, rclone_target, "replicas-quota", KGPU_USER_QUOTA_BYTES=str(quota))
    base = passable(tmp_path)
    first, second = Served(base / "one", settings), Served(base / "two", settings)
    database = postgres_url.replace("postgresql+psycopg://", "postgresql://")
    try:
        created = requests.post(f"{first.base}/v1/admin/users", json={"email": "race@lab.example"}, headers=ADMIN).json()
        auth, prefix = {"Authorization": f"Bearer {created['token']}"}, f"users/{created['user']['id']}/"

        def drive() -> tuple[dict[str, int], int]:
            listing = requests.get(f"{second.base}/v1/files", headers=auth).json()
            with psycopg.connect(database) as conn:
                used = conn.execute("SELECT used_bytes FROM drive_usage WHERE prefix = %s", (prefix,)).fetchone()[0]
            return {item["path"]: item["size"] for item in listing["files"]}, used

        assert requests.put(f"{first.base}/v1/files/race.bin", data=b"1" * quota, headers=auth).status_code == 201
        moved = threading.Event()

        def body():
            yield b"2" * (1 << 20)
            moved.wait(60)
            yield b"2" * (quota - (1 << 20))

        with ThreadPoolExecutor(1) as pool:
            put = pool.submit(requests.put, f"{first.base}/v1/files/race.bin", data=body(), headers=auth, timeout=90)
            deadline = time.monotonic() + 30
            while True:  # the PUT holds the file once its streamed reservation is open
                with psycopg.connect(database) as conn:
                    if conn.execute("SELECT count(*) FROM quota_holds WHERE prefix = %s AND kind = 'stream'", (prefix,)).fetchone()[0]:
                        break
                assert time.monotonic() < deadline and not put.done()
                time.sleep(0.05)
            move = requests.request(
                "MOVE", f"{second.base}/v1/files/race.bin",
                headers={**auth, "Destination": f"{second.base}/v1/files/moved.bin"}, timeout=60,
            )
            moved.set()
            assert put.result().status_code == 200, put.result().text
        assert move.status_code == 423 and move.json()["error_code"] == "busy", move.text
        assert drive() == ({"race.bin": quota}, quota)

        def delete(i):
            server = (first, second)[i % 2]
            return requests.delete(f"{server.base}/v1/files/race.bin", headers=auth, timeout=60).status_code

        with ThreadPoolExecutor(6) as pool:
            statuses = list(pool.map(delete, range(6)))
        assert statuses.count(204) >= 1 and set(statuses) <= {204, 404, 423}, statuses
        assert drive() == ({}, 0)
    finally:
        for server in (first, second):
            server.process.terminate()
            server.process.wait(timeout=15)


@contextmanager
def two_gateways(tmp_path, settings: dict[str, str]) -> Iterator[tuple[Served, Served]]:
    base = passable(tmp_path)
    first, second = Served(base / "one", settings), Served(base / "two", settings)
    try:
        yield first, second
    finally:
        for server in (first, second):
            server.process.terminate()
            server.process.wait(timeout=15)


def test_a_cached_listing_shows_writes_made_through_the_other_replica(tmp_path, postgres_url, rclone_target):
    """Each gateway keeps its folder listings (drive/store/caching.py); a write through the other,
    streamed or through a URL it handed out, shows in the very next listing (the drive's
    generation and the URLs out, in the database)."""
    with two_gateways(tmp_path, on_one_bucket(postgres_url, rclone_target, "replicas-listings")) as (first, second):
        created = requests.post(f"{first.base}/v1/admin/users", json={"email": "lister@lab.example"}, headers=ADMIN)
        auth = {"Authorization": f"Bearer {created.json()['token']}"}

        def listed() -> list[str]:  # PROPFIND Depth 1 through the first gateway
            reply = requests.request("PROPFIND", f"{first.base}/v1/files/f/", headers={**auth, "Depth": "1"})
            assert reply.status_code == 207, reply.text
            return sorted(set(re.findall(r"/v1/files/f/([^<]+)</", reply.text)))

        assert requests.put(f"{first.base}/v1/files/f/a.txt", data=b"a", headers=auth).status_code == 201
        assert listed() == ["a.txt"]
        assert listed() == ["a.txt"]  # cached now
        assert requests.put(f"{second.base}/v1/files/f/b.txt", data=b"b", headers=auth).status_code == 201
        assert listed() == ["a.txt", "b.txt"]
        gone = requests.request("DELETE", f"{second.base}/v1/dav/f/a.txt", headers=auth)
        assert gone.status_code == 204
        assert listed() == ["b.txt"]
        minted = requests.post(f"{second.base}/v1/files/f/c.txt", headers={**auth, "X-Content-Length": "1"}).json()
        assert listed() == ["b.txt"]
        assert requests.put(minted["url"], data=b"c", headers=minted["headers"]).status_code == 200
        assert listed() == ["b.txt", "c.txt"]
