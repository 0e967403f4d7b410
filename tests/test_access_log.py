"""The access log (gateway/access_log.py): one line per request, through its queue, and never a
token or a presigned URL's signature in it."""

import io
import logging
import queue

import pytest
import requests

from gateway import access_log

SIGNATURE = "5ec2e7" * 10 + "abcd"  # 64 hex digits, as in X-Amz-Signature


def logged_lines(stack, user) -> tuple[list[str], list[requests.Response]]:
    written = io.StringIO()
    handler = logging.StreamHandler(written)
    handler.setFormatter(logging.Formatter("%(name)s %(message)s"))
    writer = access_log.start(handler)
    try:
        presigned_query = (
            "?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKID%2F20260101%2Fauto%2Fs3%2Faws4_request"
            f"&X-Amz-Date=20260101T000000Z&X-Amz-Expires=300&X-Amz-SignedHeaders=host&X-Amz-Signature={SIGNATURE}"
        )
        replies = [
            # the cache is warm after the first: the fast path (gateway/edge.py) answers the second
            requests.get(f"{stack.base}/v1/files/log/a.txt{presigned_query}", headers=user.auth, allow_redirects=False)
            for _ in range(2)
        ]
        replies.append(requests.get(f"{stack.base}/v1/files/log/a.txt?json=1", headers=user.auth))  # the full app: 404
        replies.append(
            requests.get(f"{stack.base}/v1/me", headers={"Authorization": f"Bearer {user.token}x"})  # refused
        )
    finally:
        access_log.stop(writer)
    return written.getvalue().splitlines(), replies


def test_one_line_per_request_without_token_or_signature(stack, user):
    lines, replies = logged_lines(stack, user)
    assert [r.status_code for r in replies] == [302, 302, 404, 401]
    assert len(lines) == len(replies)
    for line, reply in zip(lines, replies):
        assert line.startswith("kgpu.access method=GET path=/v1/")
        assert f" status={reply.status_code} " in line
        assert f" request_id={reply.headers['X-Request-ID']} " in line
        assert "?" not in line
    text = "\n".join(lines)
    assert user.token not in text and user.token[6:] not in text
    assert SIGNATURE not in text and "X-Amz" not in text
    # a presigned GET handed out: its signature is not logged either
    assert replies[0].headers["Location"].rsplit("X-Amz-Signature=", 1)[1] not in text


def test_a_path_is_logged_on_one_line(stack, user):
    written = io.StringIO()
    writer = access_log.start(logging.StreamHandler(written))
    try:
        requests.get(f"{stack.base}/v1/files/a%0Ab%22c", headers=user.auth, allow_redirects=False)
    finally:
        access_log.stop(writer)
    assert written.getvalue().splitlines() == [written.getvalue().rstrip("\n")]
    assert "path=/v1/files/a%0Ab%22c " in written.getvalue()


def test_each_line_keeps_its_own_time_and_an_odd_path_stays_one_line():
    """The writer formats one record a millisecond and puts each line's fields in it: lines of
    other milliseconds carry their own time, and a path with a newline or a backslash is escaped."""
    written = io.StringIO()
    handler = logging.StreamHandler(written)
    formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s")
    handler.setFormatter(formatter)
    lines = queue.SimpleQueue()
    writer = access_log.Writer(lines, handler, 3600)
    base = 1_700_000_000.0
    moments = (base + 0.0001, base + 0.0004, base + 1.25, base + 61.5)
    for i, created in enumerate(moments):
        lines.put((created, ("GET", f"/v1/files/{i}", 302, 0.5, f"id{i}", "127.0.0.1")))
    odd = {"type": "http", "method": "GET", "raw_path": b"/v1/files/a\nb\\c\xff", "headers": [], "client": None}
    access_log._queue = lines
    try:
        access_log.record(odd, 404, "odd", 0.001)
    finally:
        access_log._queue = None
    writer.flush()
    written_lines = written.getvalue().splitlines()
    assert len(written_lines) == len(moments) + 1
    for i, (line, created) in enumerate(zip(written_lines, moments)):
        record = logging.LogRecord("kgpu.access", logging.INFO, "", 0, "", None, None)
        record.created, record.msecs = created, created % 1 * 1000
        stamp = formatter.formatTime(record)
        assert line == (
            f"{stamp} INFO kgpu.access method=GET path=/v1/files/{i} status=302 ms=0.50 request_id=id{i} client=127.0.0.1"
        )
    assert "path=/v1/files/a\\nb\\\\c\\xff status=404" in written_lines[-1]


@pytest.mark.parametrize("datefmt", [None, "%H%M%S", "%Y-%m-%dT%H:%M:%S"])
def test_a_time_of_any_shape_is_each_lines_own(datefmt):
    written = io.StringIO()
    handler = logging.StreamHandler(written)
    formatter = logging.Formatter("[%(asctime)s] %(message)s", datefmt=datefmt)
    handler.setFormatter(formatter)
    lines = queue.SimpleQueue()
    writer = access_log.Writer(lines, handler, 3600)
    moments = (1_700_006_400.0, 1_700_006_400.9994, 1_700_006_401.0, 1_700_006_401.0205)  # 00:00:00 UTC and after
    for created in moments:
        lines.put((created, ("GET", "/x", 200, 0.5, "id", "-")))
    writer.flush()
    for line, created in zip(written.getvalue().splitlines(), moments, strict=True):
        record = logging.LogRecord("kgpu.access", logging.INFO, "", 0, "", None, None)
        record.created, record.msecs = created, created % 1 * 1000
        assert line == f"[{formatter.formatTime(record, datefmt)}] method=GET path=/x status=200 ms=0.50 request_id=id client=-"
