"""WebDAV for my drive: the wsgidav application, and the ASGI dispatcher in front of the API.

Two mount points serve the same drive (the caller's ``users/{id}/``, plus the
virtual read-only ``shared/{org}/``):

``/v1/files/``
    The WebDAV methods (OPTIONS, PROPFIND, PROPPATCH, MKCOL, MOVE, COPY, LOCK,
    UNLOCK) go to wsgidav; GET, HEAD, PUT, POST and DELETE stay on the HTTP
    routes of gateway/routes/files.py: GET is a 302 to a presigned URL, PUT
    streams the body to the store unless it carries ``Expect: 100-continue``
    (SPEC decisions 3 and 4). This is what ``rclone mount :webdav:`` uses: rclone
    follows the 302 on GET and sends PUTs without ``Expect``. PUT, POST and
    DELETE first check WebDAV locks here (423 without the token), and a DELETE
    also drops the dead properties and locks of what it deleted.
    In the virtual ``shared/`` subtree, GET and HEAD are answered by the
    /v1/shared routes (302s into the org's drive); writes are 403.

``/v1/dav/`` (``KGPU_DAV_PROXY_ENABLED``, default on)
    Every method goes to wsgidav: GET streams the bytes through the gateway
    (read from a presigned URL, ranges honoured) and PUT is streamed into the
    store, for clients that do not follow redirects (litmus, cadaver, davfs2,
    Finder, Windows). Turned off, /v1/dav/ answers 404: bytes then never flow
    through the gateway (egress costs money in production).

Authentication on both: ``Authorization: Bearer <token>`` or HTTP Basic with the
token as the password (any user name). Without valid credentials the answer is
401 with ``WWW-Authenticate: Basic realm="kgpu"`` (so desktop clients prompt)
and a Bearer challenge; pending accounts get 403, the environment admin token
(which has no drive) 403 too. Paths, and the ``Destination`` of COPY and MOVE,
are checked on their raw bytes by :mod:`drive.keys` before wsgidav sees them.
The ``Destination`` is parsed once, per RFC 4918 and RFC 3986 (``;`` is part of a
name; ``%3B`` and ``%3F`` are a name's ``;`` and ``?``), here and for wsgidav alike.
Every error wsgidav would answer as an HTML page is answered in the project's
envelope instead (``{"error_code", "message", "trace_id"}``); DAV XML errors
(``propfind-finite-depth``, lock conditions) stay XML.

Dead properties and locks are kept in the main database (tables ``dav_properties`` and
``dav_locks``), so gateway replicas on one database share them; see :mod:`drive.dav` for how
a drive looks as WebDAV.
"""

from __future__ import annotations

import html
import logging
import re
import threading
from pathlib import Path
from typing import Callable
from urllib.parse import ParseResult, quote, unquote, urlsplit

from a2wsgi import WSGIMiddleware
from sqlalchemy.orm import sessionmaker
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from wsgidav import request_server, util
from wsgidav.dav_error import DAVError
from wsgidav.dir_browser import WsgiDavDirBrowser
from wsgidav.error_printer import ErrorPrinter
from wsgidav.request_resolver import RequestResolver
from wsgidav.wsgidav_app import WsgiDAVApp

from drive import dav, keys, names
from drive.dav.storage import DbLockManager, DbLockStorage, DbPropertyManager, import_sqlite_properties
from drive.keys import InvalidPath
from gateway import orgs
from gateway.auth import authenticate, status_refusal
from gateway.errors import ApiError, default_code, envelope
from gateway.models import DavLock, DavProperty
from gateway.principal import Principal

log = logging.getLogger("kgpu")

FILES_MOUNT = b"/v1/files"
DAV_MOUNT = b"/v1/dav"
DAV_METHODS = frozenset({"OPTIONS", "PROPFIND", "PROPPATCH", "MKCOL", "MOVE", "COPY", "LOCK", "UNLOCK"})
WRITE_METHODS = frozenset({"PUT", "POST", "DELETE", "MKCOL", "PROPPATCH", "MOVE", "LOCK", "UNLOCK"})
# Every method a drive mount answers (the HTTP routes' and WebDAV's), in the order Allow lists them.
DRIVE_METHODS = ("GET", "HEAD", "PUT", "POST", "DELETE", "OPTIONS",
                 "PROPFIND", "PROPPATCH", "MKCOL", "COPY", "MOVE", "LOCK", "UNLOCK")
