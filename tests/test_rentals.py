"""GPU rentals, runs and credits on the local pod backend, driven over HTTP as the seed's workflows do."""

from __future__ import annotations

import json
import threading
import time
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone

import pytest
import requests

from gateway.db import make_engine, make_sessionmaker
from gateway.models import CreditCharge, Rental
from gateway.pods.tree import remove_tree
from gateway.rentals import Rentals
from tests.conftest import ADMIN_TOKEN, LiveServer, make_settings

FAKE_GPUS = json.dumps(
    [
        {"node": "node-a", "gpu_model": "h100", "count": 2, "price_per_hour_credits": 500},
        {"node": "node-b", "gpu_model": "h100", "count": 4, "price_per_hour_credits": 500},
        {"node": "node-c", "gpu_model": "a5000", "count": 1, "price_per_hour_credits": 300},
    ]
)


class Clock:
    def __init__(self):
        self.moment = datetime.now(timezone.utc)

    def __call__(self) -> datetime:
        return self.moment

    def advance(self, **delta) -> None:
        self.moment += timedelta(**delta)


@contextmanager
def faked_clock(target):
    """``target.now`` is a :class:`Clock` the test moves, until the end of the ``with``."""
    fake = Clock()
    original, target.now = target.now, fake
    try:
        yield fake
    finally:
        target.now = original


@pytest.fixture
def clock(stack):
    with faked_clock(stack.server.app.state.rentals) as fake:
        yield fake


def rent(base: str, token: str, **body) -> requests.Response:
    return requests.post(f"{base}/v1/gpus", json={"name": "t", **body}, headers={"Authorization": f"Bearer {token}"})


def run(base: str, token: str, gpu_id: str, command: list[str], **extra) -> dict:
    reply = requests.post(
        f"{base}/v1/runs",
        json={"gpu_id": gpu_id, "name": "t", "command": command, **extra},
        headers={"Authorization": f"Bearer {token}"},
    )
    assert reply.status_code == 200, reply.text
    return reply.json()


def test_workflow_a_rent_run_return(stack, user):
    public = requests.get(f"{stack.base}/v1/gpus").json()
    assert public["cluster"][0]["gpu_model"] == "cpu" and "my_gpus" not in public
    rented = rent(stack.base, user.token, name="check")
    assert rented.status_code == 201, rented.text
    gpu = rented.json()
    assert gpu["phase"] == "Running" and gpu["ready"] and gpu["gpu_id"].startswith("gpu-")
    result = run(stack.base, user.token, gpu["gpu_id"], ["sh", "-c", "echo GPU $KGPU_GPU_ID; exit 0"])
    assert result["phase"] == "Succeeded" and result["exit_code"] == 0
    assert result["stdout"] == f"GPU {gpu['gpu_id']}\n"
    assert set(result) >= {"run_id", "gpu_id", "phase", "exit_code", "stdout", "stderr", "started_at", "completed_at", "elapsed_seconds", "pid"}
    mine = requests.get(f"{stack.base}/v1/gpus", headers=user.auth).json()
    assert [g["gpu_id"] for g in mine["my_gpus"]] == [gpu["gpu_id"]]
    assert mine["credits"]["balance"] < stack.settings.starting_credits
    returned = requests.delete(f"{stack.base}/v1/gpus/{gpu['gpu_id']}", headers=user.auth).json()
    assert returned["phase"] == "Ended" and returned["end_reason"] == "returned"
    after = requests.get(f"{stack.base}/v1/gpus/{gpu['gpu_id']}", headers=user.auth)
    assert after.status_code == 200 and after.json()["phase"] == "Ended"
    gone = requests.post(
        f"{stack.base}/v1/runs", json={"gpu_id": gpu["gpu_id"], "command": ["true"]}, headers=user.auth
    )
    assert gone.status_code == 410


