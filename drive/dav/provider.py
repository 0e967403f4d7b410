"""The wsgidav provider: one per mount point, mapping a request path to the resource of the
caller's drive (:mod:`drive.dav.resources`). Every path goes through :mod:`drive.keys`, so
nothing escapes the caller's prefix; ``shared/`` at the root of my drive is virtual and
read-only: one folder per organisation the caller may read, mapped to ``orgs/{slug}/`` (the
name is reserved there: a real ``users/{id}/shared/`` folder is hidden by it)."""

from __future__ import annotations

from itertools import chain
from urllib.parse import unquote

from wsgidav.dav_provider import DAVProvider

from drive import keys
from drive.dav import propfind
from drive.dav.context import (
    CACHE_KEY,
    DEST_EXISTED_KEY,
    LISTINGS_KEY,
    MTIME_APPLIED_KEY,
    MTIME_KEY,
    SHARED,
    cache_key,
    context_of,
    read_client_facts,
    store_errors,
)
from drive.dav.resources import FileResource, FolderResource, SharedRoot
from drive.keys import DrivePath
from drive.listing import FOLDER_MARKER

class ObjectStoreProvider(DAVProvider):
    """One instance per mount point; the drive comes from the request's :class:`DavContext`.

    ``proxy_reads``: GET serves the bytes (read from a presigned URL) instead of being
    left to the HTTP routes' 302; the /v1/dav mount, for clients that do not follow
    redirects.
    """

    def __init__(self, *, proxy_reads: bool):
        super().__init__()
        self.proxy_reads = proxy_reads

    def __repr__(self) -> str:
        return f"ObjectStoreProvider(proxy_reads={self.proxy_reads})"

    def is_readonly(self) -> bool:
        return False

    def ref_url_to_path(self, ref_url: str) -> str:
        """Inverse of the resources' ``get_ref_url`` ("/users/7/a/b" → "/a/b")."""
        head, _, rest = unquote(ref_url).lstrip("/").partition("/")
        owner, _, rel = rest.partition("/")
        if head == "orgs":
            return f"/{SHARED}/{owner}/{rel}"
        return "/" + rel

    def get_resource_inst(self, path: str, environ: dict):
        cache = environ.setdefault(CACHE_KEY, {})
        key = cache_key(path)
        if key not in cache:
            with store_errors():
                cache[key] = self._resolve(path, environ)
        return cache[key]

    def _resolve(self, path: str, environ: dict):
        ctx = context_of(environ)
        segments = [s for s in path.split("/") if s]
        prefix, inner, readonly = ctx.prefix, segments, False
        if segments and segments[0] == SHARED:
            if len(segments) == 1:
                return SharedRoot("/" + SHARED, environ)
            if segments[1] not in ctx.org_slugs():
                return None
            prefix, inner, readonly = f"orgs/{segments[1]}/", segments[2:], True
        if not inner:
            return FolderResource(path, environ, DrivePath(prefix, ""), readonly)
        if inner[-1] == FOLDER_MARKER:
            return None
        location = keys.from_text(prefix, "/".join(inner))
        info = ctx.store.head(location.key)
        if info is not None:
            return FileResource(path, environ, location, info, readonly)
        folder = DrivePath(prefix, location.rel + "/")
        if environ["REQUEST_METHOD"] == "PROPFIND":
            # The listing that tells the folder exists is the one the answer goes on with.
            pages = ctx.store.folder_pages(folder.key)
            first = next(pages, None)
            if first:
                environ.setdefault(LISTINGS_KEY, {})[folder.key] = chain((first,), pages)
        else:
            first = ctx.store.list_page(folder.key, max_keys=1).entries
        return FolderResource(path, environ, folder, readonly) if first else None

    def custom_request_handler(self, environ, start_response, default_handler):
        method = environ["REQUEST_METHOD"]
        if method == "PROPFIND":
            # RFC 4918 9.1: a server may refuse Depth: infinity (403 propfind-finite-depth).
            default_handler.__self__.allow_propfind_infinite = False
        if method in ("PUT", "COPY", "MOVE"):
            read_client_facts(environ)  # X-OC-Mtime, OC-Checksum: 400 before anything is written
        if environ.get(MTIME_KEY) is not None:
            mtime_start_response = start_response

            def start_response(status, headers, exc_info=None):
                # What ownCloud clients look for; rclone sends a PROPPATCH of the time without it.
                if status.startswith("2") and environ.get(MTIME_APPLIED_KEY):
                    headers = [*headers, ("X-OC-Mtime", "accepted")]
                return mtime_start_response(status, headers, exc_info)

        if method in ("COPY", "MOVE"):
            plain_start_response = start_response

            def start_response(status, headers, exc_info=None):
                # A COPY/MOVE done by handle_copy/handle_move is reported as 204 by wsgidav;
                # RFC 4918 wants 201 when the destination did not exist before.
                if status.startswith("204") and environ.get(DEST_EXISTED_KEY) is False:
                    status = "201 Created"
                return plain_start_response(status, headers, exc_info)

        if method == "PROPFIND" and environ.get("HTTP_DEPTH") == "1":
            with store_errors():
                fast = propfind.fast_propfind(self, environ, start_response)
            if fast is not None:
                yield from fast
                return
        with store_errors():
            yield from default_handler(environ, start_response)
