"""A researcher's day in real containers (docker backend): /shared and /files inside a pod.

An admin makes an org with an uploader and a member; the uploader puts a dataset in the
shared drive; the member rents pods and works through /v1/runs. The same walk runs on the
kgpu-pytorch image (built from images/kgpu-pytorch/Dockerfile on a local base: its
entrypoint kgpu-bootstrap mounts before the rental is ready) and on a plain image where
the member fetches rclone and the helpers from their drive and mounts by hand.
"""

from __future__ import annotations

import hashlib
import io
import os
import random
import re
import subprocess
import tarfile
import time
import uuid
from pathlib import Path

import pytest
import requests

from bootstrap import SCRIPTS, script_path
from drive.rclone import rclone_binary
from tests.conftest import ADMIN_TOKEN, DOCKER_TEST_IMAGE, LiveServer, make_settings
from tests.test_serve import Served

ROOT = Path(__file__).resolve().parent.parent
PYTORCH_TEST_IMAGE = "kgpu-pytorch-test:latest"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture(scope="module")
def pytorch_image(docker_pod_client) -> str:
    """kgpu-pytorch-test:latest, built by tests/images/build-test-image.sh from the current sources."""
    wanted = subprocess.run(
        ["bash", str(ROOT / "images/kgpu-pytorch/build.sh"), "--hash"], capture_output=True, text=True, check=True
    ).stdout.strip()
    image = docker_pod_client.images.get(PYTORCH_TEST_IMAGE)
    built = (image.labels or {}).get("net.kgpu.source-hash")
    assert built == wanted, f"{PYTORCH_TEST_IMAGE} is stale ({built} != {wanted}): run tests/images/build-test-image.sh"
    return PYTORCH_TEST_IMAGE


def docker_bridge_server(tmp: Path, rclone_target, **extra) -> LiveServer:
    """The gateway with the docker backend, its pods on docker's default bridge (a user-namespaced
    pod cannot share the host's network): it and its own embedded store listen on the bridge's
    host address, where pods reach them."""
    from gateway.pods.network import pod_host_address

    settings = make_settings(tmp, rclone_target, pod_backend="docker", docker_pull=False, **extra)
    settings = settings.model_copy(update={"s3_endpoint_url": "", "s3_access_key_id": "", "s3_secret_access_key": ""})
    address = pod_host_address(settings)
    assert address, "no address on docker's default bridge"
    return LiveServer(settings, host=address).start()


@pytest.fixture(scope="module")
def pod_server(tmp_path_factory, rclone_target, pytorch_image):
    """The gateway with the docker backend, pods on the default bridge."""
    server = docker_bridge_server(
        tmp_path_factory.mktemp("pod-mounts"), rclone_target, default_image=pytorch_image, pod_flush_timeout_seconds=20
    )
    yield server
    backend = server.app.state.rentals.backend
    for ref in backend.adopt().values():
        backend.destroy(ref)
    server.stop()


def new_user(base: str) -> dict:
    reply = requests.post(f"{base}/v1/admin/users", json={"email": f"u{uuid.uuid4().hex[:10]}@lab.example"}, headers=ADMIN)
    assert reply.status_code == 201, reply.text
    return {"id": reply.json()["user"]["id"], "token": reply.json()["token"]}


def run(base: str, token: str, gpu_id: str, script: str, *, strict: bool = False, timeout: float = 300) -> dict:
    """``script`` under bash (``strict``: with -euo pipefail) in the pod, followed to its end."""
    shell = ["bash", "-euo", "pipefail", "-c"] if strict else ["bash", "-c"]
    reply = requests.post(
        f"{base}/v1/runs", json={"gpu_id": gpu_id, "command": [*shell, script], "wait_seconds": 60}, headers=bearer(token)
    )
    assert reply.status_code == 200, reply.text
    done = reply.json()
    deadline = time.monotonic() + timeout
    while done["phase"] not in ("Succeeded", "Failed"):
        assert time.monotonic() < deadline, done
        time.sleep(1)
        done = requests.get(f"{base}/v1/runs/{done['run_id']}", headers=bearer(token)).json()
    return done


def ok(base: str, token: str, gpu_id: str, script: str) -> str:
    done = run(base, token, gpu_id, script)
    assert done["exit_code"] == 0, f"{script}\nstdout: {done['stdout']}\nstderr: {done['stderr']}"
    return done["stdout"]


