"""The Content-Type a drive file is stored with: the one its upload sent, or else one guessed
from its name. The HTTP API, WebDAV and the minted URLs all ask here, so one name gets one type
whichever way it came in."""

from __future__ import annotations

import functools
import mimetypes
import os

UNKNOWN = "application/octet-stream"
# What a client sends when it means no type at all (curl -d, some WebDAV clients).
_MEANS_NONE = {"", "application/x-www-form-urlencoded"}
# A compressed file is stored as what it is (a .tar.gz is gzip bytes: no Content-Encoding says otherwise).
_COMPRESSED = {"gzip": "application/gzip", "bzip2": "application/x-bzip2", "xz": "application/x-xz"}


def known_type(name: str) -> str | None:
    """The type of ``name`` by its last suffix, case aside (``a.tar.gz``: gzip); None if unknown."""
    return _type_of_suffix(os.path.splitext(name)[1].lower())


def guess_type(name: str) -> str:
    return known_type(name) or UNKNOWN


def stored_type(sent: str | None, name: str) -> str:
    """What an upload of ``name`` is stored as: the Content-Type sent, unless it means none."""
    if (sent or "").split(";")[0].strip().lower() in _MEANS_NONE:
        return guess_type(name)
    return sent


@functools.lru_cache(maxsize=1024)
def _type_of_suffix(suffix: str) -> str | None:
    kind, encoding = mimetypes.guess_type("x" + suffix)
    if encoding is not None:
        return _COMPRESSED.get(encoding)
    return kind
