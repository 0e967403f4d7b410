"""Folder listings in the two forms clients read: HTML links and JSON."""

from __future__ import annotations

import html
from typing import Iterable, Iterator
from urllib.parse import quote

from drive.content_types import served_type
from drive.facts import Facts
from drive.store import CommonPrefix, ObjectInfo

# WebDAV's MKCOL leaves this empty object in a new folder so that the folder exists on every
# store (rclone serve s3 refuses keys ending in '/'). No listing ever shows it (drive/dav/).
FOLDER_MARKER = ".kgpu-folder"


def is_hidden(key: str) -> bool:
    """True for objects the drive keeps for itself (folder markers), never listed to clients."""
    return key == FOLDER_MARKER or key.endswith("/" + FOLDER_MARKER)


def iso_time(moment) -> str:
    return moment.isoformat().replace("+00:00", "Z")


def entry_json(entry: ObjectInfo | CommonPrefix, drive_prefix: str, facts: Facts | None = None) -> dict:
    """One listed entry; ``facts`` (drive/facts.py): the file's modification time and hashes."""
    if isinstance(entry, CommonPrefix):
        rel = entry.prefix[len(drive_prefix) :]
        return {"name": rel.rstrip("/").rsplit("/", 1)[-1], "path": rel, "type": "dir"}
    rel = entry.key[len(drive_prefix) :]
    name = rel.rsplit("/", 1)[-1]
    item = {
        "name": name,
        "path": rel,
        "type": "file",
        "size": entry.size,
        "content_type": served_type(entry.content_type, name),
        "etag": entry.etag.strip('"'),
        "last_modified": iso_time(facts.mtime if facts is not None else entry.last_modified),
    }
    if facts is not None:
        item |= {name: value for name, value in (("sha1", facts.sha1), ("md5", facts.md5)) if value is not None}
    return item


def html_head(title: str) -> str:
    safe = html.escape(title)
    return (
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\">"
        f"<title>Index of {safe}</title></head><body>\n<h1>Index of {safe}</h1>\n"
        "<table>\n<tr><th>Name</th><th>Size</th><th>Modified</th></tr>\n"
        '<tr><td><a href="../">../</a></td><td></td><td></td></tr>\n'
    )


def html_row(item: dict) -> str:
    """One row; ``item`` is an :func:`entry_json` dict. The href is relative to the folder."""
    is_dir = item["type"] == "dir"
    name = item["name"] + ("/" if is_dir else "")
    href = quote(name, safe="/")
    if href.startswith(".") or ":" in href.split("/", 1)[0]:
        href = "./" + href  # so a name like "a:b" is not read as a URL scheme
    size = "" if is_dir else str(item["size"])
    modified = item.get("last_modified", "")
    return f'<tr><td><a href="{html.escape(href)}">{html.escape(name)}</a></td><td>{size}</td><td>{modified}</td></tr>\n'


HTML_TAIL = "</table>\n</body></html>\n"


def render_html(title: str, pages: Iterable[Iterable[dict]]) -> Iterator[str]:
    """The page, one piece per page of :func:`entry_json` items (the head with the first, the
    tail after the last): a listing streamed as the store returns its pages."""
    head = html_head(title)
    for items in pages:
        yield head + "".join(html_row(item) for item in items)
        head = ""
    yield head + HTML_TAIL
