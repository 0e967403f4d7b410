"""SHA1 and MD5 of an object's bytes, computed while they stream through the gateway, and the
headers that carry them: ``OC-Checksum`` (ownCloud's, what rclone's ``owncloud`` vendor sends
and reads), ``Digest`` (RFC 3230) and the ``oc:checksum`` text of a PROPFIND.

Only bytes that pass through the gateway get a hash: those a client sends straight to the store
(a presigned PUT: the 307 of a PUT with ``Expect: 100-continue``, the URL a body-less POST mints)
never do.
"""

from __future__ import annotations

import base64
import hashlib
import re
from dataclasses import dataclass
from typing import Sequence

# The length of each algorithm's hex digest; ownCloud writes the names upper case.
ALGORITHMS = {"SHA1": 40, "MD5": 32}
MAX_HEADER = 512
_TOKEN = re.compile(r"([A-Za-z0-9]+):([0-9A-Fa-f]*)")
_MD5_HEX = re.compile(r"[0-9a-f]{32}")


class InvalidChecksum(ValueError):
    """An ``OC-Checksum`` header that is not ``SHA1:<40 hex>`` or ``MD5:<32 hex>`` (several may be
    given, separated by spaces)."""


class ChecksumMismatch(Exception):
    """The body's hash is not the one the client announced: nothing was stored."""


@dataclass(frozen=True)
class Checksum:
    algorithm: str  # "SHA1" | "MD5"
    hex: str  # lowercase


def parse_oc_checksum(value: str) -> tuple[Checksum, ...]:
    """The checksums of an ``OC-Checksum`` header; :class:`InvalidChecksum` for anything else."""
    if len(value) > MAX_HEADER:
        raise InvalidChecksum(f"OC-Checksum is at most {MAX_HEADER} characters")
    found: dict[str, Checksum] = {}
    for token in value.split():
        match = _TOKEN.fullmatch(token)
        if match is None:
            raise InvalidChecksum("OC-Checksum must be ALGORITHM:HEX, e.g. SHA1:<40 hex digits>")
        algorithm, digest = match.group(1).upper(), match.group(2).lower()
        if algorithm not in ALGORITHMS:
            raise InvalidChecksum(f"OC-Checksum: {algorithm} is not supported here; send SHA1 or MD5")
        if len(digest) != ALGORITHMS[algorithm]:
            raise InvalidChecksum(f"OC-Checksum: a {algorithm} is {ALGORITHMS[algorithm]} hex digits")
        if algorithm in found and found[algorithm].hex != digest:
            raise InvalidChecksum(f"OC-Checksum names two different {algorithm} values")
        found[algorithm] = Checksum(algorithm, digest)
    if not found:
        raise InvalidChecksum("OC-Checksum is empty")
    return tuple(found.values())


class Hashes:
    """SHA1 and MD5 of a body fed in order, block by block, each block in one call
    (:meth:`update`) that a worker thread makes: hashlib releases the GIL on buffers over
    2 KiB, so the hashes run beside the upload and the event loop. ``md5=False``: the store
    computes the MD5 (the ETag of a single PUT), so it is not computed here."""

    def __init__(self, md5: bool = True) -> None:
        self._sha1 = hashlib.sha1()
        self._md5 = hashlib.md5() if md5 else None

    def update(self, chunks: Sequence[bytes]) -> None:
        sha1, md5 = self._sha1.update, self._md5.update if self._md5 is not None else None
        for chunk in chunks:
            sha1(chunk)
            if md5 is not None:
                md5(chunk)

    @property
    def sha1(self) -> str:
        return self._sha1.hexdigest()

    @property
    def md5(self) -> str:
        """"" when not computed here."""
        return self._md5.hexdigest() if self._md5 is not None else ""

    def check(self, expected: tuple[Checksum, ...]) -> None:
        """:class:`ChecksumMismatch` unless every announced checksum is the body's."""
        ours = {"SHA1": self.sha1, "MD5": self.md5}
        for checksum in expected:
            if ours[checksum.algorithm] != checksum.hex:
                raise ChecksumMismatch(
                    f"the body's {checksum.algorithm} is {ours[checksum.algorithm]}, not {checksum.hex} "
                    "as OC-Checksum said; nothing was stored"
                )


def md5_of_etag(etag: str | None) -> str:
    """The MD5 that a store's ETag of one PUT is (where its ``put_etag_is_md5``), or "" if the ETag
    is no plain MD5 (a multipart upload's "…-N")."""
    value = (etag or "").strip('"').lower()
    return value if _MD5_HEX.fullmatch(value) else ""


def oc_checksums_text(sha1: str | None, md5: str | None) -> str:
    """The text of ``<oc:checksum>`` in a PROPFIND, as ownCloud writes it (the hashes known)."""
    return " ".join(f"{name}:{value}" for name, value in (("SHA1", sha1), ("MD5", md5)) if value is not None)


def digest_header(sha1: str | None, md5: str | None) -> str:
    """RFC 3230's ``Digest``: base64 of the raw digests known."""
    return ",".join(
        f"{name}={base64.b64encode(bytes.fromhex(value)).decode()}"
        for name, value in (("SHA", sha1), ("MD5", md5))
        if value is not None
    )
