"""A pod that fails in the middle of a download (its file truncated, its rental returned) or whose
file grows while it is read, over HTTP on the local backend: the client gets a body cut short of
its Content-Length (never longer), the server's log one WARNING line and no traceback, and the
gateway serves the next download as usual. Below them, the rules they rest on, each alone: a pod
sending more than asked gets no more through than the span, uvicorn's own line is dropped only for a
request the gateway cut on purpose, and what the warning quotes stays on one line."""

from __future__ import annotations

import asyncio
import contextvars
import logging
import os
import socket
from urllib.parse import urlsplit

import pytest
import requests

from gateway.ended_early import end_early
from gateway.log_line import one_line
from gateway.pods.files import Channel, Download
from tests.test_pod_files import in_pod, url

live = pytest.mark.parametrize("stack", ["rclone-sqlite"], indirect=True)
MiB = 1 << 20
SIZE = 64 * MiB  # far more than the socket buffers between the pod and the client hold


class RawDownload:
    """A GET on a raw socket: its head parsed, its body read as the test chooses."""

    def __init__(self, stack, user, gpu: str, path: str):
        parts = urlsplit(stack.base)
        self.sock = socket.create_connection((parts.hostname, parts.port), timeout=30)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)  # a slow reader holds little
        self.request = (
            f"GET /v1/gpus/{gpu}/files/{path} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
            f"Authorization: Bearer {user.token}\r\n\r\n"
        ).encode()
        self.sock.sendall(self.request)
        self.extra = b""
        self.status, self.length = self._head()

    def _head(self) -> tuple[int, int]:
        raw = b""
        while b"\r\n\r\n" not in raw:
            chunk = self.sock.recv(65536)
            assert chunk, raw
            raw += chunk
        head, _, self.extra = raw.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = dict(line.lower().split(": ", 1) for line in lines[1:])
        return int(lines[0].split(" ")[1]), int(headers["content-length"])

    def read(self, n: int) -> bytes:
        """Up to ``n`` bytes of what follows the head (fewer only at the connection's end)."""
        got = [self.extra[:n]]
        self.extra = self.extra[n:]
        have = len(got[0])
        while have < n:
            chunk = self.sock.recv(min(1 << 20, n - have))
            if not chunk:
                break
            got.append(chunk)
            have += len(chunk)
        return b"".join(got)

    def close(self) -> None:
        self.sock.close()


def _log_about_it(server_log) -> list[logging.LogRecord]:
    return [r for r in server_log.records if r.levelno >= logging.WARNING]


def _no_traceback(server_log) -> None:
    text = server_log.text
    assert "Traceback" not in text and "Exception in ASGI application" not in text, text[-3000:]
    assert not any(r.exc_info for r in server_log.records), text[-3000:]


def _a_download_still_works(stack, user, gpu: str) -> None:
    again = requests.get(url(stack, gpu, "/tmp/other.bin"), headers=user.auth)
    assert (again.status_code, again.content) == (200, b"still here")


def _put(stack, user, gpu: str, path: str, data: bytes) -> None:
    reply = requests.put(url(stack, gpu, path), data=data, headers=user.auth)
    assert reply.status_code == 201, reply.text