CHALLENGES = [(b"www-authenticate", b'Basic realm="kgpu"'), (b"www-authenticate", b'Bearer realm="kgpu"')]
WSGI_THREADS = 16
_CHECK_PREFIX = "users/0/"  # only the shape of a path is checked here; the provider maps it for real
_PARAGRAPH = re.compile(rb"<p>(.*?)</p>", re.S)
_STATUS_PREFIX = re.compile(r"^\d{3}(?: [^:]*)?: ")  # "403 Forbidden: …", "507: …" (a status wsgidav has no name for)
_CODED = re.compile(r"^\[([a-z_]+)\] ")  # drive.dav.context.coded_error: the error_code the HTTP routes use
MAX_HTML_ERROR_BYTES = 64 << 10


def _parse_destination(value: str) -> tuple[str, str, bytes]:
    """(scheme, host, raw path) of a ``Destination`` header, per RFC 3986: the path is still
    percent-encoded, and ``;`` is part of it (it starts no parameters). InvalidPath if it is
    not a URL at all (``http://[::1``)."""
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number in range
        return parts.scheme, parts.netloc, parts.path.encode("latin-1")
    except (ValueError, UnicodeEncodeError):
        raise InvalidPath("not a URL") from None


def _wsgidav_destination_parse(url: str, scheme: str = "", allow_fragments: bool = True) -> ParseResult:
    """What wsgidav's COPY and MOVE take for ``urlparse(unquote(Destination))``.

    wsgidav decodes the whole header before it parses it, so a name's ``%3F`` became the start
    of a query and its ``;`` or ``%3B`` the start of parameters: ``report.txt;v2`` overwrote
    ``report.txt``. The dispatcher has already checked the Destination with the same parser."""
    dest_scheme, netloc, raw = _parse_destination(url)
    return ParseResult(dest_scheme, netloc, unquote(raw.decode("latin-1"), errors="strict"), "", "", "")


# request_server uses these two names only to read the Destination header (wsgidav 4.3).
request_server.unquote = lambda value: value
request_server.urlparse = _wsgidav_destination_parse


OLD_PROPERTIES_FILE = "webdav.sqlite3"  # where servers before migration 0008 kept dead properties and locks


def build_wsgidav(sessions: sessionmaker, data_dir: Path, usage=None) -> tuple[Callable, WsgiDAVApp]:
    """The wsgidav WSGI application for both mount points, wrapped to hand it the request's drive;
    dead properties count in ``usage`` (drive.usage.UsageBook)."""
    properties = DbPropertyManager(sessions, DavProperty.__table__, usage)
    locks = DbLockStorage(sessions, DavLock.__table__)
    imported = import_sqlite_properties(Path(data_dir) / OLD_PROPERTIES_FILE, properties)
    if imported:
        log.info("imported %d WebDAV dead properties from %s", imported, OLD_PROPERTIES_FILE)
    config = {
        "provider_mapping": {
            FILES_MOUNT.decode(): dav.ObjectStoreProvider(proxy_reads=False),
            DAV_MOUNT.decode(): dav.ObjectStoreProvider(proxy_reads=True),
        },
        # Authentication happens in DavDispatcher; no CORS, no wsgidav authenticator.
        "middleware_stack": [ErrorPrinter, WsgiDavDirBrowser, RequestResolver],
        # Not in the stack; set so wsgidav does not warn about Basic without TLS (TLS ends before us).
        "http_authenticator": {"accept_basic": False, "accept_digest": False, "default_to_digest": False},
        "property_manager": properties,
        "lock_storage": locks,
        "verbose": 1,
        "logging": {"enable": False},
        "suppress_version_info": True,
        "block_size": 256 * 1024,
        "dir_browser": {
            "enable": True,
            "icon": False,
            "response_trailer": "",
            "show_user": False,
            "davmount": False,
            "ms_sharepoint_support": False,
            "libre_office_support": False,
        },
    }
    application = WsgiDAVApp(config)
    application.lock_manager = DbLockManager(locks)  # wsgidav has no option for its lock manager's class
    for provider in application.provider_map.values():
        provider.set_lock_manager(application.lock_manager)

    def wsgi(environ: dict, start_response):
        context: dav.DavContext = environ["asgi.scope"][dav.ENVIRON_KEY]
        environ[dav.ENVIRON_KEY] = context
        environ["wsgidav.auth.user_name"] = context.principal
        environ["wsgidav.auth.realm"] = "kgpu"
        return application(environ, start_response)

    return wsgi, application


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None


