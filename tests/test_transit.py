"""Transit objects (issue 22, item 2; docs/transit-objects.md): mint with a declared size, upload
once with the presigned PUT, fetch from many pods with one presigned GET; gone 24 h after the
mint (a sweep on the reaper's tick, on every gateway, after restarts); a per-user quota that
parallel mints never pass; another user's objects are not found."""

from __future__ import annotations

import hashlib
import json
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest
import requests
from sqlalchemy import select

from drive.store import iter_objects
import gateway.transit
from gateway.db import make_engine, make_sessionmaker
from gateway.models import DriveUsage, TransitObject
from gateway.transit import MAX_OBJECT_BYTES, TransitObjects, transit_prefix
from tests.conftest import LiveServer, make_settings
from tests.test_rentals import Clock, faked_clock, run

MiB = 1 << 20


@pytest.fixture
def clock(stack):
    with faked_clock(stack.server.app.state.transit) as fake:
        yield fake


def mint(account, size: int, label: str = "data", base: str | None = None) -> requests.Response:
    return requests.post(
        f"{base or account.base}/v1/objects", json={"label": label, "size_bytes": size}, headers=account.auth
    )


def minted(account, data: bytes, label: str = "data") -> dict:
    reply = mint(account, len(data), label)
    assert reply.status_code == 201, reply.text
    body = reply.json()
    put = requests.put(body["put_url"], data=data)
    assert put.status_code == 200, put.text
    return body


def listing(account) -> dict:
    reply = requests.get(f"{account.base}/v1/objects", headers=account.auth)
    assert reply.status_code == 200, reply.text
    return reply.json()


def stored(stack, account) -> dict[str, int]:
    prefix = transit_prefix(account.id)
    return {info.key[len(prefix):]: info.size for info in iter_objects(stack.store, prefix)}


def object_count(stack) -> int:
    with stack.server.app.state.sessions() as session:
        return len(session.scalars(select(TransitObject.id)).all())


def usage_row(stack, account) -> DriveUsage:
    with stack.server.app.state.sessions() as session:
        return session.get(DriveUsage, transit_prefix(account.id))


def test_mint_upload_list_fetch_delete(stack, user):
    data = os.urandom(100_000)
    body = minted(user, data, "mit-bih")
    assert body["object_id"].startswith("obj-") and body["size_bytes"] == len(data) and body["method"] == "PUT"
    assert (body["label"], body["headers"]) == ("mit-bih", {"Content-Length": str(len(data))})
    objects = listing(user)["objects"]
    assert [(o["object_id"], o["label"], o["size_bytes"]) for o in objects] == [(body["object_id"], "mit-bih", len(data))]
    assert objects[0]["expires_at"] == body["expires_at"]
    fetched = requests.get(f"{stack.base}/v1/objects/{body['object_id']}", headers=user.auth)
    assert fetched.status_code == 200, fetched.text
    assert fetched.json()["expires_at"] == body["expires_at"]
    # One get_url serves many clients, again and again within its hour.
    url = fetched.json()["get_url"]
    for _ in range(3):
        assert requests.get(url).content == data
    assert stored(stack, user) == {body["object_id"]: len(data)}
    # The drive sees none of it: its listing and its quota are apart.
    drive = requests.get(f"{stack.base}/v1/files?json=1", headers=user.auth).json()
    assert "transit" not in json.dumps(drive["entries"] if "entries" in drive else drive)
    for _ in range(2):  # idempotent
        gone = requests.delete(f"{stack.base}/v1/objects/{body['object_id']}", headers=user.auth)
        assert gone.status_code == 204, gone.text
    assert stored(stack, user) == {}
    assert listing(user)["objects"] == []
    again = requests.get(f"{stack.base}/v1/objects/{body['object_id']}", headers=user.auth)
    assert again.status_code == 404 and again.json()["error_code"] == "object_not_found"


def test_expiry_is_24_hours_after_the_mint_and_absolute(stack, user, clock):
    body = minted(user, b"x" * 10)
    assert body["expires_at"] == (clock.moment + timedelta(hours=24)).isoformat().replace("+00:00", "Z")
    clock.advance(hours=23, minutes=59)
    assert [o["object_id"] for o in listing(user)["objects"]] == [body["object_id"]]
    assert listing(user)["objects"][0]["expires_at"] == body["expires_at"]  # fetching never extends it
    fetched = requests.get(f"{stack.base}/v1/objects/{body['object_id']}", headers=user.auth).json()
    assert fetched["get_expires_at"] <= body["expires_at"]  # a GET URL never outlives its object
    clock.advance(minutes=1)
    assert listing(user)["objects"] == []  # expired: not listed even before a sweep
    assert requests.get(f"{stack.base}/v1/objects/{body['object_id']}", headers=user.auth).status_code == 404
    assert stack.server.app.state.transit.sweep() >= 1
    assert stored(stack, user) == {}
    row = usage_row(stack, user)
    assert (row.reserved_bytes, row.inflight) == (0, 0)