def rent_ready(base: str, token: str, image: str) -> dict:
    reply = requests.post(f"{base}/v1/gpus", json={"name": "day", "image": image}, headers=bearer(token))
    assert reply.status_code == 201, reply.text
    gpu_id = reply.json()["gpu_id"]
    deadline = time.monotonic() + 120
    while True:
        state = requests.get(f"{base}/v1/gpus/{gpu_id}", headers=bearer(token)).json()
        if state["ready"] or state["phase"] in ("Ended", "Failed"):
            return state
        assert time.monotonic() < deadline, f"the rental never became ready: {state}"
        time.sleep(0.2)


def drive_bytes(base: str, token: str, path: str) -> bytes | None:
    reply = requests.get(f"{base}/v1/files/{path}", headers=bearer(token))
    return reply.content if reply.status_code == 200 else None


def wait_for_drive(base: str, token: str, path: str, timeout: float = 30) -> bytes:
    deadline = time.monotonic() + timeout
    while (body := drive_bytes(base, token, path)) is None:
        assert time.monotonic() < deadline, f"{path} never reached the drive"
        time.sleep(0.3)
    return body


MOUNT_BY_HAND = """
set -e
get() { curl -fsS -L -H "Authorization: Bearer $KGPU_API_TOKEN" "$KGPU_API_BASE/v1/files/tools/$1" -o "/usr/local/bin/$1"; }
for f in rclone kgpu-mount-shared kgpu-mount-files; do get "$f"; chmod +x "/usr/local/bin/$f"; done
kgpu-mount-shared && kgpu-mount-files
"""


def put_tools(base: str, token: str) -> None:
    """rclone and the helpers in the member's drive, for a plain image to fetch (no registry here)."""
    for name, path in [("rclone", Path(rclone_binary())), *[(s, script_path(s)) for s in ("kgpu-mount-shared", "kgpu-mount-files")]]:
        with open(path, "rb") as body:
            reply = requests.put(f"{base}/v1/files/tools/{name}", data=body, headers=bearer(token))
        assert reply.status_code in (200, 201), reply.text


@pytest.fixture(scope="module")
def local_pod_server(tmp_path_factory, rclone_target):
    """The gateway with the local backend and its mounts (kgpu-bootstrap on the host, bound into bwrap)."""
    settings = make_settings(
        tmp_path_factory.mktemp("pod-mounts-local"), rclone_target, pod_backend="local", local_pod_mounts=True,
        pod_flush_timeout_seconds=20, reaper_interval_seconds=3600,  # no tick: readiness comes from the GETs
    )
    server = LiveServer(settings).start()
    if not server.app.state.rentals.backend.mounts:
        server.stop()
        pytest.fail("local pod mounts need bubblewrap, /dev/fuse and fusermount3: .ci/run installs them")
    yield server
    backend = server.app.state.rentals.backend
    for ref in backend.adopt().values():
        backend.destroy(ref)
    server.stop()