def _rel_text(mount: bytes, raw: bytes) -> str:
    """The decoded path of the URL path ``raw`` inside ``mount`` ("" for its root); InvalidPath
    if it would escape (drive/keys.py, the parser the HTTP routes use too)."""
    return keys.from_url_path(_CHECK_PREFIX, mount, raw).rel


def _in_shared(rel: str) -> bool:
    return rel.split("/", 1)[0] == dav.SHARED


_SHARED_RAW = dav.SHARED.encode()


def maybe_shared(raw_rel: bytes) -> bool:
    """Whether the first segment could be ``shared`` (cheap: no decoding unless it is encoded)."""
    first = raw_rel.split(b"/", 1)[0]
    return first == _SHARED_RAW or b"%" in first


def _split_mount(raw: bytes) -> tuple[bytes | None, bytes]:
    for mount in (FILES_MOUNT, DAV_MOUNT):
        rest = keys.under_mount(mount, raw)
        if rest is not None:
            return mount, rest
    return None, b""


class DavDispatcher:
    """ASGI middleware: WebDAV requests to wsgidav, everything else to the API."""

    def __init__(self, app: ASGIApp):
        self.app = app
        self._dav: WSGIMiddleware | None = None
        self._wsgidav: WsgiDAVApp | None = None
        self._lock = threading.Lock()

    def _dav_app(self, state) -> WSGIMiddleware:
        if self._dav is None:
            with self._lock:
                if self._dav is None:
                    wsgi, self._wsgidav = build_wsgidav(state.sessions, state.settings.data_dir, state.usage)
                    self._dav = WSGIMiddleware(wsgi, workers=WSGI_THREADS)
        return self._dav

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        raw = (scope.get("raw_path") or scope["path"].encode("utf-8")).split(b"?", 1)[0]
        mount, raw_rel = _split_mount(raw)
        if mount is None:
            await self.app(scope, receive, send)
            return
        method = scope["method"].upper()
        if method not in DRIVE_METHODS:
            allowed = ", ".join(DRIVE_METHODS)
            await envelope(405, "method_not_allowed", f"{method} is not allowed here; allowed: {allowed}",
                           {"Allow": allowed})(scope, receive, send)
            return
        if mount == FILES_MOUNT and method in ("GET", "HEAD") and not maybe_shared(raw_rel):
            await self.app(scope, receive, send)  # the download redirect: the hot path, left alone
            return
        state = scope["app"].state
        try:
            rel = _rel_text(mount, raw)
        except InvalidPath as exc:
            if mount == FILES_MOUNT and method not in DAV_METHODS:
                await self.app(scope, receive, send)  # the HTTP routes answer their own 400
            else:
                await envelope(400, "invalid_path", str(exc))(scope, receive, send)
            return
        if mount == FILES_MOUNT and method not in DAV_METHODS:
            if not _in_shared(rel):
                if method in ("PUT", "POST", "DELETE") and rel:
                    await self._http_write(scope, receive, send, method, rel)
                else:
                    await self.app(scope, receive, send)
            elif raw_rel.split(b"/", 1)[0] != dav.SHARED.encode():
                await envelope(400, "invalid_path", "the shared/ part of the URL must not be percent-encoded")(
                    scope, receive, send
                )
            elif method in ("GET", "HEAD"):
                # /v1/files/shared/{org}/... is /v1/shared/{org}/...: 302s into the org's drive.
                rest = raw[len(FILES_MOUNT + b"/" + dav.SHARED.encode()) :]
                path = "/v1/shared" + scope["path"][len("/v1/files/" + dav.SHARED) :]
                await self.app({**scope, "path": path, "raw_path": b"/v1/shared" + rest}, receive, send)
            elif method in WRITE_METHODS:
                await self._dav_request(scope, receive, send, method, rel, None)  # 401 or 403
            else:
                await self.app(scope, receive, send)
            return
        if mount == DAV_MOUNT and not state.settings.dav_proxy_enabled:
            await envelope(404, "not_found", "/v1/dav/ is turned off here (KGPU_DAV_PROXY_ENABLED); use /v1/files/")(
                scope, receive, send
            )
            return
        destination = None
        if method in ("COPY", "MOVE"):
            try:
                destination = self._destination(scope, mount)
            except InvalidPath as exc:
                await envelope(400, "invalid_path", f"Destination: {exc}")(scope, receive, send)
                return
            except ApiError as exc:
                await envelope(exc.status, exc.error_code, exc.message)(scope, receive, send)
                return
        await self._dav_request(scope, receive, send, method, rel, destination, mount)

    async def _http_write(self, scope: Scope, receive: Receive, send: Send, method: str, rel: str) -> None:
        """PUT, POST and DELETE on /v1/files/ stay HTTP routes, but respect WebDAV locks (423
        without the lock token in an ``If`` header), and a DELETE drops the dead properties
        and locks of what it deleted."""
        principal = await self._authenticate(scope)
        if isinstance(principal, Response):
            await self.app(scope, receive, send)  # the route answers 401 or 403 in its own words
            return
        self._dav_app(scope["app"].state)
        locks, properties = self._wsgidav.lock_manager, self._wsgidav.prop_manager
        ref = quote("/" + principal.drive_prefix + rel.rstrip("/"))
        conditions = {"HTTP_IF": _header(scope, b"if")} if _header(scope, b"if") else {}
        util.parse_if_header_dict(conditions)
        try:
            locks.check_write_permission(
                url=ref,
                depth="infinity" if method == "DELETE" else "0",
                token_list=conditions["wsgidav.ifLockTokenList"],
                principal=f"user:{principal.user_id}",
            )
        except DAVError:
            await envelope(423, "locked", f"{rel} is locked; send its lock token in an If header")(scope, receive, send)
            return
        if method != "DELETE":
            await self.app(scope, receive, send)
            return

        async def send_after_cleanup(message: Message) -> None:
            # Before the 204 goes out: a client that reads it finds the properties' bytes freed.
            if message["type"] == "http.response.start" and message["status"] == 204:
                await run_in_threadpool(properties.remove_tree, ref)
                await run_in_threadpool(locks.remove_all_locks_from_url, ref, recursive=True)
            await send(message)

        await self.app(scope, receive, send_after_cleanup)

    @staticmethod
    def _destination(scope: Scope, mount: bytes) -> str | None:
        """The decoded path of a Destination inside the same mount, checked like a request path;
        None when there is none (wsgidav answers 400). InvalidPath for one that cannot be a file
        or folder of this drive; ApiError 502 for one in another mount."""
        value = _header(scope, b"destination")
        if not value:
            return None
        _, _, raw = _parse_destination(value)
        if not raw.startswith(b"/"):
            raise InvalidPath("not an absolute URL or path")
        dest_mount, _ = _split_mount(raw)
        if dest_mount != mount:
            raise ApiError(
                502, "destination_elsewhere", f"the Destination must be inside {mount.decode()}/, as the request is"
            )
        rel = _rel_text(dest_mount, raw)
        if rel == "":
            raise InvalidPath("the drive's root cannot be replaced; name a file or folder inside it")
        return rel

    async def _dav_request(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        method: str,
        rel: str,
        destination: str | None,
        mount: bytes | None = None,
    ) -> None:
        principal = await self._authenticate(scope)
        if isinstance(principal, Response):
            await principal(scope, receive, send)
            return
        if (method in WRITE_METHODS and _in_shared(rel)) or (destination is not None and _in_shared(destination)):
            await envelope(403, "read_only", "shared/ shows your organisations' drives read-only; use /v1/shared/")(
                scope, receive, send
            )
            return
        if mount is None:  # a write in the shared/ subtree, refused above
            return
        state = scope["app"].state
        settings = state.settings

        def load_orgs() -> list[str]:
            with state.sessions() as session:
                return [org.slug for org, _ in orgs.visible_orgs(session, principal)]

        context = dav.DavContext(
            drive=state.drive,
            prefix=principal.drive_prefix,
            principal=f"user:{principal.user_id}",
            load_orgs=load_orgs,
            quota_bytes=settings.user_quota_bytes,
        )

        no_depth = method == "PROPFIND" and _header(scope, b"depth") is None
        if no_depth and rel and not rel.endswith("/") and not _in_shared(rel):
            # No Depth means infinity, which is refused for folders (RFC 4918 9.1); on a file it
            # is the same as Depth 0, which webdav4 and fsspec rely on to read a file's properties.
            # Nothing there at all: Depth 0 too, so the answer is a 404 rather than a refused depth.
            if await run_in_threadpool(state.drive.file_or_nothing, principal.drive_prefix + rel):
                scope = {**scope, "headers": [*scope["headers"], (b"depth", b"0")]}

        async def explain_conflict() -> str | None:
            """What stands in the way of a write wsgidav refused with 409 (its parent a file)."""
            target = destination if method in ("COPY", "MOVE") else rel
            if method not in ("PUT", "MKCOL", "COPY", "MOVE") or not target:
                return None
            return await run_in_threadpool(state.drive.file_above, principal.drive_prefix, target)

        sender = _wsgidav_sender(send, method, rel, explain_conflict, lambda: context.answer)
        await self._dav_app(state)({**scope, dav.ENVIRON_KEY: context}, receive, sender)

    @staticmethod
    async def _authenticate(scope: Scope) -> Principal | Response:
        """The caller, or the answer that refuses them; the outcome stays with the request, so
        the route a PUT, POST or DELETE goes on to does not authenticate it again."""
        try:
            principal = await authenticate(scope, _header(scope, b"authorization"), allow_basic=True)
        except ApiError as exc:
            response = envelope(exc.status, exc.error_code, exc.message)
            if exc.status == 401:
                response.raw_headers = [h for h in response.raw_headers if h[0] != b"www-authenticate"] + CHALLENGES
            return response
        refusal = status_refusal(principal.status)
        if refusal is not None:
            return envelope(refusal.status, refusal.error_code, refusal.message)
        if principal.user_id is None:
            return envelope(403, "no_drive", "the environment admin token has no drive; use a user's token")
        return principal


