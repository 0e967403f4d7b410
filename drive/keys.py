"""Mapping of request paths onto object keys inside one drive prefix.

A drive is a key prefix: ``users/{id}/`` for my drive, ``orgs/{slug}/`` for a
shared drive. Whatever a client sends, the resulting key stays inside that
prefix, or the request is refused with :class:`InvalidPath` (400). Paths are
checked segment by segment on the *raw* bytes of the URL, before any router
has decoded ``%2f`` into a separator.
"""

from __future__ import annotations

import re
import unicodedata
from typing import NamedTuple

MAX_KEY_BYTES = 1024  # the S3 / R2 limit for a whole key
# One name (a path segment): the embedded store keeps objects as files, and a file name is at
# most 255 bytes there (NAME_MAX); R2 has no such limit, but a drive must move between stores.
MAX_NAME_BYTES = 255
_PERCENT = re.compile(rb"%([0-9A-Fa-f]{2})")
_BAD_PERCENT = re.compile(rb"%(?![0-9A-Fa-f]{2})")
# A raw path whose every segment is a plain name: letters, digits and "_-~+=,@." (not first, so no
# dot segment), nothing percent-encoded. Each such segment passes check_name as it is; at most
# MAX_NAME_BYTES in all, no segment is longer than a name may be.
_PLAIN_RAW = re.compile(rb"[\w~+=,@-][\w.~+=,@-]*(?:/[\w~+=,@-][\w.~+=,@-]*)*/?", re.ASCII)


class InvalidPath(ValueError):
    """The path cannot be mapped to a key inside the drive."""


class DrivePath(NamedTuple):  # a tuple: made on every request (each download's 302), at a tuple's cost
    prefix: str  # the drive's prefix, ending in "/"
    rel: str  # path relative to the drive, "" for its root; ends in "/" for a folder

    @property
    def key(self) -> str:
        return self.prefix + self.rel

    @property
    def is_dir(self) -> bool:
        return self.rel == "" or self.rel.endswith("/")

    @property
    def name(self) -> str:
        return self.rel.rstrip("/").rsplit("/", 1)[-1]


def user_prefix(user_id: int) -> str:
    return f"users/{int(user_id)}/"


def drive_of(key: str) -> str:
    """The prefix of the drive that holds ``key`` (or a WebDAV ref URL, "/users/7/a%20b"): its
    first two segments, "users/7/" or "orgs/vitallab/"."""
    return "/".join(key.lstrip("/").split("/", 2)[:2]) + "/"


def _xml_invalid(ch: str) -> bool:
    """Not a character of XML 1.0 (beyond the control characters refused on their own): a name
    holding one would make every WebDAV listing of its folder malformed XML."""
    point = ord(ch)
    return 0xD800 <= point <= 0xDFFF or point in (0xFFFE, 0xFFFF)


def check_name(segment: str) -> None:
    """The one rule for a file or folder name (one path segment), on every path that reads or
    writes the drive: HTTP routes, WebDAV paths and Destinations, the presigned-URL mint."""
    if segment in ("", ".", ".."):
        raise InvalidPath("empty, '.' or '..' path segments are not allowed")
    # Printable ASCII (the common case) holds no control or non-XML character, and NFKC keeps it as is.
    plain = segment.isascii() and segment.isprintable()
    if not plain and any(unicodedata.category(ch) == "Cc" for ch in segment):
        raise InvalidPath("control characters (NUL included) are not allowed in paths")
    bad = None if plain else next((ch for ch in segment if _xml_invalid(ch)), None)
    if bad is not None:
        raise InvalidPath(
            f"the character U+{ord(bad):04X} is not allowed in names: WebDAV listings are XML, which cannot carry it"
        )
    if segment.strip() == "":
        raise InvalidPath("a name may not be only whitespace")
    size = len(segment.encode("utf-8"))
    if size > MAX_NAME_BYTES:
        raise InvalidPath(f"a file or folder name is at most {MAX_NAME_BYTES} bytes (UTF-8); this one is {size}")
    if "\\" in segment or "/" in segment:
        raise InvalidPath("encoded slashes and backslashes are not allowed in path segments")
    if plain:
        return
    folded = unicodedata.normalize("NFKC", segment)
    if folded in (".", "..") or "/" in folded or "\\" in folded:
        raise InvalidPath("path segment folds to a separator or a dot segment")


