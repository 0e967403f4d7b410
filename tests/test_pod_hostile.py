"""A hostile tenant, on every pod backend: each attack is a run that tries to leave its pod.

Each test did succeed as an attack on the backends before tenant isolation (runs shared the
server's uid, pid namespace and network), so each can fail. The docker-only attacks (cgroup
release_agent, /proc/sys, devices) are in test_pod_hostile_docker.py.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest

from gateway.pods import PodError
from gateway.pods.docker import DockerPodBackend
from tests.test_pod_conformance import LISTEN_9999, _read_file, enter, files_call, pod_spec, wait_finished


def start_pod(backend, env=None):
    return backend.start(pod_spec(backend, {"KGPU_GPU_ID": "hostile", **(env or {})}))


@pytest.fixture
def pods(pod_backend):
    started = []

    def make(env=None):
        ref = start_pod(pod_backend, env)
        started.append(ref)
        return ref

    yield pod_backend, make
    for ref in started:
        pod_backend.destroy(ref)


def sh(backend, ref, script, seconds=30.0):
    """Run ``script`` in the pod; (exit code, stdout, stderr)."""
    run_id = "run-" + uuid.uuid4().hex[:8]
    backend.start_run(ref, run_id, ["sh", "-c", script], {})
    state = wait_finished(backend, ref, run_id, seconds)
    return state.exit_code, state.stdout.decode(errors="replace"), state.stderr.decode(errors="replace")


@pytest.fixture
def host_secret_process():
    """A host process with a secret in its environment and on its command line (as the server
    and the embedded store had): no pod may find either."""
    secret = "canary-" + secrets.token_hex(12)
    process = subprocess.Popen(
        ["sh", "-c", "sleep 300", secret], env={"PATH": "/usr/bin:/bin", "KGPU_ADMIN_TOKEN": secret},
    )
    yield process, secret
    process.kill()
    process.wait()


def test_a_pod_cannot_read_host_processes_environment_or_command_line(pods, host_secret_process):
    backend, make = pods
    ref = make()
    process, secret = host_secret_process
    code, out, err = sh(backend, ref, f"""
        cat /proc/{process.pid}/environ /proc/{process.pid}/cmdline 2>/dev/null
        for p in /proc/[0-9]*; do cat "$p/environ" "$p/cmdline" 2>/dev/null; echo; done
        echo scanned""")
    assert "scanned" in out, (code, out, err)
    assert secret not in out


def test_a_pod_sees_only_its_own_processes(pods):
    backend, make = pods
    mine, other = make(), make()
    marker = "other-pod-" + secrets.token_hex(6)
    backend.start_run(other, "run-other", ["sh", "-c", "sleep 300", marker], {})
    time.sleep(0.3)
    code, out, _ = sh(backend, mine, "for p in /proc/[0-9]*; do cat $p/cmdline 2>/dev/null; echo; done; ls -d /proc/[0-9]* | wc -l")
    assert code == 0
    assert marker not in out
    assert int(out.split()[-1]) < 15  # a handful of the pod's own, not the host's hundreds


def test_a_pod_cannot_reach_the_data_directory(pods, tmp_path):
    """The server's data folder (its database and the store's files) is out of sight: not by its
    path, not through /proc/*/root, and nothing can be planted in it."""
    backend, make = pods
    data = getattr(backend, "root", tmp_path / "pods").parent
    canary = "db-" + secrets.token_hex(8)
    (data / "kgpu.db").write_text(canary)
    (data / "kgpu.db").chmod(0o644)  # even a world-readable file
    ref = make()
    code, out, _ = sh(backend, ref, f"""
        cat {data}/kgpu.db 2>/dev/null
        for p in /proc/[0-9]*; do cat "$p/root{data}/kgpu.db" 2>/dev/null; done
        echo planted > {data}/planted 2>/dev/null
        for p in /proc/[0-9]*; do echo planted > "$p/root{data}/planted" 2>/dev/null; done
        echo done""")
    assert "done" in out
    assert canary not in out
    assert not (data / "planted").exists()


def test_a_pod_cannot_read_another_pods_workspace_or_tmp(pods):
    backend, make = pods
    mine, other = make(), make()
    secret = "theirs-" + secrets.token_hex(8)
    assert sh(backend, other, f"echo {secret} > /workspace/private.txt; echo {secret} > /tmp/private.txt")[0] == 0
    backend.start_run(other, "run-busy", ["sleep", "300"], {})  # a live process of the other pod
    code, out, _ = sh(backend, mine, f"""
        cat /workspace/private.txt /tmp/private.txt 2>/dev/null
        find / -name private.txt -not -path '/proc/*' 2>/dev/null | head -3 | xargs -r cat
        for p in /proc/[0-9]*; do cat $p/root/workspace/private.txt $p/root/tmp/private.txt 2>/dev/null; done
        echo done""", seconds=120)
    assert "done" in out, (code, out, _)
    assert secret not in out


def test_a_signal_reaches_only_the_pods_own_processes(pods):
    """A run writes a host pid into its run folder; stopping the run must not kill that process."""
    backend, make = pods
    ref = make()
    victim = subprocess.Popen(["sleep", "300"], start_new_session=True)  # its own group: a wrong kill takes only it
    try:
        backend.start_run(ref, "run-liar", ["sh", "-c", f"""
            sleep 0.2
            echo {victim.pid} > /tmp/kgpu/runs/run-liar/runner_pid
            echo {victim.pid} > /tmp/kgpu/runs/run-liar/pid
            sleep 300"""], {})
        time.sleep(1.0)
        backend.signal_run(ref, "run-liar", "KILL")
        backend.signal_run(ref, "run-liar", "TERM")
        time.sleep(0.5)
        assert victim.poll() is None, "the gateway killed a host process a run named"
    finally:
        victim.kill()
        victim.wait()


def test_the_gateway_does_not_follow_a_runs_symlinks(pods, tmp_path):
    """A run swaps its output for a symlink to a host file: the gateway must not read it for the run."""
    backend, make = pods
    ref = make()
    secret_file = tmp_path / "host-secret"
    secret_file.write_text("host-secret-" + secrets.token_hex(8))
    secret_file.chmod(0o600)
    sh(backend, ref, f"""
        d=/tmp/kgpu/runs
        mkdir -p $d/run-fake
        ln -sf {secret_file} $d/run-fake/stdout
        ln -sf /etc/shadow $d/run-fake/stderr
        echo 1 > $d/run-fake/exit_code
        ln -s {tmp_path} $d/run-link""")
    state = backend.run_state(ref, "run-fake", 65536)
    assert state is None or (secret_file.read_text() not in state.stdout.decode() and b"root:" not in state.stderr)
    assert secret_file.read_text().encode() not in backend.read_output(ref, "run-fake", "stdout", 0)
    assert backend.run_state(ref, "run-link", 100) is None or backend.run_state(ref, "run-link", 100).stdout == b""


def test_a_pod_holds_no_privilege(pods):
    """No cgroup, file system or device mount, no new privileges through setuid binaries."""
    backend, make = pods
    ref = make()
    code, out, _ = sh(backend, ref, """
        mkdir -p /tmp/cg /tmp/t
        mount -t cgroup -o memory cgroup /tmp/cg 2>/dev/null && echo MOUNTED-CGROUP
        mount -t tmpfs none /tmp/t 2>/dev/null && echo MOUNTED-TMPFS
        mknod /tmp/sda b 8 0 2>/dev/null && echo MADE-NODE
        ls /dev | grep -E '^(sd|vd|nvme|loop|xvd)' && echo BLOCK-DEVICES
        echo 1 > /proc/sys/kernel/core_pattern 2>/dev/null && echo WROTE-PROC-SYS
        grep NoNewPrivs /proc/self/status
        mkdir /planted 2>/dev/null && echo WROTE-ROOT
        head -c 100M /dev/zero > /run/filler 2>/dev/null || echo RUN-IS-SMALL
        unshare -Urm sh -c 'mount -t tmpfs none /workspace && echo MOUNTED-IN-NESTED-USERNS' 2>/dev/null
        echo done""")
    assert "done" in out, out
    for forbidden in ("MOUNTED-CGROUP", "MADE-NODE", "BLOCK-DEVICES", "WROTE-PROC-SYS"):
        assert forbidden not in out, out
    if getattr(pods[0], "name", "") == "local":
        assert "MOUNTED-TMPFS" not in out and "NoNewPrivs:\t1" in out, out
        # Nor in a user namespace of its own inside (issue 19, item 17: it could, there).
        assert "MOUNTED-IN-NESTED-USERNS" not in out, out
        # Its root is read-only and its memory-backed folders are small: the disk is /tmp and /workspace.
        assert "WROTE-ROOT" not in out and "RUN-IS-SMALL" in out, out


@pytest.fixture
def host_service():
    """A service on the host's loopback (as the database with trust auth is)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    stop = threading.Event()

    def serve():
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            conn.sendall(b"HOST-SERVICE\n")
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield listener.getsockname()[1]
    stop.set()
    thread.join()
    listener.close()


def test_a_pod_cannot_reach_the_hosts_loopback_services(pods, host_service):
    backend, make = pods
    ref = make()
    code, out, _ = sh(backend, ref, f"curl -s --max-time 3 telnet://127.0.0.1:{host_service} </dev/null; echo done")
    assert "done" in out
    assert "HOST-SERVICE" not in out


def test_the_in_pod_token_is_in_the_pod_only(pod_backend):
    """The pod receives its token once: its runs and logins have it (the backend's own records
    of the pod do not: each backend's hostile file checks them)."""
    token = "kgpu_" + secrets.token_hex(24)
    ref = start_pod(pod_backend, {"KGPU_API_TOKEN": token})
    try:
        assert sh(pod_backend, ref, 'printf %s "$KGPU_API_TOKEN"')[1] == token
        assert enter(pod_backend, ref, ["-c", 'printf %s "$KGPU_API_TOKEN"'])[1].decode() == token
    finally:
        pod_backend.destroy(ref)


def test_the_embedded_store_keys_are_on_no_command_line(tmp_path):
    from drive.store.embedded import EmbeddedS3Server

    server = EmbeddedS3Server(tmp_path)
    server.start()
    try:
        cmdline = Path(f"/proc/{server._process.pid}/cmdline").read_bytes().decode()
        assert server.credentials.secret_key not in cmdline and server.credentials.access_key not in cmdline
    finally:
        server.stop()


def test_two_gateways_on_one_host_never_share_a_pod_uid(tmp_path):
    """Replicas (or test stacks) with data directories of their own still give each pod a uid of
    its own, and returning one gateway's pod leaves the other's running."""
    from gateway.pods.local import LocalPodBackend
    from tests.conftest import passable

    passable(tmp_path)
    first, second = LocalPodBackend(tmp_path / "a" / "pods"), LocalPodBackend(tmp_path / "b" / "pods")
    if first.name != "local" or first.mode != "isolated":
        pytest.skip("needs the isolated local backend")
    mine, theirs = start_pod(first), start_pod(second)  # neither has run anything yet
    try:
        first.start_run(mine, "run-long", ["sleep", "300"], {})
        uid_mine = sh(first, mine, "id -u")[1].strip()
        uid_theirs = sh(second, theirs, "id -u")[1].strip()
        assert uid_mine != uid_theirs
        second.destroy(theirs)
        state = first.run_state(mine, "run-long", 10)
        assert state is not None and not state.finished, "returning another gateway's pod killed this one's run"
    finally:
        first.destroy(mine)
        second.destroy(theirs)


def test_a_pod_cannot_take_every_pid(pod_backend):
    """Issue 19 (9): a fork bomb stops at the pod's process limit (KGPU_POD_PIDS_LIMIT; 3000
    sleeps per pod hit nothing before), and only the pod feels it."""
    pod_backend.pids_limit = 64  # set before the pod starts: every backend applies it at start
    ref = start_pod(pod_backend)
    try:
        # perl (in every Debian, minbase included) counts its forks; a shell gives up at the first failure.
        code, out, err = sh(
            pod_backend, ref,
            """perl -e 'for (1..200) { my $p = fork; last unless defined $p; if (!$p) { sleep 30; exit } $n++ }
                        print "forked=$n\\n"'; kill 0""",
            seconds=60,
        )
        assert "forked=" in out, (code, out, err[-500:])
        forked = int(out.split("forked=")[1].split()[0])
        assert 8 <= forked < 64, (forked, err[-300:])
        # The limit is the pod's: the host, and a run started after, fork as before.
        assert subprocess.run(["sh", "-c", "for i in 1 2 3; do true & done; wait"], timeout=10).returncode == 0
        deadline = time.monotonic() + 20  # once the bomb's processes are reaped (their init does it, in its time)
        while True:
            try:
                if sh(pod_backend, ref, "sleep 0.1 & wait; echo again")[1].strip() == "again":
                    break
            except PodError:
                pass
            assert time.monotonic() < deadline, "the pod could not fork again after its bomb ended"
            time.sleep(0.5)
    finally:
        pod_backend.destroy(ref)


# Issue 19 (6, 8): the gateway's calls into a pod run a shell inside it. A docker or Slurm pod's
# root can replace that shell (here: one that trickles a byte a second, forever); a local pod
# cannot (the system folders are the host's, read-only), but the helper runs as its uid, so it
# can stop it (SIGSTOP to every process of its uid, every millisecond).
TRICKLING_SH = (
    "sleep 1 && cp /bin/dash /bin/dash.real && printf '#!/bin/dash.real\\nwhile :; do printf x; sleep 1; done\\n' > /tmp/trickle"
    " && chmod 0755 /tmp/trickle && ln -sf /tmp/trickle /bin/sh && echo replaced"
)
STOP_EVERYTHING = "sleep 1; exec perl -e 'while (1) { kill \"STOP\", -1; select(undef, undef, undef, 0.001) }'"


def hold_calls(backend, call) -> None:
    """30 calls at once into a pod that holds them: each is cut at its deadline or turned away
    at once (the pod's few call slots), none waits for long."""
    bound = backend.call_timeout_s + 15 + 10  # a Slurm step's start; generous for a busy machine
    outcomes: list[tuple[str, float]] = []

    def one_call():
        started = time.monotonic()
        try:
            call()
            outcomes.append(("answered", time.monotonic() - started))
        except PodError as exc:
            outcomes.append((type(exc).__name__, time.monotonic() - started))

    threads = [threading.Thread(target=one_call) for _ in range(30)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(bound + 30)
    assert len(outcomes) == 30 and all(seconds < bound for _, seconds in outcomes), outcomes
    kinds = {kind for kind, _ in outcomes}
    assert "PodBusy" in kinds, outcomes  # the rest were turned away at once, not queued
    assert "PodError" in kinds, outcomes  # held calls were cut at the deadline


def test_a_pod_that_stops_its_processes_cannot_hold_the_gateways_calls(pod_backend):
    """Every call into a pod has a deadline (and is killed past it), and one pod holds at most a
    few of the gateway's threads: 45 such calls used to hold the gateway for minutes. The pod
    also catches the processes the gateway starts in it, so this holds only where those are
    the gateway's own children (a daemon's exec it catches wedges the daemon: docs/pod-isolation.md)."""
    if not pod_backend.enters_directly:
        pytest.skip("this backend enters pods through a daemon that a pod stopping its processes wedges")
    ref = start_pod(pod_backend)
    try:
        pod_backend.start_run(ref, "run-stopper", ["sh", "-c", STOP_EVERYTHING], {})
        time.sleep(2)
        pod_backend.call_timeout_s = 2
        hold_calls(pod_backend, lambda: pod_backend.signal_run(ref, "run-stopper", "TERM"))
    finally:
        pod_backend.destroy(ref)


def test_a_pod_that_replaces_its_shell_cannot_hold_the_gateways_calls(pod_backend):
    ref = start_pod(pod_backend)
    try:
        pod_backend.start_run(ref, "run-replace", ["dash", "-c", TRICKLING_SH], {})
        time.sleep(2)
        pod_backend.call_timeout_s = 2
        try:  # (the run's state cannot be read once sh is replaced: a call tells whether it was)
            pod_backend.run_ids(ref)
            pytest.skip("this backend's calls do not run a shell the pod can replace (its system folders are read-only)")
        except PodError:
            pass
        hold_calls(pod_backend, lambda: pod_backend.run_ids(ref))
    finally:
        pod_backend.destroy(ref)


CONNECT = (
    "perl -MIO::Socket::INET -e '$c = IO::Socket::INET->new(PeerAddr => $ARGV[0], PeerPort => 9999, "
    "Timeout => 3); print $c ? \"connected:\" . <$c> : \"refused\\n\"' "
)


def test_a_pod_cannot_reach_another_pods_ports(pods):
    """Issue 19 (13): docker pods reached each other on the bridge (A connected to B's
    172.17.0.3:9999). B listens on every address; B reaches itself, A cannot reach B."""
    backend, make = pods
    a, b = make(), make()
    backend.start_run(b, "run-listen", ["sh", "-c", LISTEN_9999], {})
    address = sh(backend, b, "hostname -i 2>/dev/null | cut -d' ' -f1")[1].strip() or "127.0.0.1"
    deadline = time.monotonic() + 20
    while "connected:hello" not in sh(backend, b, CONNECT + address)[1]:  # the listener is up
        assert time.monotonic() < deadline, "pod B's own listener never answered it"
        time.sleep(0.3)
    assert sh(backend, a, CONNECT + address)[1].strip() == "refused"


def test_a_pod_that_loses_its_main_process_is_reported(pods):
    """Issue 19 (19): a pod whose own `sleep infinity` a run kills stayed Running while every run
    failed; it is reported Failed (the reaper then ends the rental, `pod_lost: …`)."""
    backend, make = pods
    ref = make()
    backend.start_run(ref, "run-kill-main", ["sh", "-c", (
        "sleep 1; for p in /proc/[0-9]*; do "
        "[ \"$(head -c 6 $p/cmdline 2>/dev/null | tr '\\0' ' ')\" = 'sleep ' ] && kill -9 ${p#/proc/}; done"
    )], {})
    deadline = time.monotonic() + 60
    while (status := backend.status(ref)).phase not in ("Failed", "Gone"):
        assert time.monotonic() < deadline, status
        time.sleep(0.5)


def test_a_write_past_the_pods_disk_fails_in_the_pod(pod_backend):
    """Issue 19 (10): /workspace and /tmp are a disk of the pod's own, of ephemeral_storage_gib
    (1 GiB here): fallocate past it, and a write past it, fail with ENOSPC in the pod."""
    ref = start_pod(pod_backend)
    try:
        code, out, err = sh(pod_backend, ref, (  # (its own output is on that disk: it speaks once there is room)
            "fallocate -l 8G /tmp/big; f=$?; rm -f /tmp/big; "
            "head -c 1100M /dev/zero > /workspace/big; h=$?; rm -f /workspace/big; echo f=$f h=$h"
        ), seconds=120)
        assert "f=1 h=1" in out, (code, out, err[-300:])
        assert pod_backend.storage_bytes(ref) < 1 << 30
    finally:
        pod_backend.destroy(ref)


# --- logins and connections (the SSH bastion's way in) ------------------------------------------

STATUS = "grep -E '^(Uid|Gid|Groups|Cap(Inh|Prm|Eff|Bnd|Amb)|NoNewPrivs|Seccomp):' /proc/self/status; grep -v '^0::' /proc/self/cgroup"


def test_a_login_holds_no_more_than_a_run(pods):
    """A login is held as the pod's runs are: the same user, capabilities, seccomp filter,
    no-new-privileges and cgroups (the pod's PID and memory limits hold for what it starts)."""
    backend, make = pods
    ref = make()
    code, run, _ = sh(backend, ref, STATUS)
    assert code == 0 and "NoNewPrivs:\t1" in run
    code, login, err = enter(backend, ref, ["-c", STATUS])
    assert code == 0, err
    assert login.decode() == run
    if type(backend) is DockerPodBackend and backend._local_daemon() and os.geteuid() == 0:
        # the daemon is this host's: runc, no daemon in the session's data path
        assert Path(backend.enter(ref, [], False, {}).argv[0]).name == "runc"


def test_a_connection_cannot_reach_the_hosts_loopback_services(pods, host_service):
    """A forward opens where the pod would: the host's 127.0.0.1 listener is not the pod's."""
    backend, make = pods
    ref = make()
    try:
        conn = backend.connect(ref, "127.0.0.1", host_service, 3)
    except Exception:
        return  # refused: nothing reached
    with conn:
        conn.settimeout(3)
        try:
            got = conn.recv(64)
        except OSError:
            got = b""
    assert b"HOST-SERVICE" not in got


# --- pod files (issue 22): every way out of /workspace, /tmp and /files is a 4xx, nothing touched ---
# 73 hostile paths: 45 refused for their letters, 27 names a run plants, 1 folder a run swaps.

# Paths refused for their letters alone, before anything enters the pod.
LEXICAL_ESCAPES = [
    "../etc/passwd", "a/../../etc/passwd", "/workspace/../etc/passwd", "/tmp/../root/.bashrc",
    "/files/../../etc/shadow", "..", "/..", "a/b/../../..", "./../x", "/etc/passwd", "/root/.ssh/authorized_keys",
    "/proc/self/environ", "/proc/1/root/etc/passwd", "/sys/kernel/notes", "/dev/null", "/dev/zero",
    "/run/kgpu/token", "/", "", "/workspacex/a", "/tmpfoo", "/filesx/a", "//etc/passwd", "/./etc/passwd",
    "/usr/bin/perl", "a\0b", "/tmp/\0", "x" * 256, "a/" + "y" * 300, "/tmp/" + "a/" * 2100,
    "/workspace/../../etc/passwd", "/files/../etc/hosts", "a/./../../b", "/tmp/./../etc/passwd",
    "/var/run/docker.sock", "/home/user/.bashrc", "/boot/vmlinuz", "/WORKSPACE/a", "/tmp/../../../../etc/passwd",
    "/proc/self/cwd/../../etc/passwd", "/files/../workspace/../etc/passwd", "/workspace/a/../../../etc", "/opt/x",
    "/tmp/a/../../etc/shadow", "/workspace/" + "b" * 256,
]
# Names a run plants in /workspace (DECOY is a real folder, outside what the paths name): each is
# read, written whole, written at a range and listed through; none may reach a file it points at.
PLANT = r"""
set -e
mkdir -p decoy real d && echo decoy-secret > decoy/secret && mkfifo fifo && mkfifo real/fifo
ln -s /etc etc_link; ln -s /etc/passwd file_link; ln -s /tmp/nowhere-yet dangling; ln -s decoy dir_link
ln -s ../../etc d/rel_link; ln -s /workspace ws_link; ln -s /proc/self/root proc_link; ln -s /dev/zero zero
ln -s decoy/secret secret_link; ln -s fifo fifo_link; ln -s /tmp tmp_link; ln -s / root_link; mkdir -p d/e
ln -s ../../decoy d/e/up_link
ln -s /dev/null null_link; ln -s loop_b loop_a; ln -s loop_a loop_b; ln -s /proc/1/environ env_link
ln -s /run run_link; ln -s /etc /tmp/etc_link
perl -MIO::Socket::UNIX -e 'IO::Socket::UNIX->new(Type => 1, Local => "sock", Listen => 1) or die $!'
"""
PLANTED = [
    "etc_link/passwd", "etc_link/", "file_link", "dangling", "dir_link/secret", "dir_link/", "dir_link/new",
    "d/rel_link/passwd", "ws_link/decoy/secret", "proc_link/etc/passwd", "zero", "secret_link", "fifo",
    "real/fifo", "fifo_link", "tmp_link/x", "root_link/etc/passwd", "sock", "d/e/up_link/secret", "fifo/",
    "null_link", "loop_a", "loop_a/x", "env_link", "run_link/kgpu/token", "/tmp/etc_link/passwd", "/tmp/etc_link/",
]


def _status_of_refusal(path: str, attempt) -> int:
    from gateway.errors import status_of
    from gateway.pod_files import _refusal
    from gateway.pods import files

    try:
        files_call(attempt(path))
    except files.PodFileError as exc:
        return status_of(_refusal(exc))
    return 200


def _attempts(backend, ref):
    from gateway.pods import files

    async def body():
        yield b"pwned\n"

    def checked(path, folder_ok=True):
        return files.pod_path(path, folder_ok=folder_ok)

    async def read(path):
        return await _read_file(backend, ref, path)

    async def write(path):
        return await files.write_file(backend, ref, checked(path, False), body(), 6, 10)

    async def write_at(path):
        return await files.write_file(backend, ref, checked(path, False), body(), 6, 10, start=0)

    async def listing(path):
        return await files.list_folder(backend, ref, checked(path.rstrip("/") + "/"), 10)

    return {"read": read, "write": write, "write_at": write_at, "list": listing}


@pytest.mark.parametrize("path", LEXICAL_ESCAPES, ids=range(len(LEXICAL_ESCAPES)))
def test_pod_file_paths_outside_the_allowed_folders_are_400_before_the_pod(path):
    from gateway.pods import files

    with pytest.raises(files.PodFileError) as refused:
        files.pod_path(path, folder_ok=False)
    assert refused.value.kind == files.BAD_PATH


def test_pod_files_never_follow_a_planted_symlink_nor_open_a_fifo_socket_or_device(pods):
    backend, make = pods
    ref = make()
    code, _, err = sh(backend, ref, PLANT)
    assert code == 0, err
    attempts = _attempts(backend, ref)
    look = "ls -lA --time-style=+%s.%N decoy; ls -A /tmp | grep -vx kgpu; cat decoy/secret"  # runs keep state in /tmp/kgpu
    before = sh(backend, ref, look)[1]
    for path in PLANTED:
        for name, attempt in attempts.items():
            if path.endswith("/") and name != "list":
                continue
            status = _status_of_refusal(path, attempt)
            assert 400 <= status < 500, (path, name, status)
    # Nothing was written through a link: the decoy, /tmp and the link targets are as they were.
    assert sh(backend, ref, look)[1] == before
    assert sh(backend, ref, "ls -A /tmp/nowhere-yet 2>&1; grep -c pwned /etc/passwd")[1].split()[-1] == "0"


def test_pod_files_refuse_a_folder_a_running_run_swaps_for_a_symlink(pods):
    """A run swaps ``swap`` between a real folder and a symlink to ``decoy`` as fast as it can; a
    walk that checked, then followed, would read decoy/secret or write into decoy."""
    backend, make = pods
    ref = make()
    sh(backend, ref, "mkdir -p decoy swap && echo decoy-secret > decoy/secret && echo real > swap/secret")
    backend.start_run(ref, "run-swap", ["sh", "-c", (
        "while :; do mv -T swap real 2>/dev/null; ln -s decoy swap 2>/dev/null; "
        "rm -f swap; mv -T real swap 2>/dev/null; done"
    )], {})
    try:
        attempts = _attempts(backend, ref)
        seen = set()
        for _ in range(20):
            try:
                seen.add(files_call(attempts["read"]("swap/secret")))
            except Exception as exc:  # a refusal (or not found while swapped): never decoy's bytes
                seen.add(type(exc).__name__)
            with contextlib.suppress(Exception):
                files_call(attempts["write"]("swap/new"))
        assert b"decoy-secret\n" not in seen, seen
    finally:
        backend.signal_run(ref, "run-swap", "KILL")
    assert sh(backend, ref, "ls -A decoy")[1].split() == ["secret"]
