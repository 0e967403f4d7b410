"""A download's 302 on the wire, from `kgpu serve` itself: the edge's answer (gateway/edge.py) as
a client reads it, pipelined among answers of the full application, a hostile tenant's inputs
passed on to it, and the log line and count of each 302 (behind a proxy too)."""

from __future__ import annotations

import re
import socket

import pytest
import requests

from tests.conftest import passable
from tests.test_metrics import scrape, value
from tests.test_serve import Served
from tests.test_serve_workers import wait_for


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = passable(tmp_path_factory.mktemp("protocol"))
    log = root / "serve.log"
    server = Served(root / "data", log_path=log)
    admin = {"Authorization": f"Bearer {Served.admin_token}"}
    made = requests.post(f"{server.base}/v1/admin/users", json={"email": "wire@lab.example"}, headers=admin)
    assert made.status_code == 201, made.text
    server.token = made.json()["token"]
    server.admin = admin
    server.log = log
    put = requests.put(f"{server.base}/v1/files/wire/a.txt", data=b"on the wire", headers={"Authorization": f"Bearer {server.token}", "Expect": ""})
    assert put.status_code == 201, put.text
    yield server
    server.process.terminate()
    server.process.wait(timeout=30)


def get(path: str, token: str, request_id: str, extra: str = "", version: str = "1.1") -> bytes:
    return (
        f"GET {path} HTTP/{version}\r\nHost: kgpu\r\nAuthorization: Bearer {token}\r\nX-Request-ID: {request_id}\r\n{extra}\r\n"
    ).encode()


