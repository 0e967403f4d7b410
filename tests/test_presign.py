"""The hand-written presigner must produce exactly what botocore produces."""

from datetime import datetime, timezone
from unittest import mock
from urllib.parse import parse_qsl, urlsplit

import boto3
import pytest
from botocore.config import Config

from drive.presign import Presigner
from drive.store.s3 import S3ObjectStore

MOMENT = datetime(2026, 5, 17, 1, 2, 3, tzinfo=timezone.utc)


def botocore_url(endpoint: str, method: str, key: str, expires: int, params: dict | None = None) -> str:
    return botocore_url_at(MOMENT, endpoint, method, key, expires, params)


def botocore_url_at(moment: datetime, endpoint: str, method: str, key: str, expires: int, params: dict | None = None) -> str:
    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id="AKIDEXAMPLE",
        aws_secret_access_key="wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
        region_name="auto",
        config=Config(signature_version="s3v4", s3={"addressing_style": "path"}),
    )
    operation = {"GET": "get_object", "PUT": "put_object"}[method]
    with mock.patch("botocore.auth.get_current_datetime", return_value=moment.replace(tzinfo=None)):
        return client.generate_presigned_url(
            operation, Params={"Bucket": "kgpu", "Key": key, **(params or {})}, ExpiresIn=expires
        )


@pytest.mark.parametrize("endpoint", ["http://127.0.0.1:9000", "https://abc.r2.cloudflarestorage.com"])
@pytest.mark.parametrize("method", ["GET", "PUT"])
@pytest.mark.parametrize(
    "key",
    ["users/1/a.txt", "users/1/sp ace/한글 파일.txt", "users/1/emoji-🚀+plus#hash%pct.bin", "users/1/a~b_c-d.e"],
)
def test_matches_botocore(endpoint, method, key):
    ours = Presigner(endpoint, "kgpu", "AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", "auto")
    assert ours.presign(method, key, 900, now=MOMENT) == botocore_url(endpoint, method, key, 900)


def test_the_clock_and_the_day_are_taken_afresh():
    """Without ``now``, the clock of the moment is signed (cached per second, the signing key per
    day): the same URL botocore makes at that instant, on one day and on the next."""
    ours = Presigner("http://127.0.0.1:9000", "kgpu", "AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", "auto")
    for moment in (MOMENT, MOMENT.replace(day=18, hour=0, second=0), MOMENT.replace(day=18, hour=0, second=1)):
        with mock.patch("drive.presign.time.time", return_value=moment.timestamp()):
            url = ours.presign("GET", "users/1/a.txt", 300)
        assert url == botocore_url_at(moment, "http://127.0.0.1:9000", "GET", "users/1/a.txt", 300)
        assert f"X-Amz-Date={moment:%Y%m%dT%H%M%SZ}" in url


def test_a_signed_content_length_matches_botocore():
    ours = Presigner("http://127.0.0.1:9000", "kgpu", "AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", "auto")
    expected = botocore_url(
        "http://127.0.0.1:9000", "PUT", "users/1/sized.bin", 900, {"ContentLength": 1234}
    )
    assert ours.presign("PUT", "users/1/sized.bin", 900, now=MOMENT, content_length=1234) == expected
    assert ours.presign("PUT", "users/1/sized.bin", 900, now=MOMENT, content_length=1235) != expected


@pytest.mark.parametrize("kind", ["text/csv", "application/gzip", "application/vnd.ms-excel", "text/plain; charset=utf-8"])
def test_a_download_s_content_type_matches_botocore(kind):
    """The 302's presigned GET names the file's type (``response-content-type``, signed):
    drive/store/s3.py presign_get, the URL botocore makes with ``ResponseContentType``."""
    store = S3ObjectStore("http://127.0.0.1:9000", "AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", "kgpu", "auto")
    with mock.patch("drive.presign.time.time", return_value=MOMENT.timestamp()):
        url = store.presign_get("users/1/ünï.csv", 900, kind)
    expected = botocore_url("http://127.0.0.1:9000", "GET", "users/1/ünï.csv", 900, {"ResponseContentType": kind})
    assert _parts(url) == _parts(expected)  # botocore writes the same parameters in another order


def _parts(url: str) -> tuple:
    parts = urlsplit(url)
    return parts.scheme, parts.netloc, parts.path, sorted(parse_qsl(parts.query, keep_blank_values=True))
