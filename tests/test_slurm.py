"""The slurm pod backend through the HTTP API, on the local two-node test cluster
(tests/slurm/cluster.sh: node1 and node2, 2 dummy GPUs each; pods are containers on this host's
dockerd). The conformance and hostile suites also run on slurm (the pod_backend fixture)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import uuid

import docker
import pytest
import requests

from gateway.pods import PodSpec, PodStartError
from tests.conftest import ADMIN_TOKEN, DOCKER_TEST_IMAGE, DOCKER_TEST_PREFIX, LiveServer, make_settings
from tests import test_pod_mounts
from tests.test_pod_mounts import drive_bytes, ok, rent_ready
from tests.test_serve import Served
from tests.test_slurm_channel import echoed

pytorch_image = test_pod_mounts.pytorch_image  # the fixture: kgpu-pytorch-test, checked fresh

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture(scope="module")
def server(tmp_path_factory, rclone_target, slurm_cluster):
    env = slurm_cluster.env
    settings = make_settings(
        tmp_path_factory.mktemp("slurm"), rclone_target,
        pod_backend="slurm", slurm_conf=env["KGPU_SLURM_CONF"], slurm_gpu_device_dir=env["KGPU_SLURM_GPU_DEVICE_DIR"],
        slurm_job_prefix=DOCKER_TEST_PREFIX, slurm_pull=False, default_image=DOCKER_TEST_IMAGE,
        max_gpus_per_user=8, pod_flush_timeout_seconds=5,
    )
    live = LiveServer(settings).start()
    yield live
    backend = live.app.state.rentals.backend
    for ref in backend.adopt().values():
        backend.destroy(ref)
    live.stop()


@pytest.fixture
def user(server) -> dict:
    reply = requests.post(f"{server.base}/v1/admin/users", json={"email": f"u{uuid.uuid4().hex[:10]}@lab.example"},
                          headers=ADMIN)
    assert reply.status_code == 201, reply.text
    return bearer(reply.json()["token"])


def slurm(cluster, *argv: str) -> str:
    return subprocess.run(argv, env={"PATH": "/usr/bin:/bin", "SLURM_CONF": cluster.env["KGPU_SLURM_CONF"]},
                          capture_output=True, text=True, check=True).stdout


def job_of(server, gpu_id: str) -> str:
    with server.app.state.sessions() as session:
        from gateway.models import Rental

        return session.get(Rental, gpu_id).pod_ref.split("/")[0]


def rent(server, user, **body) -> dict:
    reply = requests.post(f"{server.base}/v1/gpus", json={"gpu_count": 1, "cpu": "1", "memory": "1Gi", **body},
                          headers=user)
    assert reply.status_code == 201, reply.text
    return reply.json()


def ready(server, user, gpu_id: str) -> dict:
    deadline = time.monotonic() + 60
    while True:
        reply = requests.get(f"{server.base}/v1/gpus/{gpu_id}", headers=user)
        assert reply.status_code == 200, reply.text
        state = reply.json()
        if state["ready"] or state["phase"] in ("Ended", "Failed"):
            return state
        assert time.monotonic() < deadline, f"never ready: {state}"
        time.sleep(0.2)


def give_back(server, user, gpu_id: str) -> dict:
    reply = requests.delete(f"{server.base}/v1/gpus/{gpu_id}", headers=user)
    assert reply.status_code == 200, reply.text
    return reply.json()


def containers(rental_id: str) -> list:
    client = docker.from_env()
    try:
        return client.containers.list(all=True, filters={"label": f"{DOCKER_TEST_PREFIX}.rental_id={rental_id}"})
    finally:
        client.close()


def gone(cluster, job_id: str, rental_id: str) -> bool:
    """No container of the rental and no live job of it (Slurm may still list it as ended)."""
    state = slurm(cluster, "squeue", "-h", "-t", "all", f"--jobs={job_id}", "-o", "%T").strip()
    return not containers(rental_id) and state in ("", "CANCELLED", "COMPLETED", "FAILED")


def nodes_seen(server) -> list[tuple]:
    nodes = requests.get(f"{server.base}/v1/gpus").json()["cluster"]
    return sorted((n["node"], n["gpu_total"], n["ready"]) for n in nodes)


def test_the_cluster_is_the_inventory(server, user, slurm_cluster):
    assert nodes_seen(server) == [("node1", 2, True), ("node2", 2, True)]
    slurm(slurm_cluster, "scontrol", "update", "NodeName=node2", "State=DRAIN", "Reason=kgpu-test")
    try:
        deadline = time.monotonic() + 10
        while nodes_seen(server) != [("node1", 2, True), ("node2", 2, False)]:
            assert time.monotonic() < deadline, nodes_seen(server)
            time.sleep(0.2)
        rentals = [rent(server, user) for _ in range(2)]
        try:  # a drained node takes nothing: the third finds no capacity
            assert [r["node"] for r in rentals] == ["node1", "node1"]
            third = requests.post(f"{server.base}/v1/gpus", json={"gpu_count": 1, "cpu": "1", "memory": "1Gi"}, headers=user)
            assert third.status_code == 409 and third.json()["error_code"] == "no_capacity", third.text
        finally:
            for r in rentals:
                give_back(server, user, r["gpu_id"])
    finally:
        slurm(slurm_cluster, "scontrol", "update", "NodeName=node2", "State=RESUME")
    deadline = time.monotonic() + 10
    while nodes_seen(server) != [("node1", 2, True), ("node2", 2, True)]:
        assert time.monotonic() < deadline, nodes_seen(server)
        time.sleep(0.2)


def test_a_job_slurm_keeps_pending_is_a_pending_rental(server, user, slurm_cluster):
    """Another workload holds node1's GPUs (the gateway does not know): a rental placed there
    waits in Slurm's queue as Pending, and starts when they free."""
    other = slurm(slurm_cluster, "sbatch", "--parsable", "--gres=gpu:2", "--nodelist=node1", "--output=/dev/null",
                  "--wrap", "sleep 300").strip()
    try:
        deadline = time.monotonic() + 30
        while slurm(slurm_cluster, "squeue", "-h", f"--jobs={other}", "-o", "%T").strip() != "RUNNING":
            assert time.monotonic() < deadline
            time.sleep(0.1)
        rental = rent(server, user)
        assert rental["node"] == "node1"
        time.sleep(1)  # a scheduler pass
        state = requests.get(f"{server.base}/v1/gpus/{rental['gpu_id']}", headers=user).json()
        assert state["phase"] == "Pending" and not state["ready"] and "pending in Slurm" in state["pending_reason"], state
        assert requests.get(f"{server.base}/v1/gpus/{rental['gpu_id']}", headers=user).json()["runs"] == []
    finally:
        slurm(slurm_cluster, "scancel", other)
    try:
        assert ready(server, user, rental["gpu_id"])["phase"] == "Running"
    finally:
        give_back(server, user, rental["gpu_id"])


