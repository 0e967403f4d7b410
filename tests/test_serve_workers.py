"""`kgpu serve --workers N`: N worker processes on one port; one embedded store and one SSH bastion,
in the parent; one reaper among the workers, elected through the database (gateway/leases.py), which
another worker takes over when its holder dies."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import threading
import time
import uuid
from datetime import timedelta
from pathlib import Path

import pytest
import requests
from sqlalchemy.orm import Session

from gateway import db
from gateway.leases import Lease
from gateway.models import DutyLease, Rental, utcnow
from tests.clients import curl
from drive.store.embedded import free_port
from tests.conftest import passable
from tests.test_metrics import scrape, value
from tests.test_serve import Served, alive, children, wait_gone

ADMIN = {"Authorization": "Bearer serve-test-admin"}
WORKERS_START_S = 90  # the parent, then each worker, imports the server: slow on a loaded machine


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/kgpu.db"
    return request.getfixturevalue("postgres_url")


def sessions_of(url: str):
    db.migrate(url)
    return db.make_sessionmaker(db.make_engine(url))


# ------------------------------------------------------------------ the election


def test_one_holder_at_a_time_and_the_next_once_it_lapses(database_url):
    sessions = sessions_of(database_url)
    duty = f"duty:{uuid.uuid4().hex}"
    first = Lease(sessions, lambda: duty, seconds=0.5)
    second = Lease(sessions, lambda: duty, seconds=30)
    assert first.renew() and first.held
    assert not second.renew() and not second.held
    assert first.renew()  # its own lease, extended
    deadline = time.monotonic() + 30
    while not second.renew():  # first stopped renewing: its lease lapses
        assert time.monotonic() < deadline, "a lapsed lease was never taken over"
        time.sleep(0.1)
    assert not first.renew() and not first.held
    second.release()
    assert first.renew(), "a released lease is free at once"


def test_racing_processes_elect_exactly_one(database_url):
    """Many contenders at the same moment, each its own connection: exactly one holds the duty."""
    sessions = sessions_of(database_url)
    duty = f"duty:{uuid.uuid4().hex}"
    leases = [Lease(sessions, lambda: duty, seconds=30) for _ in range(8)]
    start = threading.Barrier(len(leases))
    won: list[bool] = [False] * len(leases)

    def contend(i: int) -> None:
        start.wait()
        won[i] = leases[i].renew()

    threads = [threading.Thread(target=contend, args=(i,)) for i in range(len(leases))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(won) == 1, won
    with sessions() as session:
        [row] = session.query(DutyLease).filter(DutyLease.name == duty).all()
    assert row.holder == leases[won.index(True)].holder


# ------------------------------------------------------------------ a server of two workers


def workers_of(server: Served) -> list[int]:
    return [p for p in children(server.process.pid) if alive(p) and b"spawn_main" in Path(f"/proc/{p}/cmdline").read_bytes()]


def reaper_holder(url: str, data: Path) -> int | None:
    """The pid of the process that holds the reaper's lease of the server on ``data`` now (its
    local pods' instance; holder: host:pid:token)."""
    instance = (data / "pods" / ".instance").read_text().strip()
    with Session(db.make_engine(url)) as session:
        row = session.get(DutyLease, f"reaper:{instance}")
    return int(row.holder.split(":")[-2]) if row is not None and row.expires_at > time.time() else None


def wait_for(what: str, check, seconds: float = 60):
    deadline = time.monotonic() + seconds
    while not (found := check()):
        assert time.monotonic() < deadline, f"{what}: not within {seconds} s"
        time.sleep(0.1)
    return found


def rent_ready(base: str, auth: dict, name: str) -> str:
    rented = requests.post(f"{base}/v1/gpus", json={"name": name}, headers=auth)
    assert rented.status_code == 201, rented.text
    gpu = rented.json()["gpu_id"]
    wait_for("the rental ready", lambda: requests.get(f"{base}/v1/gpus/{gpu}", headers=auth).json()["ready"])
    return gpu


