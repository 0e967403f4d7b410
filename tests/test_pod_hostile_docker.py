"""A hostile tenant in a docker pod (docs/pod-isolation.md, "Docker backend").

The pod is a kgpu-pytorch pod with both FUSE mounts up, so it holds CAP_SYS_ADMIN and
/dev/fuse, as the mounts need. With the flags docker pods had before (``--cap-add SYS_ADMIN
--device /dev/fuse --security-opt apparmor:unconfined`` on a daemon without user namespaces)
a cgroup-v1 mount worked and the ``release_agent`` trick ran a command as root on the host;
each attack here is a test that would fail that way. They pass because the daemon remaps user
namespaces: root in the pod is an unprivileged host uid whose capabilities count only in the
pod's own namespaces. The backend-generic attacks are in tests/test_pod_hostile.py.
"""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

import pytest
import requests

from gateway.pods import PodSpec
from gateway.pods.docker import DockerPodBackend
from tests.conftest import ADMIN_TOKEN, DOCKER_TEST_PREFIX
from tests.test_pod_mounts import (  # noqa: F401 - pod_server and pytorch_image are fixtures used here
    bearer,
    new_user,
    ok,
    pod_server,
    pytorch_image,
    rent_ready,
    run,
    wait_for_drive,
)

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
CAP_SYS_ADMIN = 1 << 21

# Mounts the memory controller's cgroup-v1 hierarchy at $1; exits 0 only if that worked.
CGROUP_MOUNT = 'mkdir -p "$1" && mount -t cgroup -o memory cgroup "$1"'

# The classic escape: a cgroup-v1 hierarchy mounted in the pod, notify_on_release on a child
# cgroup, release_agent pointing at a script by its path on the host (the container's upper
# directory), one process through the child: the kernel runs the agent as root on the host.
# Tried straight, then in a cgroup namespace of the pod's own (where a v1 mount of a hierarchy
# the host has is allowed); $1: the payload's path on the host, $2: the host file it writes.
RELEASE_AGENT = r"""
printf '#!/bin/sh\nid > %s\n' "$2" > /payload.sh && chmod +x /payload.sh
attack='
d=$(mktemp -d)
mount -t cgroup -o memory cgroup "$d" 2>/dev/null || mount -t cgroup -o rdma cgroup "$d" 2>/dev/null || { echo "$0: no cgroup mount"; exit 0; }
echo "$0: mounted"
mkdir -p "$d/kgpu-x" && echo 1 > "$d/kgpu-x/notify_on_release" && echo "$1" > "$d/release_agent" && echo "$0: agent set"
sh -c "echo \$\$ > $d/kgpu-x/cgroup.procs" && echo "$0: released"
sleep 1; rmdir "$d/kgpu-x" 2>/dev/null; exit 0
'
sh -c "$attack" straight "$1"
unshare -Cm sh -c "$attack" cgroupns "$1"
exit 0
"""

# Writes core_pattern's own value back (a no-op if it works), after remounting /proc/sys
# read-write: what host root could, to make the kernel run a program on the next crash.
PROC_SYS = """
mount -o remount,rw /proc/sys 2>/dev/null
cat /proc/sys/kernel/core_pattern > /tmp/pattern && cat /tmp/pattern > /proc/sys/kernel/core_pattern
"""

# finit_module(2) and init_module(2) (x86_64 numbers): EPERM, or the errno's name.
LOAD_MODULE = """python3 - <<'EOF'
import ctypes, errno, os
libc = ctypes.CDLL(None, use_errno=True)
fd = os.open("/dev/null", os.O_RDONLY)
for name, args in (("finit_module", (313, fd, b"", 0)), ("init_module", (175, b"\\0" * 64, 64, b""))):
    ctypes.set_errno(0)
    result = libc.syscall(*args)
    print(name, result, errno.errorcode.get(ctypes.get_errno(), ctypes.get_errno()))
EOF"""