def test_four_rentals_two_per_node_and_a_fifth_finds_no_capacity(server, user, slurm_cluster):
    rentals = [rent(server, user) for _ in range(4)]
    try:
        states = [ready(server, user, r["gpu_id"]) for r in rentals]
        assert all(s["ready"] and s["phase"] == "Running" for s in states), states
        assert sorted(s["node"] for s in states) == ["node1", "node1", "node2", "node2"]
        # Slurm ran each job where the gateway placed it, with one of that node's GPUs.
        for state in states:
            job = job_of(server, state["gpu_id"])
            assert slurm(slurm_cluster, "squeue", "-h", f"--jobs={job}", "-o", "%N %T").split() == [state["node"], "RUNNING"]
        fifth = requests.post(f"{server.base}/v1/gpus", json={"gpu_count": 1, "cpu": "1", "memory": "1Gi"}, headers=user)
        assert fifth.status_code == 409 and fifth.json()["error_code"] == "no_capacity", fifth.text
        # Each pod sees only its own GPU device, numbered 0 for CUDA.
        reply = requests.post(f"{server.base}/v1/runs", headers=user, json={
            "gpu_id": states[0]["gpu_id"], "command": ["sh", "-c", 'ls /dev | grep -c "^nvidia"; echo "$CUDA_VISIBLE_DEVICES"'],
            "wait_seconds": 30})
        assert reply.status_code == 200 and reply.json()["stdout"] == "1\n0\n", reply.text
    finally:
        for r in rentals:
            give_back(server, user, r["gpu_id"])