@pytest.mark.parametrize("kind", ["kgpu-pytorch", "plain image, helpers by hand", "local backend"])
def test_a_researchers_day(request, pytorch_image, kind):
    """The same day on every pod backend: docker with the kgpu-pytorch image, docker with a plain
    image mounted by hand, and the local backend (mounts bound into its sandbox)."""
    server = request.getfixturevalue("local_pod_server" if kind == "local backend" else "pod_server")
    base = server.base
    by_hand = kind == "plain image, helpers by hand"
    image = DOCKER_TEST_IMAGE if by_hand else pytorch_image

    # An admin makes the lab: an org, an uploader and a member.
    uploader, member = new_user(base), new_user(base)
    slug = "lab-" + uuid.uuid4().hex[:6]
    assert requests.post(f"{base}/v1/admin/orgs", json={"slug": slug, "name": "Lab"}, headers=ADMIN).status_code == 201
    for person, role in [(uploader, "uploader"), (member, "member")]:
        added = requests.post(f"{base}/v1/admin/orgs/{slug}/members", json={"user_id": person["id"], "role": role}, headers=ADMIN)
        assert added.status_code == 200, added.text

    # The uploader puts a dataset in the shared drive.
    dataset = random.Random(7).randbytes(3 * 1024 * 1024 + 123)
    put = requests.put(f"{base}/v1/shared/{slug}/datasets/ecg/records.bin", data=dataset, headers=bearer(uploader["token"]))
    assert put.status_code in (200, 201), put.text
    if by_hand:
        put_tools(base, member["token"])

    # The member rents a pod; with the bootstrap it is ready only once both mounts are up.
    token = member["token"]
    first = rent_ready(base, token, image)
    gpu = first["gpu_id"]
    assert first["phase"] == "Running" and first["ready"], first
    if by_hand:
        assert first["mounts"] is None
        ok(base, token, gpu, MOUNT_BY_HAND)
    else:
        assert {name: m["status"] for name, m in first["mounts"].items()} == {"shared": "mounted", "files": "mounted"}, first["mounts"]
        assert first["mounts"]["files"]["path"] == "/files" and first["mounts"]["shared"]["path"] == "/shared"
    pod_token = ok(base, token, gpu, 'printf %s "$KGPU_API_TOKEN"')

    # /shared/{org}/ lists and reads the dataset byte-exact, also at random offsets.
    assert slug in ok(base, token, gpu, "ls /shared/").split()
    assert ok(base, token, gpu, f"ls /shared/{slug}/datasets/ecg/").split() == ["records.bin"]
    digest = ok(base, token, gpu, f"sha256sum /shared/{slug}/datasets/ecg/records.bin").split()[0]
    assert digest == hashlib.sha256(dataset).hexdigest()
    spots = [(0, 10), (1_000_003, 4096), (len(dataset) - 777, 777), (2_500_000, 65536)]
    script = "; ".join(
        f"tail -c +{start + 1} /shared/{slug}/datasets/ecg/records.bin | head -c {length} | sha256sum" for start, length in spots
    )
    got = [line.split()[0] for line in ok(base, token, gpu, script).splitlines()]
    assert got == [hashlib.sha256(dataset[s : s + n]).hexdigest() for s, n in spots]

    # Writing under /shared fails, and nothing reaches the shared drive.
    denied = run(base, token, gpu, f"echo nope > /shared/{slug}/datasets/new.txt")
    assert denied["exit_code"] != 0
    listed = requests.get(f"{base}/v1/shared/{slug}/datasets/?json=1", headers=bearer(uploader["token"])).json()
    assert "new.txt" not in str(listed)

    # A file written to /files lands in the drive; so does a tar streamed with curl.
    ok(base, token, gpu, "mkdir -p /files/notes && echo 'val_loss=0.123' > /files/notes/result.txt")
    assert wait_for_drive(base, token, "notes/result.txt") == b"val_loss=0.123\n"
    tar_digest = ok(
        base, token, gpu,
        """set -e
        mkdir -p /workspace/out && head -c 2000000 /dev/urandom > /workspace/out/weights.bin && echo done > /workspace/out/log.txt
        tar -czf - -C /workspace out | tee /tmp/sent.tgz | curl -fsS -L -H "Authorization: Bearer $KGPU_API_TOKEN" \\
          -H "Expect: 100-continue" -H "Content-Type: application/gzip" --data-binary @- \\
          "$KGPU_API_BASE/v1/files/runs-out/$KGPU_GPU_ID-outputs.tgz" >/dev/null
        sha256sum /tmp/sent.tgz""",
    ).split()[0]
    tarball = drive_bytes(base, token, f"runs-out/{gpu}-outputs.tgz")
    assert tarball is not None and hashlib.sha256(tarball).hexdigest() == tar_digest

    # A file written in the last second before the return is in the drive afterwards.
    last = ok(base, token, gpu, "head -c 300000 /dev/urandom > /files/last-second.bin && sha256sum /files/last-second.bin")
    ended = requests.delete(f"{base}/v1/gpus/{gpu}", headers=bearer(token)).json()
    assert ended["phase"] == "Ended" and ended["flush_error"] is None, ended
    saved = drive_bytes(base, token, "last-second.bin")
    assert saved is not None and hashlib.sha256(saved).hexdigest() == last.split()[0]

    # The first pod's token is dead.
    assert requests.get(f"{base}/v1/files/?json=1", headers=bearer(pod_token)).status_code == 401

    # A second rental sees all of it in /files.
    second = rent_ready(base, token, image)["gpu_id"]
    if by_hand:
        ok(base, token, second, MOUNT_BY_HAND)
    seen = ok(base, token, second, f"cat /files/notes/result.txt; sha256sum /files/last-second.bin; ls /files/runs-out/")
    assert seen.splitlines() == ["val_loss=0.123", f"{last.split()[0]}  /files/last-second.bin", f"{gpu}-outputs.tgz"]
    assert requests.delete(f"{base}/v1/gpus/{second}", headers=bearer(token)).json()["flush_error"] is None


