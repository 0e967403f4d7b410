"""The in-pod side of kgpu: ``kgpu-bootstrap`` (the entrypoint of kgpu images) and the
helpers ``kgpu-mount-shared``, ``kgpu-mount-files`` and ``kgpu-flush``.

They are standalone shell scripts in ``bin/`` (bash, and POSIX sh for kgpu-flush) so they
can be copied into any image that has rclone and fuse3; the console scripts of the same
names, installed with this package, run them.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

BIN = Path(__file__).parent / "bin"
SCRIPTS = ("kgpu-bootstrap", "kgpu-mount-shared", "kgpu-mount-files", "kgpu-flush")


def script_path(name: str) -> Path:
    if name not in SCRIPTS:
        raise ValueError(f"no script {name!r}")
    return BIN / name


def _exec(name: str) -> None:
    path = script_path(name)
    shell = "sh" if name == "kgpu-flush" else "bash"
    os.execvp(shell, [shell, str(path), *sys.argv[1:]])


def bootstrap() -> None:
    _exec("kgpu-bootstrap")


def mount_shared() -> None:
    _exec("kgpu-mount-shared")


def mount_files() -> None:
    _exec("kgpu-mount-files")


def flush() -> None:
    _exec("kgpu-flush")
