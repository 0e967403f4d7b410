"""``kgpu mount`` / ``kgpu unmount``: the drive as a folder on a laptop, through ``rclone mount``.

Writes go to rclone's local cache and are uploaded a few seconds after a file is closed; an
unmount before that would leave them in the cache. ``kgpu unmount`` therefore asks rclone
(its remote control, on a unix socket recorded at mount time) to upload its queue now, waits
until the queue has been empty twice in a row, and only then unmounts.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from client import rclone
from client.errors import ApiError, TransferFailed, UsageError
from client.locations import parse_remote
from client.output import emit_json
from client.session import Session

WRITE_BACK = "2s"  # how long rclone holds a closed file before uploading it


def state_dir() -> Path:
    root = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(root) / "kgpu" / "mounts"


def _record_path(mountpoint: Path) -> Path:
    return state_dir() / (hashlib.sha256(str(mountpoint).encode()).hexdigest()[:16] + ".json")


def mount(session: Session, localdir: str, target: str) -> int:
    remote = parse_remote(target)
    mountpoint = Path(localdir).resolve()
    mountpoint.mkdir(parents=True, exist_ok=True)
    if os.path.ismount(mountpoint):
        raise UsageError(f"{mountpoint} is already a mount point")
    state = state_dir()
    state.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = _record_path(mountpoint).stem
    socket, log = state / f"{key}.sock", state / f"{key}.log"
    socket.unlink(missing_ok=True)
    # rclone mounts even when the server refuses the token: ask first, for a clear error.
    probe = rclone.run(session.login, ["mkdir" if remote.path else "lsf", f"{rclone.REMOTE}:{remote.path}",
                                       "--retries", "1", "--low-level-retries", "1"])
    if probe.returncode != 0:
        raise ApiError(0, "mount_failed", f"cannot reach {remote}: " + "; ".join(probe.errors[-2:]))
    # The daemon must not hold a pipe of ours: its output goes to the log file.
    with open(log, "ab") as log_file:
        done = subprocess.run(
            rclone.argv("mount", f"{rclone.REMOTE}:{remote.path}", str(mountpoint), "--vfs-cache-mode", "writes",
                        "--vfs-write-back", WRITE_BACK, "--rc", "--rc-addr", f"unix://{socket}", "--rc-no-auth",
                        "--log-file", str(log), "--log-level", "NOTICE", "--daemon", "--daemon-wait", "30s"),
            env=rclone.environment(session.login), stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file,
        )
    deadline = time.monotonic() + 10
    while done.returncode == 0 and not os.path.ismount(mountpoint) and time.monotonic() < deadline:
        time.sleep(0.1)
    if done.returncode != 0 or not os.path.ismount(mountpoint):
        why = _tail(log).splitlines()[-3:]
        raise ApiError(0, "mount_failed", f"rclone mount failed: {' '.join(why)}")
    record = {"mountpoint": str(mountpoint), "remote": str(remote), "socket": str(socket), "log": str(log)}
    _record_path(mountpoint).write_text(json.dumps(record))
    if session.as_json:
        emit_json(record)
    else:
        print(f"mounted {remote} at {mountpoint} (writes upload a moment after each file is closed; "
              f"`kgpu unmount {localdir}` waits for them)")
    return 0


def unmount(localdir: str, timeout: float, force: bool, as_json: bool) -> int:
    """Drain rclone's upload queue, then unmount; ``force``: unmount without waiting (a dead rclone)."""
    mountpoint = Path(localdir).resolve()
    record_path = _record_path(mountpoint)
    if not record_path.is_file():
        raise UsageError(f"{mountpoint} was not mounted by kgpu mount")
    record = json.loads(record_path.read_text())
    started = time.monotonic()
    drained = not force
    if os.path.ismount(mountpoint) and not force:
        waiting = _drain(record["socket"], timeout)
        if waiting:
            raise TransferFailed(f"not uploaded within {timeout:.0f} s: {', '.join(waiting)}; "
                                f"{mountpoint} is still mounted (see {record['log']})")
    if os.path.ismount(mountpoint):
        _unmount(mountpoint, lazy=force)
    record_path.unlink(missing_ok=True)
    Path(record["socket"]).unlink(missing_ok=True)
    result = {"mountpoint": str(mountpoint), "uploads_drained": drained, "seconds": round(time.monotonic() - started, 3)}
    if as_json:
        emit_json(result)
    else:
        print(f"{'every write uploaded; ' if drained else ''}unmounted {mountpoint}")
    return 0


def _rc(socket: str, command: str, params: dict | None = None, check: bool = True) -> dict:
    args = ["rc", "--unix-socket", socket, command]
    if params is not None:
        args += ["--json", json.dumps(params)]
    done = subprocess.run(rclone.argv(*args), capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=60)
    if done.returncode != 0 and not check:
        return {}
    if done.returncode != 0:
        raise TransferFailed(f"rclone's remote control ({socket}) did not answer: {done.stderr.strip()[-300:]}")
    return json.loads(done.stdout or "{}")


def _drain(socket: str, timeout: float) -> list[str]:
    """Upload rclone's queue now; wait until it has been seen empty twice. What is left, if anything."""
    deadline = time.monotonic() + timeout
    empty, hurried = 0, set()
    while True:
        queue = _rc(socket, "vfs/queue").get("queue") or []
        if not queue:
            empty += 1
            if empty >= 2:
                return []
        else:
            empty = 0
            for item in queue:
                if item["id"] not in hurried:
                    # Upload it now; it may have left the queue since we read it.
                    _rc(socket, "vfs/queue-set-expiry", {"id": item["id"], "expiry": 0}, check=False)
                    hurried.add(item["id"])
        if time.monotonic() > deadline:
            return [item["name"] for item in queue]
        time.sleep(0.25)


def _unmount(mountpoint: Path, lazy: bool = False) -> None:
    if sys.platform.startswith("linux"):
        tools = [["fusermount3", "-uz" if lazy else "-u"], ["fusermount", "-uz" if lazy else "-u"]]
    else:
        tools = [["umount", "-f"] if lazy else ["umount"]]
    for tool in tools:
        if shutil.which(tool[0]) and subprocess.run([*tool, str(mountpoint)], capture_output=True).returncode == 0:
            break
    deadline = time.monotonic() + 10
    while os.path.ismount(mountpoint) and time.monotonic() < deadline:
        time.sleep(0.1)
    if os.path.ismount(mountpoint):
        raise TransferFailed(f"{mountpoint} is busy: close what uses it, then run kgpu unmount again")


def _tail(path: Path) -> str:
    try:
        return path.read_text()[-2000:]
    except OSError:
        return ""