def test_helpers_are_standalone_and_console_scripts():
    """Each helper runs on its own (no sourcing of siblings) and the package installs all four."""
    for name in SCRIPTS:
        text = script_path(name).read_text()
        assert text.startswith("#!"), name
        assert "source " not in text and ". ./" not in text, name
        checker = ["sh", "-n"] if name == "kgpu-flush" else ["bash", "-n"]
        subprocess.run([*checker, str(script_path(name))], check=True)
        installed = Path(os.environ.get("VIRTUAL_ENV", Path(__import__("sys").executable).parent.parent)) / "bin" / name
        assert installed.exists(), f"console script {name} is not installed"


def test_a_mount_that_fails_is_reported_not_fatal(tmp_path_factory, rclone_target, pytorch_image):
    """Pods that cannot reach KGPU_API_BASE still become ready; GET /v1/gpus/{id} says why the mounts failed."""
    settings = make_settings(
        tmp_path_factory.mktemp("pod-mounts-fail"), rclone_target,
        pod_backend="docker", docker_pull=False, default_image=pytorch_image, pod_api_base="http://127.0.0.1:9",
    )
    server = LiveServer(settings).start()
    try:
        token = new_user(server.base)["token"]
        state = rent_ready(server.base, token, pytorch_image)
        assert state["ready"] and state["phase"] == "Running", state
        for name in ("shared", "files"):
            mount = state["mounts"][name]
            assert mount["status"] == "failed" and "127.0.0.1:9" in mount["error"], mount
        assert ok(server.base, token, state["gpu_id"], "echo still usable") == "still usable\n"
        log = ok(server.base, token, state["gpu_id"], "cat /tmp/kgpu/mounts/bootstrap.log")
        assert "/shared: failed" in log and "/files: failed" in log
        ended = requests.delete(f"{server.base}/v1/gpus/{state['gpu_id']}", headers=bearer(token)).json()
        assert ended["phase"] == "Ended" and ended["flush_error"] is None
    finally:
        server.stop()


def test_what_cannot_be_flushed_is_named_on_return(tmp_path_factory, rclone_target, pytorch_image, caplog):
    """A write the drive refuses (over quota) cannot be uploaded: the return names it, bounded in time."""
    server = docker_bridge_server(
        tmp_path_factory.mktemp("pod-mounts-quota"), rclone_target,
        default_image=pytorch_image, user_quota_bytes=10_000, pod_flush_timeout_seconds=3,
    )
    try:
        token = new_user(server.base)["token"]
        gpu = rent_ready(server.base, token, pytorch_image)["gpu_id"]
        ok(server.base, token, gpu, "head -c 50000 /dev/urandom > /files/too-big.bin")
        started = time.monotonic()
        ended = requests.delete(f"{server.base}/v1/gpus/{gpu}", headers=bearer(token)).json()
        assert time.monotonic() - started < 3 + 5 + 30  # bounded: flush timeout, the runs' grace, removal (generous: CI load)
        assert ended["end_reason"] == "returned" and "too-big.bin" in ended["flush_error"], ended
        assert any("too-big.bin" in r.getMessage() and "returned" in r.getMessage() for r in caplog.records)
        assert drive_bytes(server.base, token, "too-big.bin") is None
    finally:
        server.stop()


