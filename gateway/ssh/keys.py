"""Keys: what a rental may pin (``parse_public_key``), pairs the gateway mints, and the host key.

asyncssh parses every format; the rule of which keys are strong enough lives here alone.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

with warnings.catch_warnings():  # asyncssh imports DSA, which cryptography deprecates
    warnings.simplefilter("ignore")
    import asyncssh

ALLOWED_ALGORITHMS = {
    b"ssh-ed25519": "ed25519",
    b"ecdsa-sha2-nistp256": "ecdsa",
    b"ecdsa-sha2-nistp384": "ecdsa",
    b"ecdsa-sha2-nistp521": "ecdsa",
    b"ssh-rsa": "rsa",
}
MIN_RSA_BITS = 2048
MAX_KEY_LINE = 16 << 10
HOST_KEY_FILE = "ssh_host_ed25519_key"


class BadPublicKey(ValueError):
    """Not one OpenSSH public key line of an allowed kind (the message says why)."""


@dataclass(frozen=True)
class PinnedKey:
    line: str  # "ssh-ed25519 AAAA…" without the comment (a comment is the client's business)
    fingerprint: str  # "SHA256:…", as ssh-keygen -l prints it


def fingerprint_of(key: asyncssh.SSHKey) -> str:
    return key.get_fingerprint("sha256")


def parse_public_key(text: str) -> PinnedKey:
    """One OpenSSH public key line: ed25519, ecdsa, or RSA of at least 2048 bits."""
    if not isinstance(text, str) or not text.strip():
        raise BadPublicKey("ssh_pubkey must be one OpenSSH public key line, such as the contents of ~/.ssh/id_ed25519.pub")
    if len(text) > MAX_KEY_LINE or "\n" in text.strip() or "\0" in text:
        raise BadPublicKey("ssh_pubkey must be one line (one key), at most 16 KiB")
    fields = text.strip().split()
    if len(fields) < 2:
        raise BadPublicKey("ssh_pubkey must be 'TYPE BASE64 [comment]', as in ~/.ssh/id_ed25519.pub")
    if fields[0].encode() not in ALLOWED_ALGORITHMS:
        raise BadPublicKey(
            f"ssh_pubkey of type {fields[0][:40]!r} is not accepted: use ed25519 (ssh-keygen -t ed25519), "
            "ecdsa, or RSA of at least 2048 bits"
        )
    try:
        key = asyncssh.import_public_key(f"{fields[0]} {fields[1]}")
    except (asyncssh.KeyImportError, ValueError) as exc:
        raise BadPublicKey(f"ssh_pubkey is not a valid OpenSSH public key: {exc}") from None
    if key.algorithm != fields[0].encode():
        raise BadPublicKey("ssh_pubkey's type does not match its key data")
    if key.algorithm == b"ssh-rsa":
        bits = key.pyca_key.key_size
        if bits < MIN_RSA_BITS:
            raise BadPublicKey(f"ssh_pubkey is an RSA key of {bits} bits; at least {MIN_RSA_BITS} are needed")
    line = key.export_public_key("openssh").decode().split()
    return PinnedKey(line=f"{line[0]} {line[1]}", fingerprint=fingerprint_of(key))


def mint_pair(comment: str) -> tuple[str, PinnedKey]:
    """A new ed25519 pair: (private key in OpenSSH format, the public half to pin)."""
    private = asyncssh.generate_private_key("ssh-ed25519", comment=comment)
    text = private.export_private_key("openssh").decode()
    public = private.export_public_key("openssh").decode().split()
    return text, PinnedKey(line=f"{public[0]} {public[1]}", fingerprint=fingerprint_of(private))


def load_host_key(configured: str, data_dir: Path) -> asyncssh.SSHKey:
    """The bastion's host key: ``KGPU_SSH_HOST_KEY`` (the key itself, or a path to it: replicas
    share one), else the one kept in the data directory, made on first use."""
    if configured.strip().startswith("-----BEGIN"):
        return asyncssh.import_private_key(configured.strip() + "\n")
    if configured.strip():
        return asyncssh.read_private_key(configured.strip())
    path = Path(data_dir) / HOST_KEY_FILE
    try:
        return asyncssh.read_private_key(str(path))
    except FileNotFoundError:
        pass
    key = asyncssh.generate_private_key("ssh-ed25519")
    staged = path.with_name(f".{HOST_KEY_FILE}.{os.getpid()}")
    fd = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(key.export_private_key("openssh"))
    try:
        os.link(staged, path)  # another gateway on this data dir made one first: theirs holds
    except FileExistsError:
        pass
    finally:
        staged.unlink()
    return asyncssh.read_private_key(str(path))


def known_hosts_line(host: str, port: int, key: asyncssh.SSHKey) -> str:
    """The line a client puts in ~/.ssh/known_hosts to pin this bastion."""
    name = host if port == 22 else f"[{host}]:{port}"
    public = key.export_public_key("openssh").decode().split()
    return f"{name} {public[0]} {public[1]}"