def exchange(server: Served, data: bytes, answers: int, closes: bool = False) -> list[tuple[int, dict[str, str], bytes]]:
    """Send ``data`` in one write; read ``answers`` responses: (status, headers, body) each. With
    ``closes``, the server must then close the connection."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as conn:
        conn.sendall(data)
        buffer, found = b"", []
        while len(found) < answers:
            end = buffer.find(b"\r\n\r\n")
            if end >= 0:
                head, rest = buffer[:end].decode("latin-1"), buffer[end + 4 :]
                status_line, *lines = head.split("\r\n")
                headers = {}
                for line in lines:
                    name, _, field = line.partition(":")
                    assert name.lower() not in headers, f"{name} sent twice"
                    headers[name.lower()] = field.strip()
                length = int(headers.get("content-length", "0"))
                if len(rest) >= length:
                    found.append((int(status_line.split()[1]), headers, rest[:length]))
                    buffer = rest[length:]
                    continue
            chunk = conn.recv(65536)
            assert chunk, f"the connection closed after {len(found)} of {answers} answers"
            buffer += chunk
        assert buffer == b"", f"more than {answers} answers: {buffer[:200]!r}"
        if closes:
            assert conn.recv(65536) == b"", "the server kept the connection open"
        return found


def assert_redirect(answer, request_id: str, name: str) -> None:
    status, headers, body = answer
    assert status == 302, (status, headers, body)
    assert headers["x-request-id"] == request_id
    assert re.fullmatch(rf"http://127\.0\.0\.1:\d+/kgpu/users/\d+/wire/{name}\?X-Amz-Algorithm=.*&X-Amz-Signature=[0-9a-f]{{64}}", headers["location"])
    assert headers["cache-control"] == "no-store" and headers["content-length"] == "0" and body == b""
    assert "date" in headers and "server" not in headers  # HTTP's Date, and no banner naming the server


def test_the_302_is_the_edges_answer_and_the_store_serves_it(served):
    [answer] = exchange(served, get("/v1/files/wire/a.txt", served.token, "one-0001"), 1)
    assert_redirect(answer, "one-0001", "a.txt")
    fetched = requests.get(answer[1]["location"])
    assert fetched.status_code == 200 and fetched.content == b"on the wire"
    assert fetched.headers["content-type"].startswith("text/plain")
    # FastAPI's route (a query string the edge leaves to it) answers the same file with the same kind of 302.
    via_asgi = requests.get(f"{served.base}/v1/files/wire/a.txt?download=1", headers={"Authorization": f"Bearer {served.token}"}, allow_redirects=False)
    assert via_asgi.status_code == 302 and via_asgi.headers["location"].split("?")[0] == answer[1]["location"].split("?")[0]


def test_pipelined_answers_keep_their_order_whichever_layer_answers(served):
    token = served.token
    data = (
        get("/v1/files/wire/a.txt", token, "pipe-0001")  # the protocol
        + get("/v1/me", token, "pipe-0002")  # FastAPI, in flight while the next arrives
        + get("/v1/files/wire/b.txt", token, "pipe-0003")  # must wait for the one before
        + get("/v1/files/wire/missing?json=1", token, "pipe-0004")  # FastAPI: 404
        + get("/v1/files/wire/c.txt", token, "pipe-0005")
    )
    answers = exchange(served, data, 5)
    assert [headers["x-request-id"] for _, headers, _ in answers] == [f"pipe-000{n}" for n in range(1, 6)]
    assert_redirect(answers[0], "pipe-0001", "a.txt")
    assert answers[1][0] == 200 and b"wire@lab.example" in answers[1][2]
    assert_redirect(answers[2], "pipe-0003", "b.txt")
    assert answers[3][0] == 404 and b'"error_code"' in answers[3][2]
    assert_redirect(answers[4], "pipe-0005", "c.txt")


def test_what_the_edge_does_not_answer_still_gets_its_answer(served):
    """A hostile tenant's inputs: each goes on to the full application and gets its 4xx there."""
    token = served.token
    cases = [
        (get("/v1/files/wire/a%0d%0aSet-Cookie:%20x=1", token, "bad-0001"), 400),  # a control character
        (get("/v1/files/wire/../../2/secret", token, "bad-0002"), 400),  # a dot segment out of the drive
        (get("/v1/files/wire/a.txt", "kgpu_" + "0" * 48, "bad-0003"), 401),  # a token nobody has
        (get("/v1/files/wire/a.txt", token, "bad-0004", "Expect: 100-continue\r\nContent-Length: 0\r\n"), 302),
    ]
    answers = exchange(served, b"".join(data for data, _ in cases), len(cases))
    for (status, headers, body), (_, wanted), n in zip(answers, cases, range(1, 5)):
        assert status == wanted, (n, status, body)
        assert headers["x-request-id"] == f"bad-000{n}"
        assert "set-cookie" not in headers
        if status >= 400:
            assert b'"error_code"' in body


def test_each_302_is_logged_with_its_client_and_counted(served):
    before = value(scrape(served.base, served.admin), "kgpu_http_requests_total", family="files", status="302")
    forwarded = get("/v1/files/wire/a.txt", served.token, "log-00001", "X-Forwarded-For: 203.0.113.9\r\n")
    answers = exchange(served, forwarded + get("/v1/files/wire/a.txt", served.token, "log-00002"), 2)
    assert [a[0] for a in answers] == [302, 302]
    wait_for("both 302s counted", lambda: value(scrape(served.base, served.admin), "kgpu_http_requests_total", family="files", status="302") >= before + 2, 10)

    def lines() -> dict[str, str]:
        found = {}
        for line in served.log.read_text().splitlines():
            for request_id in ("log-00001", "log-00002"):
                if f"request_id={request_id}" in line:
                    found[request_id] = line
        return found

    wait_for("both lines written", lambda: len(lines()) == 2, 10)
    logged = lines()
    # From a trusted proxy (127.0.0.1), X-Forwarded-For names the client, as it does under ASGI.
    assert "method=GET path=/v1/files/wire/a.txt status=302" in logged["log-00001"]
    assert logged["log-00001"].endswith("client=203.0.113.9")
    assert logged["log-00002"].endswith("client=127.0.0.1")
    text = served.log.read_text()
    assert served.token not in text and "X-Amz-Signature" not in text
