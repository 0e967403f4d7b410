"""Atomic writes (issue 12, item 2): a PUT whose body did not arrive whole never creates or
replaces an object, on /v1/dav/ (wsgidav, drive/dav/) and on /v1/files/ (gateway/drive_http.py).

The server is driven with raw sockets (a client that goes away mid-body, a malformed chunked
body, a body that stops short of its Content-Length and then stalls) and with curl (a chunked
upload killed before its final chunk). After each, the old file must still be there, byte for
byte (or no file at all), and the store must hold no multipart upload left behind.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from urllib.parse import quote, urlsplit

import pytest
import requests
from botocore.exceptions import ClientError

import drive.uploads

MiB = 1 << 20
OLD = os.urandom(5000)
MOUNTS = ["dav", "files"]


def url(stack, mount: str, rel: str) -> str:
    return f"{stack.base}/v1/{mount}/{quote(rel)}"


def put_old(stack, user, rel: str) -> None:
    reply = requests.put(url(stack, "files", rel), data=OLD, headers=user.auth)
    assert reply.status_code in (200, 201), reply.text


def content(stack, user, rel: str) -> bytes | None:
    """The file's bytes (None when there is no such file), from the store through the 302."""
    reply = requests.get(url(stack, "files", rel), headers=user.auth)
    if reply.status_code == 404:
        return None
    assert reply.status_code == 200, (reply.status_code, reply.text[:300])
    return reply.content


def leftover_uploads(stack, user) -> list[str]:
    store = stack.store
    try:
        reply = store._client.list_multipart_uploads(Bucket=store.bucket, Prefix=f"users/{user.id}/")
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") == "NoSuchUpload":
            return []  # rclone serve s3's answer when there are none
        raise
    return [upload["Key"] for upload in reply.get("Uploads", [])]


def assert_untouched(stack, user, rel: str, expected: bytes | None, *, watch: float = 2.0, limit: float = 15.0) -> None:
    """The file stays ``expected`` while the server deals with the broken request (at least
    ``watch`` seconds, then until no multipart upload of the user's is in progress)."""
    start = time.monotonic()
    while True:
        now = content(stack, user, rel)
        assert now == expected, f"{rel} changed: {None if now is None else len(now)} bytes"
        elapsed = time.monotonic() - start
        if elapsed >= watch and not leftover_uploads(stack, user):
            return
        assert elapsed < limit, f"multipart uploads left in the store: {leftover_uploads(stack, user)}"
        time.sleep(0.25)


def connect(stack) -> socket.socket:
    parts = urlsplit(stack.base)
    return socket.create_connection((parts.hostname, parts.port), timeout=30)