def test_mount_status_parsing():
    from gateway.pods.mounts import parse_status, runs_bootstrap

    assert parse_status("") == (False, None)
    assert parse_status("state=mounting\n") == (False, {})
    ready, mounts = parse_status(
        "shared.path=/shared\nshared.status=mounted\nshared.seconds=0.5\nshared.error=\n"
        "files.path=/files\nfiles.status=failed\nfiles.seconds=x\nfiles.error=a=b: no\nstate=ready\n"
    )
    assert ready
    assert mounts == {
        "shared": {"path": "/shared", "status": "mounted", "seconds": 0.5, "error": None},
        "files": {"path": "/files", "status": "failed", "seconds": None, "error": "a=b: no"},
    }
    _, later = parse_status("shared.path=/shared\nshared.status=mounted\nfiles.path=/files\nfiles.status=mounted\nstate=ready\nlive=/files,\n")
    assert later["files"]["status"] == "mounted" and later["shared"]["status"] == "lost"
    assert "no longer mounted" in later["shared"]["error"]
    _, flooded = parse_status("".join(f"m{i}.status=failed\nm{i}.error={'x' * 5000}\n" for i in range(50)) + "state=ready\n")
    assert len(flooded) == 8 and all(len(m["error"]) == 1000 for m in flooded.values())
    assert runs_bootstrap(["kgpu-bootstrap"]) and runs_bootstrap(["/usr/local/bin/kgpu-bootstrap", "x"])
    assert not runs_bootstrap(None) and not runs_bootstrap(["/opt/nvidia/nvidia_entrypoint.sh"])