def test_two_workers_serve_one_drive_webdav_and_rentals(tmp_path):
    """The representative flow through a 2-worker server: every request lands on either worker, and
    each answers as one server would (one store, listings current, one bastion)."""
    data = passable(tmp_path) / "data"
    metrics = f"127.0.0.1:{free_port()}"
    server = Served(data, {
        "KGPU_WORKERS": "2", "KGPU_LOCAL_POD_MOUNTS": "false", "KGPU_METRICS_ADDRESS": metrics,
        "KGPU_AUTH_CACHE_SECONDS": "600",  # a revocation must reach the other worker's cache, not outwait it
    }, start_seconds=WORKERS_START_S)
    try:
        assert len(workers_of(server)) == 2
        store = server.rclone_pid()  # exactly one embedded store, the parent's child
        token = requests.post(f"{server.base}/v1/admin/users", json={"email": "w@lab.example"}, headers=ADMIN).json()["token"]
        auth = {"Authorization": f"Bearer {token}"}

        def listed() -> list[str]:  # PROPFIND Depth 1, on whichever worker takes it
            reply = requests.request("PROPFIND", f"{server.base}/v1/files/f/", headers={**auth, "Depth": "1"})
            assert reply.status_code == 207, reply.text
            return sorted(set(re.findall(r"/v1/files/f/([^<]+)</", reply.text)))

        names = []
        for i in range(6):  # each write seen by the very next listing, whichever worker cached the last
            payload = os.urandom(1000 + i)
            if i % 2:
                assert requests.put(f"{server.base}/v1/dav/f/{i}.bin", data=payload, headers=auth).status_code == 201
            else:
                curl("-f", "-L", "-T", "-", f"{server.base}/v1/files/f/{i}.bin", token=token, input=payload)
            names.append(f"{i}.bin")
            assert listed() == names
            for _ in range(2):
                assert curl("-f", "-L", f"{server.base}/v1/files/f/{i}.bin", token=token).stdout == payload
        assert requests.delete(f"{server.base}/v1/files/f/0.bin", headers=auth).status_code == 204
        assert listed() == names[1:]

        # The bastion the workers publish is the parent's, listening on the configured port.
        published = [requests.get(f"{server.base}/v1/gpus", headers=auth).json()["ssh"] for _ in range(6)]
        assert all(door == published[0] for door in published), published  # the same door from both workers
        with socket.create_connection(("127.0.0.1", published[0]["ssh_port"]), timeout=10) as conn:
            assert conn.recv(64).startswith(b"SSH-2.0-")

        gpu = rent_ready(server.base, auth, "two-workers")
        ran = requests.post(f"{server.base}/v1/runs", json={"gpu_id": gpu, "command": ["echo", "from a pod"], "wait_seconds": 30}, headers=auth)
        assert ran.json()["stdout"] == "from a pod\n", ran.text
        assert requests.delete(f"{server.base}/v1/gpus/{gpu}", headers=auth).json()["phase"] == "Ended"

        # A token revoked through one worker is refused at once by both, though both had it cached.
        user_id = requests.get(f"{server.base}/v1/me", headers=auth).json()["user"]["id"]
        for _ in range(20):
            assert requests.get(f"{server.base}/v1/me", headers=auth).status_code == 200
        reissued = requests.post(f"{server.base}/v1/admin/users/{user_id}/token", headers=ADMIN)
        assert reissued.status_code == 201, reissued.text
        assert {requests.get(f"{server.base}/v1/me", headers=auth).status_code for _ in range(20)} == {401}
        assert requests.get(f"{server.base}/v1/me", headers={"Authorization": f"Bearer {reissued.json()['token']}"}).status_code == 200

        # /metrics, on the parent's listener or through either worker, counts both workers' requests.
        for _ in range(10):
            assert requests.get(f"{server.base}/healthz").status_code == 200
        for base, headers in ((f"http://{metrics}", None), (server.base, ADMIN)):
            wait_for("every worker's requests counted", lambda: value(scrape(base, headers), "kgpu_http_requests_total", family="health", status="200") >= 11)
    finally:
        server.process.terminate()
        server.process.wait(timeout=30)
    assert wait_gone(store), "rclone serve s3 outlived kgpu serve"