def test_a_run_and_its_return(server, user, slurm_cluster):
    rental = ready(server, user, rent(server, user, env={"GREETING": "hello"})["gpu_id"])
    gpu_id, job = rental["gpu_id"], job_of(server, rental["gpu_id"])
    reply = requests.post(f"{server.base}/v1/runs", headers=user, json={
        "gpu_id": gpu_id, "command": ["sh", "-c", 'echo "$GREETING $WHO"; echo oops >&2; exit 3'],
        "env": {"WHO": "line one\nline two"}, "wait_seconds": 30})
    assert reply.status_code == 200, reply.text
    done = reply.json()
    assert (done["exit_code"], done["stdout"], done["stderr"]) == (3, "hello line one\nline two\n", "oops\n"), done
    again = requests.get(f"{server.base}/v1/runs/{done['run_id']}", headers=user).json()
    assert again["exit_code"] == 3 and again["stdout"] == done["stdout"]
    assert containers(gpu_id)
    ended = give_back(server, user, gpu_id)
    assert ended["phase"] == "Ended"
    assert gone(slurm_cluster, job, gpu_id)


def test_a_return_right_after_the_rent_leaves_nothing(server, user, slurm_cluster):
    for _ in range(2):
        rental = rent(server, user)
        job = job_of(server, rental["gpu_id"])
        assert give_back(server, user, rental["gpu_id"])["phase"] == "Ended"
        assert gone(slurm_cluster, job, rental["gpu_id"])
    # ... and while its container is starting (job running, script creating it).
    rental = rent(server, user)
    job = job_of(server, rental["gpu_id"])
    deadline = time.monotonic() + 30
    while slurm(slurm_cluster, "squeue", "-h", f"--jobs={job}", "-o", "%T").strip() != "RUNNING":
        assert time.monotonic() < deadline
        time.sleep(0.02)
    give_back(server, user, rental["gpu_id"])
    assert gone(slurm_cluster, job, rental["gpu_id"])


def test_kgpu_serve_with_the_clusters_exports_mounts_and_flushes(tmp_path, slurm_cluster, pytorch_image):
    """`kgpu serve` with what `cluster.sh up` printed: a kgpu-pytorch pod on a node mounts /files
    from the gateway and its store at their cluster address, and its writes reach the drive on return."""
    exports = {name: value for name, value in slurm_cluster.env.items() if name.startswith("KGPU_")}
    served = Served(tmp_path / "data", {
        **exports, "KGPU_DEFAULT_IMAGE": pytorch_image, "KGPU_SLURM_PULL": "false",
        "KGPU_SLURM_JOB_PREFIX": DOCKER_TEST_PREFIX, "KGPU_POD_FLUSH_TIMEOUT_SECONDS": "20",
    })
    try:
        base = served.base
        person = requests.post(f"{base}/v1/admin/users", json={"email": "s@lab.example"},
                               headers={"Authorization": f"Bearer {Served.admin_token}"}).json()
        token = person["token"]
        state = rent_ready(base, token, pytorch_image)
        gpu = state["gpu_id"]
        assert state["mounts"]["files"]["status"] == "mounted", state
        api_base = ok(base, token, gpu, 'echo "$KGPU_API_BASE"; echo kept > /files/from-slurm.txt').strip()
        assert api_base == f"http://{exports['KGPU_SLURM_GATEWAY_ADDRESS']}:{served.port}"
        ended = requests.delete(f"{base}/v1/gpus/{gpu}", headers=bearer(token)).json()
        assert ended["flush_error"] is None and drive_bytes(base, token, "from-slurm.txt") == b"kept\n", ended
        assert not containers(gpu)
    finally:
        served.process.terminate()
        served.process.wait(timeout=30)


def test_a_restarted_gateway_finds_its_pods_and_their_runs(slurm_cluster):
    """The srun that started a run dies with its gateway; the run lives on in the container, and
    a new backend (a restarted gateway) finds the pod in squeue and reads the run through srun."""
    first = slurm_cluster.backend()
    spec = PodSpec("gpu-" + uuid.uuid4().hex[:10], DOCKER_TEST_IMAGE, [0], 1, 256 << 20, 1, node="node2")
    ref = first.start(spec)
    try:
        first.start_run(ref, "run-long", ["sh", "-c", "echo before; sleep 2; echo after; exit 4"], {})
        os.killpg(first._held[(ref, "run-long")].pid, signal.SIGKILL)  # the gateway's srun is gone
        restarted = slurm_cluster.backend()
        assert restarted.adopt()[spec.rental_id] == ref
        state = restarted.wait_run(ref, "run-long", 20, 1000)
        assert (state.exit_code, state.stdout) == (4, b"before\nafter\n"), state
        assert restarted.run_ids(ref) == ["run-long"]
    finally:
        first.destroy(ref)
    assert spec.rental_id not in first.adopt() and not containers(spec.rental_id)


