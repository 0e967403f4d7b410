"""The kgpu HTTP API, as the client calls it (standard library only)."""

from __future__ import annotations

import base64
import contextlib
import http.client
import io
import json
import os
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from client.config import Login
from client.errors import ApiError
from client.retry import retry_after

USER_AGENT = "kgpu-client/0.1"
CONTINUE_WAIT_S = 1.0  # how long an upload waits for the server's go-ahead before it sends its body anyway
BLOCK = 1 << 20  # bytes of an upload read and sent at a time
_LONGEST_LINE = 65537  # http.client's own bound on a status line


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):  # a 302 is an answer here, not a hop
        return None


@dataclass(frozen=True)
class Api:
    login: Login
    timeout: float = 120

    def url(self, path: str, params: dict | None = None) -> str:
        """``path`` (not yet percent-encoded) under the base URL."""
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        return f"{self.login.base_url}{urllib.parse.quote(path, safe='/')}{query}"

    def _open(self, method: str, path: str, *, params=None, body=None, headers=None, timeout: float | None = 0):
        data = None
        sent = {"Authorization": f"Bearer {self.login.token}", "User-Agent": USER_AGENT, **(headers or {})}
        if body is not None:
            data = json.dumps(body).encode()
            sent["Content-Type"] = "application/json"
        request = urllib.request.Request(self.url(path, params), data=data, method=method, headers=sent)
        opener = urllib.request.build_opener(_NoRedirect)
        try:
            # timeout None: no read timeout (a stream may be quiet for long); 0: the default.
            return opener.open(request, timeout=self.timeout if timeout == 0 else timeout)
        except urllib.error.HTTPError as exc:
            if 300 <= exc.code < 400:
                return exc
            raise _error_of(exc.code, exc.reason, exc.headers, exc.read() or b"") from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
            raise self._unreachable(exc) from None

    def _unreachable(self, exc: BaseException) -> ApiError:
        return ApiError(0, "unreachable", f"cannot reach {self.login.base_url}: {getattr(exc, 'reason', exc)}")

    def call(self, method: str, path: str, *, params=None, body=None, headers=None, timeout: float = 0) -> dict:
        """One request; the JSON answer (``{}`` for an empty one)."""
        with self._open(method, path, params=params, body=body, headers=headers, timeout=timeout) as reply:
            raw = reply.read()
        return json.loads(raw) if raw.strip() else {}

    def head(self, path: str) -> dict | None:
        """A file's headers (``Content-Length``, ``ETag``…), or None when there is no such file."""
        try:
            with self._open("HEAD", path) as reply:
                return dict(reply.headers.items())
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise

    def put_file(self, path: str, local: Path) -> dict:
        """Upload one file, streamed through the gateway. It asks first (``Expect: 100-continue``,
        RFC 9110 section 10.1.1): a refusal (429, 503…) comes back before any of the body is sent,
        and a server that says nothing for :data:`CONTINUE_WAIT_S` (a proxy that does not pass the
        question on) gets the body anyway. An empty file has nothing to ask about."""
        connection, target, for_the_proxy = _connection(urllib.parse.urlsplit(self.url(path)), self.timeout)
        with open(local, "rb") as body:
            size = os.fstat(body.fileno()).st_size
            asks = size > 0  # RFC 9110: no expectation without content
            try:
                connection.putrequest("PUT", target)
                for name, value in {
                    **for_the_proxy, "Authorization": f"Bearer {self.login.token}", "User-Agent": USER_AGENT,
                    "Content-Length": str(size), "Content-Type": "application/octet-stream",
                    **({"Expect": "100-continue"} if asks else {}),
                }.items():
                    connection.putheader(name, value)
                connection.endheaders()
                reply = _answer_before_the_body(connection) if asks else None
                if reply is None:
                    reply = _answer_after(connection, body)
                with reply:
                    raw = reply.read()
            except (OSError, http.client.HTTPException) as exc:
                raise self._unreachable(exc) from None
            finally:
                connection.close()  # a refused request's body was never sent: the connection cannot serve another
        if reply.status >= 300:
            raise _error_of(reply.status, reply.reason, reply.headers, raw)
        return json.loads(raw or b"{}")

    def download(self, path: str, local: Path) -> int:
        """A GET's body streamed into ``local`` (through a temporary name beside it, written from
        its start, so a cut download, or one sent again, leaves no half or doubled file); its size."""
        partial = local.with_name(f".{local.name}.kgpu-partial")
        size = 0
        with self._open("GET", path, timeout=self.timeout) as reply:
            try:
                with open(partial, "wb") as out:
                    while chunk := _read(reply, size):
                        out.write(chunk)
                        size += len(chunk)
            except BaseException:
                partial.unlink(missing_ok=True)
                raise
        partial.replace(local)
        return size

    def delete(self, path: str) -> int:
        """DELETE; how many files went (``X-Deleted-Count``, 1 for a single file)."""
        with self._open("DELETE", path) as reply:
            return int(reply.headers.get("X-Deleted-Count") or 1)

    def lines(self, path: str, params: dict | None = None) -> Iterator[dict]:
        """An NDJSON stream, one object a line, as the lines arrive (no read timeout)."""
        reply = self._open("GET", path, params=params, timeout=None)
        with reply:
            for line in reply:
                if line.strip():
                    yield json.loads(line)


