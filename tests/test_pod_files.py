"""/v1/gpus/{id}/files (issue 22, item 1; docs/pod-files.md) over HTTP, on the local backend: upload,
download, Range, listings, resumes after a cut at 40 % both ways with curl, who may use it, what
every bad request answers, and how many transfers one user may hold across their pods. The
backends' side (local, docker, slurm) is in tests/test_pod_conformance.py; the hostile paths in
tests/test_pod_hostile.py."""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import time
from urllib.parse import urlsplit

import pytest
import requests

from tests.clients import curl, sha256_file
from tests.test_rentals import run

pytestmark = pytest.mark.parametrize("stack", ["rclone-sqlite"], indirect=True)
MiB = 1 << 20


def url(stack, gpu: str, path: str) -> str:
    return f"{stack.base}/v1/gpus/{gpu}/files/{path}"


def in_pod(stack, user, gpu: str, script: str) -> str:
    out = run(stack.base, user.token, gpu, ["sh", "-c", script], wait_seconds=30)
    assert out["exit_code"] == 0, out
    return out["stdout"]


def test_upload_download_range_and_listing(stack, user, gpu):
    data = os.urandom(3 * MiB + 17)
    put = requests.put(url(stack, gpu, "data/model.bin"), data=data, headers=user.auth)
    assert put.status_code == 201, put.text
    assert put.json() == {"gpu_id": gpu, "path": "/workspace/data/model.bin", "size": len(data)}
    # The run sees it where the path said, and nothing else was left in the folder.
    assert in_pod(stack, user, gpu, "sha256sum data/model.bin; ls -A data").split() == [
        hashlib.sha256(data).hexdigest(), "data/model.bin", "model.bin",
    ]
    got = requests.get(url(stack, gpu, "/workspace/data/model.bin"), headers=user.auth)
    assert (got.status_code, got.content, got.headers["accept-ranges"]) == (200, data, "bytes")
    span = requests.get(url(stack, gpu, "data/model.bin"), headers={**user.auth, "Range": "bytes=1000-1999"})
    assert (span.status_code, span.content) == (206, data[1000:2000])
    assert span.headers["content-range"] == f"bytes 1000-1999/{len(data)}"
    tail = requests.get(url(stack, gpu, "data/model.bin"), headers={**user.auth, "Range": "bytes=-5"})
    assert (tail.status_code, tail.content) == (206, data[-5:])
    past = requests.get(url(stack, gpu, "data/model.bin"), headers={**user.auth, "Range": f"bytes={len(data)}-"})
    assert (past.status_code, past.json()["error_code"]) == (416, "range_not_satisfiable")
    assert past.headers["content-range"] == f"bytes */{len(data)}"
    head = requests.head(url(stack, gpu, "data/model.bin"), headers=user.auth)
    assert (head.status_code, head.headers["content-length"], head.content) == (200, str(len(data)), b"")
    replaced = requests.put(url(stack, gpu, "data/model.bin"), data=b"small", headers=user.auth)
    assert (replaced.status_code, replaced.json()["size"]) == (200, 5)
    in_pod(stack, user, gpu, "mkdir -p data/sub && ln -s /etc data/link && : > data/empty")
    listed = requests.get(url(stack, gpu, "data/"), headers=user.auth)
    assert listed.status_code == 200, listed.text
    body = listed.json()
    assert (body["path"], body["truncated"]) == ("/workspace/data/", False)
    assert [(e["name"], e["type"], e["size"]) for e in body["entries"] if e["type"] != "folder"] == [
        ("empty", "file", 0), ("link", "symlink", 4), ("model.bin", "file", 5),
    ]
    assert [e["name"] for e in body["entries"] if e["type"] == "folder"] == ["sub"]
    assert all(e["mtime"].endswith("Z") for e in body["entries"])
    empty = requests.get(url(stack, gpu, "data/empty"), headers=user.auth)
    assert (empty.status_code, empty.content) == (200, b"")
    tmp = requests.put(url(stack, gpu, "/tmp/x.txt"), data=b"in tmp", headers=user.auth)
    assert tmp.status_code == 201 and in_pod(stack, user, gpu, "cat /tmp/x.txt") == "in tmp"


