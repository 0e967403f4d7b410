"""gateway/pods/bounded.py: every call into a pod has a deadline and a cap, whatever the pod does
with the process that answers (stops it, trickles, floods), and leaves nothing behind (the caps on
calls in flight: tests/test_call_slots.py)."""

from __future__ import annotations

import os
import socket
import struct
import threading
import time

import pytest

from gateway.pods import PodError
from gateway.pods.bounded import read_docker_stream, run_bounded


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().split(") ")[1][0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.parametrize(
    "script",
    [
        "echo $$ > {pidfile}; kill -STOP $$",  # a pod stops the gateway's helper
        "echo $$ > {pidfile}; while :; do printf x; sleep 0.2; done",  # trickles forever
        "echo $$ > {pidfile}; sleep 0.1 & kill -STOP $$",  # stopped, with a child
    ],
    ids=["stopped", "trickling", "stopped-with-child"],
)
def test_a_call_past_its_deadline_is_killed(tmp_path, script):
    pidfile = tmp_path / "pid"
    started = time.monotonic()
    with pytest.raises(PodError, match="did not answer within 1 s"):
        run_bounded(["sh", "-c", script.format(pidfile=pidfile)], timeout=1)
    assert time.monotonic() - started < 8
    pid = int(pidfile.read_text())
    deadline = time.monotonic() + 5
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(pid)


def test_a_flood_is_cut_at_the_cap():
    started = time.monotonic()
    with pytest.raises(PodError, match="more than 1048576 bytes"):
        run_bounded(["sh", "-c", "head -c 512M /dev/zero"], timeout=30, limit=1 << 20)
    assert time.monotonic() - started < 10


def test_an_answer_within_bounds_is_whole():
    answer = run_bounded(["sh", "-c", "head -c 300000 /dev/zero; echo oops >&2; exit 3"], timeout=10, limit=300000)
    assert (answer.returncode, len(answer.stdout), answer.stderr) == (3, 300000, b"oops\n")


def frame(kind: int, data: bytes) -> bytes:
    return struct.pack(">BxxxL", kind, len(data)) + data


def test_a_docker_stream_is_demultiplexed_and_bounded():
    ours, theirs = socket.socketpair()
    theirs.sendall(frame(1, b"out-1 ") + frame(2, b"err ") + frame(1, b"out-2"))
    theirs.close()
    assert read_docker_stream(ours, timeout=5, limit=100) == b"out-1 out-2"

    ours, theirs = socket.socketpair()
    theirs.sendall(frame(1, b"a") + frame(2, b"b"))
    theirs.close()
    assert read_docker_stream(ours, timeout=5, limit=100, streams=(1, 2)) == b"ab"

    ours, theirs = socket.socketpair()  # a trickle: one byte of a frame now and then
    stop = threading.Event()

    def trickle():
        data = frame(1, b"x" * 1000)
        for byte in data:
            if stop.wait(0.3):
                break
            theirs.send(bytes([byte]))

    threading.Thread(target=trickle, daemon=True).start()
    started = time.monotonic()
    with pytest.raises(PodError, match="within 1 s"):
        read_docker_stream(ours, timeout=1, limit=100)
    assert time.monotonic() - started < 3
    stop.set()

    ours, theirs = socket.socketpair()  # a flood

    def flood():
        try:
            for _ in range(64):
                theirs.sendall(frame(1, os.urandom(1 << 16)))
        except OSError:
            pass  # the reader stopped reading: as it should

    threading.Thread(target=flood, daemon=True).start()
    with pytest.raises(PodError, match="more than"):
        read_docker_stream(ours, timeout=10, limit=1 << 20)
    ours.close()
