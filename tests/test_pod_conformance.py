"""The pod-backend conformance suite: every PodBackend passes all of it (local, docker, slurm)."""

from __future__ import annotations

import hashlib
import os
import time
import uuid

import pytest

from gateway.pods import PodBackend, PodSpec, RunInput
from gateway.pods.exec_runs import ExecRuns


def wait_finished(backend, ref, run_id, seconds=20.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        state = backend.run_state(ref, run_id, 65536)
        if state is not None and state.finished:
            return state
        time.sleep(0.05)
    raise AssertionError(f"run {run_id} did not finish in {seconds}s")


def pod_spec(backend, env: dict[str, str]) -> PodSpec:
    """A small CPU-only pod of the backend's test image."""
    return PodSpec(
        rental_id="gpu-" + uuid.uuid4().hex[:10],
        image=getattr(backend, "test_image", "local"),
        gpu_indices=[],
        cpu=1,
        memory_bytes=512 << 20,
        ephemeral_storage_gib=1,
        env=env,
    )


@pytest.fixture
def pod(pod_backend):
    spec = pod_spec(pod_backend, {"KGPU_GPU_ID": "conformance", "GREETING": "hello"})
    ref = pod_backend.start(spec)
    yield pod_backend, ref, spec
    pod_backend.destroy(ref)


def test_is_a_pod_backend(pod_backend):
    assert isinstance(pod_backend, PodBackend)


def test_pod_is_running_and_ready(pod):
    backend, ref, _ = pod
    deadline = time.monotonic() + 30
    while not backend.status(ref).ready:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert backend.status(ref).phase == "Running"


def test_run_records_output_and_exit_code(pod):
    backend, ref, _ = pod
    backend.start_run(ref, "run-a", ["sh", "-c", 'echo "$GREETING $EXTRA"; echo oops >&2; exit 7'], {"EXTRA": "world"})
    state = wait_finished(backend, ref, "run-a")
    assert state.exit_code == 7
    assert state.stdout == b"hello world\n" and state.stderr == b"oops\n"
    assert state.pid and state.started_at and state.completed_at >= state.started_at
    assert "run-a" in backend.run_ids(ref)


def test_pod_env_has_gpu_pinning(pod):
    backend, ref, _ = pod
    backend.start_run(ref, "run-env", ["sh", "-c", 'echo "[$KGPU_GPU_ID][$CUDA_VISIBLE_DEVICES]"'], {})
    assert wait_finished(backend, ref, "run-env").stdout == b"[conformance][]\n"


def test_runs_share_the_pod_filesystem(pod):
    backend, ref, _ = pod
    backend.start_run(ref, "run-w", ["sh", "-c", "echo kept > shared.txt"], {})
    wait_finished(backend, ref, "run-w")
    backend.start_run(ref, "run-r", ["cat", "shared.txt"], {})
    assert wait_finished(backend, ref, "run-r").stdout == b"kept\n"


def test_output_tail_is_bounded(pod):
    backend, ref, _ = pod
    backend.start_run(ref, "run-big", ["sh", "-c", "i=0; while [ $i -lt 20000 ]; do echo line-$i; i=$((i+1)); done"], {})
    wait_finished(backend, ref, "run-big")
    state = backend.run_state(ref, "run-big", 1000)
    assert len(state.stdout) == 1000 and state.stdout_truncated
    assert state.stdout.endswith(b"line-19999\n")


def test_live_output_by_offset(pod):
    backend, ref, _ = pod
    backend.start_run(ref, "run-live", ["sh", "-c", "echo first; sleep 1; echo second"], {})
    deadline = time.monotonic() + 10
    while backend.read_output(ref, "run-live", "stdout", 0) != b"first\n":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    wait_finished(backend, ref, "run-live")
    assert backend.read_output(ref, "run-live", "stdout", 6) == b"second\n"


def test_terminate_a_run(pod):
    backend, ref, _ = pod
    backend.start_run(ref, "run-long", ["sleep", "300"], {})
    assert not backend.run_state(ref, "run-long", 100).finished
    backend.signal_run(ref, "run-long", "TERM")
    state = wait_finished(backend, ref, "run-long", 10)
    assert state.exit_code == 143


def test_kill_a_run_that_ignores_term(pod):
    backend, ref, _ = pod
    backend.start_run(ref, "run-stubborn", ["sh", "-c", "trap '' TERM; sleep 300 & wait; sleep 300"], {})
    time.sleep(0.3)
    backend.signal_run(ref, "run-stubborn", "KILL")
    state = wait_finished(backend, ref, "run-stubborn", 10)
    assert state.finished and state.exit_code in (None, 137)


def test_a_run_reads_the_stdin_it_is_given(pod):
    backend, ref, _ = pod
    data = os.urandom(1 << 20) + b"\x00\nend"  # binary, past a pipe's buffer
    backend.start_run(ref, "run-in", ["sh", "-c", "sha256sum | cut -c1-64"], {}, RunInput(stdin=data))
    state = wait_finished(backend, ref, "run-in")
    assert (state.exit_code, state.stdout) == (0, hashlib.sha256(data).hexdigest().encode() + b"\n")
    backend.start_run(ref, "run-no-in", ["sh", "-c", "cat; echo read-all"], {})
    assert wait_finished(backend, ref, "run-no-in").stdout == b"read-all\n"  # no stdin: at its end at once


def test_a_run_past_its_time_limit_is_ended_with_its_output_kept(pod):
    backend, ref, _ = pod
    backend.start_run(ref, "run-slow", ["sh", "-c", "echo before; sleep 60; echo after"], {}, RunInput(timeout_s=1, grace_s=1))
    state = wait_finished(backend, ref, "run-slow", 20)
    assert (state.timed_out, state.exit_code, state.stdout) == (True, 143, b"before\n")


def test_a_run_that_ignores_term_at_its_time_limit_is_killed(pod):
    backend, ref, _ = pod
    command = ["sh", "-c", "trap '' TERM; echo before; sleep 60 & wait; sleep 60"]
    backend.start_run(ref, "run-deaf", command, {}, RunInput(timeout_s=1, grace_s=1))
    state = wait_finished(backend, ref, "run-deaf", 20)
    assert (state.timed_out, state.exit_code, state.stdout) == (True, 137, b"before\n")


def test_a_run_within_its_time_limit_is_not_timed_out(pod):
    backend, ref, _ = pod
    backend.start_run(ref, "run-quick", ["sh", "-c", "echo quick"], {}, RunInput(stdin=b"", timeout_s=30))
    state = wait_finished(backend, ref, "run-quick")
    assert (state.timed_out, state.exit_code, state.stdout) == (False, 0, b"quick\n")


def test_unknown_run_is_none(pod):
    backend, ref, _ = pod
    assert backend.run_state(ref, "run-nope", 100) is None


def test_adopt_and_destroy(pod_backend):
    spec = PodSpec("gpu-" + uuid.uuid4().hex[:10], getattr(pod_backend, "test_image", "local"), [], 1, 256 << 20, 1)
    ref = pod_backend.start(spec)
    assert pod_backend.adopt().get(spec.rental_id) == ref
    pod_backend.destroy(ref)
    assert spec.rental_id not in pod_backend.adopt()
    assert pod_backend.status(ref).phase == "Gone"


def test_storage_is_measured(pod):
    backend, ref, _ = pod
    before = backend.storage_bytes(ref)
    backend.start_run(ref, "run-disk", ["sh", "-c", "head -c 3000000 /dev/urandom > /tmp/blob; sync"], {})
    assert wait_finished(backend, ref, "run-disk").exit_code == 0
    after = backend.storage_bytes(ref)
    assert before is not None and after - before >= 2_900_000


def test_a_long_poll_is_one_wait_and_answers_when_the_run_ends(pod):
    backend, ref, _ = pod
    backend.start_run(ref, "run-wait", ["sh", "-c", "sleep 0.5; echo done; exit 3"], {})
    calls = []
    exec_calls = isinstance(backend, ExecRuns)  # a backend that reaches the pod by exec: count its calls
    if exec_calls:
        original = backend._exec
        backend._exec = lambda *a, **k: calls.append(a) or original(*a, **k)
    try:
        started = time.monotonic()
        state = backend.wait_run(ref, "run-wait", 20, 4096)
        waited = time.monotonic() - started
    finally:
        if exec_calls:
            del backend._exec
    assert state is not None and state.finished and state.exit_code == 3 and state.stdout == b"done\n"
    assert waited < 15, f"the wait did not end with the run ({waited:.1f}s)"
    if exec_calls:
        assert len(calls) == 1, f"{len(calls)} execs for one long-poll"
    backend.start_run(ref, "run-long", ["sleep", "30"], {})
    still = backend.wait_run(ref, "run-long", 0.3, 4096)
    assert still is not None and not still.finished and still.exit_code is None
    backend.signal_run(ref, "run-long", "KILL")
    assert backend.wait_run(ref, "run-missing", 1, 4096) is None


def test_following_a_run_gives_its_output_as_it_comes_in_one_wait_each(pod):
    backend, ref, _ = pod
    backend.start_run(ref, "run-follow", ["sh", "-c", "echo one; sleep 1; echo two >&2; sleep 0.2; echo three; exit 2"], {})
    offsets, got, calls = {"stdout": 0, "stderr": 0}, {"stdout": b"", "stderr": b""}, 0
    deadline = time.monotonic() + 30
    while True:
        assert time.monotonic() < deadline, got
        state = backend.follow_run(ref, "run-follow", dict(offsets), 10)
        calls += 1
        assert state is not None
        for name in offsets:
            new = getattr(state, name)
            offsets[name] += len(new)
            got[name] += new
        if state.finished and not state.stdout and not state.stderr:
            break
    assert got == {"stdout": b"one\nthree\n", "stderr": b"two\n"} and state.exit_code == 2
    assert 2 <= calls <= 6, f"{calls} waits for three lines: each answers on new output, not on a timer"
    assert backend.follow_run(ref, "run-missing", {}, 1) is None


def test_fifos_planted_in_a_run_folder_do_not_hold_the_gateway(pod):
    """A run swaps its own files for FIFOs (a read of one waits for a writer forever): every
    call the gateway makes into the pod still answers."""
    import threading

    backend, ref, _ = pod
    plant = 'd=/tmp/kgpu/runs/run-fifo; for f in stdout stderr exit_code started_at completed_at; do rm -f "$d/$f"; mkfifo "$d/$f"; done; sleep 30'
    backend.start_run(ref, "run-fifo", ["sh", "-c", plant], {})
    time.sleep(1)
    calls = {
        "run_state": lambda: backend.run_state(ref, "run-fifo", 4096),
        "wait_run": lambda: backend.wait_run(ref, "run-fifo", 1, 4096),
        "follow_run": lambda: backend.follow_run(ref, "run-fifo", {"stdout": 0, "stderr": 0}, 1),
        "read_output": lambda: backend.read_output(ref, "run-fifo", "stdout", 0),
        "signal_run": lambda: backend.signal_run(ref, "run-fifo", "KILL"),
    }
    for name, call in calls.items():
        worker = threading.Thread(target=call, daemon=True)
        worker.start()
        worker.join(30)
        assert not worker.is_alive(), f"{name} hangs on a FIFO the run planted"


# --- logins and connections into the pod (the SSH bastion's half of the interface) --------------

# A listener in the pod on port 9999 for 60 s, answering "hello" to each connection.
LISTEN_9999 = (
    "perl -MIO::Socket::INET -e '$s = IO::Socket::INET->new(Listen => 5, LocalAddr => \"0.0.0.0\", "
    "LocalPort => 9999, ReuseAddr => 1) or die \"listen: $!\"; $SIG{ALRM} = sub { exit }; alarm 60; "
    "while ($c = $s->accept) { print $c \"hello\\n\"; close $c }'"
)


def enter(backend, ref, args, data=b"", tty=False, env=None):
    """``backend.enter`` run as the bastion runs it: (exit code, stdout, stderr without the host
    command's own lines)."""
    import re
    import subprocess

    command = backend.enter(ref, args, tty, env or {})
    done = subprocess.run(command.argv, input=data, capture_output=True, env=command.env, cwd=command.cwd, timeout=60)
    stderr = done.stderr
    if command.own_stderr is not None:
        stderr = b"".join(line for line in re.split(rb"(?<=\n)", stderr) if not command.own_stderr.fullmatch(line))
    return done.returncode, done.stdout, stderr


def test_a_login_runs_in_the_pod_with_its_stdio_and_exit_code(pod):
    import os

    backend, ref, _ = pod
    data = os.urandom(1 << 20) + bytes(range(256))
    code, out, err = enter(backend, ref, ["-c", "cat; echo oops >&2; exit 7"], data, env={"LANG": "C.UTF-8"})
    assert (code, out, err) == (7, data, b"oops\n")
    code, out, _ = enter(backend, ref, ["-c", 'pwd; echo "$LANG $KGPU_GPU_ID"'], env={"LANG": "C.UTF-8"})
    assert (code, out.decode().split("\n")) == (0, ["/workspace", "C.UTF-8 conformance", ""])
    code, out, _ = enter(backend, ref, ["-c", "wc -c"], b"abc")  # stdin's end reaches the pod
    assert (code, out.split()) == (0, [b"3"])


def test_a_connection_opens_from_inside_the_pod(pod):
    backend, ref, _ = pod
    backend.start_run(ref, "run-listen", ["sh", "-c", LISTEN_9999], {})
    deadline = time.monotonic() + 20
    while True:
        try:
            with backend.connect(ref, "127.0.0.1", 9999, 5) as conn:
                conn.settimeout(5)
                assert conn.recv(16) == b"hello\n"
                break
        except (OSError, Exception) as exc:  # PodError until the listener is up
            assert time.monotonic() < deadline, f"the pod's listener never answered: {exc}"
            time.sleep(0.3)
    backend.signal_run(ref, "run-listen", "KILL")


def test_cpu_seconds_grow_while_the_pod_computes(pod):
    """What the reaper's load probe reads: the CPU time of the pod's processes, growing while one spins."""
    backend, ref, _ = pod
    backend.start_run(ref, "run-busy", ["sh", "-c", "i=0; while :; do i=$((i+1)); done"], {})
    time.sleep(0.5)
    before = backend.cpu_seconds(ref)
    deadline = time.monotonic() + 20
    while (after := backend.cpu_seconds(ref)) - before < 0.3:
        assert time.monotonic() < deadline, (before, after)
        time.sleep(0.3)
    backend.signal_run(ref, "run-busy", "KILL")


# --- pod files (gateway/pods/files.py; over HTTP in tests/test_pod_files.py) -----------------------

def files_call(coroutine):
    import asyncio

    return asyncio.run(coroutine)


async def _pieces(data: bytes, cut_after: int | None = None, step: int = 1 << 18):
    """``data`` as a request body would come, ending in ConnectionError (a client gone) after ``cut_after`` bytes."""
    end = len(data) if cut_after is None else cut_after
    for at in range(0, end, step):
        yield data[at:min(at + step, end)]
    if cut_after is not None:
        raise ConnectionError("the client went away")


async def _read_file(backend, ref, path, start=0, length=None, stop_after=None) -> bytes:
    from gateway.pods import files

    got = bytearray()
    async with files.reading(backend, ref, files.pod_path(path), 30) as download:
        async for chunk in download.chunks(start, download.size - start if length is None else length):
            got += chunk
            if stop_after is not None and len(got) >= stop_after:
                break
    return bytes(got)


def test_pod_files_upload_download_range_and_listing(pod):
    from gateway.pods import files

    backend, ref, _ = pod
    data = os.urandom(5 << 20)
    written = files_call(files.write_file(backend, ref, files.pod_path("in/model.bin"), _pieces(data), len(data), 30))
    assert (written.size, written.created) == (len(data), True)
    assert files_call(_read_file(backend, ref, "/workspace/in/model.bin")) == data
    assert files_call(_read_file(backend, ref, "in/model.bin", 4096, 10000)) == data[4096:14096]
    code, out, _ = enter(backend, ref, ["-c", "sha256sum in/model.bin; ls -A in"])
    assert out.split() == [hashlib.sha256(data).hexdigest().encode(), b"in/model.bin", b"model.bin"]
    entries, more = files_call(files.list_folder(backend, ref, files.pod_path("in/"), 30))
    assert ([(e.name, e.type, e.size) for e in entries], more) == ([("model.bin", "file", len(data))], False)
    again = files_call(files.write_file(backend, ref, files.pod_path("in/model.bin"), _pieces(b"new"), 3, 30))
    assert (again.size, again.created) == (3, False)


def test_pod_files_resume_after_a_cut_at_40_percent_both_ways(pod):
    from gateway.pods import files

    backend, ref, _ = pod
    data = os.urandom(32 << 20)
    path = files.pod_path("/tmp/big.bin")
    cut = len(data) * 2 // 5
    with pytest.raises(ConnectionError):
        files_call(files.write_file(backend, ref, path, _pieces(data, cut), len(data), 30, start=0))
    have = len(files_call(_read_file(backend, ref, "/tmp/big.bin")))
    assert have == cut  # every byte that arrived, and no more
    rest = files_call(files.write_file(backend, ref, path, _pieces(data[have:]), len(data) - have, 30, start=have))
    assert rest.size == len(data)
    # Down: cut at 40 %, then the rest from where it stopped.
    first = files_call(_read_file(backend, ref, "/tmp/big.bin", stop_after=cut))
    second = files_call(_read_file(backend, ref, "/tmp/big.bin", start=len(first)))
    assert hashlib.sha256(first + second).digest() == hashlib.sha256(data).digest()
    # A whole-file write that is cut leaves the file as it was and no temporary name behind.
    with pytest.raises(ConnectionError):
        files_call(files.write_file(backend, ref, path, _pieces(b"x" * (4 << 20), 1 << 20), 4 << 20, 30))
    assert files_call(_read_file(backend, ref, "/tmp/big.bin", 0, 4096)) == data[:4096]
    deadline = time.monotonic() + 20
    while enter(backend, ref, ["-c", "ls -A /tmp | grep -c kgpu-upload"])[1].strip() != b"0":
        assert time.monotonic() < deadline
        time.sleep(0.2)
    # A start past the end answers the present size (where a resume begins).
    with pytest.raises(files.PodFileError) as refused:
        files_call(files.write_file(backend, ref, path, _pieces(b"abc"), 3, 30, start=len(data) + 1))
    assert (refused.value.kind, refused.value.size) == ("range", len(data))
