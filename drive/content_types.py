"""The Content-Type of a drive file: the one it is stored with (:func:`stored_type`, what its
upload sent, or else one guessed from its name) and the one every read reports
(:func:`served_type`). The HTTP API, WebDAV, the listings and the minted URLs all ask here, so one
file gets one type whichever way it came in and whichever way it is read."""

from __future__ import annotations

import functools
import mimetypes

UNKNOWN = "application/octet-stream"
# What a client sends when it means no type at all (curl -d, some WebDAV clients).
_MEANS_NONE = {"", "application/x-www-form-urlencoded"}
# What a store answers for an object stored with no type (S3 and moto: binary/octet-stream; rclone,
# and clients that know no better, application/octet-stream): it says nothing the name does not.
_STORED_NONE = _MEANS_NONE | {UNKNOWN, "binary/octet-stream"}
# A compressed file is stored as what it is (a .tar.gz is gzip bytes: no Content-Encoding says otherwise).
_COMPRESSED = {"gzip": "application/gzip", "bzip2": "application/x-bzip2", "xz": "application/x-xz"}


def known_type(name: str) -> str | None:
    """The type of ``name`` by its last suffix, case aside (``a.tar.gz``: gzip); None if unknown."""
    return _type_of_suffix(suffix(name).lower())


def suffix(name: str) -> str:
    """``os.path.splitext(name)[1]``, in one call (a download's 302 asks it for every file): from the
    name's last dot, unless only dots come before that dot."""
    start = name.rfind("/") + 1
    dot = name.rfind(".")
    return name[dot:] if dot > start and name[start:dot].lstrip(".") else ""


def guess_type(name: str) -> str:
    return known_type(name) or UNKNOWN


def stored_type(sent: str | None, name: str) -> str:
    """What an upload of ``name`` is stored as: the Content-Type sent, unless it means none."""
    if _media_type(sent) in _MEANS_NONE:
        return guess_type(name)
    return sent


def served_type(stored: str | None, name: str) -> str:
    """The Content-Type every read of the file ``name`` reports (HEAD, the 302's presigned GET,
    ``?json=1``, WebDAV's ``getcontenttype``, the JSON listings), ``stored`` being what the store
    says it holds (None: not asked). The stored type when it says something; else the name's
    guess, the type an upload of that name that sent none is stored as. ``application/octet-stream``
    and S3's ``binary/octet-stream`` (what stores answer for an object stored with no type) say
    nothing the name does not.

    The guess rather than ``application/octet-stream`` everywhere: a listing carries no types, so
    the name is all it can answer, and an upload that sent no type is stored as its name's guess;
    answering the guess for an object stored without one (written straight into the store, or by
    a presigned PUT that sent none) gives ``a.csv`` the ``text/csv`` its listing gives, as an
    ``a.csv`` uploaded through the gateway has. A stored type that is the name's own, parameters
    aside (``text/csv; charset=utf-8``: what the embedded rclone store answers for an ``a.csv``
    stored with none), is answered as the listing answers it.

    The listings and the 302 (drive/service.py: DriveService.download_url) ask the store nothing
    per file and pass None: a type other than the name's, sent on upload, shows where the store
    is asked (HEAD, a PROPFIND of the file, ``?json=1`` and its URL)."""
    guess = guess_type(name)
    if stored is None:  # a listing's entry: the hot case
        return guess
    kind = _media_type(stored)
    if kind in _STORED_NONE or kind == guess:
        return guess
    return stored


def _media_type(value: str | None) -> str:
    """``value`` without its parameters, trimmed and in lower case ("" for None)."""
    return (value or "").split(";")[0].strip().lower()


@functools.lru_cache(maxsize=1024)
def _type_of_suffix(suffix: str) -> str | None:
    kind, encoding = mimetypes.guess_type("x" + suffix)
    if encoding is not None:
        return _COMPRESSED.get(encoding)
    return kind
