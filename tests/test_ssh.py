"""The SSH bastion (gateway/ssh, docs/ssh.md) with the real OpenSSH client, scp, sftp, rsync and
sshfs, into pods on the local and docker backends: what a researcher does, and what a hostile
tenant tries."""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import re
import select
import shutil
import socket
import struct
import subprocess
import termios
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from drive.store.embedded import free_port
from gateway.log_line import Sparse
from gateway.traffic import TRAFFIC
from tests.conftest import (
    ADMIN_TOKEN,
    DOCKER_TEST_IMAGE,
    DOCKER_TEST_PREFIX,
    LOCAL_SANDBOX_MISSING,
    LiveServer,
    fuse_present,
    make_settings,
    passable,
    require_system_part,
)

BACKENDS = ["local", "docker", "slurm"]


def tools_present() -> bool:
    return all(shutil.which(t) for t in ("ssh", "scp", "sftp", "rsync")) and os.path.exists("/usr/lib/openssh/sftp-server")


class Door:
    """A bastion, its gateway, and an OpenSSH client set up to pin its host key."""

    def __init__(self, server: LiveServer, folder: Path, kind: str):
        self.server = server
        self.kind = kind
        self.base = server.base
        self.folder = folder
        published = requests.get(f"{self.base}/v1/gpus").json()["ssh"]
        self.port = published["ssh_port"]
        self.known_hosts = folder / "known_hosts"
        self.known_hosts.write_text(published["known_hosts"] + "\n")
        self.published = published

    def user(self) -> dict:
        email = f"u{uuid.uuid4().hex[:10]}@lab.example"
        reply = requests.post(f"{self.base}/v1/admin/users", json={"email": email},
                              headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
        assert reply.status_code == 201, reply.text
        return {"Authorization": f"Bearer {reply.json()['token']}"}

    def rent(self, auth: dict, **body) -> dict:
        reply = requests.post(f"{self.base}/v1/gpus", json={"name": "ssh", "cpu": "1", "memory": "1Gi", **body},
                              headers=auth)
        assert reply.status_code == 201, reply.text
        rental = reply.json()
        deadline = time.monotonic() + 120
        while True:
            state = requests.get(f"{self.base}/v1/gpus/{rental['gpu_id']}", headers=auth).json()
            if state["phase"] == "Running":
                break
            assert state["phase"] not in ("Ended", "Failed") and time.monotonic() < deadline, state
            time.sleep(0.2)
        rental["state"] = state
        return rental

    def key_file(self, private_key: str) -> Path:
        path = self.folder / f"key-{uuid.uuid4().hex[:8]}"
        path.write_text(private_key)
        path.chmod(0o600)
        return path

    def options(self, key: Path) -> list[str]:
        return [
            "-F", "/dev/null", "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes", "-o", "StrictHostKeyChecking=yes",
            "-o", f"UserKnownHostsFile={self.known_hosts}", "-o", "LogLevel=ERROR", "-o", "ConnectTimeout=20",
            "-i", str(key),
        ]

    def ssh(self, key: Path, *args: str, login: str = "kgpu", **run) -> subprocess.CompletedProcess:
        run.setdefault("capture_output", True)
        run.setdefault("timeout", 120)
        return subprocess.run(["ssh", *self.options(key), "-p", str(self.port), *args[:-1], f"{login}@127.0.0.1", args[-1]]
                              if args else ["ssh", *self.options(key), "-p", str(self.port), f"{login}@127.0.0.1"], **run)

    def remote(self, login: str = "kgpu") -> str:
        return f"{login}@127.0.0.1"


def docker_image_ready(docker_pod_client) -> None:
    labels = docker_pod_client.images.get(DOCKER_TEST_IMAGE).labels or {}
    assert "openssh-sftp-server" in labels.get("net.kgpu.packages", ""), (
        f"{DOCKER_TEST_IMAGE} has no sftp-server: rebuild it (tests/images/build-test-image.sh)"
    )


@pytest.fixture(scope="module", params=BACKENDS)
def door(request, tmp_path_factory, rclone_target):
    require_system_part(tools_present(), "OpenSSH's ssh, scp, sftp, sftp-server and rsync")
    kind = request.param
    folder = passable(tmp_path_factory.mktemp(f"ssh-{kind}"))
    extra = {"ssh_port": free_port()}
    if kind == "local":
        if LOCAL_SANDBOX_MISSING:
            require_system_part(False, f"the local pod sandbox ({LOCAL_SANDBOX_MISSING})")
        # GPUs on paper (no device here): the load probe's GPU half asks nvidia-smi about them
        extra["gpu_inventory"] = '[{"node": "local", "gpu_model": "t4", "count": 8, "price_per_hour_credits": 100}]'
    elif kind == "docker":
        client = request.getfixturevalue("docker_pod_client")
        docker_image_ready(client)
        extra.update(pod_backend="docker", docker_pull=False, default_image=DOCKER_TEST_IMAGE)
    else:  # the two-node test cluster (tests/slurm): pods are its jobs' containers
        docker_image_ready(request.getfixturevalue("docker_pod_client"))
        cluster = request.getfixturevalue("slurm_cluster").env
        extra.update(pod_backend="slurm", slurm_conf=cluster["KGPU_SLURM_CONF"],
                     slurm_gpu_device_dir=cluster["KGPU_SLURM_GPU_DEVICE_DIR"], slurm_job_prefix=DOCKER_TEST_PREFIX,
                     slurm_pull=False, default_image=DOCKER_TEST_IMAGE, max_gpus_per_user=8)
    settings = make_settings(folder, rclone_target, **extra)
    server = LiveServer(settings).start()
    yield Door(server, folder, kind)
    backend = server.app.state.rentals.backend
    if kind != "local":
        for ref in backend.adopt().values():
            backend.destroy(ref)
    server.stop()


@pytest.fixture(scope="module")
def pod(door):
    """One rental with a minted key, shared by the tests that only use it."""
    auth = door.user()
    rental = door.rent(auth)
    assert rental["ssh_access"]["private_key"].startswith("-----BEGIN OPENSSH PRIVATE KEY-----")
    return {"auth": auth, "id": rental["gpu_id"], "key": door.key_file(rental["ssh_access"]["private_key"]),
            "access": rental["ssh_access"]}


# --- keys on rentals ------------------------------------------------------------------------


def test_a_rental_answers_its_ssh_access_and_the_private_key_only_once(door, pod):
    access = pod["access"]
    assert access["ssh_port"] == door.port and access["ssh_user"] == "kgpu"
    assert access["host_key_fingerprint"] == door.published["host_key_fingerprint"]
    assert access["fingerprint"].startswith("SHA256:")
    state = requests.get(f"{door.base}/v1/gpus/{pod['id']}", headers=pod["auth"]).json()
    assert state["ssh_access"]["fingerprint"] == access["fingerprint"]
    assert "private_key" not in state["ssh_access"]
    listed = requests.get(f"{door.base}/v1/gpus", headers=pod["auth"]).json()["my_gpus"]
    assert "PRIVATE KEY" not in str(listed)
    # ssh-keygen agrees on the fingerprint of the key it holds
    printed = subprocess.run(["ssh-keygen", "-l", "-f", str(pod["key"])], capture_output=True, text=True).stdout
    assert access["fingerprint"] in printed


@pytest.mark.parametrize("bad", [
    "ssh-dss AAAAB3NzaC1kc3MAAACBAP",
    "hello",
    "ssh-ed25519 AAAAnotbase64!!",
    "",
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIMQTS7DYPY6hvNAA+Gso9EunvtizZ4To9tsrunAmBJ+S\nssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIMQTS7DYPY6hvNAA+Gso9EunvtizZ4To9tsrunAmBJ+S",
])
def test_a_bad_public_key_is_a_400_and_rents_nothing(door, bad):
    auth = door.user()
    reply = requests.post(f"{door.base}/v1/gpus", json={"ssh_pubkey": bad}, headers=auth)
    assert reply.status_code == 400, reply.text
    assert reply.json()["error_code"] == "bad_ssh_key"
    assert requests.get(f"{door.base}/v1/gpus", headers=auth).json()["my_gpus"] == []


def test_a_short_rsa_key_is_refused(door, tmp_path):
    subprocess.run(["ssh-keygen", "-q", "-t", "rsa", "-b", "1024", "-N", "", "-f", str(tmp_path / "weak")], check=True)
    reply = requests.post(f"{door.base}/v1/gpus", json={"ssh_pubkey": (tmp_path / "weak.pub").read_text()},
                          headers=door.user())
    assert reply.status_code == 400 and "2048" in reply.json()["message"]


def own_key(folder: Path, name: str = "id") -> tuple[Path, str]:
    path = folder / f"{name}-{uuid.uuid4().hex[:6]}"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
    return path, (path.with_suffix(".pub") if path.suffix else Path(f"{path}.pub")).read_text()


# --- what works through it -----------------------------------------------------------------


def test_a_command_keeps_its_exit_code_stderr_and_binary_stdin(door, pod):
    data = os.urandom(3 << 20) + bytes(range(256))
    done = door.ssh(pod["key"], "cat; echo oops >&2; exit 7", input=data)
    assert done.returncode == 7, done.stderr
    assert done.stdout == data
    assert done.stderr == b"oops\n"
    where = door.ssh(pod["key"], "pwd; id -u; echo $KGPU_RENT_ID; test -n \"$KGPU_API_TOKEN\" && echo token")
    assert where.returncode == 0, where.stderr
    lines = where.stdout.decode().split()
    assert lines[0] == "/workspace" and lines[2] == pod["id"] and lines[3] == "token"


def test_stdin_reaches_its_end(door, pod):
    done = door.ssh(pod["key"], "wc -c", input=b"abc")
    assert done.stdout.split() == [b"3"]


def test_a_shell_without_a_terminal_runs_a_script_from_stdin(door, pod):
    """As VS Code Remote-SSH does: ssh -T host bash, the script on stdin."""
    script = b"echo hello from $(basename $SHELL)\ncd /tmp && pwd\nexit 4\n"
    done = door.ssh(pod["key"], "-T", "bash", input=script)
    assert done.returncode == 4
    assert done.stdout == b"hello from bash\n/tmp\n"


def test_sessions_at_once_keep_every_byte_and_the_gateways_other_descriptors(door, pod):
    """Commands with a terminal and without, at once: each keeps its stdout, the stderr it writes
    last and its exit code, and a pipe the gateway's process holds meanwhile is still that pipe."""
    sentinel_r, sentinel_w = os.pipe()
    inodes = (os.fstat(sentinel_r).st_ino, os.fstat(sentinel_w).st_ino)

    def one(i: int) -> None:
        size = 1000 + 7919 * i
        make = f"head -c {size} /dev/zero | tr '\\0' x"
        if i % 2:
            done = door.ssh(pod["key"], f"{make}; echo done{i} >&2; exit {i % 7}")
            assert (done.stdout, done.stderr, done.returncode) == (b"x" * size, f"done{i}\n".encode(), i % 7), i
        else:
            done = door.ssh(pod["key"], "-tt", make)  # (a failing srun adds its own line to a terminal)
            assert (done.stdout, done.returncode) == (b"x" * size, 0), (i, done.stderr)

    try:
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(one, range(24)))
        assert (os.fstat(sentinel_r).st_ino, os.fstat(sentinel_w).st_ino) == inodes
        os.write(sentinel_w, b"still mine")
        assert os.read(sentinel_r, 64) == b"still mine"
    finally:
        os.close(sentinel_r)
        os.close(sentinel_w)