def _read(reply: http.client.HTTPResponse, so_far: int) -> bytes:
    """The body's next block (b"" at its end); a cut (a reset, or a body shorter than its
    Content-Length, which http.client ends quietly) as the ApiError it is."""
    try:
        block = reply.read(1 << 20)
    except (OSError, http.client.HTTPException) as exc:
        raise ApiError(0, "unreachable", f"the download was cut after {so_far} bytes: {exc}") from None
    if not block and reply.length:  # bytes the Content-Length promised are still missing
        raise ApiError(0, "unreachable", f"the download was cut after {so_far} bytes, {reply.length} short")
    return block


def _connection(url: urllib.parse.SplitResult, timeout: float) -> tuple[http.client.HTTPConnection, str, dict]:
    """A connection for one request to ``url``, the request's target and the headers its proxy
    wants: straight to the server, or through the proxy the environment names (``https_proxy``,
    ``http_proxy``, ``no_proxy``), as urllib sends the client's other requests."""
    kind = http.client.HTTPSConnection if url.scheme == "https" else http.client.HTTPConnection
    target = url.path + (f"?{url.query}" if url.query else "")
    proxy = urllib.request.getproxies().get(url.scheme)
    if not proxy or urllib.request.proxy_bypass(url.netloc):
        return kind(url.netloc, timeout=timeout, blocksize=BLOCK), target, {}
    via = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    login = f"{urllib.parse.unquote(via.username or '')}:{urllib.parse.unquote(via.password or '')}"
    for_the_proxy = {"Proxy-Authorization": f"Basic {base64.b64encode(login.encode()).decode()}"} if via.password else {}
    connection = kind(via.netloc.rpartition("@")[2], timeout=timeout, blocksize=BLOCK)
    if url.scheme == "https":  # a tunnel (CONNECT): TLS from here to the server, the proxy in between
        connection.set_tunnel(url.netloc, headers=for_the_proxy)
        return connection, target, {}
    return connection, urllib.parse.urlunsplit(url), for_the_proxy


def _answer_before_the_body(connection: http.client.HTTPConnection) -> http.client.HTTPResponse | None:
    """The server's final answer to a request whose head alone was sent with ``Expect:
    100-continue``, when it gave one at once (a refusal); None when it said to go on (``100
    Continue``, or another interim answer) or said nothing within :data:`CONTINUE_WAIT_S`."""
    head = connection.sock.makefile("rb", buffering=0)  # unbuffered: reads nothing past the interim answer
    with contextlib.ExitStack() as owned:
        owned.callback(head.close)
        status_line = _first_line(connection, head)
        if status_line is None:
            return None
        if _interim(status_line):
            http.client.parse_headers(head)  # the rest of the interim answer
            return None
        reply = http.client.HTTPResponse(_ReadAgain(status_line, head), method="PUT")
        reply.begin()
        owned.pop_all()  # the reply reads the rest of its body from head, and closes it
        return reply


def _interim(status_line: bytes) -> bool:
    """``HTTP/1.1 1xx …``: not the answer yet (100 Continue: send the body)."""
    words = status_line.split(None, 2)
    return len(words) > 1 and len(words[1]) == 3 and words[1].startswith(b"1")


def _first_line(connection: http.client.HTTPConnection, head) -> bytes | None:
    """The first line of the server's answer, or None when none began within :data:`CONTINUE_WAIT_S`."""
    connection.sock.settimeout(CONTINUE_WAIT_S)
    try:
        first = head.read(1)
    except TimeoutError:
        return None
    finally:
        connection.sock.settimeout(connection.timeout)
    if not first:
        raise http.client.RemoteDisconnected("the server closed the connection without an answer")
    return first + head.readline(_LONGEST_LINE)


def _answer_after(connection: http.client.HTTPConnection, body) -> http.client.HTTPResponse:
    """The answer once the body is sent. A server that answered while it came and then closed
    the connection (a refusal after the wait) cuts the body short: its answer says why."""
    try:
        connection.send(body)
    except (BrokenPipeError, ConnectionResetError):
        pass
    return connection.getresponse()


class _ReadAgain(io.RawIOBase):
    """An answer whose status line was read already: that line again, then the rest from
    ``rest``. ``HTTPResponse`` takes it as its socket (it only asks a socket for ``makefile``)."""

    def __init__(self, first: bytes, rest):
        self.first, self.rest = first, rest

    def makefile(self, mode: str) -> io.BufferedReader:
        return io.BufferedReader(self)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if not self.first:
            return self.rest.readinto(buffer)
        n = min(len(buffer), len(self.first))
        buffer[:n], self.first = self.first[:n], self.first[n:]
        return n

    def close(self) -> None:
        super().close()
        self.rest.close()


def _error_of(status: int, reason: str, headers, raw: bytes) -> ApiError:
    wait = retry_after(headers.get("Retry-After") if headers else None)
    try:
        envelope = json.loads(raw)
        return ApiError(status, envelope.get("error_code", "error"), envelope.get("message", raw.decode()), wait)
    except (ValueError, AttributeError):
        text = raw.decode(errors="replace").strip() or reason
        return ApiError(status, "http_error", f"HTTP {status}: {text}", wait)