def _join(prefix: str, segments: list[str], is_dir: bool) -> DrivePath:
    for segment in segments:
        check_name(segment)
    rel = "/".join(segments) + ("/" if is_dir and segments else "")
    if len((prefix + rel).encode("utf-8")) > MAX_KEY_BYTES:
        raise InvalidPath(f"path too long: a key is at most {MAX_KEY_BYTES} bytes")
    return DrivePath(prefix=prefix, rel=rel)


def _split(path: str) -> tuple[list[str], bool]:
    if path == "":
        return [], True
    is_dir = path.endswith("/")
    body = path[:-1] if is_dir else path
    if body == "":
        raise InvalidPath("absolute paths are not allowed")
    return body.split("/"), is_dir


def from_raw_path(prefix: str, raw: bytes) -> DrivePath:
    """Map the raw (still percent-encoded) part of a URL path after the drive's mount point."""
    if len(raw) <= MAX_NAME_BYTES and _PLAIN_RAW.fullmatch(raw):  # the hot case (every download's 302)
        rel = raw.decode("ascii")
        if len(prefix.encode("utf-8")) + len(rel) > MAX_KEY_BYTES:
            raise InvalidPath(f"path too long: a key is at most {MAX_KEY_BYTES} bytes")
        return DrivePath(prefix=prefix, rel=rel)
    encoded = b"%" in raw
    if encoded and _BAD_PERCENT.search(raw):
        raise InvalidPath("malformed percent-encoding in path")
    if b"\\" in raw:
        raise InvalidPath("backslashes are not allowed in paths")
    raw_segments = raw.split(b"/")
    is_dir = raw == b"" or raw.endswith(b"/")
    if raw_segments and raw_segments[-1] == b"":
        raw_segments = raw_segments[:-1]
    if raw and not raw_segments:
        raise InvalidPath("absolute paths are not allowed")
    if not encoded and raw.isascii():  # the common case: every segment is its own text
        return _join(prefix, [segment.decode("ascii") for segment in raw_segments], is_dir)
    segments = []
    for raw_segment in raw_segments:
        decoded = _PERCENT.sub(lambda m: bytes([int(m.group(1), 16)]), raw_segment) if b"%" in raw_segment else raw_segment
        try:
            segments.append(decoded.decode("utf-8", errors="strict"))
        except UnicodeDecodeError:
            raise InvalidPath("path is not valid UTF-8") from None
    return _join(prefix, segments, is_dir)


def under_mount(mount: bytes, raw: bytes) -> bytes | None:
    """The raw part of the URL path ``raw`` (query removed) after the mount point ``mount``
    (b"/v1/files", a trailing "/" or not): b"" for the mount itself, None when ``raw`` is not
    under it. Compared byte for byte: a mount spelled with percent-encoding is not it."""
    if not mount.endswith(b"/"):
        mount += b"/"
    if raw.startswith(mount):
        return raw[len(mount) :]
    return b"" if raw == mount[:-1] else None


def from_url_path(prefix: str, mount: bytes, raw: bytes) -> DrivePath:
    """The path inside the drive ``prefix`` that the raw URL path ``raw`` names under ``mount``:
    the one parser of a request's path, for the HTTP routes and WebDAV alike."""
    rest = under_mount(mount, raw)
    if rest is None:
        raise InvalidPath("the drive's own part of the URL must not be percent-encoded")
    return from_raw_path(prefix, rest)


def from_text(prefix: str, path: str) -> DrivePath:
    """Map an already-decoded path (a query parameter, a JSON field)."""
    segments, is_dir = _split(path)
    return _join(prefix, segments, is_dir)


def listing_prefix(prefix: str, partial: str) -> str:
    """A ``?prefix=`` filter: may end mid-name, but must stay inside the drive."""
    if partial == "":
        return prefix
    if partial.startswith("/"):
        raise InvalidPath("absolute paths are not allowed")
    head, _, tail = partial.rpartition("/")
    base = from_text(prefix, head + "/").key if head else prefix
    if tail:
        check_name(tail)
    return base + tail
