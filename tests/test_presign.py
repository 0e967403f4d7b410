"""The hand-written presigner must produce exactly what botocore produces."""

from datetime import datetime, timezone
from unittest import mock

import boto3
import pytest
from botocore.config import Config

from drive.presign import Presigner

MOMENT = datetime(2026, 5, 17, 1, 2, 3, tzinfo=timezone.utc)


def botocore_url(endpoint: str, method: str, key: str, expires: int) -> str:
    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id="AKIDEXAMPLE",
        aws_secret_access_key="wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
        region_name="auto",
        config=Config(signature_version="s3v4", s3={"addressing_style": "path"}),
    )
    operation = {"GET": "get_object", "PUT": "put_object"}[method]
    with mock.patch("botocore.auth.get_current_datetime", return_value=MOMENT.replace(tzinfo=None)):
        return client.generate_presigned_url(operation, Params={"Bucket": "kgpu", "Key": key}, ExpiresIn=expires)


@pytest.mark.parametrize("endpoint", ["http://127.0.0.1:9000", "https://abc.r2.cloudflarestorage.com"])
@pytest.mark.parametrize("method", ["GET", "PUT"])
@pytest.mark.parametrize(
    "key",
    ["users/1/a.txt", "users/1/sp ace/한글 파일.txt", "users/1/emoji-🚀+plus#hash%pct.bin", "users/1/a~b_c-d.e"],
)
def test_matches_botocore(endpoint, method, key):
    ours = Presigner(endpoint, "kgpu", "AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", "auto")
    assert ours.presign(method, key, 900, now=MOMENT) == botocore_url(endpoint, method, key, 900)
