"""PROPFIND Depth 1 of a folder, fast: when no member of the folder has dead properties or
locks, and the request asks for allprop or for named properties (not the quota ones), the
answer is written from the listing with string templates (:func:`fast_propfind`): the same
bytes wsgidav would write, without one resource object or XML element per member.

It is streamed: the 207 starts once the store has returned the folder's first page (a store that
is down before that is a 503), and each page's members are written as the store returns the
next (drive/store/caching.py), with their facts read a page at a time (drive/service.py), so
neither the time to the first byte nor the memory grows with the folder. A failure after the
answer began cuts the connection (:class:`~drive.dav.context.AnswerCut`)."""

from __future__ import annotations

import functools
import io
import re
from typing import TYPE_CHECKING, Iterator
from urllib.parse import quote, unquote

from wsgidav import util, xml_tools
from wsgidav.dav_error import DAVError

from drive.content_types import served_type
from drive.dav.context import EXTRAS_KEY, SHARED, AnswerCut, context_of, folder_pages
from drive.checksums import oc_checksums_text
from drive.dav.resources import OC_CHECKSUMS, FolderResource, SharedRoot
from drive.dav.storage import note_folder_extras
from drive.facts import Facts
from drive.store import CommonPrefix, ObjectInfo

if TYPE_CHECKING:
    from drive.dav.provider import ObjectStoreProvider

_SLOW_NAMES = frozenset({"{DAV:}quota-used-bytes", "{DAV:}quota-available-bytes"})  # None is a 200 there
_FILE_ALLPROP = [
    "{DAV:}resourcetype",
    "{DAV:}getcontentlength",
    "{DAV:}getcontenttype",
    "{DAV:}getlastmodified",
    "{DAV:}displayname",
    "{DAV:}getetag",
    "{DAV:}lockdiscovery",
    "{DAV:}supportedlock",
]
_FOLDER_ALLPROP = ["{DAV:}resourcetype", "{DAV:}displayname", "{DAV:}lockdiscovery", "{DAV:}supportedlock"]
_HREF_SAFE = "/" + "!*'()," + "$-_|."  # DAVResource.get_href
_OK = "HTTP/1.1 200 OK"
_NOT_FOUND = "HTTP/1.1 404 Not Found"
_ROOT_TAG = re.compile(r"<([A-Za-z_][\w.-]*):multistatus((?:\s+xmlns:[\w.-]+=\"[^\"&<]*\")*)\s*>")
_NS_DECL = re.compile(r"xmlns:([\w.-]+)=\"([^\"]*)\"")


def _xml_text(text: str) -> str:
    # What ElementTree's serializer escapes in text (wsgidav's etree here is the standard library's).
    if "&" in text:
        text = text.replace("&", "&amp;")
    if "<" in text:
        text = text.replace("<", "&lt;")
    if ">" in text:
        text = text.replace(">", "&gt;")
    return text


@functools.lru_cache(maxsize=4096)
def _rfc1123(timestamp: float) -> str:
    return util.get_rfc1123_time(timestamp)


def _read_propfind_names(environ: dict):
    """(mode, names) the fast path can answer, or None; the body is put back for wsgidav either way."""
    if environ.get("HTTP_TRANSFER_ENCODING"):
        return None
    length = environ.get("CONTENT_LENGTH", "").strip()
    if length == "":
        body = b""
    elif length.isdigit():
        body = environ["wsgi.input"].read(int(length)) if int(length) else b""
        environ["wsgi.input"] = io.BytesIO(body)
    else:
        return None
    if not body:
        return "allprop", None
    try:
        request = util.parse_xml_body(environ, allow_empty=True)
    except DAVError:  # wsgidav's own 400, from its own parse
        return None
    finally:
        environ["wsgi.input"] = io.BytesIO(body)
    if request is None or request.tag != "{DAV:}propfind" or len(request) != 1:
        return None
    (node,) = request
    if node.tag == "{DAV:}allprop" and len(node) == 0:
        return "allprop", None
    if node.tag != "{DAV:}prop" or len(node) == 0:
        return None
    names = []
    for prop in node:
        tag = prop.tag
        if not isinstance(tag, str) or not tag.startswith("{") or tag.startswith("{}") or tag in _SLOW_NAMES:
            return None
        names.append(tag)
    return "named", names


