"""`kgpu serve` with no configuration: embedded SQLite and rclone S3, data kept across restarts."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

from drive.store.embedded import free_port
from tests.clients import curl
from tests.conftest import passable


def children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        found += [int(p) for p in text]
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split()[2]
    except FileNotFoundError:
        return False
    return state != "Z"


class Served:
    admin_token = "serve-test-admin"

    def __init__(
        self, data_dir: Path, settings: dict[str, str] | None = None, log_path: Path | None = None, start_seconds: float = 30
    ):
        """``settings``: KGPU_* variables besides the admin token (none: the zero-configuration server);
        ``log_path``: where its output goes (none: nowhere); ``start_seconds``: how long it may take
        to answer /healthz."""
        self.port = free_port()
        env = {key: value for key, value in os.environ.items() if key != "KGPU_DATABASE_URL"}
        # Never the default SSH port: many servers run on this machine at once. One process unless a
        # test asks for workers (tests/test_serve_workers.py): the default, the machine's cores, differs by machine.
        env.update({"KGPU_ADMIN_TOKEN": self.admin_token, "KGPU_SSH_PORT": str(free_port()), "KGPU_WORKERS": "1", **(settings or {})})
        with open(log_path or os.devnull, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "gateway.cli", "serve", "--data-dir", str(data_dir), "--port", str(self.port)],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.base = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + start_seconds
        while True:
            try:
                if requests.get(f"{self.base}/healthz", timeout=1).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert time.monotonic() < deadline and self.process.poll() is None, "kgpu serve did not start"
            time.sleep(0.1)

    def rclone_pid(self) -> int:
        [pid] = [p for p in children(self.process.pid) if "rclone" in Path(f"/proc/{p}/cmdline").read_text()]
        return pid


def wait_gone(pid: int, seconds: float = 10) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not alive(pid):
            return True
        time.sleep(0.05)
    return False


def test_serve_embedded_defaults_and_restart(tmp_path):
    data = passable(tmp_path) / "data"
    first = Served(data)
    admin = {"Authorization": "Bearer serve-test-admin"}
    token = requests.post(f"{first.base}/v1/admin/users", json={"email": "r@lab.example"}, headers=admin).json()["token"]
    payload = os.urandom(300_000)
    curl("-f", "-L", "-T", "-", f"{first.base}/v1/files/kept/a.bin", token=token, input=payload)
    assert (data / "kgpu.db").exists() and (data / "objects" / "kgpu").is_dir()
    store_pid = first.rclone_pid()
    first.process.send_signal(signal.SIGTERM)
    first.process.wait(timeout=15)
    assert wait_gone(store_pid), "rclone serve s3 outlived kgpu serve"

    second = Served(data)
    try:
        got = curl("-f", "-L", f"{second.base}/v1/files/kept/a.bin", token=token)
        assert got.stdout == payload
        # Killed without a chance to clean up, the server still takes its store with it.
        store_pid = second.rclone_pid()
        second.process.send_signal(signal.SIGKILL)
        second.process.wait(timeout=15)
        assert wait_gone(store_pid), "rclone serve s3 outlived a SIGKILLed kgpu serve"
    finally:
        if second.process.poll() is None:
            second.process.kill()


def test_a_run_survives_a_killed_gateway(tmp_path):
    data = passable(tmp_path) / "data"
    admin = {"Authorization": "Bearer serve-test-admin"}
    first = Served(data)
    token = requests.post(f"{first.base}/v1/admin/users", json={"email": "k@lab.example"}, headers=admin).json()["token"]
    auth = {"Authorization": f"Bearer {token}"}
    gpu = requests.post(f"{first.base}/v1/gpus", json={"name": "survivor"}, headers=auth).json()["gpu_id"]
    deadline = time.monotonic() + 60  # with FUSE here the pod mounts /shared and /files first
    while not requests.get(f"{first.base}/v1/gpus/{gpu}", headers=auth).json()["ready"]:
        assert time.monotonic() < deadline, "the rental never became ready"
        time.sleep(0.1)
    started = requests.post(
        f"{first.base}/v1/runs",
        json={"gpu_id": gpu, "command": ["sh", "-c", "sleep 2; echo finished; exit 5"], "wait_seconds": 0},
        headers=auth,
    ).json()
    assert started["phase"] == "Running"
    first.process.send_signal(signal.SIGKILL)
    first.process.wait(timeout=15)

    second = Served(data)
    try:
        deadline = time.monotonic() + 20
        while True:
            state = requests.get(f"{second.base}/v1/runs/{started['run_id']}", headers=auth).json()
            if state["phase"] != "Running" or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert state["phase"] == "Failed" and state["exit_code"] == 5 and state["stdout"] == "finished\n"
        assert requests.delete(f"{second.base}/v1/gpus/{gpu}", headers=auth).json()["phase"] == "Ended"
    finally:
        second.process.terminate()
        second.process.wait(timeout=15)


def _read_as_nobody(path: Path) -> subprocess.CompletedProcess:
    """``cat path`` as uid/gid 65534 with no groups: another local user of the machine."""
    return subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "cat", str(path)],
        capture_output=True, timeout=30,
    )


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def _closed_to_others(data: Path, payload: bytes, fresh: bool) -> None:
    """The data directory only lets others pass (o+x, for the pods' folders); the database and the
    embedded store's files are the server's alone."""
    assert _mode(data) == 0o711
    assert _mode(data / "objects") == 0o700
    db = data / "kgpu.db"
    assert _mode(db) == 0o600
    for journal in (data / "kgpu.db-wal", data / "kgpu.db-shm"):
        assert not journal.exists() or _mode(journal) & 0o077 == 0, journal
    for kept in ("session-secret", "embedded-s3.json", "embedded-s3.log"):
        assert _mode(data / kept) & 0o077 == 0, kept
    [stored] = [p for p in (data / "objects").rglob("*") if p.is_file() and p.read_bytes() == payload]
    if fresh:  # what rclone wrote is private itself (an older server's files: behind objects/ 0700)
        for path in (data / "objects").rglob("*"):
            assert _mode(path) & 0o077 == 0, (path, oct(_mode(path)))
    # A control: another user does pass through the data directory (pods must), so what stops
    # them below is the modes of the database and of the store, not the test's folders.
    control = data / "readable-by-all"
    control.write_bytes(b"ok")
    control.chmod(0o644)
    try:
        assert _read_as_nobody(control).stdout == b"ok"
        for secret in (db, stored):
            read = _read_as_nobody(secret)
            assert read.returncode != 0 and read.stdout == b"", (secret, read.returncode, read.stdout[:100])
            assert b"Permission denied" in read.stderr, read.stderr
    finally:
        control.unlink()


def test_the_data_directory_is_closed_to_other_local_users(tmp_path):
    """Issue 19: another local user read a drive's file and the database (data/ and objects/ 0755,
    files and kgpu.db 0644). Now: data/ 0711, objects/ 0700 with 0600 files (rclone runs under
    umask 077), kgpu.db 0600; and an older server's too-open data directory is closed at start-up."""
    data = passable(tmp_path) / "data"
    admin = {"Authorization": "Bearer serve-test-admin"}
    payload = b"the lab's unpublished results " + os.urandom(16).hex().encode()
    first = Served(data)
    try:
        token = requests.post(f"{first.base}/v1/admin/users", json={"email": "p@lab.example"}, headers=admin).json()["token"]
        curl("-f", "-L", "-T", "-", f"{first.base}/v1/files/private.txt", token=token, input=payload)
        _closed_to_others(data, payload, fresh=True)
    finally:
        first.process.terminate()
        first.process.wait(timeout=15)

    # What an older server left: everything readable by all.
    for path in [data, *data.rglob("*")]:
        if path.is_dir() and not path.is_relative_to(data / "pods"):
            path.chmod(0o755)
        elif path.is_file():
            path.chmod(0o644)
    assert _read_as_nobody(data / "kgpu.db").returncode == 0  # the finding, as it was
    second = Served(data)
    try:
        _closed_to_others(data, payload, fresh=False)
        got = curl("-f", "-L", f"{second.base}/v1/files/private.txt", token=token)
        assert got.stdout == payload
    finally:
        second.process.terminate()
        second.process.wait(timeout=15)


def test_an_ssh_port_in_use_stops_serve_with_a_message(tmp_path):
    """As with the HTTP port: a taken KGPU_SSH_PORT stops `kgpu serve` and says what to do."""
    taken = socket.create_server(("127.0.0.1", 0))
    port = taken.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("KGPU_")}
    env.update(KGPU_ADMIN_TOKEN="serve-test-admin", KGPU_SSH_PORT=str(port))
    try:
        done = subprocess.run(
            [sys.executable, "-m", "gateway.cli", "serve", "--data-dir", str(passable(tmp_path) / "data"),
             "--port", str(free_port())], env=env, capture_output=True, text=True, timeout=120,
        )
    finally:
        taken.close()
    assert done.returncode != 0
    assert f"the SSH port 127.0.0.1:{port} is not free" in done.stderr + done.stdout
    assert "KGPU_SSH_PORT" in done.stderr + done.stdout