def _wsgidav_sender(send: Send, method: str, rel: str, explain_conflict=None, answer=lambda: None) -> Send:
    """``send`` for wsgidav's answers: without its Date header (uvicorn adds its own), and with
    each HTML error page (wsgidav's ErrorPrinter) turned into the project's envelope; a 409
    that a file in the way explains says so as the HTTP routes do (drive/names.py). When the
    request set an ``answer()`` of its own (drive.dav.DavContext.answer), that is sent instead."""
    held: dict | None = None
    page = bytearray()
    replaced = False

    async def sender(message: Message) -> None:
        nonlocal held, replaced
        if replaced:
            return  # wsgidav's own answer, dropped
        if message["type"] == "http.response.start" and answer() is not None:
            replaced = True
            status, code, said = answer()
            response = envelope(status, code, said)
            await send({"type": "http.response.start", "status": response.status_code, "headers": response.raw_headers})
            await send({"type": "http.response.body", "body": response.body})
            return
        if message["type"] == "http.response.start":
            headers = [h for h in message["headers"] if h[0] != b"date"]
            content_type = next((v for k, v in headers if k == b"content-type"), b"")
            if message["status"] >= 400 and content_type.startswith(b"text/html"):
                held = {**message, "headers": headers}  # answered once the page is complete
                return
            await send({**message, "headers": headers})
            return
        if held is None or message["type"] != "http.response.body":
            await send(message)
            return
        if len(page) < MAX_HTML_ERROR_BYTES:
            page.extend(message.get("body", b""))
        if not message.get("more_body"):
            response = _envelope_for(held, bytes(page), method, rel)
            if held["status"] == 409 and explain_conflict is not None:
                why = await explain_conflict()
                if why:
                    response = envelope(409, names.NAME_CONFLICT, why)
            await send({"type": "http.response.start", "status": response.status_code, "headers": response.raw_headers})
            await send({"type": "http.response.body", "body": response.body})

    return sender