def test_a_killed_reaper_is_replaced_and_an_expired_rental_still_returned(tmp_path, database_url):
    """SIGKILL the worker that holds the reaper's lease: uvicorn starts another worker, another
    process takes the lease within a lease period, and a rental that expires then is returned."""
    own_node = json.dumps([{"node": f"w-{uuid.uuid4().hex[:8]}", "gpu_model": "WorkerGPU", "count": 1, "price_per_hour_credits": 10}])
    settings = {
        "KGPU_WORKERS": "2", "KGPU_LOCAL_POD_MOUNTS": "false", "KGPU_GPU_INVENTORY": own_node,
        "KGPU_REAPER_INTERVAL_SECONDS": "0.3", "KGPU_REAPER_LEASE_SECONDS": "2",
    }
    if not database_url.startswith("sqlite"):
        settings["KGPU_DATABASE_URL"] = database_url
    data = passable(tmp_path) / "data"
    url = database_url if not database_url.startswith("sqlite") else f"sqlite:///{data}/kgpu.db"
    server = Served(data, settings, start_seconds=WORKERS_START_S)
    try:
        token = requests.post(f"{server.base}/v1/admin/users", json={"email": f"{uuid.uuid4().hex[:6]}@lab.example"}, headers=ADMIN).json()["token"]
        auth = {"Authorization": f"Bearer {token}"}
        gpu = rent_ready(server.base, auth, "outlives-its-reaper")
        # (a worker uvicorn replaced while the machine was slow may hold the lease until it lapses)
        leader = wait_for("a reaper elected among the workers", lambda: (held := reaper_holder(url, data)) in workers_of(server) and held)
        os.kill(leader, signal.SIGKILL)
        assert wait_gone(leader)
        with Session(db.make_engine(url)) as session, session.begin():  # its time is up
            rental = session.get(Rental, gpu)
            rental.started_at, rental.duration_hours = utcnow() - timedelta(hours=2), 1
        ended = wait_for(  # (a GET racing the pod's removal may answer 503 pod_unavailable: asked again)
            "the expired rental returned",
            lambda: (state := requests.get(f"{server.base}/v1/gpus/{gpu}", headers=auth).json()).get("phase") == "Ended" and state,
        )
        assert ended["end_reason"] == "expired", ended
        assert reaper_holder(url, data) not in (None, leader)
        assert len(wait_for("a worker started in the killed one's place", lambda: len(workers_of(server)) == 2 and workers_of(server))) == 2
    finally:
        server.process.terminate()
        server.process.wait(timeout=30)


