"""Calls into a pod, bounded: a pod is hostile, so every call into one has a deadline and a cap
on the bytes it reads (and one pod holds only a few of the gateway's threads at a time:
gateway/pods/slots.py).

Before these bounds a pod whose ``sh`` trickled a byte every 20 s held the gateway's workers for
minutes (45 requests stopped billing and every other tenant's requests), and one that printed
512 MiB grew the gateway by a GiB (issue 19, items 6-8).
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import struct
import subprocess
import time
from dataclasses import dataclass

from gateway.pods import PodError

CALL_TIMEOUT_S = 15.0  # a call that does not wait on purpose answers within this
MAX_ANSWER = 4 << 20  # the most bytes a call reads from a pod unless it says otherwise
MAX_STDERR = 64 << 10


@dataclass(frozen=True)
class Answer:
    returncode: int
    stdout: bytes
    stderr: bytes


def run_bounded(
    argv: list[str], *, timeout: float = CALL_TIMEOUT_S, limit: int = MAX_ANSWER,
    env: dict[str, str] | None = None, cwd: str | os.PathLike | None = None,
) -> Answer:
    """Run ``argv`` (a host command that enters the pod: nsenter, srun, docker exec) in a session
    of its own; its answer once it exits. Past ``timeout`` seconds, or ``limit`` bytes of stdout,
    the whole session is killed (SIGKILL reaches a stopped process too) and PodError raised."""
    try:
        process = subprocess.Popen(
            argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, start_new_session=True,
        )
    except OSError as exc:
        raise PodError(f"{argv[0]} failed: {exc}") from exc
    out, err = bytearray(), bytearray()
    deadline = time.monotonic() + timeout
    poller = select.poll()
    streams = {process.stdout.fileno(): (process.stdout, out, limit), process.stderr.fileno(): (process.stderr, err, None)}
    for fd in streams:
        poller.register(fd, select.POLLIN)
    try:
        while streams:
            left = deadline - time.monotonic()
            if left <= 0:
                raise PodError(f"the pod did not answer within {timeout:g} s")
            for fd, _ in poller.poll(left * 1000):
                stream, buffer, cap = streams[fd]
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    poller.unregister(fd)
                    del streams[fd]
                    continue
                if cap is not None and len(buffer) + len(chunk) > cap:
                    raise PodError(f"the pod answered more than {cap} bytes")
                if cap is not None or len(buffer) < MAX_STDERR:
                    buffer += chunk
        returncode = process.wait(max(0.1, deadline - time.monotonic()))
    except (PodError, subprocess.TimeoutExpired) as exc:
        _kill_session(process)
        if isinstance(exc, subprocess.TimeoutExpired):
            raise PodError(f"the pod did not answer within {timeout:g} s") from None
        raise
    finally:
        process.stdout.close()
        process.stderr.close()
    return Answer(returncode, bytes(out), bytes(err[:MAX_STDERR]))


def _kill_session(process: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        process.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(5)


_FRAME = struct.Struct(">BxxxL")  # docker's multiplexed stream: stream type, 3 zero bytes, length


def read_docker_stream(sock: socket.socket, *, timeout: float, limit: int, streams: tuple[int, ...] = (1,)) -> bytes:
    """The frames of ``streams`` (1 stdout, 2 stderr) of a docker exec's attached stream
    (``exec_start(socket=True)``, no tty), in order, read until the exec ends, within
    ``timeout`` seconds and ``limit`` bytes (PodError)."""
    deadline = time.monotonic() + timeout
    raw = bytearray()
    out = bytearray()
    while True:
        while len(raw) >= _FRAME.size:
            kind, length = _FRAME.unpack_from(raw)
            if len(raw) < _FRAME.size + length:
                break
            if kind in streams:
                out += raw[_FRAME.size:_FRAME.size + length]
            del raw[:_FRAME.size + length]
        if len(out) + len(raw) > limit + _FRAME.size:
            raise PodError(f"the pod answered more than {limit} bytes")
        left = deadline - time.monotonic()
        if left <= 0:
            raise PodError(f"the pod did not answer within {timeout:g} s")
        sock.settimeout(left)
        try:
            chunk = sock.recv(1 << 16)
        except (socket.timeout, TimeoutError):
            raise PodError(f"the pod did not answer within {timeout:g} s") from None
        except OSError as exc:
            raise PodError(f"reading the pod's answer failed: {exc}") from exc
        if not chunk:
            return bytes(out)
        raw += chunk
