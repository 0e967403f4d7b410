"""SigV4 query-string presigning for S3-compatible stores.

boto3's ``generate_presigned_url`` spends about 150 µs per call building a
whole botocore request; a presigned URL is four HMACs over a few strings.
Downloads are redirects (SPEC decision 3), so this is the hot path of every
``GET /v1/files/...``. The output is the same URL botocore produces for the
same instant (``tests/test_presign.py`` checks that, and the conformance suite
checks the embedded store accepts it and refuses a tampered one).
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import re
import time
from datetime import datetime
from urllib.parse import quote, urlsplit

_ALGORITHM = "AWS4-HMAC-SHA256"
_PLAIN_KEY = re.compile(r"[A-Za-z0-9_.~/-]*")  # a key that URI-encodes to itself
# HMAC-SHA256 (RFC 2104) with a day's key: the hash of the key's inner and outer pads is kept, and
# a signature copies two hashes (hmac's own copy() costs three times as much, in Python).
_INNER_PAD = bytes(b ^ 0x36 for b in range(256))
_OUTER_PAD = bytes(b ^ 0x5C for b in range(256))


def _uri_encode(value: str, safe: str = "") -> str:
    return quote(value, safe="-_.~" + safe)


@functools.lru_cache(maxsize=256)
def _query_pair(name: str, value: str) -> str:
    """``&name=value`` encoded; cached: a download's ``response-content-type`` is one of few types."""
    return f"&{_uri_encode(name)}={_uri_encode(value)}"


def _key_path(key: str) -> str:
    return key if _PLAIN_KEY.fullmatch(key) else _uri_encode(key, safe="/")


class _Day:
    """What stays the same for a whole day of signatures: the signing key (its HMAC pads hashed),
    the credential scope and the canonical query up to its date."""

    def __init__(self, datestamp: str, secret_key: str, region: str, query_credential: str):
        key = ("AWS4" + secret_key).encode()
        for part in (datestamp, region, "s3", "aws4_request"):
            key = hmac.new(key, part.encode(), hashlib.sha256).digest()
        self.datestamp = datestamp
        block = key.ljust(64, b"\0")  # SHA-256's block size; the key is one digest, 32 bytes
        self.inner = hashlib.sha256(block.translate(_INNER_PAD))
        self.outer = hashlib.sha256(block.translate(_OUTER_PAD))
        self.scope = f"{datestamp}/{region}/s3/aws4_request"
        self.query_head = (
            f"X-Amz-Algorithm={_ALGORITHM}&X-Amz-Credential={query_credential}%2F{datestamp}%2F"
            f"{_uri_encode(region)}%2Fs3%2Faws4_request&X-Amz-Date="
        )


class Presigner:
    def __init__(self, endpoint_url: str, bucket: str, access_key: str, secret_key: str, region: str):
        parts = urlsplit(endpoint_url.rstrip("/"))
        # Everything constant is prepared once: per request only the date, the path and the
        # signature are computed (a signature is two SHA-256s: the canonical request, the HMAC).
        self._origin = f"{parts.scheme}://{parts.netloc}"
        self._host = parts.netloc
        self._host_header = f"host:{parts.netloc}\n"
        self._bucket_path = f"{parts.path}/{bucket}/"  # an endpoint may sit under a path
        self._secret_key = secret_key
        self._region = region
        self._query_credential = _uri_encode(access_key)
        self._day: _Day | None = None
        self._second: tuple[int, str] = (-1, "")

    def _day_of(self, datestamp: str) -> _Day:
        day = self._day
        if day is None or day.datestamp != datestamp:
            day = self._day = _Day(datestamp, self._secret_key, self._region, self._query_credential)
        return day

    def _amz_date(self, now: datetime | None) -> str:
        if now is not None:
            return now.strftime("%Y%m%dT%H%M%SZ")
        second = int(time.time())
        cached = self._second
        if cached[0] != second:
            cached = self._second = (second, time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(second)))
        return cached[1]

    def presign(
        self,
        method: str,
        key: str,
        expires_in: int,
        now: datetime | None = None,
        content_length: int | None = None,
        content_md5: str | None = None,
        query: dict[str, str] | None = None,
    ) -> str:
        """``content_length`` and ``content_md5`` (base64, a PUT): signed too, so the store refuses a
        body of another size, and one without that MD5 (the store checks ``Content-MD5``).
        ``query``: more parameters (``partNumber``, ``uploadId`` of a multipart upload's part)."""
        amz_date = self._amz_date(now)
        day = self._day_of(amz_date[:8])
        path = self._bucket_path + _key_path(key)
        # The parameters in their sorted order, encoded once: only the date and expiry vary.
        if content_length is None and content_md5 is None:  # a GET: the hot path, nothing to sort
            names, headers, encoded_names = "host", self._host_header, "host"
        else:
            signed = {"host": self._host}
            if content_length is not None:
                signed["content-length"] = str(int(content_length))
            if content_md5 is not None:
                signed["content-md5"] = content_md5
            names = ";".join(sorted(signed))
            headers = "".join(f"{name}:{signed[name]}\n" for name in sorted(signed))
            encoded_names = _uri_encode(names)
        canonical_query = (
            f"{day.query_head}{amz_date}&X-Amz-Expires={int(expires_in)}&X-Amz-SignedHeaders={encoded_names}"
        )
        if query:
            for name, value in sorted(query.items()):
                # Every extra name (lower case) sorts after the X-Amz- ones, as SigV4 orders them.
                canonical_query += _query_pair(name, value)
        canonical_request = f"{method}\n{path}\n{canonical_query}\n{headers}\n{names}\nUNSIGNED-PAYLOAD"
        string_to_sign = (
            f"{_ALGORITHM}\n{amz_date}\n{day.scope}\n{hashlib.sha256(canonical_request.encode()).hexdigest()}"
        )
        inner = day.inner.copy()
        inner.update(string_to_sign.encode())
        outer = day.outer.copy()
        outer.update(inner.digest())
        return f"{self._origin}{path}?{canonical_query}&X-Amz-Signature={outer.hexdigest()}"