@live
@pytest.mark.parametrize("failure", ["truncated", "returned"])
def test_a_pod_failing_mid_download_cuts_the_body_with_one_warning(stack, user, gpu, server_log, failure):
    data = os.urandom(SIZE)
    _put(stack, user, gpu, "/tmp/cut.bin", data)
    _put(stack, user, gpu, "/tmp/other.bin", b"still here")
    download = RawDownload(stack, user, gpu, "/tmp/cut.bin")
    try:
        assert (download.status, download.length) == (200, SIZE)
        first = download.read(MiB)
        if failure == "truncated":
            in_pod(stack, user, gpu, ": > /tmp/cut.bin")
        else:
            gone = requests.delete(f"{stack.base}/v1/gpus/{gpu}", headers=user.auth)
            assert gone.status_code == 200, gone.text
        body = first + download.read(SIZE)  # until the gateway closes the connection
    finally:
        download.close()
    assert MiB <= len(body) < SIZE and body == data[: len(body)]
    warnings = _log_about_it(server_log)
    assert len(warnings) == 1, server_log.text[-3000:]
    line = warnings[0].getMessage()
    assert warnings[0].levelno == logging.WARNING and "\n" not in line
    assert gpu in line and "/tmp/cut.bin" in line and f"{len(body)} of {SIZE} bytes" in line, line
    _no_traceback(server_log)
    if failure == "truncated":
        _a_download_still_works(stack, user, gpu)


@live
def test_a_file_growing_while_read_sends_exactly_its_content_length(stack, user, gpu, server_log):
    data = os.urandom(SIZE)
    _put(stack, user, gpu, "/tmp/grows.bin", data)
    _put(stack, user, gpu, "/tmp/other.bin", b"still here")
    download = RawDownload(stack, user, gpu, "/tmp/grows.bin")
    try:
        assert (download.status, download.length) == (200, SIZE)
        first = download.read(MiB)
        in_pod(stack, user, gpu, "head -c 16777216 /dev/zero >> /tmp/grows.bin")
        body = first + download.read(SIZE - MiB)
        assert body == data
        # Nothing past the body: the connection carries the next request's answer, or has closed.
        download.sock.sendall(download.request.replace(b"grows.bin", b"other.bin"))
        after = download.read(12)
        assert after in (b"", b"HTTP/1.1 200"), after
    finally:
        download.close()
    assert _log_about_it(server_log) == [], server_log.text[-3000:]
    _no_traceback(server_log)
    _a_download_still_works(stack, user, gpu)


def test_a_pod_sending_more_than_asked_gets_only_the_span_through():
    """The pod's script sends what was asked, but the pod is its tenant's (its perl included)."""
    to_pod, pod_stdin = socket.socketpair()
    from_pod, pod_stdout = socket.socketpair()
    errors, pod_stderr = socket.socketpair()
    pod_stdout.sendall(os.urandom(5000))  # a file grown past the span, sent whole
    download = Download(Channel(None, to_pod, from_pod, errors, idle_s=5), size=1000, mtime=0)

    async def read_all() -> bytes:
        return b"".join([chunk async for chunk in download.chunks(0, 1000)])

    try:
        assert len(asyncio.run(read_all())) == 1000
    finally:
        for sock in (to_pod, pod_stdin, from_pod, pod_stdout, errors, pod_stderr):
            sock.close()


def test_uvicorns_line_is_dropped_only_for_a_request_cut_on_purpose():
    uvicorn_log = logging.getLogger("uvicorn.error")
    record = uvicorn_log.makeRecord(
        uvicorn_log.name, logging.ERROR, __file__, 0, "ASGI callable returned without completing response.", (), None,
    )

    def cut_then_logged():
        end_early()
        return uvicorn_log.filter(record)

    assert not contextvars.copy_context().run(cut_then_logged)  # that request's task
    assert uvicorn_log.filter(record)  # any other request's: a body left incomplete by mistake is still logged
    other = uvicorn_log.makeRecord(uvicorn_log.name, logging.ERROR, __file__, 0, "Exception in ASGI application\n", (), None)
    assert contextvars.copy_context().run(lambda: end_early() or uvicorn_log.filter(other))


def test_what_the_warning_quotes_stays_on_one_short_line():
    assert one_line("/tmp/cut.bin") == "/tmp/cut.bin"
    said = one_line("died\nERROR forged line\r\x1b[2J" + "x" * 5000)
    assert said.isprintable() and said.isascii() and len(said) < 260
    assert said.startswith("died\\nERROR forged line\\r\\x1b[2J") and said.endswith("x" * 100)