def test_not_uploaded_yet_is_a_409(stack, user):
    body = mint(user, 5).json()
    reply = requests.get(f"{stack.base}/v1/objects/{body['object_id']}", headers=user.auth)
    assert reply.status_code == 409 and reply.json()["error_code"] == "not_uploaded"


# ------------------------------------------------------------------ hostile tenants


def test_another_users_object_is_not_found(stack, user):
    body = minted(user, b"secret data")
    other = stack.new_user(name="Mallory")
    for method in ("GET",):
        reply = requests.request(method, f"{stack.base}/v1/objects/{body['object_id']}", headers=other.auth)
        assert reply.status_code == 404 and reply.json()["error_code"] == "object_not_found", reply.text
    assert requests.delete(f"{stack.base}/v1/objects/{body['object_id']}", headers=other.auth).status_code == 204
    assert listing(other)["objects"] == []
    # Still there for its owner, bytes and all.
    assert [o["object_id"] for o in listing(user)["objects"]] == [body["object_id"]]
    assert stored(stack, user) == {body["object_id"]: len(b"secret data")}


@pytest.mark.parametrize(
    "object_id",
    ["obj-", "obj-" + "g" * 24, "obj-" + "0" * 25, "../users/1/x", "%2e%2e%2fusers", "obj-" + "0" * 24, "\x00", "a" * 5000],
)
def test_ids_that_name_nothing_are_a_404(stack, user, object_id):
    reply = requests.get(f"{stack.base}/v1/objects/{requests.utils.quote(object_id, safe='')}", headers=user.auth)
    assert reply.status_code == 404, reply.text
    assert reply.json()["error_code"] in ("object_not_found", "not_found")
    gone = requests.delete(f"{stack.base}/v1/objects/{requests.utils.quote(object_id, safe='')}", headers=user.auth)
    assert gone.status_code in (204, 404), gone.text


@pytest.mark.parametrize(
    "body",
    [
        {"label": "x"},
        {"label": "x", "size_bytes": -1},
        {"label": "x", "size_bytes": "10"},
        {"label": "x", "size_bytes": 1.5},
        {"label": "x", "size_bytes": True},
        {"label": "x", "size_bytes": 2**53},
        {"label": "x", "size_bytes": 2**64},
        {"label": "a\x00b", "size_bytes": 1},
        {"label": "a\nb", "size_bytes": 1},
        {"label": "x" * 201, "size_bytes": 1},
        {"label": 7, "size_bytes": 1},
        {"label": "x", "size_bytes": 1, "key": "users/1/evil"},
        [],
    ],
)
def test_bad_mints_are_a_422_and_mint_nothing(stack, user, body):
    reply = requests.post(f"{stack.base}/v1/objects", json=body, headers=user.auth)
    assert reply.status_code == 422, reply.text
    assert set(reply.json()) == {"error_code", "message", "trace_id"}
    assert reply.json()["error_code"] == "validation_error"
    assert listing(user)["objects"] == []


def test_a_size_over_the_cap_is_a_413(stack, user):
    reply = mint(user, MAX_OBJECT_BYTES + 1)
    assert reply.status_code == 413 and reply.json()["error_code"] == "object_too_large", reply.text
    assert listing(user)["objects"] == []


def test_the_put_url_takes_only_the_declared_size(stack, user):
    """The size is signed into the URL: a store that checks signatures (the embedded rclone, R2)
    refuses any other, so the reservation covers whatever lands. moto checks none."""
    if not stack.target.checks_signatures:
        pytest.skip("this store (moto) does not check presigned signatures")
    body = mint(user, 1000).json()
    for size in (1001, 999, 10 * MiB):
        assert requests.put(body["put_url"], data=os.urandom(size)).status_code == 403
    assert requests.put(body["put_url"], data=iter([b"a" * 500, b"b" * 500])).status_code in (403, 411, 501)
    assert stored(stack, user) == {}
    assert requests.put(body["put_url"], data=b"k" * 1000).status_code == 200
    assert stored(stack, user) == {body["object_id"]: 1000}


