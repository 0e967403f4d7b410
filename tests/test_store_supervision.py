"""The embedded store is supervised: restarted within seconds when it dies, on a port kept in the
data directory, so presigned URLs outlive both a store crash and a server restart (issue 12)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path

import requests

from drive.store.embedded import ExitWatch, free_port
from tests.conftest import passable
from tests.test_serve import Served, alive, children, wait_gone

ADMIN = {"Authorization": "Bearer supervision-test-admin"}
BACK_WITHIN = 20.0  # seconds a killed store may take to serve again


class Server(Served):
    """``kgpu serve`` on a data directory, its log kept beside it."""

    admin_token = "supervision-test-admin"

    def __init__(self, data_dir: Path, settings: dict[str, str] | None = None, **served):
        self.log_path = data_dir.parent / f"serve-{uuid.uuid4().hex[:8]}.log"
        super().__init__(data_dir, settings, self.log_path, **served)

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *_) -> None:
        self.stop()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def rclone_pid(self) -> int:
        [pid] = [p for p in children(self.process.pid) if alive(p) and "rclone" in Path(f"/proc/{p}/cmdline").read_text()]
        return pid

    def stop(self) -> None:
        if self.process.poll() is None:
            store = self.rclone_pid() if self._has_store() else None
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(timeout=15)
            if store is not None:
                assert wait_gone(store), "rclone serve s3 outlived kgpu serve"

    def _has_store(self) -> bool:
        try:
            self.rclone_pid()
            return True
        except ValueError:
            return False


def new_user(server: Server) -> dict[str, str]:
    reply = requests.post(f"{server.base}/v1/admin/users", json={"email": "s@lab.example"}, headers=ADMIN)
    return {"Authorization": f"Bearer {reply.json()['token']}"}


def upload(server: Server, auth: dict[str, str], name: str, payload: bytes) -> None:
    reply = requests.put(f"{server.base}/v1/files/{name}", data=payload, headers=auth, timeout=30)
    assert reply.status_code in (200, 201), (reply.status_code, reply.text)


def presigned(server: Server, auth: dict[str, str], name: str) -> str:
    reply = requests.get(f"{server.base}/v1/files/{name}", headers=auth, allow_redirects=False, timeout=10)
    assert reply.status_code == 302, (reply.status_code, reply.text)
    return reply.headers["Location"]


def presigned_once_back(server: Server, auth: dict[str, str], name: str, seconds: float = 5) -> str:
    """A fresh presigned URL, once the gateway calls the restarted store serving: it notices a
    moment after the store first answers, and answers 503 with Retry-After until then."""
    deadline = time.monotonic() + seconds
    while True:
        reply = requests.get(f"{server.base}/v1/files/{name}", headers=auth, allow_redirects=False, timeout=10)
        if reply.status_code != 503 or time.monotonic() > deadline:
            break
        assert reply.headers.get("Retry-After")
        time.sleep(0.05)
    assert reply.status_code == 302, (reply.status_code, reply.text)
    return reply.headers["Location"]


def fetch(url: str) -> bytes | None:
    try:
        reply = requests.get(url, timeout=5)
    except requests.ConnectionError:
        return None
    return reply.content if reply.status_code == 200 else None


def wait_for(url: str, payload: bytes, seconds: float) -> float:
    """Seconds until ``url`` serves ``payload`` again; fails after ``seconds``."""
    start = time.monotonic()
    while fetch(url) != payload:
        assert time.monotonic() - start < seconds, f"the presigned URL did not work again within {seconds}s"
        time.sleep(0.1)
    return time.monotonic() - start


def kill_store(server: Server) -> int:
    pid = server.rclone_pid()
    os.kill(pid, signal.SIGKILL)
    assert wait_gone(pid)
    return pid


def hold_port(port: int, seconds: float = 5) -> socket.socket:
    """Listen on ``port`` (as another program would), retrying while its last owner lets it go."""
    deadline = time.monotonic() + seconds
    while True:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
            sock.listen()
            return sock
        except OSError:
            sock.close()
            assert time.monotonic() < deadline, f"port {port} stayed busy"
            time.sleep(0.005)


def test_killed_store_is_restarted_on_its_port(tmp_path):
    with Server(passable(tmp_path) / "data") as server:
        auth = new_user(server)
        payload = os.urandom(200_000)
        upload(server, auth, "kept/a.bin", payload)
        url = presigned(server, auth, "kept/a.bin")
        assert fetch(url) == payload
        old = kill_store(server)
        start = time.monotonic()
        took = wait_for(url, payload, BACK_WITHIN)
        print(f"store back after a SIGKILL in {took:.2f}s")
        assert server.rclone_pid() != old
        # New uploads and downloads work through the restarted store (the gateway may take a moment
        # longer than the store itself to call it serving: a 503 with Retry-After until then).
        fresh = os.urandom(50_000)
        while True:
            reply = requests.put(f"{server.base}/v1/files/kept/b.bin", data=fresh, headers=auth, timeout=30)
            if reply.status_code != 503 or time.monotonic() - start > BACK_WITHIN:
                break
            assert reply.headers.get("Retry-After")
            time.sleep(0.1)
        assert reply.status_code in (200, 201), (reply.status_code, reply.text)
        assert fetch(presigned(server, auth, "kept/b.bin")) == fresh
        assert "restart" in server.log()


def test_store_down_answers_503_then_comes_back(tmp_path):
    """While the store cannot come back (its port taken), downloads (and /healthz) answer 503 with
    Retry-After, not a redirect to a dead port; once the port is free it serves again."""
    with Server(passable(tmp_path) / "data") as server:
        auth = new_user(server)
        payload = os.urandom(10_000)
        upload(server, auth, "a.bin", payload)
        url = presigned(server, auth, "a.bin")
        port = int(url.split("/")[2].rsplit(":", 1)[1])
        kill_store(server)
        squatter = hold_port(port)
        try:
            time.sleep(1.5)  # the supervisor has noticed, and failed to restart on the taken port (logged)
            for reply in (
                requests.get(f"{server.base}/v1/files/a.bin", headers=auth, allow_redirects=False, timeout=10),
                requests.get(f"{server.base}/v1/files/", headers=auth, timeout=10),
                requests.put(f"{server.base}/v1/files/c.bin", data=b"x", headers=auth, timeout=10),
            ):
                assert reply.status_code == 503, (reply.request.method, reply.request.url, reply.status_code, reply.text)
                assert reply.json()["error_code"] == "store_unavailable"
                assert reply.headers.get("Retry-After")
            assert str(port) in server.log()  # the log says which port is taken
            health = requests.get(f"{server.base}/healthz", timeout=10)
            assert health.status_code == 503 and health.json()["checks"]["object_store"] == "unavailable"
            assert health.headers.get("Retry-After")
        finally:
            squatter.close()
        wait_for(url, payload, BACK_WITHIN + 30)  # the back-off is capped well below this
        assert fetch(presigned_once_back(server, auth, "a.bin")) == payload


def test_presigned_url_survives_server_restart(tmp_path):
    data = passable(tmp_path) / "data"
    with Server(data) as first:
        auth = new_user(first)
        payload = os.urandom(100_000)
        upload(first, auth, "kept/a.bin", payload)
        url = presigned(first, auth, "kept/a.bin")
    with Server(data) as second:
        assert fetch(url) == payload
        # Killed without a chance to clean up, the server's next start still gets the same port.
        os.kill(second.process.pid, signal.SIGKILL)
        second.process.wait(timeout=15)
    with Server(data):
        assert fetch(url) == payload


def stored_port(data: Path) -> int:
    """The store's port a server keeps in its data directory."""
    return json.loads((data / "embedded-s3.json").read_text())["port"]