def _pty_ssh(door: Door, key: Path, rows: int, cols: int, command: str | None = None):
    """ssh with a real terminal of ``rows`` x ``cols`` (its master returned)."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

    def controlling():
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    argv = ["ssh", *door.options(key), "-tt", "-p", str(door.port), "kgpu@127.0.0.1", *([command] if command else [])]
    process = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, start_new_session=True,
                               preexec_fn=controlling)
    os.close(slave)
    return process, master


def _read_until(master: int, needle: bytes, seconds: float = 30) -> bytes:
    seen = b""
    deadline = time.monotonic() + seconds
    while needle not in seen:
        left = deadline - time.monotonic()
        assert left > 0, f"never saw {needle!r}: {seen[-500:]!r}"
        ready, _, _ = select.select([master], [], [], left)
        if ready:
            try:
                chunk = os.read(master, 65536)
            except OSError:
                break
            if not chunk:
                break
            seen += chunk
    assert needle in seen, f"never saw {needle!r}: {seen[-500:]!r}"
    return seen


def test_a_terminal_has_its_size_follows_resizes_and_ctrl_c_reaches_the_job(door, pod):
    process, master = _pty_ssh(door, pod["key"], 33, 111)
    try:
        os.write(master, b"stty size; echo mark-$((6*7))\n")
        assert b"33 111" in _read_until(master, b"mark-42")
        fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 160, 0, 0))
        os.killpg(process.pid, 28)  # SIGWINCH: ssh sends the new size
        time.sleep(0.5)
        os.write(master, b"stty size; echo mark-$((7*7))\n")
        assert b"50 160" in _read_until(master, b"mark-49")
        os.write(master, b"sleep 300; echo slept-$((1+1))\n")
        time.sleep(1)
        os.write(master, b"\x03")  # Ctrl-C: the sleep ends, the shell stays
        os.write(master, b"echo after-$((2*2))\n")
        out = _read_until(master, b"after-4")
        assert b"slept-2" not in out
        os.write(master, b"exit 5\n")
        assert process.wait(timeout=30) == 5
    finally:
        if process.poll() is None:
            process.kill()
        os.close(master)


def test_scp_both_modes_and_sftp_carry_files_both_ways(door, pod, tmp_path):
    source = tmp_path / "data.bin"
    source.write_bytes(os.urandom(5 << 20))
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    options = [*door.options(pod["key"]), "-P", str(door.port)]
    for mode, flags in (("legacy", ["-O"]), ("sftp", [])):
        up = subprocess.run(["scp", *flags, *options, str(source), f"{door.remote()}:/workspace/{mode}.bin"],
                            capture_output=True, timeout=120)
        assert up.returncode == 0, up.stderr
        remote = door.ssh(pod["key"], f"sha256sum /workspace/{mode}.bin")
        assert remote.stdout.split()[0].decode() == digest
        back = tmp_path / f"back-{mode}.bin"
        down = subprocess.run(["scp", *flags, *options, f"{door.remote()}:/workspace/{mode}.bin", str(back)],
                              capture_output=True, timeout=120)
        assert down.returncode == 0, down.stderr
        assert hashlib.sha256(back.read_bytes()).hexdigest() == digest
    batch = tmp_path / "batch"
    batch.write_text("mkdir /workspace/viasftp\nput {0} /workspace/viasftp/x.bin\nls -l /workspace/viasftp\n".format(source))
    done = subprocess.run(["sftp", *door.options(pod["key"]), "-P", str(door.port), "-b", str(batch), door.remote()],
                          capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert b"x.bin" in done.stdout


def test_a_gib_crosses_scp_both_ways_intact(door, pod, tmp_path):
    """1 GiB each way with the legacy protocol (stdin and stdout carry it), checked by SHA-256:
    a prototype lost a pull at 597 MB. On every backend, each carrying the bytes its own way; on
    slurm a quarter of it, as srun's I/O forwarding carries a few tens of MiB/s (bench/ssh_bench.py
    measures the whole GiB there)."""
    source = tmp_path / "gib.bin"
    digest = hashlib.sha256()
    with open(source, "wb") as handle:
        for _ in range(16 if door.kind == "slurm" else 64):
            chunk = os.urandom(16 << 20)
            digest.update(chunk)
            handle.write(chunk)
    options = ["-O", *door.options(pod["key"]), "-P", str(door.port)]
    up = subprocess.run(["scp", *options, str(source), f"{door.remote()}:/workspace/gib.bin"], capture_output=True,
                        timeout=600)
    assert up.returncode == 0, up.stderr
    assert door.ssh(pod["key"], "sha256sum /workspace/gib.bin", timeout=300).stdout.split()[0].decode() == digest.hexdigest()
    source.unlink()
    back = tmp_path / "back.bin"
    down = subprocess.run(["scp", *options, f"{door.remote()}:/workspace/gib.bin", str(back)], capture_output=True,
                          timeout=600)
    assert down.returncode == 0, down.stderr
    pulled = hashlib.sha256()
    with open(back, "rb") as handle:
        while chunk := handle.read(16 << 20):
            pulled.update(chunk)
    assert pulled.hexdigest() == digest.hexdigest()
    door.ssh(pod["key"], "rm /workspace/gib.bin")


def test_rsync_over_ssh_both_ways(door, pod, tmp_path):
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    for n in range(20):
        (tree / "sub" / f"f{n}").write_bytes(os.urandom(10_000 + n))
    shell = " ".join(["ssh", *door.options(pod["key"]), "-p", str(door.port)])
    up = subprocess.run(["rsync", "-a", "-e", shell, f"{tree}/", f"{door.remote()}:/workspace/tree/"],
                        capture_output=True, timeout=120)
    assert up.returncode == 0, up.stderr
    back = tmp_path / "back"
    down = subprocess.run(["rsync", "-a", "-e", shell, f"{door.remote()}:/workspace/tree/", f"{back}/"],
                          capture_output=True, timeout=120)
    assert down.returncode == 0, down.stderr
    for n in range(20):
        assert (back / "sub" / f"f{n}").read_bytes() == (tree / "sub" / f"f{n}").read_bytes()


def test_sshfs_mounts_the_pods_files(door, pod, tmp_path):
    require_system_part(shutil.which("sshfs") is not None and fuse_present(), "sshfs and FUSE")
    door.ssh(pod["key"], "mkdir -p /workspace/fs && echo from-pod > /workspace/fs/a.txt")
    for extra in ([], ["-o", "sftp_server=/usr/lib/openssh/sftp-server"]):
        mount = tmp_path / f"mnt{len(extra)}"
        mount.mkdir()
        ssh_command = " ".join(["ssh", *door.options(pod["key"])])
        done = subprocess.run(["sshfs", "-p", str(door.port), "-o", f"ssh_command={ssh_command}", *extra,
                               f"{door.remote()}:/workspace/fs", str(mount)], capture_output=True, timeout=60)
        assert done.returncode == 0, done.stderr
        try:
            assert (mount / "a.txt").read_text() == "from-pod\n"
            (mount / f"b{len(extra)}.txt").write_text("from-laptop")
        finally:
            subprocess.run(["fusermount3", "-u", str(mount)], timeout=30)
        assert door.ssh(pod["key"], f"cat /workspace/fs/b{len(extra)}.txt").stdout == b"from-laptop"


def test_a_detached_job_outlives_the_session(door, pod):
    done = door.ssh(pod["key"], "setsid -f sh -c 'sleep 2; echo done > /workspace/detached.txt' </dev/null >/dev/null 2>&1; echo back",
                    timeout=30)
    assert done.stdout == b"back\n"
    deadline = time.monotonic() + 20
    while door.ssh(pod["key"], "cat /workspace/detached.txt 2>/dev/null").stdout != b"done\n":
        assert time.monotonic() < deadline
        time.sleep(0.5)


# --- forwards -------------------------------------------------------------------------------


def _serve_once_on_host(port: int, answer: bytes) -> socket.socket:
    listener = socket.create_server(("127.0.0.1", port))

    def serve():
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                conn.sendall(answer)

    threading.Thread(target=serve, daemon=True).start()
    return listener


def _connect_when_up(port: int, seconds: float = 20) -> socket.socket:
    """A connection to ``ssh -L``'s local end, once ssh listens there."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            return socket.create_connection(("127.0.0.1", port), timeout=5)
        except OSError:
            assert time.monotonic() < deadline, f"nothing listens on 127.0.0.1:{port}"
            time.sleep(0.2)