def test_workflow_b_code_from_the_drive_and_polling(stack, user):
    requests.put(f"{stack.base}/v1/files/train.py", data=b"import time\ntime.sleep(1.5)\nprint('trained')\n", headers=user.auth)
    gpu = rent(stack.base, user.token, name="exp").json()["gpu_id"]
    script = (
        "curl -sfL -H \"Authorization: Bearer $KGPU_API_TOKEN\" $KGPU_API_BASE/v1/files/train.py > /tmp/train-$KGPU_GPU_ID.py"
        " && python3 /tmp/train-$KGPU_GPU_ID.py"
        " && echo done | curl -sfL -H \"Authorization: Bearer $KGPU_API_TOKEN\" -T - $KGPU_API_BASE/v1/files/out/$KGPU_GPU_ID.txt >/dev/null"
    )
    started = run(stack.base, user.token, gpu, ["bash", "-c", script], wait_seconds=0.2)
    assert started["phase"] == "Running" and started["exit_code"] is None
    for _ in range(100):
        state = requests.get(f"{stack.base}/v1/runs/{started['run_id']}?gpu_id={gpu}", headers=user.auth).json()
        if state["phase"] != "Running":
            break
        time.sleep(0.1)
    assert state["phase"] == "Succeeded", state
    assert state["stdout"] == "trained\n"
    assert requests.get(f"{stack.base}/v1/files/out/{gpu}.txt", headers=user.auth).content == b"done\n"
    without_hint = requests.get(f"{stack.base}/v1/runs/{started['run_id']}", headers=user.auth).json()
    assert without_hint["phase"] == "Succeeded"
    listed = requests.get(f"{stack.base}/v1/runs", headers=user.auth).json()["runs"]
    assert started["run_id"] in [r["run_id"] for r in listed]
    detail = requests.get(f"{stack.base}/v1/gpus/{gpu}", headers=user.auth).json()
    assert started["run_id"] in [r["run_id"] for r in detail["runs"]]
    requests.delete(f"{stack.base}/v1/gpus/{gpu}", headers=user.auth)


def test_stop_and_stream_a_run(stack, user):
    gpu = rent(stack.base, user.token).json()["gpu_id"]
    long = run(stack.base, user.token, gpu, ["sleep", "300"], wait_seconds=0)
    stopped = requests.delete(f"{stack.base}/v1/runs/{long['run_id']}", headers=user.auth)
    assert stopped.status_code == 202
    assert stopped.json()["exit_code"] == 143 and stopped.json()["phase"] == "Failed"
    chatty = run(stack.base, user.token, gpu, ["sh", "-c", "echo one; sleep 0.5; echo two >&2; echo three; exit 4"], wait_seconds=0)
    with requests.get(f"{stack.base}/v1/runs/{chatty['run_id']}/stream", headers=user.auth, stream=True) as reply:
        assert reply.headers["Content-Type"].startswith("application/x-ndjson")
        events = [json.loads(line) for line in reply.iter_lines() if line]
    assert events[-1] == {"type": "done", "exit_code": 4}
    assert "".join(e["chunk"] for e in events if e["type"] == "stdout") == "one\nthree\n"
    assert "".join(e["chunk"] for e in events if e["type"] == "stderr") == "two\n"
    requests.delete(f"{stack.base}/v1/gpus/{gpu}", headers=user.auth)


@pytest.mark.parametrize(
    "body",
    [
        {"name": "Bad_Name"},
        {"name": "x" * 31},
        {"gpu_count": 5},
        {"gpu_count": -1},
        {"cpu": 17},
        {"cpu": "lots"},
        {"memory": "129Gi"},
        {"memory": "sixteen"},
        {"memory": "\u0661Gi"},  # an Arabic-Indic one: a digit to Python, not to a backend
        {"cpu": "1_0"},
        {"cpu": "1e1"},
        {"cpu": "\u0662"},
        {"cpu": "nan"},
        {"ephemeral_storage_gib": 0},
        {"ephemeral_storage_gib": 101},
        {"duration_hours": 0},
        {"duration_hours": 169},
        {"env": {"KGPU_API_TOKEN": "x"}},
        {"env": {"1BAD": "x"}},
        {"gpu_model": "tpu"},
    ],
)
def test_bad_rental_requests_are_422(stack, user, body):
    reply = rent(stack.base, user.token, **body)
    assert reply.status_code == 422, reply.text
    assert reply.json()["error_code"] == "validation_error"