@pytest.fixture(scope="module")
def hostile(pod_server, pytorch_image):
    """A kgpu-pytorch pod with /shared and /files mounted: (base, token, gpu id, container name, org)."""
    base = pod_server.base
    person = new_user(base)
    slug = "hostile-" + uuid.uuid4().hex[:6]
    made = requests.post(f"{base}/v1/admin/orgs", json={"slug": slug, "name": "H", "owner_user_id": person["id"]}, headers=ADMIN)
    assert made.status_code == 201, made.text
    assert requests.put(f"{base}/v1/shared/{slug}/data.txt", data=b"shared bytes\n", headers=bearer(person["token"])).ok
    state = rent_ready(base, person["token"], pytorch_image)
    assert {n: m["status"] for n, m in state["mounts"].items()} == {"shared": "mounted", "files": "mounted"}, state
    gpu = state["gpu_id"]
    yield base, person["token"], gpu, f"kgpu-{gpu}", slug
    requests.delete(f"{base}/v1/gpus/{gpu}", headers=bearer(person["token"]))


def pod_sh(hostile, script: str, *args: str) -> dict:
    base, token, gpu, _, _ = hostile
    quoted = " ".join("'" + a.replace("'", "'\\''") + "'" for a in args)
    return run(base, token, gpu, f"set -- {quoted}\n{script}")


def host_pids(client, container: str) -> list[int]:
    top = client.api.top(container)
    column = top["Titles"].index("PID")
    return [int(row[column]) for row in top["Processes"]]


def status_field(pid: int, field: str) -> list[str]:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return line.split()[1:]
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def test_the_mounts_work_and_the_pod_holds_sys_admin_in_its_namespace(hostile):
    """The configuration under attack: FUSE mounts up, CAP_SYS_ADMIN effective in the pod."""
    base, token, gpu, _, slug = hostile
    caps = ok(base, token, gpu, "grep CapEff /proc/self/status").split()[1]
    assert int(caps, 16) & CAP_SYS_ADMIN
    assert ok(base, token, gpu, f"cat /shared/{slug}/data.txt") == "shared bytes\n"
    ok(base, token, gpu, "echo written in a hostile pod > /files/hostile.txt")
    assert wait_for_drive(base, token, "hostile.txt") == b"written in a hostile pod\n"


def test_root_in_the_pod_is_no_one_on_the_host(hostile, docker_pod_client):
    """Every process of the pod (the bootstrap's rclone mounts too), seen from the host: not uid 0,
    and in a user namespace that is not the host's, so its capabilities count nothing here."""
    _, _, _, name, _ = hostile
    pids = host_pids(docker_pod_client, name)
    assert len(pids) >= 3, pids  # docker-init, kgpu-bootstrap's sleep, two rclone mounts
    host_userns = os.readlink("/proc/self/ns/user")
    for pid in pids:
        assert "0" not in status_field(pid, "Uid") and "0" not in status_field(pid, "Gid"), pid
        assert os.readlink(f"/proc/{pid}/ns/user") != host_userns, pid
        first = Path(f"/proc/{pid}/uid_map").read_text().split()
        assert first[0] == "0" and first[1] != "0", first  # pod root -> an unprivileged host uid


def test_a_cgroup_mount_is_refused(hostile):
    done = pod_sh(hostile, CGROUP_MOUNT, "/tmp/kgpu-cg")
    assert done["exit_code"] != 0, done
    assert "denied" in done["stderr"] or "not permitted" in done["stderr"], done