def test_a_pod_that_cannot_start_says_why(slurm_cluster):
    backend = slurm_cluster.backend()
    ref = backend.start(PodSpec("gpu-" + uuid.uuid4().hex[:10], "kgpu-missing:latest", [], 1, 256 << 20, 1))
    try:
        deadline = time.monotonic() + 30
        while (status := backend.status(ref)).phase not in ("Gone", "Failed"):
            assert time.monotonic() < deadline, status
            time.sleep(0.1)
        assert status.phase == "Failed" and "kgpu-missing:latest is not on node" in status.reason, status
    finally:
        backend.destroy(ref)
    with pytest.raises(PodStartError, match="line breaks"):
        backend.start(PodSpec("gpu-" + uuid.uuid4().hex[:10], DOCKER_TEST_IMAGE, [], 1, 256 << 20, 1, {"A": "x\ny"}))


def test_a_pods_container_has_the_docker_backends_limits_and_isolation(slurm_cluster):
    """The job script starts the container with the docker backend's rules (docs/pod-isolation.md)."""
    from gateway.pods.docker import CAP_DROP

    backend = slurm_cluster.backend()
    spec = PodSpec("gpu-" + uuid.uuid4().hex[:10], DOCKER_TEST_IMAGE, [0, 1], 1.5, 300 << 20, 1, node="node1")
    ref = backend.start(spec)
    try:
        backend._wait_up(ref)
        client = docker.from_env()
        try:
            info = client.api.inspect_container(ref.split("/", 1)[1])
            userns = "name=userns" in " ".join(client.info().get("SecurityOptions") or [])
        finally:
            client.close()
        host = info["HostConfig"]
        assert not host["Privileged"] and host["Init"] and "no-new-privileges" in host["SecurityOpt"]
        assert sorted(cap.removeprefix("CAP_") for cap in host["CapDrop"]) == sorted(CAP_DROP)
        assert (host["NanoCpus"], host["Memory"], host["MemorySwap"], host["PidsLimit"]) == (1_500_000_000, 300 << 20, 300 << 20, 4096)  # KGPU_POD_PIDS_LIMIT
        gpus = sorted(m["Destination"] for m in info["Mounts"] if m["Destination"].startswith("/dev/nvidia"))
        assert gpus == ["/dev/nvidia0", "/dev/nvidia1"]
        assert ("CAP_SYS_ADMIN" in (host["CapAdd"] or [])) == userns
        env = dict(item.split("=", 1) for item in info["Config"]["Env"])
        assert (env["CUDA_VISIBLE_DEVICES"], env["NVIDIA_VISIBLE_DEVICES"]) == ("0,1", "0,1")
    finally:
        backend.destroy(ref)


def test_gres_strings():
    from gateway.pods.slurm import parse_gres

    assert parse_gres("gpu:h100:4(S:0-1),gpu:2", "gpu") == {"h100": 4, "gpu": 2}
    assert parse_gres("gpu:a100:1,gpu:a100:1", "gpu") == {"a100": 2}
    assert parse_gres("(null)", "gpu") == {} and parse_gres("", "gpu") == {}


def test_a_fifth_rental_queues_and_starts_when_a_gpu_is_returned(server, user, slurm_cluster):
    """Issue 13's queue on two nodes of two GPUs: the fifth with queue: true waits as Queued at
    position 1, unbilled and with no job, and runs on the node of the GPU given back."""
    rentals = [rent(server, user) for _ in range(4)]
    try:
        for r in rentals:
            assert ready(server, user, r["gpu_id"])["phase"] == "Running"
        fifth = rent(server, user, queue=True)
        assert fifth["phase"] == "Queued" and fifth["queue_position"] == 1 and fifth["credits_charged"] == 0
        with server.app.state.sessions() as session:
            from gateway.models import Rental

            assert session.get(Rental, fifth["gpu_id"]).pod_ref is None  # no job submitted for it yet
        freed = give_back(server, user, rentals[1]["gpu_id"])
        started = ready(server, user, fifth["gpu_id"])  # ready() gives it 60 s; the queue moves at once
        assert started["phase"] == "Running" and started["node"] == freed["node"], started
        reply = requests.post(f"{server.base}/v1/runs", headers=user,
                              json={"gpu_id": fifth["gpu_id"], "command": ["sh", "-c", "echo $CUDA_VISIBLE_DEVICES"],
                                    "wait_seconds": 30})
        assert reply.status_code == 200 and reply.json()["stdout"] == "0\n", reply.text
        rentals.append(fifth)
    finally:
        for r in rentals:
            requests.delete(f"{server.base}/v1/gpus/{r['gpu_id']}", headers=user)


