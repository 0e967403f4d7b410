"""Uploads a client sends straight to the store, minted by the gateway (``kgpu cp``, docs/my-drive.md
"Direct uploads"): the rules of their parts and of the MD5 a client declares for them.

A file goes up as one presigned PUT (a mint, drive/service.py ``upload_url``) or, when large, as a
multipart upload the gateway starts, whose parts' URLs it mints one by one and which it completes
itself: the declared size is held against the quota for the whole upload (a hold of kind
"parts", gateway/quota.py), each part's URL signs its exact length, so the parts can never add up
to more than was declared, and only the gateway can complete the upload, while the hold stands.
An upload left unfinished is aborted when its hold expires (``DbUsageBook.settle_holds``), and by
the start-up sweep of multipart uploads (gateway/app.py ``abort_stale_uploads``).
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass

from drive.uploads import MAX_PARTS, choose_part_size

MAX_ETAG = 200  # characters of one part's ETag, as the client reports it back
MAX_OPEN_UPLOADS = 100  # multipart uploads open at once in one drive (each is a store upload and a row)
_HEX_MD5 = re.compile(r"[0-9a-fA-F]{32}")


class DirectUploadError(ValueError):
    """A request about a direct upload that cannot be right: a 400 with ``code``."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


class TooManyUploads(Exception):
    """A drive already has :data:`MAX_OPEN_UPLOADS` multipart uploads open: a 429 until some end."""


class NoSuchUpload(LookupError):
    """No multipart upload of that id for that file is open (finished, aborted or expired): a 404."""


@dataclass(frozen=True)
class DeclaredMd5:
    """The MD5 a client declares for bytes it sends to the store (``X-Content-MD5``)."""

    hex: str  # lowercase, as an ETag lists it
    base64: str  # as ``Content-MD5`` carries it, signed into the URL


def parse_md5(value: str | None) -> DeclaredMd5 | None:
    """``X-Content-MD5``: 32 hex digits or the base64 of the 16 bytes (Content-MD5's own form)."""
    if value is None:
        return None
    text = value.strip()
    if _HEX_MD5.fullmatch(text):
        raw = bytes.fromhex(text)
    else:
        try:
            raw = base64.b64decode(text, validate=True) if len(text) == 24 else b""
        except binascii.Error:
            raw = b""
        if len(raw) != 16:
            raise DirectUploadError("bad_md5", "X-Content-MD5 must be an MD5: 32 hex digits, or 24 characters of base64")
    return DeclaredMd5(raw.hex(), base64.b64encode(raw).decode())


@dataclass(frozen=True)
class PartPlan:
    """How a multipart upload of ``size`` bytes is cut: equal parts of ``part_bytes`` but the last."""

    size: int
    part_bytes: int

    @property
    def count(self) -> int:
        return -(-self.size // self.part_bytes)

    def length(self, number: int) -> int:
        """The exact length of part ``number`` (1-based); DirectUploadError outside the plan."""
        if not 1 <= number <= self.count:
            raise DirectUploadError("bad_part", f"this upload has parts 1 to {self.count}, not {number}")
        return min(self.part_bytes, self.size - (number - 1) * self.part_bytes)


def plan_parts(size: int, part_bytes: int) -> PartPlan:
    """The parts of a new multipart upload: ``part_bytes`` each unless 10,000 would not hold it."""
    if size <= 0:
        raise DirectUploadError("bad_content_length", "a multipart upload needs X-Content-Length above 0")
    plan = PartPlan(size, choose_part_size(size, part_bytes, part_bytes))
    assert plan.count <= MAX_PARTS
    return plan


def parse_number(value: str) -> int:
    if not (value.isdigit() and len(value) <= 5):
        raise DirectUploadError("bad_part", f"partNumber must be a number from 1 to {MAX_PARTS}")
    return int(value)


def completed_parts(plan: PartPlan, body: object) -> list[tuple[int, str]]:
    """The parts a client reports done, ``{"parts": [{"number": 1, "etag": "…"}, …]}``: every part of
    the plan, once each, in order (so the object is exactly the declared size)."""
    parts = body.get("parts") if isinstance(body, dict) else None
    if not isinstance(parts, list):
        raise DirectUploadError("bad_parts", 'the body must be {"parts": [{"number": 1, "etag": "…"}, …]}')
    found: list[tuple[int, str]] = []
    for item in parts:
        number = item.get("number") if isinstance(item, dict) else None
        etag = item.get("etag") if isinstance(item, dict) else None
        if type(number) is not int or not isinstance(etag, str) or not 0 < len(etag) <= MAX_ETAG:
            raise DirectUploadError("bad_parts", "each part is {\"number\": N, \"etag\": \"the ETag its PUT answered\"}")
        found.append((number, etag))
    if [number for number, _ in found] != list(range(1, plan.count + 1)):
        raise DirectUploadError("bad_parts", f"name every part of this upload once, in order: 1 to {plan.count}")
    return found