def _cut_upload(stack, user, gpu: str, path: str, data: bytes, sent: int) -> None:
    """A PUT of all of ``data`` with Content-Range from 0, whose connection is closed after ``sent`` bytes."""
    parts = urlsplit(stack.base)
    head = (
        f"PUT /v1/gpus/{gpu}/files/{path} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
        f"Authorization: Bearer {user.token}\r\nContent-Length: {len(data)}\r\n"
        f"Content-Range: bytes 0-{len(data) - 1}/{len(data)}\r\n\r\n"
    ).encode()
    with socket.create_connection((parts.hostname, parts.port), timeout=30) as sock:
        sock.sendall(head + data[:sent])
        time.sleep(0.5)  # let the bytes reach the pod before the cut (what arrived is kept)


def _size_once_settled(stack, user, gpu: str, path: str) -> int:
    """The file's size once the cut transfer has ended in the pod (its size stops changing)."""
    deadline, last = time.monotonic() + 30, -1
    while time.monotonic() < deadline:
        head = requests.head(url(stack, gpu, path), headers=user.auth)
        size = int(head.headers["content-length"]) if head.status_code == 200 else 0
        if size == last:
            return size
        last = size
        time.sleep(0.5)
    raise AssertionError("the cut upload never settled")


def test_an_upload_cut_at_40_percent_resumes_with_curl(stack, user, gpu, tmp_path):
    data = os.urandom(24 * MiB)
    source = tmp_path / "model.pt"
    source.write_bytes(data)
    _cut_upload(stack, user, gpu, "model.pt", data, len(data) * 2 // 5)
    have = _size_once_settled(stack, user, gpu, "model.pt")
    assert 0 < have <= len(data) * 2 // 5  # what arrived is kept, not more
    # curl -C N -T sends Content-Range: bytes N-(T-1)/T and the rest of the file.
    done = curl("-f", "-C", str(have), "-T", str(source), url(stack, gpu, "model.pt"), token=user.token)
    assert b'"size":%d' % len(data) in done.stdout
    assert in_pod(stack, user, gpu, "sha256sum model.pt").split()[0] == hashlib.sha256(data).hexdigest()
    # A resume from past the end is a 416 that says where to start.
    start = len(data) + 5
    ahead = requests.put(url(stack, gpu, "model.pt"), data=b"abc",
                         headers={**user.auth, "Content-Range": f"bytes {start}-{start + 2}/{start + 3}"})
    assert (ahead.status_code, ahead.headers["content-range"]) == (416, f"bytes */{len(data)}")


def test_a_cut_whole_upload_leaves_the_old_file_and_no_half_file(stack, user, gpu):
    assert requests.put(url(stack, gpu, "keep.bin"), data=b"old", headers=user.auth).status_code == 201
    data = os.urandom(8 * MiB)
    parts = urlsplit(stack.base)
    head = (
        f"PUT /v1/gpus/{gpu}/files/keep.bin HTTP/1.1\r\nHost: {parts.netloc}\r\n"
        f"Authorization: Bearer {user.token}\r\nContent-Length: {len(data)}\r\n\r\n"
    ).encode()
    with socket.create_connection((parts.hostname, parts.port), timeout=30) as sock:
        sock.sendall(head + data[: len(data) * 2 // 5])
        time.sleep(0.5)
    deadline = time.monotonic() + 30
    while (listing := in_pod(stack, user, gpu, "ls -A")) != "keep.bin\n":  # the temporary name goes
        assert time.monotonic() < deadline, listing
        time.sleep(0.3)
    assert in_pod(stack, user, gpu, "cat keep.bin") == "old"


def test_a_download_cut_at_40_percent_resumes_with_curl(stack, user, gpu, tmp_path):
    data = os.urandom(16 * MiB)
    put = requests.put(url(stack, gpu, "/tmp/out.bin"), data=data, headers=user.auth)
    assert put.status_code == 201, put.text
    partial = tmp_path / "out.bin"
    with requests.get(url(stack, gpu, "/tmp/out.bin"), headers=user.auth, stream=True) as reply:
        with open(partial, "wb") as handle:
            for chunk in reply.iter_content(MiB):
                handle.write(chunk)
                if handle.tell() >= len(data) * 2 // 5:
                    break
    assert partial.stat().st_size < len(data)
    curl("-f", "-C", "-", "-o", str(partial), url(stack, gpu, "/tmp/out.bin"), token=user.token)
    assert sha256_file(partial) == hashlib.sha256(data).hexdigest()


def test_a_chunked_upload_needs_content_range(stack, user, gpu):
    def chunks(data):
        yield data[:3]
        yield data[3:]

    plain = requests.put(url(stack, gpu, "c.txt"), data=chunks(b"abcdef"), headers=user.auth)
    assert (plain.status_code, plain.json()["error_code"]) == (411, "length_required")
    ranged = requests.put(url(stack, gpu, "c.txt"), data=chunks(b"abcdef"),
                          headers={**user.auth, "Content-Range": "bytes 0-5/6"})
    assert (ranged.status_code, ranged.json()["size"]) == (201, 6)
    more = requests.put(url(stack, gpu, "c.txt"), data=chunks(b"XYZ"), headers={**user.auth, "Content-Range": "bytes 3-5/*"})
    assert (more.status_code, more.json()["size"]) == (200, 6)
    assert requests.get(url(stack, gpu, "c.txt"), headers=user.auth).content == b"abcXYZ"


@pytest.mark.parametrize(
    "headers, status, code",
    [
        ({"Content-Range": "bytes 5-2/10"}, 400, "bad_range"),
        ({"Content-Range": "bytes 0-9/5"}, 400, "bad_range"),
        ({"Content-Range": "bytes */10"}, 400, "bad_range"),
        ({"Content-Range": "bytes 0-1/2"}, 400, "bad_range"),  # 2 bytes said, 3 sent
        ({"Content-Range": "bytes 10-12/13"}, 416, "range_not_satisfiable"),  # the file holds 3
    ],
)
def test_bad_content_ranges_are_refused_and_write_nothing(stack, user, gpu, headers, status, code):
    assert requests.put(url(stack, gpu, "r.txt"), data=b"abc", headers=user.auth).status_code == 201
    reply = requests.put(url(stack, gpu, "r.txt"), data=b"xyz", headers={**user.auth, **headers})
    assert (reply.status_code, reply.json()["error_code"]) == (status, code)
    if status == 416:
        assert reply.headers["content-range"] == "bytes */3"
    assert requests.get(url(stack, gpu, "r.txt"), headers=user.auth).content == b"abc"


def test_refusals_answer_the_envelope(stack, user, gpu):
    in_pod(stack, user, gpu, "mkdir -p d && echo x > f")
    cases = [
        ("GET", "missing.bin", 404, "pod_file_not_found"),
        ("GET", "d", 409, "is_a_folder"),
        ("PUT", "d", 409, "is_a_folder"),
        ("PUT", "d/", 400, "invalid_path"),
        ("PUT", "f/inside", 409, "not_a_folder"),
        ("GET", "f/", 409, "not_a_folder"),
        ("GET", "/etc/passwd", 400, "invalid_path"),
        ("GET", "nowhere/", 404, "pod_file_not_found"),
    ]
    for method, path, status, code in cases:
        reply = requests.request(method, url(stack, gpu, path), data=b"x" if method == "PUT" else None, headers=user.auth)
        assert (reply.status_code, reply.json()["error_code"]) == (status, code), (method, path, reply.text)
        assert reply.json()["trace_id"]


def test_only_the_owner_or_its_pod_may_use_its_files(stack, user, gpu):
    assert requests.put(url(stack, gpu, "secret.txt"), data=b"mine", headers=user.auth).status_code == 201
    other = stack.new_user()
    for method in ("GET", "PUT"):
        reply = requests.request(method, url(stack, gpu, "secret.txt"), data=b"theirs", headers=other.auth)
        assert (reply.status_code, reply.json()["error_code"]) == (404, "gpu_not_found")
    assert requests.get(url(stack, gpu, "secret.txt")).status_code == 401
    # The pod's own token reaches its own rental's files (a run's KGPU_API_TOKEN).
    out = in_pod(stack, user, gpu, 'printf %s "$KGPU_API_TOKEN"')
    own = requests.get(url(stack, gpu, "secret.txt"), headers={"Authorization": f"Bearer {out}"})
    assert (own.status_code, own.content) == (200, b"mine")
    requests.delete(f"{stack.base}/v1/gpus/{gpu}", headers=user.auth)
    ended = requests.get(url(stack, gpu, "secret.txt"), headers=user.auth)
    assert (ended.status_code, ended.json()["error_code"]) == (410, "gpu_not_running")
    assert requests.get(url(stack, gpu, "secret.txt"), headers=other.auth).status_code == 404


def test_curl_uploads_and_downloads_as_the_docs_say(stack, user, gpu, tmp_path):
    source = tmp_path / "in.txt"
    source.write_text("hello pod\n")
    curl("-f", "-T", str(source), url(stack, gpu, "notes/in.txt"), token=user.token)
    got = curl("-f", url(stack, gpu, "notes/in.txt"), token=user.token)
    assert got.stdout == b"hello pod\n"


# One tenant cannot starve the others: a user's transfers across all their pods are capped
# (KGPU_POD_FILES_PER_USER, 8 by default), besides each pod's 4.


def _rent(stack, account) -> str:
    reply = requests.post(f"{stack.base}/v1/gpus", json={"name": "t"}, headers=account.auth)
    assert reply.status_code == 201, reply.text
    return reply.json()["gpu_id"]


def _held_download(stack, auth: dict, gpu: str, *, wait_s: float = 0) -> requests.Response:
    """A download of a 1 GiB file whose body is left unread: once its head is back, its transfer
    holds its slots (taken before the head) until the answer is closed (or dropped: keep it). With
    ``wait_s``: asked again while refused, for that long (slots still being given back)."""
    deadline = time.monotonic() + wait_s
    while True:
        reply = requests.get(url(stack, gpu, "/tmp/big.bin"), headers=auth, stream=True, timeout=30)
        if reply.status_code == 200:
            return reply
        reply.close()
        assert reply.status_code in (429, 503) and time.monotonic() < deadline, (reply.status_code, reply.headers)
        time.sleep(0.2)


def _held_upload(stack, user, token: str, gpu: str) -> socket.socket:
    """An upload that sends its head and a few bytes, then nothing; returned once its transfer has
    begun in the pod (the file is there), so its slots are held."""
    parts = urlsplit(stack.base)
    sock = socket.create_connection((parts.hostname, parts.port), timeout=30)
    sock.sendall((
        f"PUT /v1/gpus/{gpu}/files/stalled.bin HTTP/1.1\r\nHost: {parts.netloc}\r\n"
        f"Authorization: Bearer {token}\r\nContent-Length: 1000\r\nContent-Range: bytes 0-999/1000\r\n\r\nabc"
    ).encode())
    deadline = time.monotonic() + 30
    while in_pod(stack, user, gpu, "[ -e stalled.bin ] && echo begun || true") != "begun\n":
        assert time.monotonic() < deadline, "the stalled upload never began"
        time.sleep(0.2)
    return sock


def _pod_token(stack, user, gpu: str) -> dict:
    """The Authorization header of the pod's own token (a run's KGPU_API_TOKEN)."""
    return {"Authorization": "Bearer " + in_pod(stack, user, gpu, 'printf %s "$KGPU_API_TOKEN"')}


def _refused_for_the_user(reply: requests.Response) -> None:
    assert reply.status_code == 429, (reply.request.method, reply.request.url, reply.status_code)  # not a GiB of body
    assert reply.headers["retry-after"] == "5"
    if reply.request.method != "HEAD":
        body = reply.json()
        assert body["error_code"] == "too_many_transfers" and "8 pod-file transfers" in body["message"], body
        assert body["trace_id"]


def test_one_user_cannot_hold_every_transfer_across_their_pods(stack, user):
    """A tenant with three pods holds 8 transfers (4 on one pod, 4 on another, two of those by that
    pod's own token): every further one is refused at once, on the third pod too, whose own cap is
    far off, and writes nothing; another user's transfers go through meanwhile; once the tenant's
    clients go, or a pod with 4 of them, every slot comes back (8 held again, the 9th refused again)."""
    assert stack.settings.pod_files_per_user == 8  # what the counts below are made of
    other = stack.new_user()
    pods = [_rent(stack, user) for _ in range(3)]
    theirs = _rent(stack, other)
    downloads: list[requests.Response] = []
    uploads: list[socket.socket] = []

    def let_go() -> None:
        for client in [*downloads, *uploads]:
            client.close()
        downloads.clear()
        uploads.clear()

    try:
        for gpu in pods:
            in_pod(stack, user, gpu, "truncate -s 1G /tmp/big.bin")
        pod_token = _pod_token(stack, user, pods[1])
        downloads.extend(_held_download(stack, user.auth, pods[0]) for _ in range(4))
        downloads.extend(_held_download(stack, user.auth, pods[1]) for _ in range(2))
        downloads.append(_held_download(stack, pod_token, pods[1]))
        uploads.append(_held_upload(stack, user, pod_token["Authorization"].split()[1], pods[1]))

        idle = pods[2]  # no transfer of its own: only the user's cap refuses
        _refused_for_the_user(requests.get(url(stack, idle, "/tmp/big.bin"), headers=user.auth, stream=True))
        _refused_for_the_user(requests.head(url(stack, idle, "/tmp/big.bin"), headers=user.auth))
        _refused_for_the_user(requests.get(url(stack, idle, "/tmp/"), headers=user.auth))
        _refused_for_the_user(requests.put(url(stack, idle, "new.bin"), data=b"lost?", headers=user.auth))
        idle_token = _pod_token(stack, user, idle)
        _refused_for_the_user(requests.put(url(stack, idle, "new.bin"), data=b"lost?", headers=idle_token))
        assert in_pod(stack, user, idle, "ls -A") == ""  # a refused upload wrote nothing

        # Meanwhile another user moves files at will.
        data = os.urandom(MiB)
        put = requests.put(url(stack, theirs, "mine.bin"), data=data, headers=other.auth)
        assert put.status_code == 201, put.text
        got = requests.get(url(stack, theirs, "mine.bin"), headers=other.auth)
        assert (got.status_code, got.content) == (200, data)

        # The tenant's clients go (downloads unread, an upload cut): all 8 slots come back, none more.
        let_go()
        for gpu in [pods[0]] * 4 + [pods[1]] * 4:
            downloads.append(_held_download(stack, user.auth, gpu, wait_s=30))
        _refused_for_the_user(requests.get(url(stack, idle, "/tmp/"), headers=user.auth))

        # A pod that goes ends its transfers, and gives back their slots: 4 more on the idle pod.
        gone = requests.delete(f"{stack.base}/v1/gpus/{pods[0]}", headers=user.auth)
        assert gone.status_code == 200, gone.text
        drained = 0
        for reply in downloads[:4]:  # what was on its way still arrives, then the body is cut short
            with contextlib.suppress(requests.RequestException):
                for chunk in reply.iter_content(1 << 20):
                    drained += len(chunk)
        assert drained < 4 << 30, drained  # none was whole: each ended with its pod
        for _ in range(4):
            downloads.append(_held_download(stack, user.auth, idle, wait_s=30))
        pods.append(_rent(stack, user))  # room in a pod again, none for the user
        _refused_for_the_user(requests.get(url(stack, pods[-1], "/tmp/"), headers=user.auth))
    finally:
        let_go()
        for gpu in pods:
            requests.delete(f"{stack.base}/v1/gpus/{gpu}", headers=user.auth)
        requests.delete(f"{stack.base}/v1/gpus/{theirs}", headers=other.auth)