def data_dir_with_a_kept_port(tmp_path: Path) -> Path:
    """A data directory a server has run on once: its store's port chosen and kept."""
    data = passable(tmp_path) / "data"
    Server(data).stop()
    return data


def test_port_taken_at_start_falls_back_and_says_so(tmp_path):
    data = data_dir_with_a_kept_port(tmp_path)
    port = stored_port(data)
    squatter = hold_port(port)
    try:
        with Server(data) as second:
            auth = new_user(second)
            upload(second, auth, "a.bin", b"still works")
            url = presigned(second, auth, "a.bin")
            assert f":{port}/" not in url
            assert fetch(url) == b"still works"
            log = second.log()
            assert f"port {port}" in log and "taken" in log, log
    finally:
        squatter.close()


def test_explicit_port_wins(tmp_path):
    data = data_dir_with_a_kept_port(tmp_path)
    stored = stored_port(data)
    explicit = free_port()
    with Server(data, {"KGPU_EMBEDDED_S3_PORT": str(explicit)}) as server:
        auth = new_user(server)
        upload(server, auth, "a.bin", b"x")
        assert f"127.0.0.1:{explicit}/" in presigned(server, auth, "a.bin")
    assert stored_port(data) == stored


def test_data_dir_of_an_older_server_gets_a_kept_port(tmp_path):
    """A data directory whose embedded-s3.json holds only the keys keeps them and gains a port."""
    from drive.store.embedded import EmbeddedS3Server

    state = tmp_path / "embedded-s3.json"
    state.write_text(json.dumps({"access_key": "kgpuolder", "secret_key": "s" * 40}))
    state.chmod(0o600)
    first = EmbeddedS3Server(tmp_path)
    kept = json.loads(state.read_text())
    assert kept["access_key"] == "kgpuolder" and kept["secret_key"] == "s" * 40
    assert kept["port"] == first.port and 0 < first.port < 65536
    assert state.stat().st_mode & 0o777 == 0o600
    assert EmbeddedS3Server(tmp_path).port == first.port
    assert EmbeddedS3Server(tmp_path, port=free_port()).port != first.port


def test_exit_watch_sees_an_exit_before_anyone_reaps_it():
    """The watch behind every presigned URL's "is the store serving" (no system call per URL):
    cleared as the process exits, while it is still unreaped, and never set by a pid long gone."""
    child = subprocess.Popen(["sleep", "60"])
    watch = ExitWatch.of(child.pid)
    assert watch is not None and watch.alive
    time.sleep(0.3)
    assert watch.alive  # a live process stays alive past the watch's poll interval
    child.kill()
    deadline = time.monotonic() + 2
    while watch.alive and time.monotonic() < deadline:
        time.sleep(0.001)
    assert not watch.alive
    assert child.returncode is None  # nobody has reaped it: the watch saw the exit itself
    assert child.wait(timeout=5) == -signal.SIGKILL
    watch.close()
    assert ExitWatch.of(child.pid) is None  # reaped: nothing left to watch