def test_the_environment_admin_token_has_no_objects(stack):
    reply = requests.post(f"{stack.base}/v1/objects", json={"size_bytes": 1}, headers=stack.admin)
    assert reply.status_code == 403 and reply.json()["error_code"] == "no_account"


# ------------------------------------------------------------------ the quota


QUOTA = 10 * MiB


@pytest.fixture
def small_quota(stack, monkeypatch):
    monkeypatch.setattr(stack.settings, "transit_quota_bytes", QUOTA)
    return QUOTA


def test_parallel_mints_never_pass_the_quota(stack, user, small_quota, clock):
    """20 mints of 1 MiB at once against a quota of 10: exactly 10 fit, the others are a 413
    quota_exceeded, and all that was uploaded stays within the quota."""
    start = threading.Barrier(20)

    def one(_n):
        start.wait()
        return mint(user, MiB)

    with ThreadPoolExecutor(max_workers=20) as pool:
        replies = list(pool.map(one, range(20)))
    accepted = [r.json() for r in replies if r.status_code == 201]
    refused = [r for r in replies if r.status_code != 201]
    assert len(accepted) == 10, [r.text for r in refused]
    for reply in refused:
        assert reply.status_code == 413 and reply.json()["error_code"] == "quota_exceeded", reply.text
    for body in accepted:
        assert requests.put(body["put_url"], data=os.urandom(MiB)).status_code == 200
    assert sum(stored(stack, user).values()) == QUOTA
    assert listing(user)["quota"] == {"limit_bytes": QUOTA, "free_bytes": 0}
    assert mint(user, 0).status_code == 201  # an empty object takes no room
    assert mint(user, 1).status_code == 413
    # A deleted object's room comes back once its upload URL can no longer land.
    assert requests.delete(f"{stack.base}/v1/objects/{accepted[0]['object_id']}", headers=user.auth).status_code == 204
    assert mint(user, MiB).status_code == 413
    clock.advance(hours=1, seconds=1)
    stack.server.app.state.transit.sweep()
    assert listing(user)["quota"]["free_bytes"] == MiB
    assert mint(user, MiB).status_code == 201


def test_parallel_mints_never_pass_the_count_of_objects(stack, user, monkeypatch):
    """Objects of 0 bytes take no quota; their number is capped, atomically too."""
    monkeypatch.setattr(gateway.transit, "MAX_OBJECTS", 3)
    start = threading.Barrier(8)

    def one(_n):
        start.wait()
        return mint(user, 0)

    with ThreadPoolExecutor(max_workers=8) as pool:
        replies = list(pool.map(one, range(8)))
    assert sorted(r.status_code for r in replies) == [201] * 3 + [409] * 5, [r.text for r in replies if r.status_code != 409]
    assert {r.json()["error_code"] for r in replies if r.status_code == 409} == {"too_many_objects"}
    assert len(listing(user)["objects"]) == 3


def test_a_put_landing_after_the_delete_is_swept_with_its_room(stack, user, small_quota, clock):
    """A deleted object's upload URL still works until it expires: what lands then holds its
    reserved room, and goes with it at the sweep."""
    body = mint(user, MiB).json()
    assert requests.delete(f"{stack.base}/v1/objects/{body['object_id']}", headers=user.auth).status_code == 204
    assert requests.put(body["put_url"], data=os.urandom(MiB)).status_code == 200
    assert stored(stack, user) == {body["object_id"]: MiB}
    assert listing(user)["objects"] == []
    assert listing(user)["quota"]["free_bytes"] == QUOTA - MiB
    clock.advance(hours=1, seconds=1)
    stack.server.app.state.transit.sweep()
    assert stored(stack, user) == {}
    assert listing(user)["quota"]["free_bytes"] == QUOTA


def test_transit_and_drive_quotas_are_apart(stack, user, small_quota):
    minted(user, os.urandom(MiB))
    drive = requests.get(f"{stack.base}/v1/files?json=1", headers=user.auth).json()
    assert drive["quota"]["used_bytes"] == 0, drive["quota"]


# ------------------------------------------------------------------ replicas and restarts


