"""Real clients for the tests: curl as a subprocess, raw sockets for protocol details."""

from __future__ import annotations

import hashlib
import socket
import subprocess
from pathlib import Path
from urllib.parse import urlsplit


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def curl(*args: str, token: str | None = None, input: bytes | None = None, check: bool = True) -> subprocess.CompletedProcess:
    command = ["curl", "-sS"]
    if token:
        command += ["-H", f"Authorization: Bearer {token}"]
    command += list(args)
    result = subprocess.run(command, input=input, capture_output=True, timeout=120)
    if check and result.returncode != 0:
        raise AssertionError(f"curl failed ({result.returncode}): {result.stderr.decode()}")
    return result


def shell(script: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-euo", "pipefail", "-c", script], env=env, cwd=cwd, capture_output=True, timeout=120)


def raw_request(base: str, head: bytes, body: bytes = b"", read_timeout: float = 5.0) -> bytes:
    """Send raw bytes and return everything the server answered before closing (or the timeout)."""
    parts = urlsplit(base)
    with socket.create_connection((parts.hostname, parts.port), timeout=read_timeout) as sock:
        sock.sendall(head + body)
        chunks = []
        try:
            while True:
                data = sock.recv(65536)
                if not data:
                    break
                chunks.append(data)
        except socket.timeout:
            pass
        return b"".join(chunks)