def head(stack, user, mount: str, rel: str, fields: dict[str, str]) -> bytes:
    host = urlsplit(stack.base).netloc
    lines = [f"PUT /v1/{mount}/{quote(rel)} HTTP/1.1", f"Host: {host}", f"Authorization: Bearer {user.token}"]
    lines += [f"{name}: {value}" for name, value in fields.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def read_reply(sock: socket.socket, deadline: float) -> tuple[bytes, bool]:
    """What the server sent before closing the connection or before ``deadline`` (monotonic),
    and whether it closed."""
    chunks = []
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return b"".join(chunks), False
        sock.settimeout(left)
        try:
            data = sock.recv(65536)
        except socket.timeout:
            return b"".join(chunks), False
        except ConnectionResetError:
            return b"".join(chunks), True
        if not data:
            return b"".join(chunks), True
        chunks.append(data)


@pytest.mark.parametrize("mount", MOUNTS)
@pytest.mark.parametrize("sent", [3000, 6 * MiB + 17], ids=["small", "over-a-part"])
def test_disconnect_mid_body_keeps_the_old_file(stack, user, mount, sent):
    """The measured finding: a 5,000-byte file became the prefix a vanished client had sent."""
    rel = f"atomic/{mount}-{sent}.bin"
    put_old(stack, user, rel)
    with connect(stack) as sock:
        sock.sendall(head(stack, user, mount, rel, {"Content-Length": str(26 * MiB)}))
        sock.sendall(os.urandom(sent))
        time.sleep(0.5)  # the server has read (and for multipart, sent on) the bytes
    assert_untouched(stack, user, rel, OLD)


@pytest.mark.parametrize("mount", MOUNTS)
def test_disconnect_mid_body_creates_nothing(stack, user, mount):
    put_old(stack, user, "atomic/other.bin")  # the folder exists, so WebDAV takes the PUT
    rel = f"atomic/new-{mount}.bin"
    with connect(stack) as sock:
        sock.sendall(head(stack, user, mount, rel, {"Content-Length": str(26 * MiB)}))
        sock.sendall(os.urandom(6 * MiB))
        time.sleep(0.5)
    assert_untouched(stack, user, rel, None)


@pytest.mark.parametrize("mount", MOUNTS)
@pytest.mark.parametrize("tail", [b"", b"7\r\nso far\r\n", b"zz\r\nbad size\r\n", b"3\r\nabcdef\r\n"],
                         ids=["no-final-chunk", "cut-after-chunk", "bad-size", "bad-chunk"])
def test_chunked_body_without_its_end_keeps_the_old_file(stack, user, mount, tail):
    rel = f"atomic/chunked-{mount}-{tail.hex()}.bin"
    put_old(stack, user, rel)
    with connect(stack) as sock:
        sock.sendall(head(stack, user, mount, rel, {"Transfer-Encoding": "chunked"}))
        sock.sendall(b"5\r\nhello\r\n" + tail)
        time.sleep(0.5)
    assert_untouched(stack, user, rel, OLD)


@pytest.mark.parametrize("mount", MOUNTS)
def test_curl_killed_before_the_final_chunk_keeps_the_old_file(stack, user, mount, tmp_path):
    """curl -T - sends stdin chunked; killed, it never sends the zero-length final chunk."""
    rel = f"atomic/curl-{mount}.bin"
    put_old(stack, user, rel)
    headers = tmp_path / "headers"
    headers.touch(mode=0o600)
    headers.write_text(f"Authorization: Bearer {user.token}\nExpect:\n")
    curl = subprocess.Popen(
        ["curl", "-sS", "-H", f"@{headers}", "-T", "-", url(stack, mount, rel)],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        curl.stdin.write(os.urandom(7 * MiB))
        curl.stdin.flush()
        time.sleep(1.0)  # curl has sent it, the server has read it
    finally:
        curl.send_signal(signal.SIGKILL)
        curl.wait(timeout=10)
        curl.stdin.close()
    assert_untouched(stack, user, rel, OLD)


@pytest.mark.parametrize("mount", MOUNTS)
@pytest.mark.parametrize("sent", [100, 6 * MiB + 17], ids=["small", "over-a-part"])
def test_stalled_body_is_cut_off_after_the_idle_timeout(stack, user, mount, sent, monkeypatch):
    """A body shorter than its Content-Length used to hold the connection forever."""
    idle = 1.5
    monkeypatch.setattr(drive.uploads, "BODY_IDLE_TIMEOUT", idle)
    rel = f"atomic/stall-{mount}-{sent}.bin"
    put_old(stack, user, rel)
    with connect(stack) as sock:
        sock.sendall(head(stack, user, mount, rel, {"Content-Length": str(sent + 1000)}))
        sock.sendall(os.urandom(sent))
        started = time.monotonic()
        reply, closed = read_reply(sock, started + 3 * idle + 2)
        waited = time.monotonic() - started
    assert reply, f"no answer {waited:.1f} s after the body stalled (idle timeout {idle} s)"
    status = int(reply.split(b" ", 2)[1])
    assert status == 408, reply[:500]  # Request Timeout on both mounts (it was 400 on /v1/files/)
    if mount == "files":
        assert b'"error_code":"body_timeout"' in reply, reply[:500]
    assert closed, "the connection stayed open after the stalled upload was refused"
    assert_untouched(stack, user, rel, OLD)


def test_whole_bodies_still_commit(stack, user):
    """The guard against over-eager refusal: complete bodies, sized and chunked, on both mounts."""
    put_old(stack, user, "atomic/old.bin")  # the folder exists for WebDAV
    for mount in MOUNTS:
        for size in (0, 5000, 6 * MiB + 17):
            data = os.urandom(size)
            rel = f"atomic/whole-{mount}-{size}.bin"
            reply = requests.put(url(stack, mount, rel), data=data, headers=user.auth)
            assert reply.status_code in (200, 201), reply.text
            assert content(stack, user, rel) == data
            reply = requests.put(url(stack, mount, rel), data=iter([data[:1000], data[1000:]]), headers=user.auth)
            assert reply.status_code in (200, 204), reply.text
            assert content(stack, user, rel) == data
    assert leftover_uploads(stack, user) == []
