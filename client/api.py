"""The kgpu HTTP API, as the client calls it (standard library only)."""

from __future__ import annotations

import http.client
import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from client.config import Login
from client.retry import Refusal, retry_after

USER_AGENT = "kgpu-client/0.1"


class ApiError(Refusal):
    """An answer other than 2xx, with the envelope's ``error_code`` and ``message`` (exit code 1);
    status 0 when none came (client/retry.py: which ones are worth another try)."""

    def __init__(self, status: int, error_code: str, message: str, retry_after: float | None = None):
        super().__init__(message, status, retry_after)
        self.error_code, self.message = error_code, message


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
            raise _error_of(exc) from None
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
        """Upload one file, streamed through the gateway (a PUT without ``Expect``)."""
        with open(local, "rb") as body:
            request = urllib.request.Request(
                self.url(path), data=body, method="PUT",
                headers={"Authorization": f"Bearer {self.login.token}", "User-Agent": USER_AGENT,
                         "Content-Length": str(local.stat().st_size), "Content-Type": "application/octet-stream"},
            )
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as reply:
                    return json.loads(reply.read() or b"{}")
            except urllib.error.HTTPError as exc:
                raise _error_of(exc) from None
            except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
                raise self._unreachable(exc) from None

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


def _error_of(exc: urllib.error.HTTPError) -> ApiError:
    raw = exc.read() or b""
    wait = retry_after(exc.headers.get("Retry-After") if exc.headers else None)
    try:
        envelope = json.loads(raw)
        return ApiError(exc.code, envelope.get("error_code", "error"), envelope.get("message", raw.decode()), wait)
    except (ValueError, AttributeError):
        text = raw.decode(errors="replace").strip() or exc.reason
        return ApiError(exc.code, "http_error", f"HTTP {exc.code}: {text}", wait)