def _envelope_for(start: Message, page: bytes, method: str, rel: str) -> Response:
    """The envelope for one of wsgidav's HTML error pages, keeping its status and extra headers."""
    status = start["status"]
    code = default_code(status)
    found = _PARAGRAPH.search(page)
    said = html.unescape(found.group(1).decode("utf-8", "replace")).split("\n")[0].strip() if found else ""
    said = _STATUS_PREFIX.sub("", said)  # "403 Forbidden: Cannot copy..." -> "Cannot copy..."
    if status == 404 and method in ("COPY", "MOVE", "LOCK", "UNLOCK", "PROPPATCH", "PROPFIND", "DELETE"):
        message = f"no file or folder {rel or '/'}"
    elif status >= 500 and status not in (503, 507):  # 507: a COPY over the quota, which says so
        message, code = "internal server error", "internal_error" if status == 500 else code
    else:
        message = said or code.replace("_", " ")
    coded = _CODED.match(message)
    if coded:
        code, message = coded.group(1), message[coded.end() :]
    headers = {}
    for name, value in start["headers"]:
        if name.lower() in (b"retry-after", b"connection", b"www-authenticate", b"allow", b"dav"):
            headers[name.decode("latin-1")] = value.decode("latin-1")
    if status == 503:
        code = "store_unavailable"
        headers.setdefault("Retry-After", "5")
    if status == 413:
        code = "quota_exceeded"  # the only 413 drive/dav/ raises: a PUT over the quota
    return envelope(status, code, message, headers)
