"""A pod's folder seen from the host, without trusting its shape.

A pod shapes its own files: folders nested deeper than Python's stack (``os.walk`` and
``shutil.rmtree`` recurse, and fail), millions of entries, symlinks to anywhere. So nothing here
recurses, follows a symlink or leaves the folder's filesystem, and a walk has a budget.
"""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

MAX_ENTRIES = 2_000_000  # a walk's budget: past it the size is unknown (the reaper asks again)


class TreeTooLarge(Exception):
    """A walk met more entries than its budget."""


def disk_usage(root: Path, skip_top: frozenset[str] = frozenset(), max_entries: int = MAX_ENTRIES) -> int | None:
    """Bytes allocated to the files and folders under ``root`` (None: ``root`` is gone), without
    the entries of ``root`` named in ``skip_top``. Raises TreeTooLarge past ``max_entries``."""
    try:
        device = os.lstat(root).st_dev
    except FileNotFoundError:
        return None
    total, seen = 0, 0
    folders = [(str(root), True)]
    while folders:
        folder, top = folders.pop()
        try:
            entries = os.scandir(folder)
        except (FileNotFoundError, NotADirectoryError, PermissionError):
            continue
        with entries:
            for entry in entries:
                seen += 1
                if seen > max_entries:
                    raise TreeTooLarge(f"more than {max_entries} entries under {root}")
                if top and entry.name in skip_top:
                    continue
                try:
                    info = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if info.st_dev != device:
                    continue  # a mount inside the pod's folder is not its disk
                total += info.st_blocks * 512
                if stat.S_ISDIR(info.st_mode):
                    folders.append((entry.path, False))
    return total


def remove_tree(root: Path, timeout: float = 600) -> None:
    """Remove ``root`` and everything under it, staying on its filesystem. GNU rm (the host's)
    walks without recursion and never follows a symlink the pod planted, even one swapped in
    while it runs; shutil.rmtree recurses and fails on a deep tree."""
    if not os.path.lexists(root):
        return
    subprocess.run(
        ["rm", "-rf", "--one-file-system", "--", str(root)],
        stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout,
    )