def test_replicas_sweeping_at_once_purge_each_object_once(stack, user, clock):
    """Four gateways sweep the same expired objects at the same moment: each object's reservation
    is given back exactly once (the transit usage ends at 0, not below)."""
    for _ in range(6):
        minted(user, os.urandom(1000))
    clock.advance(hours=24, seconds=1)
    app = stack.server.app
    url = stack.settings.resolved_database_url
    replicas = [
        TransitObjects(stack.settings, make_sessionmaker(make_engine(url)), app.state.store, app.state.usage, clock)
        for _ in range(4)
    ]
    start = threading.Barrier(len(replicas))

    def sweep(replica):
        start.wait()
        return replica.sweep()

    before = object_count(stack)
    with ThreadPoolExecutor(max_workers=len(replicas)) as pool:
        purged = sum(pool.map(sweep, replicas))
    assert purged == before - object_count(stack) >= 6  # other tests' objects expired too
    assert stored(stack, user) == {}
    row = usage_row(stack, user)
    assert (row.reserved_bytes, row.inflight, row.used_bytes) == (0, 0, 0)


def test_an_expired_object_is_gone_after_a_restart(rclone_target, tmp_path):
    """The object expires while no gateway runs; the restarted one's sweep removes it from the
    store and from the listing."""
    settings = make_settings(tmp_path, rclone_target)
    server = LiveServer(settings).start()
    try:
        admin = {"Authorization": f"Bearer {settings.admin_token}"}
        created = requests.post(f"{server.base}/v1/admin/users", json={"email": "r@lab.example"}, headers=admin).json()
        auth = {"Authorization": f"Bearer {created['token']}"}
        body = requests.post(f"{server.base}/v1/objects", json={"label": "a", "size_bytes": 3}, headers=auth).json()
        assert requests.put(body["put_url"], data=b"abc").status_code == 200
        store = server.app.state.store
    finally:
        server.stop()
    key = transit_prefix(created["user"]["id"]) + body["object_id"]
    assert store.head(key) is not None
    server = LiveServer(settings).start()
    try:
        transit = server.app.state.transit
        clock = Clock()
        clock.advance(hours=24, seconds=1)
        transit.now = clock
        assert transit.sweep() == 1
        assert server.app.state.store.head(key) is None
        assert requests.get(f"{server.base}/v1/objects", headers=auth).json()["objects"] == []
        with server.app.state.sessions() as session:
            assert session.scalars(select(TransitObject)).all() == []
    finally:
        server.stop()


# ------------------------------------------------------------------ pods


@pytest.mark.parametrize("stack", ["rclone-sqlite"], indirect=True)
def test_an_in_pod_token_mints_and_two_pods_fetch_one_get_url(stack, user):
    """Pod A mints and uploads with its in-pod token; the owner fetches one get_url; pods A and B
    both download it with that URL and read the same bytes."""
    gpus = []
    for name in ("a", "b"):
        reply = requests.post(f"{stack.base}/v1/gpus", json={"name": name}, headers=user.auth)
        assert reply.status_code == 201, reply.text
        gpus.append(reply.json()["gpu_id"])
    try:
        script = (
            "head -c 300000 /dev/urandom > /tmp/data.bin && sha256sum /tmp/data.bin | cut -d' ' -f1 > /tmp/sum && "
            'R=$(curl -sS -X POST "$KGPU_API_BASE/v1/objects" -H "Authorization: Bearer $KGPU_API_TOKEN" '
            '-H "Content-Type: application/json" -d "{\\"label\\":\\"from-pod\\",\\"size_bytes\\":300000}") && '
            "URL=$(printf %s \"$R\" | python3 -c 'import json,sys; print(json.load(sys.stdin)[\"put_url\"])') && "
            'curl -sS --fail --upload-file /tmp/data.bin "$URL" && '
            "printf %s \"$R\" | python3 -c 'import json,sys; print(json.load(sys.stdin)[\"object_id\"])' && cat /tmp/sum"
        )
        out = run(stack.base, user.token, gpus[0], ["bash", "-c", script], wait_seconds=60)
        assert out["exit_code"] == 0, out
        object_id, digest = out["stdout"].split()
        fetched = requests.get(f"{stack.base}/v1/objects/{object_id}", headers=user.auth)
        assert fetched.status_code == 200, fetched.text
        url = fetched.json()["get_url"]
        for gpu in gpus:
            got = run(
                stack.base, user.token, gpu,
                ["bash", "-c", f"curl -sS --fail -o /tmp/got.bin '{url}' && sha256sum /tmp/got.bin | cut -d' ' -f1"],
                wait_seconds=60,
            )
            assert got["exit_code"] == 0, got
            assert got["stdout"].strip() == digest
        stored_bytes = requests.get(url).content
        assert hashlib.sha256(stored_bytes).hexdigest() == digest
    finally:
        for gpu in gpus:
            requests.delete(f"{stack.base}/v1/gpus/{gpu}", headers=user.auth)
