"""/v1/files with real clients (curl, requests, boto3) on every stack; every upload checked by sha256."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
from pathlib import Path

import boto3
import pytest
import requests
from botocore.config import Config

from tests.clients import curl, raw_request, sha256_file

MiB = 1 << 20


@pytest.fixture
def blob(tmp_path) -> Path:
    path = tmp_path / "blob.bin"
    path.write_bytes(os.urandom(7 * MiB + 123))  # more than one 5 MiB part on the test stacks
    return path


def download_sha(stack, user, rel: str, tmp_path: Path) -> str:
    out = tmp_path / ("dl-" + hashlib.md5(rel.encode()).hexdigest())
    curl("-f", "-L", "-o", str(out), f"{stack.base}/v1/files/{rel}", token=user.token)
    return sha256_file(out)


def object_store_client(stack):
    target = stack.target
    return boto3.client(
        "s3",
        endpoint_url=target.endpoint,
        aws_access_key_id=target.access_key,
        aws_secret_access_key=target.secret_key,
        region_name="us-east-1",
        config=Config(signature_version="s3v4", s3={"addressing_style": "path"}),
    )


# ------------------------------------------------------------------ uploads


def test_curl_put_with_expect_is_redirected_to_the_store(stack, user, blob, tmp_path):
    result = curl(
        "-f", "-L", "-H", "Expect: 100-continue", "-T", str(blob), "-w", "%{num_redirects}",
        f"{stack.base}/v1/files/up/expect.bin", token=user.token,
    )
    assert result.stdout.decode().strip().endswith("1")  # one 307, then the presigned PUT
    assert download_sha(stack, user, "up/expect.bin", tmp_path) == sha256_file(blob)


def test_307_is_answered_before_any_body_byte(stack, user):
    head = (
        f"PUT /v1/files/up/never-sent.bin HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {user.token}\r\n"
        "Content-Length: 1048576\r\nExpect: 100-continue\r\n\r\n"
    ).encode()
    answer = raw_request(stack.base, head)  # no body byte is ever sent
    status, _, rest = answer.partition(b"\r\n")
    assert status == b"HTTP/1.1 307 Temporary Redirect"
    assert b"100 Continue" not in answer
    assert re.search(rb"(?i)\r?\nconnection: close\r\n", b"\r\n" + rest)
    location = re.search(rb"(?i)location: (\S+)", answer).group(1).decode()
    assert location.startswith(stack.target.endpoint) and "X-Amz-Signature=" in location


def test_curl_put_without_expect_is_streamed_once(stack, user, blob, tmp_path):
    result = curl(
        "-f", "-L", "-H", "Expect:", "-T", str(blob), "-w", "\n%{num_redirects}",
        f"{stack.base}/v1/files/up/streamed.bin", token=user.token,
    )
    body, redirects = result.stdout.decode().rsplit("\n", 1)
    assert redirects == "0"
    reply = json.loads(body)
    assert reply["size"] == blob.stat().st_size
    assert reply["parts"] == 0  # a known length over one part: one PUT, streamed as it arrives
    assert reply["md5"] == hashlib.md5(blob.read_bytes()).hexdigest()
    assert download_sha(stack, user, "up/streamed.bin", tmp_path) == sha256_file(blob)


def test_curl_from_a_pipe_is_chunked_and_streamed(stack, user, blob, tmp_path):
    # curl 7.88 adds Expect to -T uploads, pipes included; a chunked body still cannot be redirected.
    result = curl("-f", "-L", "-T", "-", f"{stack.base}/v1/files/up/pipe.bin", token=user.token, input=blob.read_bytes())
    assert json.loads(result.stdout)["size"] == blob.stat().st_size
    assert download_sha(stack, user, "up/pipe.bin", tmp_path) == sha256_file(blob)


def test_tar_piped_with_data_binary_is_a_streamed_post(stack, user, tmp_path):
    src = tmp_path / "exp42"
    src.mkdir()
    for n in range(3):
        (src / f"f{n}.txt").write_bytes(os.urandom(100_000))
    archive = tmp_path / "expected.tgz"
    subprocess.run(["tar", "-czf", str(archive), "-C", str(tmp_path), "exp42"], check=True)
    script = (
        f"cat {archive} | curl -sSf -L -H 'Authorization: Bearer {user.token}' -H 'Expect: 100-continue' "
        f"-H 'Content-Type: application/gzip' --data-binary @- {stack.base}/v1/files/runs/exp42.tgz"
    )
    subprocess.run(["bash", "-euo", "pipefail", "-c", script], check=True, capture_output=True, timeout=60)
    assert download_sha(stack, user, "runs/exp42.tgz", tmp_path) == sha256_file(archive)
    head = requests.head(f"{stack.base}/v1/files/runs/exp42.tgz", headers=user.auth)
    assert head.headers["Content-Type"] == "application/gzip"


def test_requests_two_step_upload(stack, user, blob, tmp_path):
    minted = requests.post(
        f"{stack.base}/v1/files/two/step.zip", headers={**user.auth, "x-content-type": "application/zip"}
    )
    assert minted.status_code == 200, minted.text
    grant = minted.json()
    assert grant["method"] == "PUT" and grant["expires_in"] > 0
    with open(blob, "rb") as handle:
        put = requests.put(grant["url"], data=handle, headers=grant["headers"])
    assert put.status_code == 200
    assert download_sha(stack, user, "two/step.zip", tmp_path) == sha256_file(blob)
    meta = object_store_client(stack).head_object(Bucket=stack.settings.s3_bucket, Key=f"users/{user.id}/two/step.zip")
    assert meta["ContentLength"] == blob.stat().st_size
    assert meta["ContentType"] == "application/zip"


def test_requests_put_follows_the_307(stack, user, blob, tmp_path):
    with open(blob, "rb") as handle:
        reply = requests.put(f"{stack.base}/v1/files/req/put.bin", data=handle, headers=user.auth)
    assert reply.status_code == 201
    assert download_sha(stack, user, "req/put.bin", tmp_path) == sha256_file(blob)


def test_overwrite_replaces_and_counts_once(stack, user, tmp_path):
    url = f"{stack.base}/v1/files/ow/file.txt"
    assert requests.put(url, data=b"a" * 1000, headers=user.auth).status_code == 201
    again = requests.put(url, data=b"b" * 10, headers=user.auth)
    assert again.status_code == 200
    assert requests.get(url, headers=user.auth).content == b"b" * 10
    listing = requests.get(f"{stack.base}/v1/files", headers=user.auth).json()
    assert listing["quota"]["used_bytes"] == 10


def test_empty_file(stack, user):
    reply = requests.put(f"{stack.base}/v1/files/empty.txt", data=b"", headers=user.auth)
    assert reply.status_code == 201
    assert requests.head(f"{stack.base}/v1/files/empty.txt", headers=user.auth).headers["Content-Length"] == "0"


def test_truncated_body_stores_nothing(stack, user):
    head = (
        f"PUT /v1/files/cut/short.bin HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {user.token}\r\n"
        "Content-Length: 100000\r\n\r\n"
    ).encode()
    raw_request(stack.base, head, b"x" * 1000, read_timeout=1.0)
    assert stack.store.head(f"users/{user.id}/cut/short.bin") is None


def test_put_to_a_folder_path_is_refused(stack, user):
    reply = requests.put(f"{stack.base}/v1/files/folder/", data=b"x", headers=user.auth)
    assert reply.status_code == 400
    assert reply.json()["error_code"] == "is_a_folder"


def test_file_and_folder_names_conflict_clearly(stack, user):
    assert requests.put(f"{stack.base}/v1/files/c/inner.txt", data=b"1", headers=user.auth).status_code == 201
    reply = requests.put(f"{stack.base}/v1/files/c", data=b"2", headers=user.auth)
    assert reply.status_code == 409
    assert reply.json()["error_code"] == "name_conflict"
    redirected = requests.put(f"{stack.base}/v1/files/c", data=b"2", headers={**user.auth, "Expect": "100-continue"})
    assert redirected.status_code == 409  # refused before a 307 could reach the store
    assert requests.post(f"{stack.base}/v1/files/c", headers=user.auth).status_code == 409
    assert requests.get(f"{stack.base}/v1/files/c/inner.txt", headers=user.auth).content == b"1"


# ------------------------------------------------------------------ quota


@pytest.fixture
def small_quota(stack, monkeypatch):
    monkeypatch.setattr(stack.settings, "user_quota_bytes", 1_000_000)
    return 1_000_000


def test_quota_refuses_a_declared_length_over_it(stack, user, small_quota):
    for expect in ("Expect: 100-continue", "Expect:"):
        result = curl(
            "-H", expect, "-H", "Content-Type: application/octet-stream", "--data-binary", "@-", "-X", "PUT",
            "-w", "\n%{http_code}", f"{stack.base}/v1/files/q/big.bin",
            token=user.token, input=os.urandom(small_quota + 1), check=False,
        )
        body, status = result.stdout.decode(errors="replace").rsplit("\n", 1)
        assert status == "413", result
        assert json.loads(body)["error_code"] == "quota_exceeded"
    assert stack.store.head(f"users/{user.id}/q/big.bin") is None


def test_quota_stops_a_chunked_upload_midway(stack, user, small_quota):
    result = curl(
        "-H", "Expect:", "-T", "-", "-w", "\n%{http_code}", f"{stack.base}/v1/files/q/chunked.bin",
        token=user.token, input=os.urandom(small_quota * 2), check=False,
    )
    assert result.stdout.decode(errors="replace").rsplit("\n", 1)[-1] == "413"
    assert stack.store.head(f"users/{user.id}/q/chunked.bin") is None


def test_a_full_drive_mints_no_upload_url(stack, user, small_quota):
    assert requests.put(f"{stack.base}/v1/files/q/full.bin", data=os.urandom(small_quota), headers=user.auth).status_code == 201
    minted = requests.post(f"{stack.base}/v1/files/q/more.bin", headers=user.auth)
    assert minted.status_code == 413 and minted.json()["error_code"] == "quota_exceeded"


def test_quota_counts_what_was_uploaded(stack, user, small_quota):
    assert requests.put(f"{stack.base}/v1/files/q/a.bin", data=os.urandom(600_000), headers=user.auth).status_code == 201
    reply = requests.put(f"{stack.base}/v1/files/q/b.bin", data=os.urandom(600_000), headers=user.auth)
    assert reply.status_code == 413
    requests.delete(f"{stack.base}/v1/files/q/a.bin", headers=user.auth)
    assert requests.put(f"{stack.base}/v1/files/q/b.bin", data=os.urandom(600_000), headers=user.auth).status_code == 201


# ------------------------------------------------------------------ downloads


def test_download_ranged_and_resumed(stack, user, blob, tmp_path):
    curl("-f", "-L", "-T", str(blob), f"{stack.base}/v1/files/dl/blob.bin", token=user.token)
    data = blob.read_bytes()
    ranged = curl("-f", "-L", "-r", "1000-1999", f"{stack.base}/v1/files/dl/blob.bin", token=user.token)
    assert ranged.stdout == data[1000:2000]
    partial = tmp_path / "partial.bin"
    partial.write_bytes(data[: 3 * MiB + 7])
    curl("-f", "-L", "-C", "-", "-o", str(partial), f"{stack.base}/v1/files/dl/blob.bin", token=user.token)
    assert sha256_file(partial) == sha256_file(blob)


def test_get_is_a_302_to_a_presigned_url(stack, user):
    requests.put(f"{stack.base}/v1/files/dl/a.txt", data=b"abc", headers=user.auth)
    reply = requests.get(f"{stack.base}/v1/files/dl/a.txt", headers=user.auth, allow_redirects=False)
    assert reply.status_code == 302
    assert reply.headers["Location"].startswith(stack.target.endpoint)
    assert requests.get(reply.headers["Location"]).content == b"abc"  # the URL alone authorises


@pytest.mark.parametrize("how", [{"params": {"json": "1"}}, {"headers": {"Accept": "application/json"}}])
def test_get_json_envelope(stack, user, how):
    requests.put(f"{stack.base}/v1/files/dl/j.txt", data=b"json!", headers=user.auth)
    reply = requests.get(
        f"{stack.base}/v1/files/dl/j.txt", params=how.get("params"), headers={**user.auth, **how.get("headers", {})}
    )
    assert reply.status_code == 200
    body = reply.json()
    assert body["size"] == 5 and body["expires_in"] == stack.settings.presign_expires_seconds
    assert requests.get(body["url"]).content == b"json!"


def test_get_json_of_missing_file_is_404(stack, user):
    reply = requests.get(f"{stack.base}/v1/files/nope.txt?json=1", headers=user.auth)
    assert reply.status_code == 404
    assert set(reply.json()) == {"error_code", "message", "trace_id"}


def test_head_answers_itself(stack, user):
    requests.put(f"{stack.base}/v1/files/h/page.html", data=b"<p>hi</p>", headers=user.auth)
    reply = requests.head(f"{stack.base}/v1/files/h/page.html", headers=user.auth)
    assert reply.status_code == 200
    assert reply.headers["Content-Length"] == "9"
    assert reply.headers["Content-Type"].startswith("text/html")
    assert reply.headers["ETag"] == '"' + hashlib.md5(b"<p>hi</p>").hexdigest() + '"'
    assert re.match(r"^\w{3}, \d\d \w{3} \d{4} \d\d:\d\d:\d\d GMT$", reply.headers["Last-Modified"])
    assert requests.head(f"{stack.base}/v1/files/h/missing", headers=user.auth).status_code == 404
    assert requests.head(f"{stack.base}/v1/files/h/", headers=user.auth).status_code == 200
    assert requests.head(f"{stack.base}/v1/files/nowhere/", headers=user.auth).status_code == 404


# ------------------------------------------------------------------ listings


def test_flat_list_with_prefix_glob_and_quota(stack, user):
    for rel in ["a/x.csv", "a/y.txt", "a/b/z.csv", "top.csv"]:
        requests.put(f"{stack.base}/v1/files/{rel}", data=rel.encode(), headers=user.auth)
    everything = requests.get(f"{stack.base}/v1/files", headers=user.auth).json()
    assert sorted(f["path"] for f in everything["files"]) == ["a/b/z.csv", "a/x.csv", "a/y.txt", "top.csv"]
    assert everything["quota"] == {"used_bytes": sum(len(r) for r in ["a/x.csv", "a/y.txt", "a/b/z.csv", "top.csv"]), "quota_bytes": stack.settings.user_quota_bytes}
    assert everything["count"] == 4
    narrowed = requests.get(f"{stack.base}/v1/files", params={"prefix": "a/"}, headers=user.auth).json()
    assert sorted(f["path"] for f in narrowed["files"]) == ["a/b/z.csv", "a/x.csv", "a/y.txt"]
    globbed = requests.get(f"{stack.base}/v1/files", params={"glob": "*.csv"}, headers=user.auth).json()
    assert sorted(f["path"] for f in globbed["files"]) == ["a/b/z.csv", "a/x.csv", "top.csv"]


def test_listing_is_private_to_each_user(stack, user):
    other = stack.new_user()
    requests.put(f"{stack.base}/v1/files/secret.txt", data=b"mine", headers=other.auth)
    assert requests.get(f"{stack.base}/v1/files", headers=user.auth).json()["files"] == []
    assert requests.get(f"{stack.base}/v1/files/secret.txt?json=1", headers=user.auth).status_code == 404


def test_folder_listing_html_and_json(stack, user):
    names = ["sp ace.txt", "hash#.txt", "pct%.txt", "plus+.txt", "한글.txt", "🚀.bin"]
    for name in names:
        curl("-f", "-L", "-T", "-", f"{stack.base}/v1/files/d/{requests.utils.quote(name)}", token=user.token, input=name.encode())
    requests.put(f"{stack.base}/v1/files/d/sub/inner.txt", data=b"i", headers=user.auth)
    page = requests.get(f"{stack.base}/v1/files/d/", headers=user.auth)
    assert page.headers["Content-Type"].startswith("text/html")
    hrefs = re.findall(r'href="([^"]+)"', page.text)
    assert "sub/" in hrefs and "../" in hrefs
    from urllib.parse import unquote

    assert sorted(unquote(h.removeprefix("./")) for h in hrefs if h not in ("../", "sub/")) == sorted(names)
    listed = requests.get(f"{stack.base}/v1/files/d/?json=1", headers=user.auth).json()
    by_name = {e["name"]: e for e in listed["entries"]}
    assert by_name["sub"]["type"] == "dir"
    assert by_name["🚀.bin"]["size"] == len("🚀.bin".encode())
    for name in names:  # every href, followed, downloads the right bytes
        assert requests.get(f"{stack.base}/v1/files/d/{requests.utils.quote(name)}", headers=user.auth).content == name.encode()
    assert requests.get(f"{stack.base}/v1/files/nope/", headers=user.auth).status_code == 404
    root = requests.get(f"{stack.base}/v1/files/?json=1", headers=user.auth).json()
    assert {"name": "d", "path": "d/", "type": "dir"} in root["entries"]


# ------------------------------------------------------------------ deletes


def test_delete_file_folder_and_missing(stack, user):
    for rel in ["del/a.txt", "del/sub/b.txt", "del/sub/c.txt", "keep.txt"]:
        requests.put(f"{stack.base}/v1/files/{rel}", data=b"12345", headers=user.auth)
    assert requests.delete(f"{stack.base}/v1/files/del/a.txt", headers=user.auth).status_code == 204
    assert requests.head(f"{stack.base}/v1/files/del/a.txt", headers=user.auth).status_code == 404
    gone = requests.delete(f"{stack.base}/v1/files/del/sub/", headers=user.auth)
    assert gone.status_code == 204 and gone.headers["X-Deleted-Count"] == "2"
    requests.put(f"{stack.base}/v1/files/del2/x/y.txt", data=b"1", headers=user.auth)
    assert requests.delete(f"{stack.base}/v1/files/del2", headers=user.auth).status_code == 204  # no exact key: prefix
    missing = requests.delete(f"{stack.base}/v1/files/never/there", headers=user.auth)
    assert missing.status_code == 404 and missing.json()["error_code"] == "not_found"
    assert requests.delete(f"{stack.base}/v1/files/", headers=user.auth).status_code == 400
    remaining = requests.get(f"{stack.base}/v1/files", headers=user.auth).json()
    assert [f["path"] for f in remaining["files"]] == ["keep.txt"]
    assert remaining["quota"]["used_bytes"] == 5


def test_fast_download_path_agrees_with_the_routes(stack, user):
    """The second GET finds the token cached and is answered by gateway/edge.py."""
    requests.put(f"{stack.base}/v1/files/fast/a b.txt", data=b"fast", headers=user.auth)
    app = stack.server.app
    app.state.authenticator.invalidate()
    first = requests.get(f"{stack.base}/v1/files/fast/a%20b.txt", headers=user.auth, allow_redirects=False)
    assert app.state.authenticator.cached(user.token) is not None
    second = requests.get(f"{stack.base}/v1/files/fast/a%20b.txt", headers=user.auth, allow_redirects=False)
    for reply in (first, second):
        assert reply.status_code == 302 and reply.headers["X-Request-ID"]
        assert f"/users/{user.id}/fast/a%20b.txt?" in reply.headers["Location"]
        assert requests.get(reply.headers["Location"]).content == b"fast"
    bad = requests.get(f"{stack.base}/v1/files/fast/%2e%2e/x", headers=user.auth, allow_redirects=False)
    assert bad.status_code == 400 and bad.json()["error_code"] == "invalid_path"
    pending = stack.new_user(status="pending")
    requests.get(f"{stack.base}/v1/me", headers=pending.auth)  # now cached
    assert requests.get(f"{stack.base}/v1/files/x", headers=pending.auth, allow_redirects=False).status_code == 403


def test_folder_marker_name_is_reserved(stack, user):
    reply = requests.put(f"{stack.base}/v1/files/a/.kgpu-folder", data=b"x", headers=user.auth)
    assert reply.status_code == 400 and reply.json()["error_code"] == "reserved_name"
