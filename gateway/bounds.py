"""Bounds on what the API takes: one home for each rule, used by every request model and route.

A request a client can send never reaches the database or a pod with a value they cannot hold
(an integer past a column's range, a NUL in a PostgreSQL text column or in exec's argv): it is
refused here, as a 422 ``validation_error`` naming the field (or a 404 for an id that cannot
exist). Path names have their own rule in :func:`drive.keys.check_name`; a run's and a pod's
``env`` and ``command`` in :func:`gateway.rentals.requests.check_env` and :func:`gateway.rentals.requests.check_command`.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Annotated, Any

from pydantic import AfterValidator, Field

MAX_ROW_ID = 2**31 - 1  # integer primary keys (PostgreSQL's int4)
MAX_CREDITS = 10**15  # a balance, and one grant: far from the 2^63 of a BIGINT column
# A file's Content-Type is stored with it: the embedded store refuses a request whose
# metadata passes 2 KiB (MetadataTooLarge), and no real media type comes near this.
MAX_CONTENT_TYPE_BYTES = 256
# A declared length is counted in the database (BIGINT) and echoed in JSON: past 2^53 no JSON
# client reads it exactly, and nothing stores that much (S3 and R2 objects stop at 5 TiB).
MAX_CONTENT_LENGTH = 2**53 - 1
_BOUNDED_HEADERS = {b"content-type": "Content-Type", b"x-content-type": "X-Content-Type"}

RowId = Annotated[int, Field(ge=1, le=MAX_ROW_ID)]


def plain_text(value: str) -> str:
    """Text stored in the database: no control characters (a NUL cannot be stored in PostgreSQL
    text), and no lone surrogates (not encodable as UTF-8)."""
    for ch in value:
        category = unicodedata.category(ch)
        if category == "Cc":
            raise ValueError(f"control characters (U+{ord(ch):04X}) are not allowed here")
        if category == "Cs":
            raise ValueError("not valid Unicode (a lone surrogate)")
    return value


PlainText = Annotated[str, AfterValidator(plain_text)]


def is_dns_label(value: str, longest: int) -> bool:
    """Lowercase letters, digits and inner '-', 1 to ``longest`` characters."""
    return re.fullmatch(rf"[a-z0-9](?:[a-z0-9-]{{0,{longest - 2}}}[a-z0-9])?", value) is not None


def dns_label(longest: int, refusal: str) -> Any:
    """The type of a field that must be a DNS label of at most ``longest`` characters (an org's slug,
    a rental's name); ``refusal``: the 422's message for one that is not."""

    def check(value: str) -> str:
        if not is_dns_label(value, longest):
            raise ValueError(refusal)
        return value

    return Annotated[str, AfterValidator(check)]


def header_problem(headers: list[tuple[bytes, bytes]]) -> tuple[int, str, str] | None:
    """(status, error_code, message) when a request's headers cannot be taken, else None."""
    for name, value in headers:
        label = _BOUNDED_HEADERS.get(name)
        if label is not None and len(value) > MAX_CONTENT_TYPE_BYTES:
            return 400, "bad_header", f"{label} is {len(value)} bytes; at most {MAX_CONTENT_TYPE_BYTES}"
        if name == b"content-length" and value.isdigit() and (len(value) > 20 or int(value) > MAX_CONTENT_LENGTH):
            return 413, "payload_too_large", f"Content-Length is {value.decode()}; at most {MAX_CONTENT_LENGTH}"
    return None