def test_the_release_agent_trick_runs_nothing_on_the_host(hostile, docker_pod_client):
    _, _, _, name, _ = hostile
    upper = docker_pod_client.api.inspect_container(name)["GraphDriver"]["Data"]["UpperDir"]
    marker = Path(f"/tmp/kgpu-hostile-{uuid.uuid4().hex}")
    agents = {p: p.read_text() for p in Path("/sys/fs/cgroup").glob("*/release_agent")}
    try:
        done = pod_sh(hostile, RELEASE_AGENT, f"{upper}/payload.sh", str(marker))
        assert done["exit_code"] == 0, done
        time.sleep(2)  # the kernel runs the agent asynchronously
        assert not marker.exists(), f"the pod ran {marker.read_text()!r} on the host\n{done['stdout']}"
        assert {p: p.read_text() for p in agents} == agents, done["stdout"]
        assert "agent set" not in done["stdout"], done["stdout"]
        assert "straight: no cgroup mount" in done["stdout"], done["stdout"]
    finally:
        for path, value in agents.items():  # had it worked: leave the host as it was
            if path.read_text() != value:
                path.write_text(value or "\n")
        marker.unlink(missing_ok=True)


def test_proc_sys_cannot_be_written(hostile):
    before = Path("/proc/sys/kernel/core_pattern").read_text()
    done = pod_sh(hostile, PROC_SYS)
    assert done["exit_code"] != 0 and "ermission denied" in done["stderr"], done
    assert Path("/proc/sys/kernel/core_pattern").read_text() == before


def test_no_block_device_can_be_made_or_mounted(hostile):
    """No block device in /dev; mknod refused (MKNOD dropped, and a user namespace's root may not
    anyway), so the host's disk cannot be mounted; no loop devices either. (A tmpfs the pod may
    mount, in its own mount namespace only: every unprivileged user namespace may, and FUSE needs
    the same right; docs/pod-isolation.md.)"""
    base, token, gpu, _, _ = hostile
    assert ok(base, token, gpu, "find /dev -type b") == ""
    disk = os.stat("/").st_dev
    made = run(base, token, gpu, f"mknod /tmp/disk b {os.major(disk)} {os.minor(disk)}")
    assert made["exit_code"] != 0 and "not permitted" in made["stderr"], made
    loop = run(base, token, gpu, "truncate -s 8M /tmp/img && losetup -f --show /tmp/img")
    assert loop["exit_code"] != 0, loop  # no /dev/loop-control, and no right to make one


def test_kernel_modules_cannot_be_loaded(hostile):
    base, token, gpu, _, _ = hostile
    lines = ok(base, token, gpu, LOAD_MODULE).splitlines()
    assert [line.split()[0] for line in lines] == ["finit_module", "init_module"], lines
    assert all(line.split()[1:] == ["-1", "EPERM"] for line in lines), lines
    modprobe = run(base, token, gpu, "cat /proc/sys/kernel/modprobe > /proc/sys/kernel/modprobe")
    assert modprobe["exit_code"] != 0, modprobe


def test_the_pod_sees_no_host_process(hostile):
    base, token, gpu, _, _ = hostile
    seen = ok(base, token, gpu, "for p in /proc/[0-9]*; do tr '\\0' ' ' < $p/cmdline; echo; done")
    assert "dockerd" not in seen and "containerd" not in seen and "pytest" not in seen, seen
    assert seen.startswith("/sbin/docker-init -- kgpu-bootstrap"), seen  # pid 1 is the pod's own init
    assert int(ok(base, token, gpu, "ls -d /proc/[0-9]* | wc -l")) < 15


# --- where a pod gets no FUSE: said clearly, and nothing privileged ----------------------------


def start_and_wait_failed_mounts(backend: DockerPodBackend, image: str) -> tuple[str, dict, dict]:
    spec = PodSpec(rental_id="nofuse-" + uuid.uuid4().hex[:8], image=image, gpu_indices=[], cpu=1,
                   memory_bytes=256 << 20, ephemeral_storage_gib=1,
                   env={"KGPU_API_BASE": "http://127.0.0.1:9", "KGPU_API_TOKEN": "x"})
    ref = backend.start(spec)
    deadline = time.monotonic() + 60
    while not (status := backend.status(ref)).ready:
        assert time.monotonic() < deadline, status
        time.sleep(0.3)
    return ref, status.mounts, backend.api.inspect_container(ref)["HostConfig"]


