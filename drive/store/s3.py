"""ObjectStore over any S3-compatible endpoint (rclone serve s3, moto, R2, S3) via boto3."""

from __future__ import annotations

import functools
import http.client
import re
import ssl
from datetime import datetime, timedelta, timezone
from typing import Callable, Sequence, TypeVar
from urllib.parse import urlsplit

import boto3
from botocore.config import Config
from botocore.parsers import DEFAULT_TIMESTAMP_PARSER as default_timestamp_parser
from botocore.exceptions import BotoCoreError, ClientError, ConnectionError as BotoConnectionError
from botocore.httpsession import get_cert_path

from drive.presign import Presigner
from drive.store import (
    CommonPrefix,
    ListPage,
    ObjectInfo,
    ObjectNotFound,
    PartsRefused,
    StoreError,
    StoreUnavailable,
    UploadedPart,
)

T = TypeVar("T")

_NOT_FOUND_CODES = {"404", "NoSuchKey", "NotFound", "NoSuchUpload", "NoSuchBucket"}


def _translate_errors(fn: Callable[..., T]) -> Callable[..., T]:
    """Map botocore failures onto the store's own exceptions."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            if code in _NOT_FOUND_CODES or status == 404:
                raise ObjectNotFound(code) from exc
            if status >= 500 or status == 0:
                raise StoreUnavailable(f"object store error {code or status}") from exc
            raise
        except (BotoConnectionError, BotoCoreError) as exc:
            raise StoreUnavailable(f"object store unreachable: {exc.__class__.__name__}") from exc

    return wrapper


def _parse_timestamp(value: str) -> datetime:
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return default_timestamp_parser(value)  # RFC 1123 dates in headers
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


STREAMED_PUT_URL_SECONDS = 3600  # a streamed PUT's URL outlives any body the idle timeout lets through
STORE_SOCKET_TIMEOUT = 120  # seconds a blocked send to, or read from, the store may take
MAX_ERROR_BODY = 64 << 10
_ERROR_CODE = re.compile(rb"<Code>([^<]{1,64})</Code>")


class _StreamedPut:
    """A presigned PUT (``Content-Length`` signed) sent with http.client, its body block by block:
    each block goes out in ``sendall`` calls that release the GIL, with nothing copied or hashed
    here (botocore would SHA-256 an http store's body once more to sign it)."""

    def __init__(self, url: str, size: int, content_type: str | None, tls: ssl.SSLContext):
        parts = urlsplit(url)
        if parts.scheme == "https":
            self._conn = http.client.HTTPSConnection(parts.netloc, timeout=STORE_SOCKET_TIMEOUT, context=tls)
        else:
            self._conn = http.client.HTTPConnection(parts.netloc, timeout=STORE_SOCKET_TIMEOUT)
        try:
            self._conn.putrequest("PUT", f"{parts.path}?{parts.query}", skip_host=True, skip_accept_encoding=True)
            self._conn.putheader("Host", parts.netloc)  # as signed, a default port included
            self._conn.putheader("Content-Length", str(size))
            if content_type:
                self._conn.putheader("Content-Type", content_type)
            self._conn.endheaders()
        except OSError as exc:
            self._conn.close()
            raise StoreUnavailable(f"object store unreachable: {exc.__class__.__name__}") from exc

    def send(self, chunks: Sequence[bytes]) -> None:
        try:
            for chunk in chunks:
                self._conn.send(chunk)
        except OSError as exc:
            raise self._refusal(exc) from exc

    def finish(self) -> str:
        try:
            answer = self._conn.getresponse()
            body = answer.read(MAX_ERROR_BODY) if answer.status != 200 else answer.read()
        except (OSError, http.client.HTTPException) as exc:
            self._conn.close()
            raise StoreUnavailable(f"object store unreachable: {exc.__class__.__name__}") from exc
        self._conn.close()
        if answer.status == 200:
            return answer.getheader("ETag", "")
        raise _error_of(answer.status, body)

    def abort(self) -> None:
        self._conn.close()

    def _refusal(self, cause: OSError) -> StoreError:
        """The store stopped reading: its answer says why, when it sent one before closing."""
        try:
            self._conn.sock.settimeout(3)
            answer = self._conn.getresponse()
            error = _error_of(answer.status, answer.read(MAX_ERROR_BODY))
        except Exception:
            error = StoreUnavailable(f"object store unreachable: {cause.__class__.__name__}")
        self._conn.close()
        return error


def _error_of(status: int, body: bytes) -> StoreError:
    found = _ERROR_CODE.search(body)
    code = found.group(1).decode(errors="replace") if found else str(status)
    if status == 404:
        return ObjectNotFound(code)
    if status >= 500:
        return StoreUnavailable(f"object store error {code}")
    return StoreError(f"object store refused the upload: {status} {code}")


def _tls_context(session: boto3.session.Session) -> ssl.SSLContext:
    """What the streamed PUTs (http.client) verify the store's certificate with: the CA bundle
    boto3's calls use, so both trust the same store (AWS_CA_BUNDLE or the profile's ca_bundle,
    else the certifi bundle botocore ships with)."""
    return ssl.create_default_context(cafile=get_cert_path(session._session.get_config_variable("ca_bundle") or True))


class S3ObjectStore:
    multipart_etag_is_md5 = False  # "…-N" on R2, S3 and moto
    serving = True  # a store elsewhere: whether it answers is found out by asking it

    def __init__(
        self,
        endpoint_url: str,
        access_key: str,
        secret_key: str,
        bucket: str,
        region: str = "us-east-1",
        public_endpoint_url: str | None = None,
        put_etag_is_md5: bool = True,
    ):
        self.bucket = bucket
        # True of R2, rclone serve s3, moto, MinIO and S3 without SSE-KMS or SSE-C (KGPU_S3_PUT_ETAG_IS_MD5).
        self.put_etag_is_md5 = put_etag_is_md5
        self.endpoint_url = endpoint_url
        self.presign_endpoint_url = public_endpoint_url or endpoint_url  # where presigned URLs lead
        config = Config(
            signature_version="s3v4",
            # The body is not signed: SHA-256 of every byte once more (for a store over http) costs
            # as much CPU as the upload's own hashes; presigned PUTs are UNSIGNED-PAYLOAD too.
            s3={"addressing_style": "path", "payload_signing_enabled": False},
            retries={"max_attempts": 2, "mode": "standard"},
            connect_timeout=3,
            read_timeout=120,
            max_pool_connections=32,
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        session = boto3.session.Session()
        # botocore parses every listed date with dateutil; S3 dates are ISO 8601, which
        # fromisoformat reads several times faster (a 10,000-object folder listing: -0.5 s).
        session._session.get_component("response_parser_factory").set_parser_defaults(
            timestamp_parser=_parse_timestamp
        )
        self._client = session.client(
            "s3",
            endpoint_url=endpoint_url,
            aws_access_key_id=access_key,
            aws_secret_access_key=secret_key,
            region_name=region,
            config=config,
        )
        self._presigner = Presigner(public_endpoint_url or endpoint_url, bucket, access_key, secret_key, region)
        self._tls = _tls_context(session)

    @_translate_errors
    def ensure_bucket(self) -> None:
        try:
            self._client.head_bucket(Bucket=self.bucket)
        except ClientError as exc:
            if exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") != 404:
                raise
            self._client.create_bucket(Bucket=self.bucket)

    @_translate_errors
    def put_object(self, key: str, data: bytes, content_type: str | None = None) -> str:
        extra = {"ContentType": content_type} if content_type else {}
        return self._client.put_object(Bucket=self.bucket, Key=key, Body=data, **extra)["ETag"]

    def open_put(self, key: str, size: int, content_type: str | None = None) -> _StreamedPut:
        url = self.presign_put(key, STREAMED_PUT_URL_SECONDS, content_length=size)
        return _StreamedPut(url, size, content_type, self._tls)

    @_translate_errors
    def head(self, key: str) -> ObjectInfo | None:
        try:
            meta = self._client.head_object(Bucket=self.bucket, Key=key)
        except ClientError as exc:
            if exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") in (404, 403):
                # 403: stores answer it for a HEAD under a key whose "parent" is a file.
                return None
            raise
        return ObjectInfo(
            key=key,
            size=meta["ContentLength"],
            etag=meta["ETag"],
            last_modified=meta["LastModified"],
            content_type=meta.get("ContentType"),
        )

    @_translate_errors
    def list_page(
        self, prefix: str, delimiter: str | None = None, token: str | None = None, max_keys: int = 1000
    ) -> ListPage:
        params: dict = {"Bucket": self.bucket, "Prefix": prefix, "MaxKeys": max_keys}
        if delimiter:
            params["Delimiter"] = delimiter
        if token:
            params["ContinuationToken"] = token
        reply = self._client.list_objects_v2(**params)
        entries: list[ObjectInfo | CommonPrefix] = [
            CommonPrefix(p["Prefix"]) for p in reply.get("CommonPrefixes", [])
        ]
        entries += [
            ObjectInfo(key=o["Key"], size=o["Size"], etag=o.get("ETag", ""), last_modified=o["LastModified"])
            for o in reply.get("Contents", [])
        ]
        next_token = reply.get("NextContinuationToken") if reply.get("IsTruncated") else None
        return ListPage(entries=entries, next_token=next_token)

    @_translate_errors
    def delete(self, key: str) -> None:
        self._client.delete_object(Bucket=self.bucket, Key=key)

    @_translate_errors
    def delete_many(self, keys: list[str]) -> None:
        for start in range(0, len(keys), 1000):
            batch = keys[start : start + 1000]
            self._client.delete_objects(
                Bucket=self.bucket, Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True}
            )

    @_translate_errors
    def copy(self, src_key: str, dst_key: str) -> str:
        reply = self._client.copy_object(
            Bucket=self.bucket, Key=dst_key, CopySource={"Bucket": self.bucket, "Key": src_key}
        )
        return reply.get("CopyObjectResult", {}).get("ETag", "")

    def presign_get(self, key: str, expires_in: int, content_type: str | None = None) -> str:
        query = {"response-content-type": content_type} if content_type else None
        return self._presigner.presign("GET", key, expires_in, query=query)

    def presign_put(
        self, key: str, expires_in: int, content_length: int | None = None, content_md5: str | None = None
    ) -> str:
        return self._presigner.presign("PUT", key, expires_in, content_length=content_length, content_md5=content_md5)

    def presign_part(
        self, key: str, upload_id: str, number: int, expires_in: int, content_length: int, content_md5: str | None = None
    ) -> str:
        return self._presigner.presign(
            "PUT", key, expires_in, content_length=content_length, content_md5=content_md5,
            query={"partNumber": str(number), "uploadId": upload_id},
        )

    @_translate_errors
    def create_multipart(self, key: str, content_type: str | None = None) -> str:
        extra = {"ContentType": content_type} if content_type else {}
        return self._client.create_multipart_upload(Bucket=self.bucket, Key=key, **extra)["UploadId"]

    @_translate_errors
    def upload_part(self, key: str, upload_id: str, number: int, data: bytes) -> UploadedPart:
        reply = self._client.upload_part(
            Bucket=self.bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=data
        )
        return UploadedPart(number=number, etag=reply["ETag"])

    def open_part(self, key: str, upload_id: str, number: int, size: int) -> _StreamedPut:
        url = self.presign_part(key, upload_id, number, STREAMED_PUT_URL_SECONDS, size)
        return _StreamedPut(url, size, None, self._tls)

    @_translate_errors
    def complete_multipart(self, key: str, upload_id: str, parts: list[UploadedPart]) -> str:
        try:
            reply = self._client.complete_multipart_upload(
                Bucket=self.bucket,
                Key=key,
                UploadId=upload_id,
                MultipartUpload={"Parts": [{"PartNumber": p.number, "ETag": p.etag} for p in parts]},
            )
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 400:
                raise PartsRefused(f"the store refused the parts ({code})") from None
            raise
        return reply["ETag"]

    @_translate_errors
    def abort_multipart(self, key: str, upload_id: str) -> None:
        self._client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)

    @_translate_errors
    def abort_stale_multiparts(self, older_than_seconds: float) -> int:
        cutoff = datetime.now(timezone.utc) - timedelta(seconds=older_than_seconds)
        aborted = 0
        try:
            pages = list(self._client.get_paginator("list_multipart_uploads").paginate(Bucket=self.bucket))
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") == "NoSuchUpload":  # rclone serve s3, with none
                return 0
            raise
        for page in pages:
            for upload in page.get("Uploads") or []:
                started = upload.get("Initiated")
                if started is not None and started.tzinfo is None:
                    started = started.replace(tzinfo=timezone.utc)
                if started is None or started <= cutoff:
                    try:
                        self._client.abort_multipart_upload(Bucket=self.bucket, Key=upload["Key"], UploadId=upload["UploadId"])
                        aborted += 1
                    except ClientError as exc:
                        if exc.response.get("Error", {}).get("Code") != "NoSuchUpload":  # finished meanwhile
                            raise
        return aborted