@pytest.mark.parametrize("pod_backend", ["slurm"], indirect=True)
def test_the_in_pod_token_is_in_neither_the_job_nor_the_containers_configuration(pod_backend):
    import secrets

    from tests.test_pod_hostile import sh, start_pod

    token = "kgpu_" + secrets.token_hex(24)
    ref = start_pod(pod_backend, {"KGPU_API_TOKEN": token})
    try:
        assert sh(pod_backend, ref, 'printf %s "$KGPU_API_TOKEN"')[1] == token  # (once its container is up)
        config = docker.from_env().api.inspect_container(ref.split("/", 1)[1])["Config"]
        assert config.get("Env") and token not in " ".join(config.get("Env") or [])
        job = subprocess.run(["scontrol", "show", "job", ref.split("/")[0]], env=pod_backend._env(),
                             capture_output=True, text=True).stdout
        assert "JobState=RUNNING" in job and token not in job
    finally:
        pod_backend.destroy(ref)


# A pod's process that knocks on the gateway's listener: `perl -e KNOCK HOST PORT WORDS TRIES`,
# one line per try: "refused", or what it read back ("read 0": dropped without a byte).
KNOCK = r"""
use IO::Socket::INET; my ($host, $port, $words, $tries) = @ARGV;
for (1 .. $tries) {
  my $s = IO::Socket::INET->new(PeerAddr => $host, PeerPort => $port, Timeout => 3);
  if (!$s) { print "refused\n"; } else {
    print $s "$words\n"; local $SIG{ALRM} = sub { print "silence\n"; exit 0 }; alarm 5;
    my $n = sysread($s, my $buf, 100); alarm 0; print "read ", (defined $n ? $n : "error"), "\n"; close $s;
  }
  select(undef, undef, undef, 0.3);
}
"""


def _pod_files_roundtrip(backend, ref, size: int) -> None:
    import asyncio
    import hashlib

    from gateway.pods import files

    data = os.urandom(size)

    async def pieces():
        for at in range(0, size, 1 << 20):
            yield data[at:at + (1 << 20)]

    async def both():
        await files.write_file(backend, ref, files.pod_path("/tmp/direct.bin"), pieces(), size, 30)
        got = hashlib.sha256()
        async with files.reading(backend, ref, files.pod_path("/tmp/direct.bin"), 30) as download:
            async for chunk in download.chunks(0, download.size):
                got.update(chunk)
        return got.hexdigest()

    assert asyncio.run(both()) == hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("pod_backend", ["slurm"], indirect=True)
def test_pod_files_travel_on_a_connection_of_their_own_and_fall_back_to_srun(pod_backend, monkeypatch, caplog):
    """gateway/pods/slurm_channel.py: the step connects back from the node; when it cannot, the
    transfer goes over srun's stdio, and the log says so."""
    import logging

    from gateway.pods import slurm as slurm_module
    from tests.test_pod_hostile import start_pod

    caplog.set_level(logging.WARNING)
    ref = start_pod(pod_backend)
    try:
        pod_backend._wait_up(ref)
        stream = pod_backend.stream(ref, ["-c", "cat; echo said \"$LANG\" >&2"], {"LANG": "C.UTF-8"})
        assert stream is not None and stream.process.args[0] == "srun"
        try:
            echoed(stream, b"y" * (3 << 20), 30)
            stream.stderr.settimeout(10)
            assert stream.stderr.recv(100).startswith(b"said C.UTF-8\n")
        finally:
            stream.data.close()
            stream.stderr.close()
        _pod_files_roundtrip(pod_backend, ref, 8 << 20)
        assert "direct channel failed" not in caplog.text

        monkeypatch.setattr(slurm_module, "NODE_SCRIPT", 'echo "no way back" >&2; exit 1')
        assert pod_backend.stream(ref, ["-c", "cat"], {}) is None
        assert "the direct channel failed (the step exited before it joined: " in caplog.text
        assert "no way back" in caplog.text  # what the step said (before or after srun's own line)
        assert caplog.text.count("using srun's stdio") == 1
        _pod_files_roundtrip(pod_backend, ref, 2 << 20)  # over srun's stdio
        monkeypatch.setattr(pod_backend, "direct_channel", False)
        assert pod_backend.stream(ref, ["-c", "cat"], {}) is None
    finally:
        pod_backend.destroy(ref)


