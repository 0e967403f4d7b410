"""A pod's own disk: a file system of ``ephemeral_storage_gib`` for its /workspace and /tmp.

A sparse ext4 image in a folder of the gateway's, loop-mounted ``nosuid,nodev`` at
``{folder}/disk``, with ``workspace`` and ``tmp`` in it: a write past its size fails with ENOSPC
in the pod, and the host loses no more than that (issue 19, item 10: a pod with 1 GiB wrote 5 GiB
before the reaper saw it). Making one needs root and loop devices; where either is missing the
caller falls back to watching the pod's disk use.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
from pathlib import Path

log = logging.getLogger(__name__)

IMAGE = "disk.img"
MOUNT = "disk"
FOLDERS = {"workspace": 0o700, "tmp": 0o1777}


def make_disk(folder: Path, gib: int, owner: int) -> Path | None:
    """The mounted disk (``{folder}/disk``, its folders owned by ``owner``), or None, with a
    warning, where this host cannot make one."""
    image, disk = folder / IMAGE, folder / MOUNT
    if os.path.ismount(disk):
        return disk  # a start retried: the pod's disk is made, and holds its files
    try:
        folder.mkdir(mode=0o711, parents=True, exist_ok=True)
        with open(image, "wb") as handle:
            handle.truncate(gib << 30)
        image.chmod(0o600)
        _host(["mkfs.ext4", "-q", "-F", "-m", "0", "-O", "^has_journal", "-E", f"root_owner={owner}:{owner}", str(image)])
        disk.mkdir(mode=0o711, exist_ok=True)
        _host(["mount", "-o", "loop,nosuid,nodev", str(image), str(disk)])
        for name, mode in FOLDERS.items():
            (disk / name).mkdir(exist_ok=True)
            os.chown(disk / name, owner, owner)
            (disk / name).chmod(mode)
        return disk
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("%s gets no disk of its own (%s); its disk use is watched instead", folder.name, exc)
        release_disk(folder)
        return None


def release_disk(folder: Path, also_unmount: tuple[Path, ...] = ()) -> None:
    """Unmount the disk (and the mounts bound from it, first), lazily: a process still in it
    lets go later; then remove its image."""
    for path in (*also_unmount, folder / MOUNT):
        if os.path.ismount(path):
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                _host(["umount", "--lazy", str(path)])
    with contextlib.suppress(FileNotFoundError):
        (folder / IMAGE).unlink()


def bind(source: Path, target: Path) -> None:
    """Bind ``source`` (a folder of the disk) at ``target``; CalledProcessError if it fails."""
    _host(["mount", "--bind", str(source), str(target)])


def disk_used(folder: Path) -> int | None:
    """Bytes used on the pod's disk (None: it has none mounted). It can never pass its size."""
    disk = folder / MOUNT
    if not os.path.ismount(disk):
        return None
    usage = os.statvfs(disk)
    return (usage.f_blocks - usage.f_bfree) * usage.f_frsize


def _host(argv: list[str]) -> None:
    """A host command of the gateway's own (mkfs, mount): raises CalledProcessError with its words."""
    done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise subprocess.CalledProcessError(done.returncode, argv[0], stderr=done.stderr)
