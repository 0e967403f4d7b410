"""rclone against /v1/files/ with the documented vendor (``--webdav-vendor owncloud``, docs/webdav.md):
modification times kept (X-OC-Mtime), hashes checked (OC-Checksum, oc:checksums), so that
sync, check, lsl and bisync work as they do against ownCloud itself (issue 14).

Real rclone, real server; every assertion reads what rclone itself says or lists.
"""

from __future__ import annotations

import os
import random
import re
import subprocess
from datetime import datetime, timezone
from pathlib import Path

import pytest
import requests

from drive.rclone import rclone_binary

pytestmark = pytest.mark.parametrize("stack", ["rclone-sqlite"], indirect=True)

VENDOR = "owncloud"  # what docs/webdav.md names; nextcloud would chunk big uploads under /dav/uploads/
COUNT = 200
BASE_TIME = 1_650_000_000  # 2022-04-15


def rclone(*args: str, stack, account, check: bool = True) -> subprocess.CompletedProcess:
    command = [
        rclone_binary(), "--config", os.devnull, *args,
        "--webdav-url", f"{stack.base}/v1/files/", "--webdav-vendor", VENDOR,
        "--webdav-headers", f"Authorization,Bearer {account.token}",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    if check and result.returncode != 0:
        pytest.fail(f"rclone {args[0]} exited {result.returncode}:\n{result.stderr[-6000:]}")
    return result


def make_tree(root: Path) -> dict[str, float]:
    """COUNT small files (and one past a multipart part), each with its own modification time."""
    rng = random.Random(14)
    times = {}
    for n in range(COUNT):
        rel = f"d{n % 7}/f{n:03d}.bin" if n % 3 else f"f{n:03d}.txt"
        times[rel] = BASE_TIME + n * 97 + 0.25  # sub-second part: rclone compares to the second here
    times["big/part.bin"] = BASE_TIME - 3600
    for rel, mtime in times.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        size = 12 << 20 if rel == "big/part.bin" else rng.randrange(0, 5000)
        path.write_bytes(rng.randbytes(size))
        os.utime(path, (mtime, mtime))
    return times


def copied(stderr: str) -> list[str]:
    """The files rclone -v says it transferred (new or replaced)."""
    return re.findall(r"INFO\s+: (.+?): Copied \(", stderr)


def test_sync_check_lsl_with_the_documented_vendor(stack, user, tmp_path):
    src = tmp_path / "src"
    times = make_tree(src)
    first = rclone("sync", "-v", str(src), ":webdav:s", stack=stack, account=user)
    assert len(copied(first.stderr)) == len(times)

    # The second run transfers nothing and sets no time: sizes and modification times match.
    second = rclone("sync", "-v", str(src), ":webdav:s", stack=stack, account=user)
    assert copied(second.stderr) == [], second.stderr
    assert "Updated modification time" not in second.stderr

    # lsl shows the source's modification times (to the second: WebDAV's getlastmodified).
    listed = rclone("lsl", ":webdav:s", stack=stack, account=user).stdout
    seen = {}
    for line in listed.splitlines():
        size, day, clock, rel = line.split(maxsplit=3)
        seen[rel] = datetime.fromisoformat(f"{day}T{clock[:8]}").replace(tzinfo=timezone.utc).timestamp()
    assert seen == {rel: float(int(mtime)) for rel, mtime in times.items()}

    # check compares hashes for every file (no "hashes could not be checked").
    checked = rclone("check", str(src), ":webdav:s", stack=stack, account=user)
    assert f"{len(times)} matching files" in checked.stderr, checked.stderr
    assert "could not be checked" not in checked.stderr and "size-only" not in checked.stderr

    # A same-size change with the same modification time: only --checksum sees it.
    changed = src / "d1" / "f001.bin"
    before = changed.read_bytes()
    after = bytes(b ^ 0xFF for b in before)
    changed.write_bytes(after)
    os.utime(changed, (times["d1/f001.bin"], times["d1/f001.bin"]))
    differ = rclone("check", str(src), ":webdav:s", stack=stack, account=user, check=False)
    assert differ.returncode != 0 and "1 differences found" in differ.stderr, differ.stderr
    synced = rclone("sync", "-v", "--checksum", str(src), ":webdav:s", stack=stack, account=user)
    assert copied(synced.stderr) == ["d1/f001.bin"], synced.stderr
    fetched = requests.get(f"{stack.base}/v1/files/s/d1/f001.bin", headers=user.auth)
    assert fetched.content == after
    again = rclone("check", str(src), ":webdav:s", stack=stack, account=user)
    assert f"{len(times)} matching files" in again.stderr

    # A server-side move keeps the time and the hashes (rclone sends X-OC-Mtime with it).
    rclone("moveto", ":webdav:s/f000.txt", ":webdav:s/moved/f000.txt", stack=stack, account=user)
    moved = rclone("lsl", ":webdav:s/moved", stack=stack, account=user).stdout.split()
    assert moved[2].startswith(datetime.fromtimestamp(int(times["f000.txt"]), timezone.utc).strftime("%H:%M:%S"))
    head = requests.head(f"{stack.base}/v1/files/s/moved/f000.txt", headers=user.auth)
    assert head.headers["OC-Checksum"].startswith("SHA1:")


def test_bisync_catches_a_same_size_remote_edit(stack, user, tmp_path):
    local = tmp_path / "local"
    local.mkdir()
    for n in range(20):
        path = local / f"b{n:02d}.txt"
        path.write_bytes(f"line {n:02d}\n".encode() * 10)
        os.utime(path, (BASE_TIME + n, BASE_TIME + n))
    workdir = tmp_path / "bisync-state"
    common = ("--workdir", str(workdir), "-v")
    rclone("mkdir", ":webdav:b", stack=stack, account=user)
    rclone("bisync", str(local), ":webdav:b", "--resync", *common, stack=stack, account=user)
    target = local / "b07.txt"
    edited = target.read_bytes().replace(b"line", b"LINE")
    assert len(edited) == target.stat().st_size
    reply = requests.put(f"{stack.base}/v1/files/b/b07.txt", data=edited, headers=user.auth)  # an edit elsewhere
    assert reply.status_code == 200
    synced = rclone("bisync", str(local), ":webdav:b", *common, stack=stack, account=user)
    assert target.read_bytes() == edited, synced.stderr
    assert rclone("check", str(local), ":webdav:b", stack=stack, account=user).returncode == 0