@pytest.mark.parametrize("pod_backend", ["slurm"], indirect=True)
def test_a_pod_can_neither_take_the_channel_nor_replay_its_secret(pod_backend, slurm_cluster, monkeypatch):
    """A run in the pod reaches the gateway's address (its API is there), so it can knock on a
    transfer's listener: guessing before the step joins gets nothing, and the step still joins;
    the secret itself, once used, opens nothing (the listener is closed). The listener is on the
    gateway's cluster address only: its port on another address of the host (127.0.0.1) refuses."""
    from gateway.pods import slurm_channel
    from tests.test_pod_hostile import sh, start_pod

    gateway = slurm_cluster.env["KGPU_SLURM_GATEWAY_ADDRESS"]
    ref = start_pod(pod_backend)
    made: list = []
    seen: list = []

    class Raced(slurm_channel.Rendezvous):
        def __init__(self, address: str = ""):
            super().__init__(address)
            made.append(self)
            seen.append(self.listener.getsockname()[0])
            try:  # the host's loopback, while the listener is open
                socket.create_connection(("127.0.0.1", self.port), timeout=2).close()
                seen.append("accepted")
            except ConnectionRefusedError:
                seen.append("refused")
            # the pod knocks before the step is even started
            pod_backend.start_run(ref, "run-knock", ["perl", "-e", KNOCK, gateway, str(self.port), "0" * 64, "3"], {})

    try:
        pod_backend._wait_up(ref)
        monkeypatch.setattr(slurm_channel, "Rendezvous", Raced)
        stream = pod_backend.stream(ref, ["-c", "cat"], {})
        monkeypatch.undo()
        assert stream is not None, "the pod's knocks stopped the step from joining"
        assert seen == [gateway, "refused"]
        try:
            stream.data.sendall(b"mine")
            stream.data.shutdown(socket.SHUT_WR)
            assert stream.data.recv(10) == b"mine"
        finally:
            stream.data.close()
            stream.stderr.close()
            stream.process.wait(30)
        from tests.test_pod_conformance import wait_finished

        knocks = wait_finished(pod_backend, ref, "run-knock", 60).stdout.decode().split()
        assert knocks and all(line in ("refused", "read", "0", "error") for line in knocks), knocks
        secret = made[0].secret.decode()
        code, out, _ = sh(pod_backend, ref, f"perl -e '{KNOCK}' {gateway} {made[0].port} {secret} 1")
        assert (code, out) == (0, "refused\n")
    finally:
        pod_backend.destroy(ref)


@pytest.mark.parametrize("pod_backend", ["slurm"], indirect=True)
def test_ssh_sessions_without_a_terminal_take_the_direct_channel(pod_backend):
    """gateway/ssh/pod_session.py:open_session: a command, scp or sftp gets the backend's own
    connection (with the client's locale); a terminal stays on srun's stdio (--pty)."""
    from types import SimpleNamespace

    from gateway.pods import PodCommand, PodStream
    from gateway.ssh.pod_session import open_session
    from tests.test_pod_hostile import start_pod

    ref = start_pod(pod_backend)
    try:
        pod_backend._wait_up(ref)
        command = SimpleNamespace(subsystem=None, command='echo "hi $LANG"', term_type=None, env={"LANG": "C.UTF-8"})
        session = open_session(pod_backend, ref, command)
        assert isinstance(session, PodStream)
        try:
            session.data.settimeout(30)
            said = b""
            while chunk := session.data.recv(100):
                said += chunk
            assert said == b"hi C.UTF-8\n"
            assert session.process.wait(30) == 0
        finally:
            session.data.close()
            session.stderr.close()
        terminal = SimpleNamespace(subsystem=None, command=None, term_type="xterm", env={})
        entered = open_session(pod_backend, ref, terminal)
        assert isinstance(entered, PodCommand) and "--pty" in entered.argv
    finally:
        pod_backend.destroy(ref)