def test_insufficient_credits_is_402(stack):
    poor = stack.new_user(credits=50)
    reply = rent(stack.base, poor.token)
    assert reply.status_code == 402 and reply.json()["error_code"] == "insufficient_credits"


def test_billing_minutes_once_and_reaper(stack, user, clock):
    rentals = stack.server.app.state.rentals
    gpu = rent(stack.base, user.token).json()["gpu_id"]
    balance = lambda: requests.get(f"{stack.base}/v1/balance", headers=user.auth).json()["balance"]  # noqa: E731
    start = balance()
    clock.advance(minutes=10, seconds=30)
    rentals.tick()
    rentals.tick()  # a second tick in the same minute charges nothing more
    # A second gateway process on the same database ticks too: still nothing more.
    other = Rentals(stack.settings, make_sessionmaker(make_engine(stack.settings.resolved_database_url)), rentals.backend, rentals.inventory, clock)
    other.tick()
    with stack.server.app.state.sessions() as session:
        minutes = sorted(session.query(CreditCharge.minute).filter(CreditCharge.rental_id == gpu).all())
    assert [m for (m,) in minutes] == list(range(11))
    cpu_price = stack.settings.cpu_price_per_hour_credits
    assert stack.settings.starting_credits - balance() == -(-11 * cpu_price // 60)
    assert start - balance() == -(-11 * cpu_price // 60) - -(-cpu_price // 60)

    clock.advance(minutes=50)
    rentals.tick()
    state = requests.get(f"{stack.base}/v1/gpus/{gpu}", headers=user.auth).json()
    assert state["idle_warning"] is True and state["phase"] == "Running"
    run(stack.base, user.token, gpu, ["true"])  # activity clears the warning
    assert requests.get(f"{stack.base}/v1/gpus/{gpu}", headers=user.auth).json()["idle_warning"] is False
    clock.advance(hours=2, seconds=1)
    assert (gpu, "auto_idle") in rentals.tick()
    ended = requests.get(f"{stack.base}/v1/gpus/{gpu}", headers=user.auth).json()
    assert ended["phase"] == "Ended" and ended["end_reason"] == "auto_idle"


def test_concurrent_gateways_charge_each_minute_once(stack, user, clock):
    rentals = stack.server.app.state.rentals
    gpu = rent(stack.base, user.token).json()["gpu_id"]
    clock.advance(minutes=30, seconds=1)
    gateways = [
        Rentals(stack.settings, make_sessionmaker(make_engine(stack.settings.resolved_database_url)), rentals.backend, rentals.inventory, clock)
        for _ in range(3)
    ]
    threads = [threading.Thread(target=g.tick) for g in gateways for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with stack.server.app.state.sessions() as session:
        minutes = [m for (m,) in session.query(CreditCharge.minute).filter(CreditCharge.rental_id == gpu)]
    assert sorted(minutes) == list(range(31))
    requests.delete(f"{stack.base}/v1/gpus/{gpu}", headers=user.auth)


def test_duration_ceiling_and_out_of_credits(stack, clock):
    rentals = stack.server.app.state.rentals
    short = stack.new_user()
    gpu = rent(stack.base, short.token, duration_hours=1).json()["gpu_id"]
    clock.advance(minutes=30)
    run(stack.base, short.token, gpu, ["true"])
    clock.advance(minutes=31)
    assert (gpu, "expired") in rentals.tick()
    price = stack.settings.cpu_price_per_hour_credits
    broke = stack.new_user(credits=price)  # exactly one hour
    gpu2 = rent(stack.base, broke.token).json()["gpu_id"]
    clock.advance(minutes=59)
    assert gpu2 not in dict(rentals.tick())
    clock.advance(minutes=1, seconds=1)
    run(stack.base, broke.token, gpu2, ["true"])
    assert (gpu2, "out_of_credits") in rentals.tick()
    assert requests.get(f"{stack.base}/v1/gpus/{gpu2}", headers=broke.auth).json()["end_reason"] == "out_of_credits"


def test_in_pod_token_is_scoped_to_its_rental(stack, user):
    gpu = rent(stack.base, user.token).json()["gpu_id"]
    other_gpu = rent(stack.base, user.token, name="other").json()["gpu_id"]
    token = run(stack.base, user.token, gpu, ["sh", "-c", "printf %s $KGPU_API_TOKEN"])["stdout"]
    pod = {"Authorization": f"Bearer {token}"}
    assert requests.put(f"{stack.base}/v1/files/from-pod.txt", data=b"x", headers=pod).status_code == 201
    assert requests.get(f"{stack.base}/v1/gpus/{gpu}", headers=pod).status_code == 200
    assert run(stack.base, token, gpu, ["true"])["exit_code"] == 0
    assert requests.get(f"{stack.base}/v1/gpus/{other_gpu}", headers=pod).status_code == 404
    assert requests.post(f"{stack.base}/v1/runs", json={"gpu_id": other_gpu, "command": ["true"]}, headers=pod).status_code == 404
    assert rent(stack.base, token).status_code == 403
    assert requests.get(f"{stack.base}/v1/admin/users", headers=pod).status_code == 403
    assert [g["gpu_id"] for g in requests.get(f"{stack.base}/v1/gpus", headers=pod).json()["my_gpus"]] == [gpu]
    assert requests.delete(f"{stack.base}/v1/gpus/{gpu}", headers=pod).json()["end_reason"] == "returned"
    assert requests.get(f"{stack.base}/v1/files", headers=pod).status_code == 401  # dead with its rental
    requests.delete(f"{stack.base}/v1/gpus/{other_gpu}", headers=user.auth)


@pytest.fixture(scope="module")
def gpu_server(tmp_path_factory, rclone_target):
    server = LiveServer(make_settings(tmp_path_factory.mktemp("gpus"), rclone_target, gpu_inventory=FAKE_GPUS)).start()
    yield server
    server.stop()


def new_account(server, **fields) -> str:
    reply = requests.post(
        f"{server.base}/v1/admin/users",
        json={"email": f"g{time.monotonic_ns()}@lab.example", **fields},
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
    )
    return reply.json()["token"]


def test_capacity_pinning_and_per_user_cap(gpu_server):
    base = gpu_server.base
    first = new_account(gpu_server)
    a = rent(base, first, gpu_model="a5000", gpu_count=1).json()
    script = ["sh", "-c", 'echo "$CUDA_VISIBLE_DEVICES|$NVIDIA_VISIBLE_DEVICES"']
    assert run(base, first, a["gpu_id"], script)["stdout"] == "0|0\n"
    second = new_account(gpu_server)
    full = rent(base, second, gpu_model="a5000", gpu_count=1)
    assert full.status_code == 409 and full.json()["error_code"] == "no_capacity"
    big = rent(base, first, gpu_model="h100", gpu_count=3).json()
    assert big["node"] == "node-b"  # node-a has only two
    assert run(base, first, big["gpu_id"], script)["stdout"] == "0,1,2|0,1,2\n"
    capped = rent(base, first, gpu_model="h100", gpu_count=1)
    assert capped.status_code == 409 and capped.json()["error_code"] == "gpu_cap_reached"
    cluster = {(c["node"], c["gpu_model"]): c for c in requests.get(f"{base}/v1/gpus").json()["cluster"]}
    assert cluster[("node-b", "h100")]["gpu_busy"] == 3 and cluster[("node-c", "a5000")]["gpu_busy"] == 1
    requests.delete(f"{base}/v1/gpus/{a['gpu_id']}", headers={"Authorization": f"Bearer {first}"})
    assert rent(base, second, gpu_model="a5000", gpu_count=1).status_code == 201
    price = requests.get(f"{base}/v1/gpus/{big['gpu_id']}", headers={"Authorization": f"Bearer {first}"}).json()
    assert price["price_per_hour_credits"] == 1500  # 3 GPUs x 500
    # The public menu per model: h100 on two nodes (6 in all, 3 taken), a5000 on one (taken again).
    models = {m["gpu_model"]: m for m in requests.get(f"{base}/v1/gpu-models").json()["models"]}
    assert models["h100"] == {"gpu_model": "h100", "gpu_total": 6, "gpu_free": 3, "nodes": 2, "price_per_hour_credits": 500}
    assert models["a5000"] == {"gpu_model": "a5000", "gpu_total": 1, "gpu_free": 0, "nodes": 1, "price_per_hour_credits": 300}


@pytest.fixture(scope="module")
def docker_server(tmp_path_factory, rclone_target, docker_pod_client):
    """The gateway with the docker pod backend; pods on docker's default bridge reach it at the bridge's host address."""
    from tests.test_pod_mounts import docker_bridge_server

    server = docker_bridge_server(tmp_path_factory.mktemp("docker-gw"), rclone_target, default_image="kgpu-test:latest")
    yield server
    server.stop()


def test_workflows_a_and_b_on_docker(docker_server):
    base = docker_server.base
    token = new_account(docker_server)
    auth = {"Authorization": f"Bearer {token}"}
    requests.put(f"{base}/v1/files/train.sh", data=b"echo trained in $(cat /etc/debian_version | cut -c1-2)\n", headers=auth)
    gpu = rent(base, token, name="dock")
    assert gpu.status_code == 201, gpu.text
    gpu_id = gpu.json()["gpu_id"]
    assert gpu.json()["ready"] is True
    hello = run(base, token, gpu_id, ["sh", "-c", "echo $KGPU_GPU_ID; test -c /dev/fuse && echo fuse"])
    assert hello["stdout"] == f"{gpu_id}\nfuse\n" and hello["phase"] == "Succeeded"
    script = 'curl -sfL -H "Authorization: Bearer $KGPU_API_TOKEN" $KGPU_API_BASE/v1/files/train.sh > /tmp/t.sh && sh /tmp/t.sh'
    started = run(base, token, gpu_id, ["sh", "-c", "sleep 1; " + script], wait_seconds=0)
    assert started["phase"] == "Running"
    for _ in range(100):
        state = requests.get(f"{base}/v1/runs/{started['run_id']}", headers=auth).json()
        if state["phase"] != "Running":
            break
        time.sleep(0.1)
    assert state["phase"] == "Succeeded" and state["stdout"] == "trained in 12\n", state
    stopped = requests.delete(f"{base}/v1/runs/{run(base, token, gpu_id, ['sleep', '300'], wait_seconds=0)['run_id']}", headers=auth)
    assert stopped.json()["exit_code"] == 143
    assert requests.delete(f"{base}/v1/gpus/{gpu_id}", headers=auth).json()["phase"] == "Ended"
    assert not [c for c in docker_server.app.state.rentals.backend.adopt() if c == gpu_id]


def test_missing_image_fails_the_start_on_docker(docker_server):
    token = new_account(docker_server)
    reply = rent(docker_server.base, token, image="no-such-image:never")
    assert reply.status_code == 201
    body = reply.json()
    assert body["phase"] == "Failed" and body["end_reason"].startswith("start_failed:")


def test_runs_cannot_see_the_gateway_or_other_pods(stack, user):
    if stack.server.app.state.rentals.backend.mode != "isolated":
        pytest.fail("the local backend's isolated sandbox needs root and bubblewrap: .ci/run installs it")
    mine = rent(stack.base, user.token).json()["gpu_id"]
    other = rent(stack.base, stack.new_user().token).json()["gpu_id"]
    data_dir = stack.settings.data_dir.resolve()
    probe = run(stack.base, user.token, mine, ["sh", "-c", f"ls {data_dir} 2>&1; ls {data_dir}/pods/{other} 2>&1; pwd; echo x > /tmp/mine && echo wrote"])
    assert "kgpu.db" not in probe["stdout"] and "pod.json" not in probe["stdout"]
    assert probe["stdout"].endswith("/workspace\nwrote\n")
    escaped = run(stack.base, user.token, mine, ["sh", "-c", "echo no > /etc/kgpu-escape"])
    assert escaped["exit_code"] != 0
    bad_env = requests.post(
        f"{stack.base}/v1/runs", json={"gpu_id": mine, "command": ["true"], "env": {"KGPU_GPU_ID": "x"}}, headers=user.auth
    )
    assert bad_env.status_code == 422


def test_a_write_past_the_disk_limit_fails_in_the_pod(stack, user):
    """Issue 19 (10): with ephemeral_storage_gib 1, dd wrote 5.15 GiB before the reaper ended the
    rental, fallocate -l 8G took 18 ms, and /dev/shm was the host's memory. A local pod's
    /workspace and /tmp are a file system of its own, of that size: a write past it fails with
    ENOSPC in the pod, the host loses no more, and the rental goes on."""
    rentals = stack.server.app.state.rentals
    gpu = rent(stack.base, user.token, ephemeral_storage_gib=1, memory="1Gi").json()["gpu_id"]
    done = run(stack.base, user.token, gpu, ["sh", "-c", (
        # (its own output is on that disk too: it speaks once the disk has room again)
        "fallocate -l 8G /tmp/big; falloc=$?; rm -f /tmp/big; "
        "head -c 1100M /dev/zero > /workspace/big; code=$?; echo x > /tmp/more; more=$?; "
        "rm -f /workspace/big /tmp/more; echo fallocate=$falloc head=$code more=$more; "
        "df -k /dev/shm | tail -1"
    )])
    out = done["stdout"]
    assert "fallocate=1 head=1 more=1" in out, done  # all three refused: the disk is full
    assert int(out.split()[-5]) <= 1 << 20, out  # /dev/shm: the rental's memory (1 GiB), not the host's
    with stack.server.app.state.sessions() as session:
        ref = session.get(Rental, gpu).pod_ref
    assert rentals.backend.storage_bytes(ref) < 1 << 30
    rentals.tick()
    state = requests.get(f"{stack.base}/v1/gpus/{gpu}", headers=user.auth).json()
    assert state["phase"] == "Running" and state["end_reason"] is None, state


def test_the_sandbox_keeps_the_nvidia_device_nodes(monkeypatch, tmp_path):
    """bubblewrap's --dev builds a bare /dev: the GPUs' nodes are bound back in, or CUDA sees none."""
    from gateway.pods import local, sandbox

    nodes = ["/dev/nvidia0", "/dev/nvidia1", "/dev/nvidiactl", "/dev/nvidia-uvm"]
    monkeypatch.setattr(local, "nvidia_device_nodes", lambda: nodes)  # this module's name only, not glob's
    command = sandbox.holder_command(
        workspace=tmp_path / "ws", pod_tmp=tmp_path / "tmp", token_dir=tmp_path / "secret", etc_files={},
        hidden=[], mounts={}, devices=local.nvidia_device_nodes(), isolate_network=True, info_fd=3,
    )
    bound = [command[i + 1] for i, arg in enumerate(command) if arg == "--dev-bind"]
    assert sorted(bound) == sorted(nodes)
    assert command.index("--dev") < command.index("--dev-bind")  # bound after /dev is built


def test_a_return_ends_the_rental_even_when_the_backend_breaks(stack, user, monkeypatch):
    backend = stack.server.app.state.rentals.backend
    gpu = rent(stack.base, user.token).json()["gpu_id"]
    pod_token = run(stack.base, user.token, gpu, ["sh", "-c", "printf %s $KGPU_API_TOKEN"])["stdout"]
    real_destroy = backend.destroy

    def broken(ref):
        raise RuntimeError("the backend fell over")

    monkeypatch.setattr(backend, "destroy", broken)
    ended = requests.delete(f"{stack.base}/v1/gpus/{gpu}", headers=user.auth)
    assert ended.status_code == 200 and ended.json()["phase"] == "Ended", ended.text
    assert requests.get(f"{stack.base}/v1/me", headers={"Authorization": f"Bearer {pod_token}"}).status_code == 401
    with stack.server.app.state.sessions() as session:
        real_destroy(session.get(Rental, gpu).pod_ref)  # the pod the broken backend left behind


def test_the_local_backend_refuses_to_rent_where_it_cannot_isolate_pods(tmp_path, stack, user, monkeypatch):
    """A pods folder others cannot pass through: no sandbox, so no pod, and the reason says so."""
    from gateway.pods import PodSpec, PodStartError
    from gateway.pods.local import LocalPodBackend

    closed = tmp_path / "closed"
    closed.mkdir(mode=0o700)
    backend = LocalPodBackend(closed / "pods")
    assert backend.refusal and "chmod o+x" in backend.refusal
    with pytest.raises(PodStartError, match="cannot be reached|must be reachable"):
        backend.start(PodSpec("gpu-refused", "local", [], 1, 256 << 20, 1))
    # Over HTTP: a clear 503 before anything is booked or charged.
    monkeypatch.setattr(stack.server.app.state.rentals.backend, "refusal", backend.refusal, raising=False)
    reply = rent(stack.base, user.token)
    assert reply.status_code == 503 and reply.json()["error_code"] == "pods_unavailable", reply.text
    assert "chmod o+x" in reply.json()["message"]
    mine = requests.get(f"{stack.base}/v1/gpus", headers=user.auth).json()["my_gpus"]
    assert mine == []


def test_a_trusted_single_user_server_without_bubblewrap_runs_plain_processes(tmp_path, monkeypatch):
    """KGPU_LOCAL_TRUSTED_SINGLE_USER: no sandbox to be had, pods are plain processes instead of a refusal."""
    from gateway.pods import PodSpec, sandbox
    from gateway.pods.local import LocalPodBackend
    from tests.test_pod_conformance import wait_finished

    real_which = sandbox.shutil.which
    monkeypatch.setattr(sandbox.shutil, "which", lambda tool: None if tool == "bwrap" else real_which(tool))
    backend = LocalPodBackend(tmp_path / "pods", trusted_single_user=True)
    assert backend.mode == "none" and backend.refusal is None
    ref = backend.start(PodSpec("gpu-trusted", "local", [], 1, 256 << 20, 1, env={"KGPU_API_TOKEN": "tok", "A": "b"}))
    try:
        backend.start_run(ref, "run-1", ["sh", "-c", 'echo "$A $KGPU_API_TOKEN" > out.txt; cat out.txt; exit 3'], {})
        state = wait_finished(backend, ref, "run-1")
        assert (state.exit_code, state.stdout) == (3, b"b tok\n")
        assert (tmp_path / "pods" / ref / "workspace" / "out.txt").exists()
        backend.start_run(ref, "run-2", ["sleep", "300"], {})
        backend.signal_run(ref, "run-2", "TERM")
        assert wait_finished(backend, ref, "run-2", 10).exit_code == 143
    finally:
        backend.destroy(ref)
    assert not (tmp_path / "pods" / ref).exists()


def test_the_reaper_asks_pods_with_no_transaction_open(stack, user, clock, monkeypatch):
    """Each backend call (a docker exec, an srun) may be slow: the reaper makes them with no
    transaction of its own open, which on PostgreSQL would hold row locks all that while."""
    if not stack.settings.resolved_database_url.startswith("postgresql"):
        pytest.skip("pg_stat_activity tells open transactions apart on PostgreSQL")
    import psycopg

    rentals = stack.server.app.state.rentals
    gpus = [rent(stack.base, user.token).json()["gpu_id"] for _ in range(2)]
    clock.advance(minutes=5)  # minutes are due: the tick charges, updating the user's row
    url = stack.settings.resolved_database_url.replace("postgresql+psycopg://", "postgresql://")
    open_transactions = []
    original = rentals.backend.status

    def status(ref):
        with psycopg.connect(url, autocommit=True) as probe:
            open_transactions.append(probe.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND state LIKE 'idle in transaction%' AND pid <> pg_backend_pid()"
            ).fetchone()[0])
        return original(ref)

    monkeypatch.setattr(rentals.backend, "status", status)
    rentals.tick()
    assert len(open_transactions) >= 2 and set(open_transactions) == {0}, open_transactions
    for gpu in gpus:
        requests.delete(f"{stack.base}/v1/gpus/{gpu}", headers=user.auth)


def test_one_pods_worst_never_stops_the_reaper_for_the_others(stack, user, clock, monkeypatch):
    """Issue 19 (5): a pod nests folders deeper than Python's stack (os.walk raised RecursionError
    in every tick: billing, returns and the queue stopped for everyone), and another pod's
    observation hangs; the reaper still bills every rental, ends the deep pod's rental and
    removes its folder."""
    rentals = stack.server.app.state.rentals
    other = stack.new_user()
    deep = rent(stack.base, user.token).json()["gpu_id"]
    stuck = rent(stack.base, other.token).json()["gpu_id"]
    billed = rent(stack.base, other.token).json()["gpu_id"]
    made = run(stack.base, user.token, deep, ["sh", "-c", "mkdir -p /workspace/deep && cd /workspace/deep && "
                                              "for i in $(seq 1200); do mkdir a && cd a; done && echo made"])
    assert made["exit_code"] == 0 and "made" in made["stdout"], made
    with stack.server.app.state.sessions() as session:
        stuck_ref = session.get(Rental, stuck).pod_ref
    release = threading.Event()
    real_status = rentals.backend.status

    def status(ref):
        if ref == stuck_ref:
            release.wait(30)  # a pod that never answers (a trickling docker exec)
        return real_status(ref)

    monkeypatch.setattr(rentals.backend, "status", status)
    monkeypatch.setattr(rentals.settings, "reaper_observe_timeout_seconds", 2)
    try:
        clock.advance(minutes=5, seconds=1)
        rentals.tick()
        clock.advance(minutes=1)
        rentals.tick()  # the stuck pod is not asked a second time while its first answer is out
        with stack.server.app.state.sessions() as session:
            minutes = {
                gpu: len(session.query(CreditCharge.minute).filter(CreditCharge.rental_id == gpu).all())
                for gpu in (deep, stuck, billed)
            }
        assert minutes == {deep: 7, stuck: 7, billed: 7}, minutes
        reply = requests.delete(f"{stack.base}/v1/gpus/{deep}", headers=user.auth)
        assert reply.status_code in (200, 202), reply.text
        state = requests.get(f"{stack.base}/v1/gpus/{deep}", headers=user.auth).json()
        assert state["phase"] in ("Ended", "Terminating"), state
        rentals.tick()
        with stack.server.app.state.sessions() as session:
            deep_ref = session.get(Rental, deep).pod_ref
        assert deep_ref not in rentals.backend.adopt()
        assert not (stack.settings.data_dir / "pods" / deep_ref).exists()
    finally:
        release.set()
        # A deep tree left behind would break pytest's own clean-up of old temp folders (it recurses).
        with stack.server.app.state.sessions() as session:
            remove_tree(stack.settings.data_dir / "pods" / session.get(Rental, deep).pod_ref)