def _serve_once_in_pod(door: Door, pod: dict, port: int, answer: str) -> subprocess.Popen:
    """A listener on the pod's 127.0.0.1:``port`` (perl: perl-base is in every Debian image, the
    smallest included) that runs the perl ``answer`` on its one connection ``$c``; returns once it listens."""
    server = subprocess.Popen(
        ["ssh", *door.options(pod["key"]), "-p", str(door.port), door.remote(),
         "perl -MIO::Socket::INET -e '$s = IO::Socket::INET->new(LocalAddr => \"127.0.0.1\", "
         f"LocalPort => {port}, Listen => 1, ReuseAddr => 1) or die; $| = 1; print \"up\\n\"; "
         f"$c = $s->accept; {answer}; close $c'"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    assert server.stdout.readline() == b"up\n"
    return server


def test_a_local_forward_reaches_the_pods_listener_never_the_hosts(door, pod):
    port = free_port()
    host_listener = _serve_once_on_host(port, b"HOST\n")  # the same port on the host
    try:
        server = _serve_once_in_pod(door, pod, port, '$c->recv($b, 100); $c->send("POD:$b")')
        local = free_port()
        tunnel = subprocess.Popen(["ssh", *door.options(pod["key"]), "-p", str(door.port), "-N", "-o",
                                   "ExitOnForwardFailure=yes", "-L", f"{local}:127.0.0.1:{port}", door.remote()])
        try:
            conn = _connect_when_up(local)
            with conn:
                conn.sendall(b"hello")
                answer = conn.recv(100)
            assert answer == b"POD:hello"
        finally:
            _stop(tunnel)
            server.kill()
    finally:
        host_listener.close()


def test_a_forward_to_the_hosts_services_gets_nothing(door, pod):
    """PostgreSQL and any other service on the host's loopback: a pod's forward finds no one
    there (the API base and the store are the only host endpoints a pod reaches, by design)."""
    host_only = free_port()
    host_listener = _serve_once_on_host(host_only, b"HOST\n")
    for port in (5432, host_only):
        local = free_port()
        tunnel = subprocess.Popen(["ssh", *door.options(pod["key"]), "-p", str(door.port), "-N",
                                   "-L", f"{local}:127.0.0.1:{port}", door.remote()], stderr=subprocess.PIPE)
        try:
            conn = _connect_when_up(local)
            with conn:
                conn.settimeout(10)
                conn.sendall(b"GET /healthz HTTP/1.0\r\n\r\n")
                try:
                    answer = conn.recv(100)
                except (ConnectionResetError, TimeoutError):
                    answer = b""
            assert answer == b"", f"port {port} of the host answered through a pod's forward: {answer!r}"
        finally:
            _stop(tunnel)
    host_listener.close()


def test_remote_forwards_agent_and_x11_are_refused(door, pod):
    done = door.ssh(pod["key"], "-o", "ExitOnForwardFailure=yes", "-R", f"{free_port()}:127.0.0.1:22", "true", timeout=30)
    assert done.returncode != 0
    assert b"remote port forwarding failed" in done.stderr.lower() or b"forward" in done.stderr.lower()


# --- who gets in ----------------------------------------------------------------------------


def test_strangers_and_other_tenants_keys_never_land_in_the_pod(door, pod, tmp_path):
    stranger, _ = own_key(tmp_path, "stranger")
    refused = door.ssh(stranger, "true", timeout=30)
    assert refused.returncode == 255 and b"Permission denied" in refused.stderr
    # another tenant, with a rental of its own: its key lands in its pod, never in pod's
    other = door.user()
    theirs = door.rent(other)
    their_key = door.key_file(theirs["ssh_access"]["private_key"])
    assert door.ssh(their_key, "echo $KGPU_RENT_ID").stdout.decode().strip() == theirs["gpu_id"]
    for login in (pod["id"], "root", "kgpu"):
        done = door.ssh(their_key, "echo $KGPU_RENT_ID", login=login, timeout=30)
        assert pod["id"].encode() not in done.stdout
    # nor may it pin our public key on its rental
    pinned = requests.patch(f"{door.base}/v1/gpus/{theirs['gpu_id']}", json={"ssh_pubkey": _public(pod["key"])},
                            headers=other)
    assert pinned.status_code == 409 and pinned.json()["error_code"] == "ssh_key_in_use"
    requests.delete(f"{door.base}/v1/gpus/{theirs['gpu_id']}", headers=other)


def test_logins_are_counted_for_metrics(door, pod, tmp_path):
    before = dict(TRAFFIC.ssh_logins)  # the bastion runs in this process: its counts are these
    stranger, _ = own_key(tmp_path, "counted")
    assert door.ssh(stranger, "true", timeout=30).returncode == 255
    assert door.ssh(pod["key"], "true").returncode == 0
    assert TRAFFIC.ssh_logins.get("refused", 0) > before.get("refused", 0)
    assert TRAFFIC.ssh_logins.get("accepted", 0) > before.get("accepted", 0)


def _public(key: Path) -> str:
    return subprocess.run(["ssh-keygen", "-y", "-f", str(key)], capture_output=True, text=True, check=True).stdout


def _stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


def _wait_gone(process: subprocess.Popen, seconds: float) -> bool:
    try:
        process.wait(timeout=seconds)
        return True
    except subprocess.TimeoutExpired:
        return False


def test_a_rotated_key_stops_at_once_and_its_sessions_end(door, tmp_path):
    auth = door.user()
    mine, public = own_key(tmp_path)
    rental = door.rent(auth, ssh_pubkey=public)
    assert "private_key" not in rental["ssh_access"]
    session = subprocess.Popen(["ssh", *door.options(mine), "-p", str(door.port), door.remote(), "sleep 300"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    time.sleep(2)
    assert session.poll() is None
    # a pod's own token may not change it
    pod_token = door.ssh(mine, "echo $KGPU_API_TOKEN").stdout.decode().strip()
    refused = requests.patch(f"{door.base}/v1/gpus/{rental['gpu_id']}", json={},
                             headers={"Authorization": f"Bearer {pod_token}"})
    assert refused.status_code == 403
    rotated = requests.patch(f"{door.base}/v1/gpus/{rental['gpu_id']}", json={}, headers=auth)
    assert rotated.status_code == 200, rotated.text
    fresh = door.key_file(rotated.json()["ssh_access"]["private_key"])
    assert _wait_gone(session, 10), "a session of the old key outlived the rotation"
    assert door.ssh(mine, "true", timeout=30).returncode == 255
    assert door.ssh(fresh, "echo $KGPU_RENT_ID").stdout.decode().strip() == rental["gpu_id"]
    # returned: the session ends, and the key is refused
    session = subprocess.Popen(["ssh", *door.options(fresh), "-p", str(door.port), door.remote(), "sleep 300"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    time.sleep(2)
    assert requests.delete(f"{door.base}/v1/gpus/{rental['gpu_id']}", headers=auth).status_code == 200
    assert _wait_gone(session, 10), "a session outlived its rental's return"
    assert door.ssh(fresh, "true", timeout=30).returncode == 255
    gone = requests.patch(f"{door.base}/v1/gpus/{rental['gpu_id']}", json={}, headers=auth)
    assert gone.status_code == 409


def test_one_key_on_two_rentals_is_picked_by_login_name(door, tmp_path):
    auth = door.user()
    mine, public = own_key(tmp_path)
    first = door.rent(auth, ssh_pubkey=public)
    second = door.rent(auth, ssh_pubkey=public, name="second")
    described = requests.get(f"{door.base}/v1/gpus/{first['gpu_id']}", headers=auth).json()
    assert described["ssh_access"]["ssh_user"] == first["gpu_id"]
    ambiguous = door.ssh(mine, "true", timeout=30)
    assert ambiguous.returncode != 0
    assert first["gpu_id"].encode() in ambiguous.stderr and second["gpu_id"].encode() in ambiguous.stderr
    for rental in (first, second):
        done = door.ssh(mine, "echo $KGPU_RENT_ID", login=rental["gpu_id"])
        assert done.stdout.decode().strip() == rental["gpu_id"], done.stderr
    for rental in (first, second):
        requests.delete(f"{door.base}/v1/gpus/{rental['gpu_id']}", headers=auth)


def test_an_ssh_session_counts_as_activity(door, tmp_path):
    auth = door.user()
    mine, public = own_key(tmp_path)
    rental = door.rent(auth, ssh_pubkey=public)
    assert requests.get(f"{door.base}/v1/gpus/{rental['gpu_id']}", headers=auth).json()["activity"] == "rent"
    door.server.app.state.bastion.activity_interval_s = 1  # 30 s in service
    session = subprocess.Popen(["ssh", *door.options(mine), "-p", str(door.port), door.remote(), "sleep 60"])
    try:
        deadline = time.monotonic() + 45
        while requests.get(f"{door.base}/v1/gpus/{rental['gpu_id']}", headers=auth).json()["activity"] != "ssh":
            assert time.monotonic() < deadline, "an open SSH session never counted as activity"
            time.sleep(1)
    finally:
        session.kill()
        requests.delete(f"{door.base}/v1/gpus/{rental['gpu_id']}", headers=auth)


# --- the kgpu client ------------------------------------------------------------------------


def test_kgpu_rent_keeps_the_minted_key_and_kgpu_ssh_uses_it(door, tmp_path):
    """A researcher without a key of their own: `kgpu rent` keeps the minted one, `kgpu ssh`
    and `kgpu ssh-config` use it; a rental whose key is not here gets a new one."""
    import json
    import sys

    auth = door.user()
    home = tmp_path / "home"
    home.mkdir()
    env = {"PATH": os.environ["PATH"], "HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config"),
           "KGPU_API_BASE": door.base, "KGPU_API_TOKEN": auth["Authorization"].split()[1]}
    kgpu = str(Path(sys.executable).parent / "kgpu")
    rented = subprocess.run([kgpu, "rent", "--name", "client", "--json"], env=env, capture_output=True, text=True,
                            timeout=300)
    assert rented.returncode == 0, rented.stderr
    rental = json.loads(rented.stdout)
    assert "private_key" not in rental["ssh_access"]
    kept = home / ".config" / "kgpu" / "ssh" / rental["gpu_id"]
    assert kept.stat().st_mode & 0o777 == 0o600
    done = subprocess.run([kgpu, "ssh", rental["gpu_id"], "--", "echo", "$KGPU_RENT_ID"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == rental["gpu_id"]
    config = subprocess.run([kgpu, "ssh-config"], env=env, capture_output=True, text=True, timeout=60)
    assert config.returncode == 0, config.stderr
    (tmp_path / "config").write_text(config.stdout)
    via_config = subprocess.run(["ssh", "-F", str(tmp_path / "config"), "-o", "BatchMode=yes",
                                 f"kgpu-{rental['gpu_id']}", "echo config-works"], capture_output=True, text=True, timeout=60)
    assert via_config.stdout.strip() == "config-works", via_config.stderr
    # a rental rented elsewhere with a key this machine lacks: kgpu ssh mints a new one
    other = door.rent(auth, ssh_pubkey=own_key(tmp_path)[1], name="elsewhere")
    done = subprocess.run([kgpu, "ssh", other["gpu_id"], "--", "echo", "minted"], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "minted", done.stderr
    assert "minted" in done.stderr
    for gpu_id in (rental["gpu_id"], other["gpu_id"]):
        requests.delete(f"{door.base}/v1/gpus/{gpu_id}", headers=auth)


def test_a_pod_busy_on_its_own_is_active(door, pod):
    """A job started over SSH and detached (no run, no session) keeps the rental from idling:
    the reaper's load probe sees its processes use more than a tenth of a CPU."""
    started = door.ssh(pod["key"], "setsid -f sh -c 'end=$(($(date +%s) + 20)); "
                       "while [ $(date +%s) -lt $end ]; do :; done' </dev/null >/dev/null 2>&1", timeout=60)
    assert started.returncode == 0, started.stderr
    rentals = door.server.app.state.rentals
    rentals.tick()
    time.sleep(6)  # the probe judges over 5 s at least
    rentals.tick()
    state = requests.get(f"{door.base}/v1/gpus/{pod['id']}", headers=pod["auth"]).json()
    assert state["activity"] == "load", state


def test_the_ssh_guide_examples(door, tmp_path):
    """docs/ssh.md's bash blocks as written, for a researcher with no key yet (on the local backend)."""
    if door.kind != "local":
        pytest.skip("the guide runs once, on the local backend")
    from tests.test_docs_examples import run_doc

    auth = door.user()
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True, mode=0o700)
    result, workdir = run_doc("ssh.md", tmp_path, {
        "KGPU_API_BASE": door.base, "KGPU_API_TOKEN": auth["Authorization"].split()[1], "HOME": str(home),
    })
    assert re.search(r"^hello from gpu-[0-9a-f]+ in /workspace$", result.stdout, re.M), result.stdout
    assert "done\nsome results\n" in result.stdout
    assert (workdir / "out" / "results.txt").read_text() == "some results\n"
    assert requests.get(f"{door.base}/v1/gpus", headers=auth).json()["my_gpus"] == []


def test_a_dynamic_forward_connects_inside_the_pod(door, pod):
    """ssh -D (SOCKS, as VS Code uses it): the target is reached from the pod's own network."""
    port = free_port()
    host_listener = _serve_once_on_host(port, b"HOST\n")
    server = _serve_once_in_pod(door, pod, port, '$c->send("POD\\n")')
    socks = free_port()
    tunnel = subprocess.Popen(["ssh", *door.options(pod["key"]), "-p", str(door.port), "-N", "-D", str(socks),
                               door.remote()])
    try:
        with _connect_when_up(socks) as conn:
            conn.sendall(b"\x05\x01\x00")  # SOCKS5, no authentication
            assert conn.recv(2) == b"\x05\x00"
            conn.sendall(b"\x05\x01\x00\x01" + socket.inet_aton("127.0.0.1") + port.to_bytes(2, "big"))
            assert conn.recv(10)[:2] == b"\x05\x00"
            conn.settimeout(10)
            assert conn.recv(100) == b"POD\n"
    finally:
        _stop(tunnel)
        server.kill()
        host_listener.close()


def test_a_forward_to_a_name_no_resolver_takes_is_refused_alone(door, pod):
    """A host name IDNA cannot encode (a label of 64 characters) is refused as that one channel;
    the connection goes on: the next forward through it reaches the pod."""
    port = free_port()
    server = _serve_once_in_pod(door, pod, port, '$c->send("POD\\n")')
    socks = free_port()
    tunnel = subprocess.Popen(["ssh", *door.options(pod["key"]), "-p", str(door.port), "-N", "-D", str(socks),
                               door.remote()])
    try:
        name = b"a" * 64 + b".example"
        with _connect_when_up(socks) as conn:
            conn.sendall(b"\x05\x01\x00")
            assert conn.recv(2) == b"\x05\x00"
            conn.sendall(b"\x05\x01\x00\x03" + bytes([len(name)]) + name + port.to_bytes(2, "big"))
            conn.settimeout(10)
            assert conn.recv(10)[:2] != b"\x05\x00"  # refused (or closed): not connected
        with _connect_when_up(socks) as conn:
            conn.sendall(b"\x05\x01\x00")
            assert conn.recv(2) == b"\x05\x00"
            conn.sendall(b"\x05\x01\x00\x01" + socket.inet_aton("127.0.0.1") + port.to_bytes(2, "big"))
            assert conn.recv(10)[:2] == b"\x05\x00"
            conn.settimeout(10)
            assert conn.recv(100) == b"POD\n"
        assert tunnel.poll() is None  # the SSH connection itself is still up
    finally:
        _stop(tunnel)
        server.kill()


def test_tmux_keeps_a_job_after_the_session(door, pod):
    require_system_part(door.kind != "local" or shutil.which("tmux") is not None, "tmux")
    if door.ssh(pod["key"], "command -v tmux").returncode != 0:
        pytest.skip("this backend's test image has no tmux (kgpu-pytorch has it)")
    started = door.ssh(pod["key"], "tmux new-session -d -s train 'sleep 60'", timeout=30)
    assert started.returncode == 0, started.stderr
    listed = door.ssh(pod["key"], "tmux ls", timeout=30)
    assert listed.stdout.startswith(b"train:"), listed
    door.ssh(pod["key"], "tmux kill-server", timeout=30)


def test_connections_that_never_log_in_are_capped_per_address(door, pod, caplog):
    """A client opening connection after connection without logging in holds at most a few of
    the bastion's slots (each may wait 30 s for its login), and gets them back as they close.
    The log says so once a minute per address, not once per connection closed."""
    from gateway.ssh.bastion import UNAUTHENTICATED_PER_ADDRESS

    caplog.set_level(logging.WARNING, logger="kgpu.ssh")
    door.server.app.state.bastion.over_cap_lines = Sparse()  # this test's address is everyone's here

    idle = [socket.create_connection(("127.0.0.1", door.port)) for _ in range(UNAUTHENTICATED_PER_ADDRESS + 8)]
    try:
        for conn in idle:
            conn.settimeout(5)
        closed = 0
        for conn in idle:
            try:
                data = conn.recv(200)  # the server's banner, or nothing when it was closed
                closed += data == b""
            except (ConnectionResetError, TimeoutError):
                closed += 1
        assert closed >= 8, closed
    finally:
        for conn in idle:
            conn.close()
    lines = [r.getMessage() for r in caplog.records if "have not logged in" in r.getMessage()]
    assert len(lines) == 1, lines
    # the slots come back as they go (this test's address is everyone's here)
    bastion = door.server.app.state.bastion
    deadline = time.monotonic() + 10
    while bastion.waiting:
        assert time.monotonic() < deadline, bastion.waiting
        time.sleep(0.1)
    assert door.ssh(pod["key"], "echo again").stdout == b"again\n"


def test_a_busy_gpu_is_activity(door, tmp_path, monkeypatch):
    """The load probe's GPU half: a rental's GPU over 5 % busy (the host's nvidia-smi; a stand-in
    here, which answers for the indices it was asked about) keeps the rental from idling."""
    if door.kind != "local":
        pytest.skip("GPUs on paper only on the local backend (docker needs the NVIDIA runtime for them)")
    auth = door.user()
    rental = door.rent(auth, gpu_count=1)
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "nvidia-smi").write_text('#!/bin/sh\necho "$@" >> "$(dirname "$0")/asked"\necho 37\n')
    (fake / "nvidia-smi").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}{os.pathsep}{os.environ['PATH']}")
    door.server.app.state.rentals.tick()
    state = requests.get(f"{door.base}/v1/gpus/{rental['gpu_id']}", headers=auth).json()
    assert state["activity"] == "load", state
    with door.server.app.state.sessions() as session:
        from gateway.models import Rental

        indices = session.get(Rental, rental["gpu_id"]).gpu_indices
    assert f"-i {indices}" in (fake / "asked").read_text()
    requests.delete(f"{door.base}/v1/gpus/{rental['gpu_id']}", headers=auth)