def test_workers_starting_at_once_share_one_session_secret(tmp_path):
    """Every worker signs the dashboard's cookies with the one secret kept in the data directory,
    however many make it at the same moment (none reads it half written)."""
    from gateway.web_session import load_or_create_secret

    start = threading.Barrier(16)
    found: list[str] = []

    def load() -> None:
        start.wait()
        found.append(load_or_create_secret("", tmp_path))

    threads = [threading.Thread(target=load) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(found) == 16 and len(set(found)) == 1 and len(found[0]) >= 48, found
    assert [p.name for p in tmp_path.iterdir()] == ["session-secret"]
    assert (tmp_path / "session-secret").stat().st_mode & 0o777 == 0o600


def test_every_worker_answers_503_while_the_parents_store_is_down_then_follows_the_next(tmp_path):
    """The parent's store killed (and its port taken, so it cannot come back): every worker sees
    it at once and answers 503 with Retry-After, never a redirect to a dead port; once the parent
    restarts the store, every worker follows the new one."""
    from tests.test_store_supervision import Server, hold_port, kill_store, new_user, presigned, upload
    from tests.test_store_supervision import wait_for as wait_served

    server = Server(passable(tmp_path) / "data", {"KGPU_WORKERS": "2"}, start_seconds=WORKERS_START_S)
    try:
        auth = new_user(server)
        payload = os.urandom(10_000)
        upload(server, auth, "a.bin", payload)
        url = presigned(server, auth, "a.bin")
        kill_store(server)
        squatter = hold_port(int(url.split("/")[2].rsplit(":", 1)[1]))
        try:
            replies = [requests.get(f"{server.base}/v1/files/a.bin", headers=auth, allow_redirects=False, timeout=10) for _ in range(10)]
            assert {r.status_code for r in replies} == {503}, [(r.status_code, r.text) for r in replies]
            assert all(r.json()["error_code"] == "store_unavailable" and r.headers.get("Retry-After") for r in replies)
        finally:
            squatter.close()
        wait_served(url, payload, 60)  # the parent's store is back on its port
        wait_for("both workers follow the new store", lambda: all(
            requests.get(f"{server.base}/v1/files/a.bin", headers=auth, allow_redirects=False, timeout=10).status_code == 302
            for _ in range(10)
        ))
        assert requests.get(f"{server.base}/v1/files/a.bin", headers=auth, timeout=10).content == payload
    finally:
        server.stop()


# ------------------------------------------------------------------ caps that count every worker's transfers


def worker_of(server: Served, conn: socket.socket) -> int | None:
    """The worker process that accepted ``conn`` (its server side's socket among its descriptors),
    None while none has."""
    client_port = conn.getsockname()[1]
    inodes = set()
    with open("/proc/net/tcp") as table:
        for line in table.readlines()[1:]:
            fields = line.split()
            if (int(fields[1].rsplit(":", 1)[1], 16), int(fields[2].rsplit(":", 1)[1], 16)) == (server.port, client_port):
                inodes.add(f"socket:[{fields[9]}]")
    for pid in workers_of(server):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") in inodes:
                    return pid
            except FileNotFoundError:
                continue
    return None


def download_on(server: Served, worker: int, token: str, gpu: str) -> tuple[int, socket.socket]:
    """A download of the pod's 1 GiB file on a connection ``worker`` accepted (others are closed
    unused until one lands there): its status, and the connection, left unread, so that a 200's
    transfer holds its slots until it is closed."""
    while True:
        conn = socket.create_connection(("127.0.0.1", server.port), timeout=30)
        if wait_for("the connection accepted", lambda: worker_of(server, conn)) == worker:
            break
        conn.close()
    conn.sendall((
        f"GET /v1/gpus/{gpu}/files//tmp/big.bin HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n"
        f"Authorization: Bearer {token}\r\n\r\n"
    ).encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = conn.recv(4096)
        assert chunk, head
        head += chunk
    return int(head.split()[1]), conn


def test_a_users_transfers_are_capped_across_all_workers(tmp_path):
    """One tenant's stalled downloads spread over both workers: a pod's 4 (2 on each) fill the
    pod, and the user's 6 (KGPU_POD_FILES_PER_USER) fill the user's cap, whichever worker holds
    them; the next is refused on either worker (503 for the pod, 429 for the user), where
    counts per worker process let each worker take more."""
    data = passable(tmp_path) / "data"
    server = Served(data, {"KGPU_WORKERS": "2", "KGPU_LOCAL_POD_MOUNTS": "false", "KGPU_POD_FILES_PER_USER": "6"}, start_seconds=WORKERS_START_S)
    held: list[socket.socket] = []
    rented: list[str] = []
    try:
        workers = workers_of(server)
        assert len(workers) == 2
        first, second = workers
        token = requests.post(f"{server.base}/v1/admin/users", json={"email": "caps@lab.example"}, headers=ADMIN).json()["token"]
        auth = {"Authorization": f"Bearer {token}"}
        for name in ("full", "other"):
            rented.append(rent_ready(server.base, auth, name))
        full, other = rented
        for gpu in (full, other):
            made = requests.post(f"{server.base}/v1/runs", json={"gpu_id": gpu, "command": ["truncate", "-s", "1G", "/tmp/big.bin"], "wait_seconds": 30}, headers=auth)
            assert made.json()["exit_code"] == 0, made.text

        def hold(worker: int, gpu: str) -> None:
            status, conn = download_on(server, worker, token, gpu)
            held.append(conn)
            assert status == 200, (status, len(held))

        def refused(gpu: str, status: int) -> None:
            for worker in workers:
                answer, conn = download_on(server, worker, token, gpu)
                conn.close()
                assert answer == status, (worker, answer)

        for worker in (first, second, first, second):
            hold(worker, full)
        refused(full, 503)  # the pod's 4 are held, 2 by each worker
        hold(first, other)
        hold(second, other)
        refused(other, 429)  # the user's 6 are held, 3 by each worker; the pod has 2 left
    finally:
        for conn in held:
            conn.close()
        for gpu in rented:  # a pod outlives the gateway by design: return it, or it stays
            requests.delete(f"{server.base}/v1/gpus/{gpu}", headers=auth)
        server.process.terminate()
        server.process.wait(timeout=30)
