"""rclone's webdav backend and a read-write `rclone mount :webdav:` on /v1/files/, as pods use them.

rclone follows the 302 of a GET to the store and sends PUTs without
`Expect: 100-continue` (streamed through the gateway, SPEC decision 4); every
other operation is WebDAV (PROPFIND, MKCOL, MOVE, COPY) handled by wsgidav.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
from pathlib import Path
from urllib.parse import quote

import pytest
import requests

from drive.rclone import rclone_binary
from drive.store.embedded import free_port
from tests.clients import sha256_file

FILES = {
    "a.txt": 1000,
    "empty.bin": 0,
    "d/b c.bin": 200_000,
    "d/e/f#%+.csv": 5000,
    "d/e/big.bin": 12 << 20,  # more than one part: a multipart upload through the gateway
    "한글 🚀.txt": 300,
}

# rclone's own client behaviour does not depend on the database or store behind the server.
pytestmark = pytest.mark.parametrize("stack", ["rclone-sqlite"], indirect=True)


def webdav_flags(base: str, token: str) -> list[str]:
    return [
        "--webdav-url", f"{base}/v1/files/", "--webdav-vendor", "other",
        "--webdav-headers", f"Authorization,Bearer {token}",
    ]


def rclone(*args: str, stack, account) -> subprocess.CompletedProcess:
    command = [rclone_binary(), "--config", os.devnull, *args, *webdav_flags(stack.base, account.token)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, (args, result.stderr)
    return result


def make_tree(root: Path, files: dict[str, int]) -> None:
    for rel, size in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(os.urandom(size))


def remote_files(stack, account, remote: str) -> dict[str, int]:
    listed = json.loads(rclone("lsjson", "-R", remote, stack=stack, account=account).stdout)
    return {e["Path"]: e["Size"] for e in listed if not e["IsDir"]}


def remote_dirs(stack, account, remote: str) -> set[str]:
    listed = json.loads(rclone("lsjson", "-R", remote, stack=stack, account=account).stdout)
    return {e["Path"] for e in listed if e["IsDir"]}


def test_rclone_webdav_backend(stack, user, tmp_path):
    src = tmp_path / "src"
    make_tree(src, FILES)
    rclone("copy", str(src), ":webdav:t", stack=stack, account=user)
    assert remote_files(stack, user, ":webdav:t") == FILES
    checked = rclone("check", "--download", str(src), ":webdav:t", stack=stack, account=user)
    assert f"{len(FILES)} matching files" in checked.stderr

    # sync: one file changed, one removed, one added.
    (src / "a.txt").write_bytes(os.urandom(1500))
    (src / "d" / "b c.bin").unlink()
    (src / "d" / "new.txt").write_bytes(b"new\n")
    rclone("sync", str(src), ":webdav:t", stack=stack, account=user)
    expected = {**{k: v for k, v in FILES.items() if k != "d/b c.bin"}, "a.txt": 1500, "d/new.txt": 4}
    assert remote_files(stack, user, ":webdav:t") == expected
    rclone("check", "--download", str(src), ":webdav:t", stack=stack, account=user)
    back = tmp_path / "back"
    rclone("copy", ":webdav:t", str(back), stack=stack, account=user)
    for rel in expected:
        assert sha256_file(back / rel) == sha256_file(src / rel), rel

    # moveto (a server-side MOVE into a new folder), deletefile, mkdir, rmdir, purge.
    rclone("moveto", ":webdav:t/d/e/f#%+.csv", ":webdav:t/moved here/g+#.csv", stack=stack, account=user)
    files = remote_files(stack, user, ":webdav:t")
    assert "d/e/f#%+.csv" not in files and files["moved here/g+#.csv"] == 5000
    fetched = requests.get(f"{stack.base}/v1/files/t/{quote('moved here/g+#.csv')}", headers=user.auth)
    assert fetched.content == (src / "d" / "e" / "f#%+.csv").read_bytes()
    rclone("deletefile", ":webdav:t/moved here/g+#.csv", stack=stack, account=user)
    assert "moved here/g+#.csv" not in remote_files(stack, user, ":webdav:t")
    rclone("mkdir", ":webdav:t/made/deeper", stack=stack, account=user)
    assert {"made", "made/deeper"} <= remote_dirs(stack, user, ":webdav:t")
    rclone("rmdir", ":webdav:t/made/deeper", stack=stack, account=user)
    assert "made/deeper" not in remote_dirs(stack, user, ":webdav:t")
    assert "made" in remote_dirs(stack, user, ":webdav:t")  # an empty folder stays a folder
    rclone("purge", ":webdav:t", stack=stack, account=user)
    assert json.loads(rclone("lsjson", ":webdav:", stack=stack, account=user).stdout) == []
    assert requests.get(f"{stack.base}/v1/files?json=1", headers=user.auth).json()["files"] == []


class Mount:
    """`rclone mount :webdav:` with --vfs-cache-mode writes and a remote-control port to drain uploads."""

    def __init__(self, stack, account, mountpoint: Path, cache: Path):
        self.mountpoint = mountpoint
        self.rc = f"http://127.0.0.1:{free_port()}"
        mountpoint.mkdir(exist_ok=True)
        self.process = subprocess.Popen(
            [
                rclone_binary(), "--config", os.devnull, "mount", ":webdav:", str(mountpoint),
                *webdav_flags(stack.base, account.token),
                "--vfs-cache-mode", "writes", "--cache-dir", str(cache),
                "--vfs-write-back", "1s",  # 5 s by default; shorter here so the test waits less
                "--dir-cache-time", "1s",
                "--rc", "--rc-addr", self.rc.removeprefix("http://"), "--rc-no-auth",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 20
        while not os.path.ismount(mountpoint):
            assert time.monotonic() < deadline and self.process.poll() is None, "rclone mount did not come up"
            time.sleep(0.05)

    def drain(self, timeout: float = 60) -> None:
        """Wait until rclone has uploaded everything written through the mount."""
        deadline = time.monotonic() + timeout
        empty_polls = 0
        while empty_polls < 3:
            assert time.monotonic() < deadline, "uploads did not finish"
            queue = requests.post(f"{self.rc}/vfs/queue", timeout=5).json()["queue"]
            empty_polls = 0 if queue else empty_polls + 1
            time.sleep(0.1)

    def close(self) -> None:
        subprocess.run(["fusermount3", "-u", str(self.mountpoint)], capture_output=True)
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            subprocess.run(["fusermount3", "-uz", str(self.mountpoint)], capture_output=True)
            self.process.kill()
            self.process.wait(timeout=10)


def wait_for_size(stack, account, rel: str, size: int, timeout: float = 60) -> float:
    """Seconds until the server has ``rel`` with ``size`` bytes."""
    started = time.monotonic()
    while True:
        reply = requests.head(f"{stack.base}/v1/files/{quote(rel)}", headers=account.auth)
        if reply.status_code == 200 and int(reply.headers["Content-Length"]) == size:
            return time.monotonic() - started
        assert time.monotonic() - started < timeout, f"{rel} never reached {size} bytes"
        time.sleep(0.05)


def test_rclone_mount_read_write(stack, user, tmp_path):
    if not Path("/dev/fuse").exists() or subprocess.run(["which", "fusermount3"], capture_output=True).returncode:
        pytest.fail("FUSE is needed: .ci/run installs fuse3")
    mnt = tmp_path / "mnt"
    mount = Mount(stack, user, mnt, tmp_path / "cache1")
    try:
        (mnt / "a.txt").write_bytes(b"one")  # create
        (mnt / "a.txt").write_bytes(b"two!")  # overwrite
        with open(mnt / "a.txt", "ab") as handle:  # append
            handle.write(b"+3")
        (mnt / "d1").mkdir()  # mkdir
        (mnt / "d1" / "x y.txt").write_bytes(b"x")
        (mnt / "gone.txt").write_bytes(b"soon deleted")
        mount.drain()
        (mnt / "a.txt").rename(mnt / "d1" / "renamed.txt")  # rename a file
        (mnt / "d1").rename(mnt / "d2")  # rename a folder
        (mnt / "gone.txt").unlink()  # delete
        (mnt / "empty dir").mkdir()
        big = os.urandom(64 << 20)
        with open(mnt / "big.bin", "wb") as handle:
            for start in range(0, len(big), 1 << 20):
                handle.write(big[start : start + (1 << 20)])
        mount.drain(timeout=120)
    finally:
        mount.close()
    flat = requests.get(f"{stack.base}/v1/files?json=1", headers=user.auth).json()
    assert {f["path"]: f["size"] for f in flat["files"]} == {
        "d2/renamed.txt": 6, "d2/x y.txt": 1, "big.bin": 64 << 20,
    }
    assert requests.get(f"{stack.base}/v1/files/d2/renamed.txt", headers=user.auth).content == b"two!+3"
    listed = requests.get(f"{stack.base}/v1/files/?json=1", headers=user.auth).json()["entries"]
    assert {e["name"] for e in listed} == {"d2", "empty dir", "big.bin"}

    # A fresh mount with an empty cache reads it all back.
    mount = Mount(stack, user, mnt, tmp_path / "cache2")
    try:
        assert sorted(p.name for p in mnt.iterdir()) == ["big.bin", "d2", "empty dir"]
        assert list((mnt / "empty dir").iterdir()) == []
        assert (mnt / "d2" / "renamed.txt").read_bytes() == b"two!+3"
        assert sha256_file(mnt / "big.bin") == hashlib.sha256(big).hexdigest()
        # Write hygiene (docs/webdav.md): appending one line re-uploads the whole object.
        started = time.monotonic()
        with open(mnt / "big.bin", "ab") as handle:
            handle.write(b"one more line\n")
        appended = time.monotonic() - started
        uploaded = wait_for_size(stack, user, "big.bin", (64 << 20) + 14)
        print(f"append to a 64 MiB file: {appended:.2f} s in the write, {uploaded:.2f} s more until stored")
        mount.drain()
    finally:
        mount.close()
    reply = requests.get(f"{stack.base}/v1/files/big.bin", headers=user.auth)
    assert hashlib.sha256(reply.content).hexdigest() == hashlib.sha256(big + b"one more line\n").hexdigest()


DOC = Path(__file__).resolve().parent.parent / "docs" / "webdav.md"


def test_webdav_doc_examples_run(stack, user, tmp_path):
    """docs/webdav.md's ```bash blocks, joined, run as written in an empty directory."""
    import re
    import sys

    blocks = re.findall(r"^```bash[ \t]*\n(.*?)^```[ \t]*$", DOC.read_text(), re.S | re.M)
    assert blocks
    used = set(re.findall(r"\$\{?(KGPU_[A-Z0-9_]+)", "\n".join(blocks)))
    assert used <= {"KGPU_API_BASE", "KGPU_API_TOKEN"}, used
    script = tmp_path / "webdav.sh"
    script.write_text("\n".join(blocks))
    work = tmp_path / "work"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("KGPU_") and "proxy" not in k.lower()}
    env.update(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",  # rclone, and python3 with requests
        KGPU_API_BASE=stack.base,
        KGPU_API_TOKEN=user.token,
        RC_PORT=str(free_port()),
    )
    try:
        result = subprocess.run(
            ["bash", "-euo", "pipefail", str(script)], cwd=work, env=env, capture_output=True, text=True, timeout=300
        )
    finally:
        subprocess.run(["fusermount3", "-uz", str(work / "files")], capture_output=True)
    assert result.returncode == 0, f"--- stdout\n{result.stdout[-6000:]}\n--- stderr\n{result.stderr[-6000:]}"
    for line in (
        "MKCOL: HTTP 201",
        "Depth infinity: HTTP 403",
        "propfind-finite-depth",
        "COPY: HTTP 201",
        "COPY with Overwrite F: HTTP 412",
        "MOVE: HTTP 201",
        "best run so far",
        "MOVE while locked: HTTP 423",
        "UNLOCK: HTTP 204",
        "GET through /v1/dav/: same bytes",
        "PUT through /v1/dav/: HTTP 201",
        "final/metrics r1.txt",
        "0 differences found",
        "2024-01-02 03:04:05",
        "second sync: 0 files copied",
        "hello from the mount",
        "upload: HTTP 200",
        "streamed: HTTP 201",
    ):
        assert line in result.stdout, (line, result.stdout)
    files = {f["path"]: f["size"] for f in requests.get(f"{stack.base}/v1/files?json=1", headers=user.auth).json()["files"]}
    assert files["notes/hello.txt"] == len("hello from the mount\n")
    assert files["exp43/results.csv"] == files["exp43/results copy.csv"] == files["exp43/again.csv"] == 23
    assert "exp42-outputs.tgz" in files and "exp42-outputs-streamed.tgz" in files
    assert not [path for path in files if path.startswith(("runs/", "exp42/"))]