def test_a_daemon_without_userns_remap_gives_pods_no_fuse_and_says_why(docker_pod_client, pytorch_image, monkeypatch):
    backend = DockerPodBackend(docker_pod_client, labels_prefix=DOCKER_TEST_PREFIX, pull=False)
    assert backend.daemon_security()[0], "the test daemon remaps user namespaces (tests/images/build-test-image.sh)"
    monkeypatch.setattr(backend, "daemon_security", lambda: (False, False))
    ref, mounts, host = start_and_wait_failed_mounts(backend, pytorch_image)
    try:
        assert not host.get("CapAdd") and not host.get("Devices") and host["Privileged"] is False, host
        assert {m["status"] for m in mounts.values()} == {"failed"}, mounts
        assert all("userns-remap" in m["error"] for m in mounts.values()), mounts
        caps = backend._exec(ref, "grep CapEff /proc/self/status").decode().split()[1]
        assert not int(caps, 16) & CAP_SYS_ADMIN
    finally:
        backend.destroy(ref)


def test_a_pod_on_the_host_network_gets_no_fuse_and_says_why(docker_pod_client, pytorch_image):
    """docker refuses the host's network namespace in a remapped user namespace: such a pod runs
    in the host's user namespace, so it gets no CAP_SYS_ADMIN and no /dev/fuse."""
    backend = DockerPodBackend(docker_pod_client, network="host", labels_prefix=DOCKER_TEST_PREFIX, pull=False)
    ref, mounts, host = start_and_wait_failed_mounts(backend, pytorch_image)
    try:
        assert host["UsernsMode"] == "host" and host["NetworkMode"] == "host", host
        assert not host.get("CapAdd") and not host.get("Devices"), host
        assert all("host's network" in m["error"] for m in mounts.values()), mounts
        assert backend.run_ids(ref) == []  # usable: runs still work
    finally:
        backend.destroy(ref)


def test_a_network_that_lets_pods_reach_each_other_is_refused(docker_pod_client):
    """Issue 19 (13): a bridge network with inter-container communication on (docker's default
    unless dockerd runs with --icc=false) would let pods reach each other: no pod starts on it."""
    from gateway.pods import PodStartError
    from tests.test_pod_conformance import pod_spec

    name = f"{DOCKER_TEST_PREFIX}-icc-{uuid.uuid4().hex[:8]}"
    docker_pod_client.networks.create(name, driver="bridge")  # icc on, docker's default
    try:
        backend = DockerPodBackend(docker_pod_client, network=name, labels_prefix=DOCKER_TEST_PREFIX, pull=False)
        backend.test_image = "kgpu-test:latest"
        assert not backend.network_isolates_pods()
        with pytest.raises(PodStartError, match="lets pods reach each other"):
            backend.start(pod_spec(backend, {"KGPU_GPU_ID": "icc"}))
        assert not [c for c in docker_pod_client.containers.list(all=True) if c.name.endswith("icc")]
    finally:
        docker_pod_client.networks.get(name).remove()


@pytest.mark.parametrize("pod_backend", ["docker"], indirect=True)
def test_the_in_pod_token_is_not_in_the_containers_configuration(pod_backend):
    """docker inspect (which any user of the daemon may run) never shows a pod's token."""
    import secrets

    from tests.test_pod_hostile import sh, start_pod

    token = "kgpu_" + secrets.token_hex(24)
    ref = start_pod(pod_backend, {"KGPU_API_TOKEN": token})
    try:
        assert sh(pod_backend, ref, 'printf %s "$KGPU_API_TOKEN"')[1] == token
        config = pod_backend.api.inspect_container(ref)["Config"]
        assert config.get("Env")
        assert token not in " ".join(config.get("Env") or []) + " ".join(config.get("Cmd") or [])
    finally:
        pod_backend.destroy(ref)
