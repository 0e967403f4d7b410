"""``kgpu ssh`` and ``kgpu ssh-config``: the SSH bastion (docs/ssh.md) with the right key, port and
host key, and the key a rental needs (standard library only: the client installs alone).

Keys: a rental pins either one of your own keys (``kgpu rent`` sends ``~/.ssh/id_ed25519.pub``,
``id_ecdsa.pub`` or ``id_rsa.pub``, the first that exists) or a pair the server minted, whose private
half ``kgpu`` keeps in ``~/.config/kgpu/ssh/{gpu_id}`` (0600). When neither is found for a rental,
``kgpu ssh`` asks the server for a new pair (the old key stops). The bastion's host key is pinned
in ``~/.config/kgpu/ssh/known_hosts`` from what ``GET /v1/gpus`` publishes.
"""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import sys
from pathlib import Path

from client.config import config_path
from client.errors import ApiError, UsageError
from client.session import Session

OWN_KEYS = ("id_ed25519", "id_ecdsa", "id_rsa")


def keys_dir() -> Path:
    return config_path().parent / "ssh"


def fingerprint(public_line: str) -> str | None:
    """``SHA256:…`` of an OpenSSH public key line, as ``ssh-keygen -l`` prints it."""
    fields = public_line.split()
    try:
        blob = base64.b64decode(fields[1], validate=True)
    except (IndexError, ValueError):
        return None
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def own_public_key() -> str | None:
    """The first of your own public keys (``~/.ssh/id_*.pub``), to pin on a new rental."""
    for name in OWN_KEYS:
        path = Path.home() / ".ssh" / f"{name}.pub"
        if path.is_file():
            return path.read_text().strip()
    return None


def save_private_key(gpu_id: str, private_key: str, key_fingerprint: str) -> Path:
    """``{keys_dir}/{gpu_id}`` (0600), and beside it the fingerprint of the key it is."""
    folder = keys_dir()
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = folder / gpu_id
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(private_key)
    (folder / f"{gpu_id}.fingerprint").write_text(key_fingerprint + "\n")
    return path


def remember_minted(rental: dict) -> None:
    """Keep a minted key's private half (the server shows it once)."""
    access = rental.get("ssh_access") or {}
    if access.get("private_key"):
        save_private_key(rental["gpu_id"], access.pop("private_key"), access["fingerprint"])


def _identity(session: Session, rental: dict) -> Path:
    """The private key file for ``rental``'s pinned key; a new pair minted when none here matches."""
    pinned = rental["ssh_access"]["fingerprint"]
    kept = keys_dir() / rental["gpu_id"]  # a minted key: its fingerprint kept beside it, no .pub
    for private in (Path.home() / ".ssh" / name for name in OWN_KEYS):
        public = Path(f"{private}.pub")
        if private.is_file() and public.is_file() and fingerprint(public.read_text()) == pinned:
            return private
    if kept.is_file() and _minted_fingerprint(rental["gpu_id"]) == pinned:
        return kept
    changed = session.api.call("PATCH", f"/v1/gpus/{rental['gpu_id']}", body={})
    print(f"kgpu: no key here matched {rental['gpu_id']}'s; a new one was minted and kept in {kept}",
          file=sys.stderr)
    path = save_private_key(rental["gpu_id"], changed["ssh_access"]["private_key"], changed["ssh_access"]["fingerprint"])
    rental["ssh_access"] = {k: v for k, v in changed["ssh_access"].items() if k != "private_key"}
    return path


def _minted_fingerprint(gpu_id: str) -> str | None:
    try:
        return (keys_dir() / f"{gpu_id}.fingerprint").read_text().strip()
    except FileNotFoundError:
        return None


def _known_hosts(session: Session) -> Path:
    published = session.api.call("GET", "/v1/gpus").get("ssh")
    if not published:
        raise ApiError(0, "ssh_unavailable", "this server runs no SSH bastion")
    folder = keys_dir()
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = folder / "known_hosts"
    lines = set(path.read_text().splitlines()) if path.is_file() else set()
    if published["known_hosts"] not in lines:
        with open(path, "a") as handle:
            handle.write(published["known_hosts"] + "\n")
    return path


def _rental(session: Session, gpu_id: str) -> dict:
    rental = session.api.call("GET", f"/v1/gpus/{gpu_id}")
    if not rental.get("ssh_access"):
        raise ApiError(0, "ssh_unavailable", f"{gpu_id} has no SSH access ({rental.get('phase')})")
    return rental


def ssh_argv(session: Session, gpu_id: str) -> list[str]:
    rental = _rental(session, gpu_id)
    key = _identity(session, rental)
    access = rental["ssh_access"]
    return ["ssh", "-i", str(key), "-o", "IdentitiesOnly=yes", "-o", f"UserKnownHostsFile={_known_hosts(session)}",
            "-o", "StrictHostKeyChecking=yes", "-p", str(access["ssh_port"]), f"{access['ssh_user']}@{access['ssh_host']}"]


def ssh(session: Session, gpu_id: str, command: list[str]) -> int:
    if shutil.which("ssh") is None:
        raise UsageError("the OpenSSH client (ssh) is not installed")
    argv = ssh_argv(session, gpu_id) + (["--", *command] if command else [])
    sys.stdout.flush()
    os.execvp("ssh", argv)  # the terminal is ssh's from here
    return 0  # pragma: no cover


def ssh_config(session: Session) -> int:
    """``~/.ssh/config`` blocks for your live rentals (``Host kgpu-{name}-{gpu_id}``)."""
    mine = session.api.call("GET", "/v1/gpus").get("my_gpus") or []
    known = None
    for rental in mine:
        if not rental.get("ssh_access") or rental["phase"] != "Running":
            continue
        known = known or _known_hosts(session)
        key = _identity(session, rental)
        access = rental["ssh_access"]
        print(f"Host kgpu-{rental['gpu_id']}\n"
              f"    HostName {access['ssh_host']}\n    Port {access['ssh_port']}\n    User {access['ssh_user']}\n"
              f"    IdentityFile {key}\n    IdentitiesOnly yes\n    UserKnownHostsFile {known}\n"
              f"    StrictHostKeyChecking yes\n")
    return 0
