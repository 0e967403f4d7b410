"""rclone reads shared drives the way pods do: the http backend, and a read-only FUSE mount."""

from __future__ import annotations

import json
import os
import random
import subprocess
import time
import uuid
from pathlib import Path

import pytest
import requests

from drive.rclone import rclone_binary
from tests.clients import curl, sha256_file

FILES = {"a.txt": 1000, "d/b c.bin": 200_000, "d/e/f#.csv": 5000, "한글 🚀.txt": 300}


# rclone's own client behaviour does not depend on the database or store behind the server.
pytestmark = pytest.mark.parametrize("stack", ["rclone-sqlite"], indirect=True)


@pytest.fixture
def shared(stack, tmp_path):
    owner = stack.new_user()
    slug = "rc-" + uuid.uuid4().hex[:8]
    requests.post(f"{stack.base}/v1/admin/orgs", json={"slug": slug, "owner_user_id": owner.id}, headers=stack.admin)
    src = tmp_path / "src" / slug
    for rel, size in FILES.items():
        path = src / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(os.urandom(size))
        curl("-f", "-L", "-T", str(path), f"{stack.base}/v1/shared/{slug}/{requests.utils.quote(rel)}", token=owner.token)
    return slug, owner, src


def rclone(*args: str, token: str, base: str) -> subprocess.CompletedProcess:
    command = [
        rclone_binary(), "--config", os.devnull, *args,
        "--http-url", f"{base}/v1/shared/", "--http-headers", f"Authorization,Bearer {token}",
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def test_rclone_http_backend_lists_copies_and_checks(stack, shared, tmp_path):
    slug, owner, src = shared
    listed = rclone("lsjson", "-R", f":http:{slug}", token=owner.token, base=stack.base)
    assert listed.returncode == 0, listed.stderr
    files = {e["Path"]: e["Size"] for e in json.loads(listed.stdout) if not e["IsDir"]}
    assert files == FILES
    copied = rclone("copy", f":http:{slug}", str(tmp_path / "copy"), token=owner.token, base=stack.base)
    assert copied.returncode == 0, copied.stderr
    for rel in FILES:
        assert sha256_file(tmp_path / "copy" / rel) == sha256_file(src / rel)
    checked = rclone("check", "--download", str(src), f":http:{slug}", token=owner.token, base=stack.base)
    assert checked.returncode == 0, checked.stderr
    assert f"{len(FILES)} matching files" in checked.stderr


def test_rclone_http_backend_sees_only_my_orgs(stack, shared):
    slug, _, _ = shared
    outsider = stack.new_user()
    listed = rclone("lsjson", ":http:", token=outsider.token, base=stack.base)
    assert listed.returncode == 0 and json.loads(listed.stdout) == []
    denied = rclone("lsjson", f":http:{slug}", token=outsider.token, base=stack.base)
    assert denied.returncode != 0


def test_read_only_mount_serves_random_reads(stack, shared, tmp_path):
    if not Path("/dev/fuse").exists() or subprocess.run(["which", "fusermount3"], capture_output=True).returncode:
        pytest.fail("FUSE is needed: .ci/run installs fuse3")
    slug, owner, src = shared
    big = src / "big.bin"
    big.write_bytes(os.urandom(48 << 20))
    curl("-f", "-L", "-T", str(big), f"{stack.base}/v1/shared/{slug}/big.bin", token=owner.token)
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    mount = subprocess.Popen(
        [
            rclone_binary(), "--config", os.devnull, "mount", ":http:", str(mountpoint),
            "--http-url", f"{stack.base}/v1/shared/", "--http-headers", f"Authorization,Bearer {owner.token}",
            "--read-only", "--vfs-cache-mode", "full", "--vfs-read-chunk-size", "16M",
            "--vfs-read-chunk-streams", "4", "--cache-dir", str(tmp_path / "cache"),
        ],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 20
        while not (mountpoint / slug).exists():
            assert time.monotonic() < deadline and mount.poll() is None, "rclone mount did not come up"
            time.sleep(0.1)
        mounted = mountpoint / slug / "big.bin"
        size = big.stat().st_size
        assert mounted.stat().st_size == size
        rng = random.Random(7)
        with open(big, "rb") as want, open(mounted, "rb") as got:
            for _ in range(100):
                offset, length = rng.randrange(size), rng.randrange(1, 1 << 20)
                want.seek(offset)
                got.seek(offset)
                assert got.read(length) == want.read(length), offset
        assert (mountpoint / slug / "d" / "e" / "f#.csv").read_bytes() == (src / "d" / "e" / "f#.csv").read_bytes()
        with pytest.raises(OSError):
            (mountpoint / slug / "new.txt").write_bytes(b"no")
    finally:
        subprocess.run(["fusermount3", "-u", str(mountpoint)], capture_output=True)
        mount.wait(timeout=20)