def fast_propfind(provider: ObjectStoreProvider, environ: dict, start_response):
    """PROPFIND Depth 1 of a folder written with string templates, or None to leave it to wsgidav.

    Only when no member of the folder has dead properties or locks (what
    :func:`note_folder_extras` reads) and the request asks for allprop or for named
    properties: live ones are computed as wsgidav would, every other name is a 404
    (no member has dead properties). The folder itself (and ``shared/`` in my drive's
    root) still go through wsgidav's own code; the output is byte for byte wsgidav's.
    """
    if any(key.startswith("HTTP_IF") for key in environ):
        return None
    if provider.lock_manager is None or provider.prop_manager is None:
        return None
    asked = _read_propfind_names(environ)
    if asked is None:
        return None
    mode, names = asked
    folder = provider.get_resource_inst(environ["PATH_INFO"], environ)
    if not isinstance(folder, FolderResource) or folder.prevent_locking():
        return None
    ctx = context_of(environ)
    base = folder.location.key
    note_folder_extras(folder)
    folder_url = unquote(folder.get_ref_url()).rstrip("/") or "/"
    found = environ.get(EXTRAS_KEY, {}).get(folder_url)
    if found is None:
        return None
    for url in found[0] | found[1]:
        if url != folder_url and url.rsplit("/", 1)[0] == folder_url:
            return None  # a member has dead properties or a lock: wsgidav's way
    folder_href = folder.get_href()
    if not folder_href.endswith("/"):
        return None

    # The folder itself (and shared/) the normal way, in a multistatus of their own.
    slow = [folder]
    if folder._is_my_root and ctx.org_slugs():
        slow.append(SharedRoot("/" + SHARED, environ))
    multistatus = xml_tools.make_multistatus_el()
    for resource in slow:
        if mode == "allprop":
            props = resource.get_properties("allprop")
        else:
            props = resource.get_properties("named", name_list=names)
        util.add_property_response(multistatus, resource.get_href(), props)
    data = xml_tools.xml_to_bytes(multistatus, pretty=False).decode("utf-8")
    root = _ROOT_TAG.search(data)
    if root is None:
        return None
    prefixes = {uri: prefix for prefix, uri in _NS_DECL.findall(root.group(2))}
    d = root.group(1)
    if prefixes.get("DAV:") != d:
        return None
    close_response = f"</{d}:response>"
    close_all = f"</{d}:multistatus>"
    first_end = data.find(close_response)
    if first_end < 0 or not data.endswith(close_all):
        return None
    first_end += len(close_response)
    head, rest = data[:first_end], data[first_end : -len(close_all)]

    def tag(name: str) -> str | None:
        uri, _, local = name[1:].partition("}")
        prefix = prefixes.get(uri)
        return None if prefix is None else f"{prefix}:{local}"

    asked_names = names if names is not None else list(dict.fromkeys(_FILE_ALLPROP + _FOLDER_ALLPROP))
    tags = {name: tag(name) for name in asked_names}
    if None in tags.values():
        return None
    empty = {name: f"<{t} />" for name, t in tags.items()}
    opening = {name: f"<{t}>" for name, t in tags.items()}
    closing = {name: f"</{t}>" for name, t in tags.items()}
    collection = f"<{d}:resourcetype><{d}:collection /></{d}:resourcetype>"
    lock_entry = (
        f"<{d}:lockentry><{d}:lockscope><{d}:%s /></{d}:lockscope><{d}:locktype><{d}:write /></{d}:locktype></{d}:lockentry>"
    )
    supported = f"<{d}:supportedlock>{lock_entry % 'exclusive'}{lock_entry % 'shared'}</{d}:supportedlock>"
    propstat_open = f"<{d}:propstat><{d}:prop>"

    def propstat(status: str, parts: list[str]) -> str:
        return f"{propstat_open}{''.join(parts)}</{d}:prop><{d}:status>{status}</{d}:status></{d}:propstat>"

    def render(href: str, values: list) -> str:
        # values: (name, text or None for an empty element or an XML string, is_xml) or (name, _NOT_FOUND)
        ok: list[str] = []
        missing: list[str] = []
        order = []
        for name, value in values:
            if value is _NOT_FOUND:
                if not missing:
                    order.append(_NOT_FOUND)
                missing.append(empty[name])
                continue
            if not ok:
                order.append(_OK)
            if not value:  # None or "": an empty element, as ElementTree writes it
                ok.append(empty[name])
            elif value.__class__ is _Xml:
                ok.append(value)
            else:
                ok.append(f"{opening[name]}{_xml_text(value)}{closing[name]}")
        stats = "".join(propstat(status, ok if status is _OK else missing) for status in order)
        return f"<{d}:response><{d}:href>{href}</{d}:href>{stats}</{d}:response>"

    collection_xml, supported_xml = _Xml(collection), _Xml(supported)

    checksums_tag = tags.get(OC_CHECKSUMS)
    if checksums_tag is not None:
        checksum_tag = checksums_tag.partition(":")[0] + ":checksum"
        checksums_open = f"<{checksums_tag}><{checksum_tag}>"
        checksums_close = f"</{checksum_tag}></{checksums_tag}>"

    def file_values(name: str, info: ObjectInfo, facts: Facts) -> list:
        etag = info.etag.strip('"') if info.etag else None
        modified = facts.mtime
        known = {
            "{DAV:}resourcetype": "",
            "{DAV:}getcontentlength": str(info.size),
            "{DAV:}getcontenttype": served_type(info.content_type, name),
            "{DAV:}getlastmodified": _rfc1123(modified.timestamp()) if modified is not None else _NOT_FOUND,
            "{DAV:}displayname": name,
            "{DAV:}getetag": f'"{etag}"' if etag else _NOT_FOUND,
            "{DAV:}lockdiscovery": None,
            "{DAV:}supportedlock": supported_xml,
        }
        if checksums_tag is not None:
            known[OC_CHECKSUMS] = (
                _Xml(checksums_open + oc_checksums_text(facts.sha1, facts.md5) + checksums_close)
                if facts.has_hashes
                else _NOT_FOUND
            )
        if names is None:
            return [(n, v) for n, v in ((n, known[n]) for n in _FILE_ALLPROP) if v is not _NOT_FOUND]
        return [(n, known.get(n, _NOT_FOUND)) for n in names]

    def folder_values(name: str) -> list:
        known = {
            "{DAV:}resourcetype": collection_xml,
            "{DAV:}displayname": name,
            "{DAV:}lockdiscovery": None,
            "{DAV:}supportedlock": supported_xml,
        }
        if names is None:
            return [(n, known[n]) for n in _FOLDER_ALLPROP]
        return [(n, known.get(n, _NOT_FOUND)) for n in names]

    skip_shared = folder._is_my_root

    def members(page: list) -> Iterator[str]:
        for entry, facts in page:
            if isinstance(entry, CommonPrefix):
                name = entry.prefix[len(base) : -1]
                if not name or "/" in name or (name == SHARED and skip_shared):
                    continue
                yield render(folder_href + quote(name, safe=_HREF_SAFE) + "/", folder_values(name))
            else:
                name = entry.key[len(base) :]
                if "/" in name:
                    continue
                yield render(folder_href + quote(name, safe=_HREF_SAFE), file_values(name, entry, facts))

    # The store's first page before the 207 (read when the folder was resolved, or now: a store
    # that is down is a 503); the rest as the answer is written, with each page's facts.
    pages = ctx.drive.members(base, folder_pages(environ, base))

    def body():
        yield head.encode("utf-8", "xmlcharrefreplace")
        try:
            for page in pages:  # one chunk a page, written as the store returns the next
                yield "".join(members(page)).encode("utf-8", "xmlcharrefreplace")
        except Exception as exc:
            raise AnswerCut(f"the listing of {base} failed after its answer began: {exc}") from exc
        yield (rest + close_all).encode("utf-8", "xmlcharrefreplace")

    start_response(
        "207 Multi-Status",
        [("Content-Type", "application/xml; charset=utf-8"), ("Date", util.get_rfc1123_time())],
    )
    return body()


class _Xml(str):
    """A property value that is already XML (written as is)."""
