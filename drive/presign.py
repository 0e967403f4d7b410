"""SigV4 query-string presigning for S3-compatible stores.

boto3's ``generate_presigned_url`` spends about 150 µs per call building a
whole botocore request; a presigned URL is four HMACs over a few strings.
Downloads are redirects (SPEC decision 3), so this is the hot path of every
``GET /v1/files/...``. The output is the same URL botocore produces for the
same instant (``tests/test_presign.py`` checks that, and the conformance suite
checks the embedded store accepts it and refuses a tampered one).
"""

from __future__ import annotations

import hashlib
import hmac
from datetime import datetime, timezone
from urllib.parse import quote, urlsplit

_ALGORITHM = "AWS4-HMAC-SHA256"


def _uri_encode(value: str, safe: str = "") -> str:
    return quote(value, safe="-_.~" + safe)


class Presigner:
    def __init__(self, endpoint_url: str, bucket: str, access_key: str, secret_key: str, region: str):
        parts = urlsplit(endpoint_url.rstrip("/"))
        self._origin = f"{parts.scheme}://{parts.netloc}"
        self._host = parts.netloc
        self._base_path = parts.path  # an endpoint may sit under a path
        self._bucket = bucket
        self._secret_key = secret_key
        self._region = region
        self._key_cache: tuple[str, bytes] | None = None
        self._encoded_key_id = _uri_encode(access_key)
        self._encoded_region = _uri_encode(region)

    def _signing_key(self, datestamp: str) -> bytes:
        cached = self._key_cache
        if cached and cached[0] == datestamp:
            return cached[1]
        key = ("AWS4" + self._secret_key).encode()
        for part in (datestamp, self._region, "s3", "aws4_request"):
            key = hmac.new(key, part.encode(), hashlib.sha256).digest()
        self._key_cache = (datestamp, key)
        return key

    def presign(
        self, method: str, key: str, expires_in: int, now: datetime | None = None, content_length: int | None = None
    ) -> str:
        """``content_length`` (a PUT): signed too, so the store refuses a body of another size."""
        now = now or datetime.now(timezone.utc)
        amz_date = now.strftime("%Y%m%dT%H%M%SZ")
        datestamp = amz_date[:8]
        scope = f"{datestamp}/{self._region}/s3/aws4_request"
        path = f"{self._base_path}/{self._bucket}/{_uri_encode(key, safe='/')}"
        # The parameters in their sorted order, encoded once: only the date and expiry vary.
        canonical_query = (
            f"X-Amz-Algorithm={_ALGORITHM}&X-Amz-Credential={self._encoded_key_id}%2F{datestamp}%2F"
            f"{self._encoded_region}%2Fs3%2Faws4_request&X-Amz-Date={amz_date}"
            f"&X-Amz-Expires={int(expires_in)}&X-Amz-SignedHeaders="
            + ("host" if content_length is None else "content-length%3Bhost")
        )
        if content_length is None:
            headers, signed = f"host:{self._host}", "host"
        else:
            headers, signed = f"content-length:{int(content_length)}\nhost:{self._host}", "content-length;host"
        canonical_request = "\n".join([method, path, canonical_query, headers, "", signed, "UNSIGNED-PAYLOAD"])
        string_to_sign = "\n".join(
            [_ALGORITHM, amz_date, scope, hashlib.sha256(canonical_request.encode()).hexdigest()]
        )
        signature = hmac.new(self._signing_key(datestamp), string_to_sign.encode(), hashlib.sha256).hexdigest()
        return f"{self._origin}{path}?{canonical_query}&X-Amz-Signature={signature}"