BASH_BLOCK = re.compile(r"^```bash[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)


def test_inside_a_gpu_doc_examples(pod_server, pytorch_image):
    """docs/inside-a-gpu.md's bash blocks, joined, run inside a kgpu-pytorch pod and do what they say."""
    base = pod_server.base
    member = new_user(base)
    token = member["token"]
    requests.post(f"{base}/v1/admin/orgs", json={"slug": "vitallab", "name": "VitalLab"}, headers=ADMIN)
    requests.post(f"{base}/v1/admin/orgs/vitallab/members", json={"user_id": member["id"], "role": "uploader"}, headers=ADMIN)
    records = "id,hr\n" + "".join(f"{i},{60 + i % 40}\n" for i in range(1000))
    assert requests.put(f"{base}/v1/shared/vitallab/datasets/ecg/records.csv", data=records, headers=bearer(token)).status_code in (200, 201)

    blocks = BASH_BLOCK.findall((ROOT / "docs/inside-a-gpu.md").read_text())
    assert len(blocks) >= 5
    gpu = rent_ready(base, token, pytorch_image)["gpu_id"]
    done = run(base, token, gpu, "\n".join(blocks), strict=True)
    assert done["exit_code"] == 0, f"stdout: {done['stdout']}\nstderr: {done['stderr']}"
    out = done["stdout"]
    assert "state=ready" in out and "duckdb: (1000, " in out and "pyarrow: 1000 rows" in out
    assert "venv restored" in out and "uploaded" in out.splitlines()
    requests.delete(f"{base}/v1/gpus/{gpu}", headers=bearer(token))

    tarball = drive_bytes(base, token, "exp42-outputs.tgz")
    with tarfile.open(fileobj=io.BytesIO(tarball)) as tar:
        assert sorted(tar.getnames()) == ["exp42", "exp42/checkpoint.pt", "exp42/metrics.csv"]
    assert drive_bytes(base, token, "exp42/results.csv") == b"epoch,loss\n1,0.9\n2,0.5\n"
    assert drive_bytes(base, token, "exp42/last-words.txt") == b"one more result\n"
    assert len(drive_bytes(base, token, "envs/exp42.tar.zst") or b"") > 1000


def test_a_bootstrap_that_never_reports_does_not_hold_the_rental(docker_pod_client):
    """An image whose kgpu-bootstrap hangs becomes ready after the backend's deadline, saying so in mounts."""
    from gateway.pods import PodSpec
    from gateway.pods.docker import DockerPodBackend
    from tests.conftest import DOCKER_TEST_PREFIX

    dockerfile = (
        f"FROM {DOCKER_TEST_IMAGE}\n"
        "RUN printf '#!/bin/sh\\nexec sleep infinity\\n' > /usr/local/bin/kgpu-bootstrap && chmod +x /usr/local/bin/kgpu-bootstrap\n"
        'ENTRYPOINT ["kgpu-bootstrap"]\n'
    )
    image, _ = docker_pod_client.images.build(fileobj=io.BytesIO(dockerfile.encode()), tag="kgpu-test-silent-bootstrap:latest", rm=True)
    backend = DockerPodBackend(docker_pod_client, labels_prefix=DOCKER_TEST_PREFIX, pull=False, bootstrap_timeout_s=8)
    spec = PodSpec(rental_id="silent-" + uuid.uuid4().hex[:8], image="kgpu-test-silent-bootstrap:latest",
                   gpu_indices=[], cpu=1, memory_bytes=256 << 20, ephemeral_storage_gib=1)
    ref = backend.start(spec)
    try:
        first = backend.status(ref)
        assert not first.ready and "mounting" in first.reason
        deadline = time.monotonic() + 40
        while not (status := backend.status(ref)).ready:
            assert time.monotonic() < deadline, status
            time.sleep(0.5)
        assert status.mounts["bootstrap"]["status"] == "failed" and "within 8 s" in status.mounts["bootstrap"]["error"]
    finally:
        assert backend.destroy(ref) is None


def test_an_idle_return_flushes_too(pod_server, pytorch_image):
    """The reaper's returns (idle here; expiry and credits take the same path) upload /files first."""
    from datetime import timedelta

    from gateway.models import utcnow

    base, token = pod_server.base, new_user(pod_server.base)["token"]
    gpu = rent_ready(base, token, pytorch_image)["gpu_id"]
    digest = ok(base, token, gpu, "head -c 100000 /dev/urandom > /files/idle.bin && sha256sum /files/idle.bin").split()[0]
    rentals = pod_server.app.state.rentals
    original = rentals.now
    rentals.now = lambda: utcnow() + timedelta(seconds=pod_server.settings.idle_return_seconds + 60)
    try:
        assert (gpu, "auto_idle") in rentals.tick()
    finally:
        rentals.now = original
    state = requests.get(f"{base}/v1/gpus/{gpu}", headers=bearer(token)).json()
    assert state["end_reason"] == "auto_idle" and state["flush_error"] is None, state
    saved = drive_bytes(base, token, "idle.bin")
    assert saved is not None and hashlib.sha256(saved).hexdigest() == digest


def test_docker_pods_on_the_default_bridge_with_no_configuration(tmp_path, docker_pod_client, pytorch_image):
    """`kgpu serve` with the docker backend and nothing else set: pods join docker's default bridge
    (not the host's network), and still reach the gateway and the embedded store (presigned URLs),
    which listen on the bridge's host address too."""
    served = Served(tmp_path / "data", {"KGPU_POD_BACKEND": "docker", "KGPU_DEFAULT_IMAGE": pytorch_image, "KGPU_DOCKER_PULL": "false"})
    try:
        base = served.base
        person = requests.post(f"{base}/v1/admin/users", json={"email": "b@lab.example"}, headers={"Authorization": "Bearer serve-test-admin"}).json()
        token = person["token"]
        requests.post(f"{base}/v1/admin/orgs", json={"slug": "bridgelab", "name": "B", "owner_user_id": person["user"]["id"]},
                      headers={"Authorization": "Bearer serve-test-admin"})
        assert requests.put(f"{base}/v1/shared/bridgelab/d.txt", data=b"over the bridge\n", headers=bearer(token)).status_code in (200, 201)
        state = rent_ready(base, token, pytorch_image)
        gpu = state["gpu_id"]
        assert {n: m["status"] for n, m in state["mounts"].items()} == {"shared": "mounted", "files": "mounted"}, state
        network = docker_pod_client.api.inspect_container(f"kgpu-{gpu}")["HostConfig"]["NetworkMode"]
        assert network in ("default", "bridge")
        seen = ok(base, token, gpu, 'echo "$KGPU_API_BASE"; cat /shared/bridgelab/d.txt')
        api_base, content = seen.split("\n", 1)
        assert not api_base.startswith("http://127.0.0.1") and api_base.endswith(f":{served.port}")
        assert content == "over the bridge\n"
        ok(base, token, gpu, "echo kept > /files/bridge.txt")
        ended = requests.delete(f"{base}/v1/gpus/{gpu}", headers=bearer(token)).json()
        assert ended["flush_error"] is None and drive_bytes(base, token, "bridge.txt") == b"kept\n"
    finally:
        served.process.terminate()
        served.process.wait(timeout=30)


def test_mounting_pods_get_fuse_and_sys_admin_only(pod_server, pytorch_image, docker_pod_client):
    base, token = pod_server.base, new_user(pod_server.base)["token"]
    gpu = rent_ready(base, token, pytorch_image)["gpu_id"]
    try:
        host = docker_pod_client.api.inspect_container(f"kgpu-{gpu}")["HostConfig"]
        assert host["Privileged"] is False and host["SecurityOpt"] == ["no-new-privileges"]
        assert host["CapAdd"] == ["SYS_ADMIN"] and sorted(host["CapDrop"]) == ["AUDIT_WRITE", "MKNOD", "NET_RAW"]
        assert [d["PathOnHost"] for d in host["Devices"]] == ["/dev/fuse"]
        caps = ok(base, token, gpu, "grep CapEff /proc/self/status")
        assert int(caps.split()[1], 16) & (1 << 21)  # CAP_SYS_ADMIN, and only what docker grants besides
    finally:
        requests.delete(f"{base}/v1/gpus/{gpu}", headers=bearer(token))


def test_a_mount_lost_later_shows_at_the_next_tick(pod_server, pytorch_image):
    base, token = pod_server.base, new_user(pod_server.base)["token"]
    gpu = rent_ready(base, token, pytorch_image)["gpu_id"]
    try:
        ok(base, token, gpu, "fusermount3 -u /shared")
        pod_server.app.state.rentals.tick()
        state = requests.get(f"{base}/v1/gpus/{gpu}", headers=bearer(token)).json()
        assert state["mounts"]["shared"]["status"] == "lost" and state["mounts"]["files"]["status"] == "mounted", state
        assert state["ready"] and state["phase"] == "Running"
    finally:
        requests.delete(f"{base}/v1/gpus/{gpu}", headers=bearer(token))


def test_the_rental_list_shows_a_pod_ready_once_mounted(local_pod_server):
    """GET /v1/gpus (my_gpus) asks a starting pod as GET /v1/gpus/{id} does (this server's reaper never ticks)."""
    base, token = local_pod_server.base, new_user(local_pod_server.base)["token"]
    gpu = requests.post(f"{base}/v1/gpus", json={"name": "listed"}, headers=bearer(token)).json()["gpu_id"]
    try:
        deadline = time.monotonic() + 60
        while True:
            mine = {g["gpu_id"]: g for g in requests.get(f"{base}/v1/gpus", headers=bearer(token)).json()["my_gpus"]}
            if mine[gpu]["ready"]:
                break
            assert time.monotonic() < deadline, mine[gpu]
            time.sleep(0.2)
        assert mine[gpu]["mounts"]["files"]["status"] == "mounted"
    finally:
        requests.delete(f"{base}/v1/gpus/{gpu}", headers=bearer(token))


def test_a_write_the_drive_refuses_is_reported_at_once(pod_server, pytorch_image):
    """/files/shared/ is read-only on the server: the write seems to work in the pod, its upload is
    refused (403), and the return names it without waiting out the flush timeout."""
    base = pod_server.base
    person = new_user(base)
    token = person["token"]
    slug = "lab-" + uuid.uuid4().hex[:6]
    requests.post(f"{base}/v1/admin/orgs", json={"slug": slug, "name": "L", "owner_user_id": person["id"]}, headers=ADMIN)
    requests.put(f"{base}/v1/shared/{slug}/a.txt", data=b"x", headers=bearer(token))
    gpu = rent_ready(base, token, pytorch_image)["gpu_id"]
    ok(base, token, gpu, f"echo oops > /files/shared/{slug}/mine.txt && echo fine > /files/fine.txt")
    started = time.monotonic()
    ended = requests.delete(f"{base}/v1/gpus/{gpu}", headers=bearer(token)).json()
    took = time.monotonic() - started
    assert "refused by the drive" in ended["flush_error"] and f"shared/{slug}/mine.txt" in ended["flush_error"], ended
    assert took < pod_server.settings.pod_flush_timeout_seconds, took  # not waited out
    assert drive_bytes(base, token, "fine.txt") == b"fine\n"
    listed = requests.get(f"{base}/v1/shared/{slug}/?json=1", headers=bearer(token)).json()
    assert "mine.txt" not in str(listed)
