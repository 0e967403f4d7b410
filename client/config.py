"""Where the client finds the server and its token: the environment, else the login file."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path


class NotLoggedIn(Exception):
    """No base URL or token: ``kgpu login`` first (exit code 3)."""


@dataclass(frozen=True)
class Login:
    base_url: str
    token: str


def config_path() -> Path:
    """``$XDG_CONFIG_HOME/kgpu/config.json``, or ``~/.config/kgpu/config.json``."""
    root = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(root) / "kgpu" / "config.json"


def normalise_base(url: str) -> str:
    """The server's origin without a trailing ``/`` or ``/v1`` (what ``KGPU_API_BASE`` holds)."""
    url = url.strip().rstrip("/")
    if url.endswith("/v1"):
        url = url[: -len("/v1")]
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"the base URL must start with http:// or https://, not {url!r}")
    return url


def load() -> Login:
    """``KGPU_API_BASE`` and ``KGPU_API_TOKEN`` from the environment override the login file."""
    stored: dict = {}
    path = config_path()
    if path.is_file():
        try:
            stored = json.loads(path.read_text())
        except ValueError as exc:
            raise NotLoggedIn(f"{path} is not valid JSON ({exc}): run kgpu login again") from exc
    base = os.environ.get("KGPU_API_BASE") or stored.get("base_url") or ""
    token = os.environ.get("KGPU_API_TOKEN") or stored.get("token") or ""
    if not base or not token:
        raise NotLoggedIn("not logged in: run `kgpu login` (or set KGPU_API_BASE and KGPU_API_TOKEN)")
    return Login(normalise_base(base), token)


def save(login: Login) -> Path:
    """Write the login file readable by its owner only (0600), without a moment at a wider mode."""
    path = config_path()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"base_url": login.base_url, "token": login.token}, f)
        f.write("\n")
    os.chmod(temporary, 0o600)
    os.replace(temporary, path)
    return path
