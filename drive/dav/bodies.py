"""Bytes in and out of the store for WebDAV: a PUT's body streamed to the store
(:class:`BodyWriter`, the same rule as /v1/files/), and a GET read through a presigned URL
(:class:`PresignedReader`, on /v1/dav/ only)."""

from __future__ import annotations

import asyncio
import urllib.error
import urllib.request

from wsgidav.dav_error import (
    HTTP_BAD_REQUEST,
    HTTP_NOT_FOUND,
    HTTP_REQUEST_ENTITY_TOO_LARGE,
    HTTP_REQUEST_TIMEOUT,
    HTTP_SERVICE_UNAVAILABLE,
    DAVError,
)

from drive.checksums import ChecksumMismatch
from drive.dav.context import CLOSE_CONNECTION, client_checksums, client_mtime, coded_error, store_errors
from drive.service import DriveService
from drive.uploads import BodyTimeout, IncompleteBody, UploadTooLarge


class BodyWriter:
    """wsgidav's file object for a PUT. The body is not read through ``wsgi.input`` (whose
    end a2wsgi cannot tell from a client that went away): :meth:`writelines` hands the ASGI
    ``receive`` behind it to :meth:`drive.service.DriveService.receive_file` on the event loop,
    the one way /v1/files/ takes too, so the object is created or replaced only when the
    body arrived whole, a stalled client is cut off after the idle timeout, a started upload
    is aborted otherwise, and a stored one is counted and its facts recorded."""

    def __init__(
        self,
        environ: dict,
        drive: DriveService,
        key: str,
        content_type: str,
        *,
        content_length: int | None,
        reservation=None,
    ):
        self.reservation = reservation
        self.environ = environ
        self.drive = drive
        self.key = key
        self.content_type = content_type
        self.content_length = content_length
        self.size = 0
        self.etag: str | None = None

    def writelines(self, _wsgi_chunks) -> None:
        # _wsgi_chunks is wsgidav's lazy reader of wsgi.input: never started, so nothing is read twice.
        body = self.environ["wsgi.input"]  # a2wsgi's Body: the ASGI receive and the event loop it runs on
        self.environ["wsgidav.some_input_read"] = 1  # wsgidav must not read the rest after an error
        upload = self.drive.receive_file(
            self.reservation,
            self.key,
            body.receive,
            content_length=self.content_length,
            content_type=self.content_type,
            expected=client_checksums(self.environ),
            mtime=client_mtime(self.environ),
        )
        try:
            with store_errors():
                result = asyncio.run_coroutine_threadsafe(upload, body.loop).result()
        except UploadTooLarge as exc:
            raise DAVError(HTTP_REQUEST_ENTITY_TOO_LARGE, str(exc), add_headers=[CLOSE_CONNECTION]) from None
        except ChecksumMismatch as exc:
            raise coded_error(HTTP_BAD_REQUEST, "checksum_mismatch", str(exc)) from None
        except BodyTimeout as exc:
            raise DAVError(HTTP_REQUEST_TIMEOUT, str(exc), add_headers=[CLOSE_CONNECTION]) from None
        except IncompleteBody as exc:
            raise DAVError(HTTP_BAD_REQUEST, str(exc), add_headers=[CLOSE_CONNECTION]) from None
        self.environ["wsgidav.all_input_read"] = 1
        self.size, self.etag = result.size, result.etag

    def write(self, data: bytes) -> None:
        raise NotImplementedError("BodyWriter reads the body itself: wsgidav calls writelines")

    def close(self) -> None:
        pass  # committed (or not) by writelines


class PresignedReader:
    """A file-like view of an object read through a presigned GET (seek opens a ranged GET)."""

    def __init__(self, url: str, size: int, timeout: float = 60.0):
        self.url = url
        self.size = size
        self.timeout = timeout
        self.pos = 0
        self._response = None

    def seek(self, pos: int) -> None:
        self.close()
        self.pos = pos

    def read(self, n: int = -1) -> bytes:
        if self.pos >= self.size:
            return b""
        if self._response is None:
            self._open()
        data = self._response.read() if n is None or n < 0 else self._response.read(n)
        self.pos += len(data)
        return data

    def _open(self) -> None:
        request = urllib.request.Request(self.url)
        if self.pos:
            request.add_header("Range", f"bytes={self.pos}-")
        try:
            response = urllib.request.urlopen(request, timeout=self.timeout)
        except urllib.error.HTTPError as exc:
            raise DAVError(HTTP_NOT_FOUND if exc.code == 404 else HTTP_SERVICE_UNAVAILABLE) from None
        except OSError as exc:
            raise DAVError(HTTP_SERVICE_UNAVAILABLE, f"object store unreachable: {exc}") from None
        if self.pos and not response.headers.get("Content-Range"):
            skip = self.pos  # a store that ignored Range sent the whole object
            while skip:
                skipped = len(response.read(min(skip, 1 << 20)))
                if not skipped:
                    break
                skip -= skipped
        self._response = response

    def close(self) -> None:
        if self._response is not None:
            self._response.close()
            self._response = None
