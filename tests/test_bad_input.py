"""Bad input is a clear 4xx in the envelope, never a 5xx, and never loses a file (issue 12).

Each test here failed on the code before the fix: a 500 (or wsgidav's HTML page), a 503 that
made clients retry forever, a name that broke every later listing, or a COPY that clobbered
a file.
"""

from __future__ import annotations

import http.client
import subprocess
import xml.etree.ElementTree as ET
from urllib.parse import quote, urlsplit

import pytest
import requests

from tests.clients import curl, raw_request

D = "{DAV:}"
BIG = 2**63  # one past the largest 64-bit integer a database column holds


def assert_envelope(reply: requests.Response, status: int, error_code: str | None = None) -> dict:
    assert reply.status_code == status, (reply.status_code, reply.headers.get("content-type"), reply.text[:500])
    assert reply.headers["content-type"].startswith("application/json"), reply.text[:300]
    body = reply.json()
    assert set(body) == {"error_code", "message", "trace_id"}, body
    assert body["trace_id"] == reply.headers["x-request-id"]
    assert body["message"]
    if error_code is not None:
        assert body["error_code"] == error_code, body
    return body


def raw(stack, method: str, path: str, headers: dict[str, str], body: bytes = b"") -> tuple[int, dict, bytes]:
    """A request with headers exactly as given (requests would refuse or rewrite some)."""
    parts = urlsplit(stack.base)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    try:
        connection.putrequest(method, path, skip_accept_encoding=True)
        for name, value in headers.items():
            connection.putheader(name, value)
        connection.putheader("Content-Length", str(len(body)))
        connection.endheaders(body)
        answer = connection.getresponse()
        return answer.status, {k.lower(): v for k, v in answer.getheaders()}, answer.read()
    finally:
        connection.close()


def put(stack, account, rel: str, data: bytes) -> None:
    reply = requests.put(f"{stack.base}/v1/files/{quote(rel)}", data=data, headers=account.auth)
    assert reply.status_code in (200, 201), reply.text


def content(stack, account, rel: str) -> bytes | None:
    reply = requests.get(f"{stack.base}/v1/files/{quote(rel)}", headers=account.auth)
    if reply.status_code == 404:
        return None
    assert reply.status_code == 200, (rel, reply.status_code, reply.text[:200])
    return reply.content


def dav(stack, account, method: str, rel: str, mount: str = "files", **headers) -> requests.Response:
    url = f"{stack.base}/v1/{mount}/{rel}"
    return requests.request(method, url, headers={**account.auth, **headers}, allow_redirects=False)


def propfind_ok(stack, account, rel: str) -> list[str]:
    """The names a Depth 1 PROPFIND lists, checking the answer is well-formed XML."""
    reply = dav(stack, account, "PROPFIND", rel, Depth="1")
    assert reply.status_code == 207, reply.text[:300]
    return [href.text for href in ET.fromstring(reply.content).iter(f"{D}href")]


# ------------------------------------------------------------------ integers and strings


@pytest.mark.parametrize(
    "method,path,body",
    [
        ("PATCH", "/v1/admin/users/{BIG}", {"name": "x"}),
        ("POST", "/v1/admin/users/{BIG}/token", None),
        ("POST", "/v1/admin/users/{BIG}/credits", {"credits": 1}),
        ("POST", "/v1/admin/users/{uid}/credits", {"credits": BIG}),
        ("POST", "/v1/admin/users/{uid}/credits", {"credits": -BIG}),
        ("POST", "/v1/admin/users", {"email": "big@lab.example", "credits": BIG}),
        ("POST", "/v1/admin/orgs", {"slug": "bigowner", "owner_user_id": BIG}),
        ("POST", "/v1/admin/orgs/{org}/members", {"user_id": BIG, "role": "member"}),
        ("DELETE", "/v1/admin/orgs/{org}/members/{BIG}", None),
    ],
)
def test_huge_integers_are_a_4xx(stack, user, method, path, body):
    org = "big-" + str(user.id)
    made = requests.post(f"{stack.base}/v1/admin/orgs", json={"slug": org}, headers=stack.admin)
    assert made.status_code in (201, 409)
    url = stack.base + path.format(BIG=BIG, uid=user.id, org=org)
    reply = requests.request(method, url, json=body, headers=stack.admin)
    assert 400 <= reply.status_code < 500, (reply.status_code, reply.text)
    assert_envelope(reply, reply.status_code)
    me = requests.get(f"{stack.base}/v1/me", headers=user.auth).json()["user"]
    assert me["credits"] == stack.settings.starting_credits  # nothing moved


def test_credits_cannot_overflow_the_balance(stack, user):
    url = f"{stack.base}/v1/admin/users/{user.id}/credits"
    first = requests.post(url, json={"credits": 2**62}, headers=stack.admin)
    if first.status_code == 200:  # a grant this large may be refused outright; if not, the sum must be
        reply = requests.post(url, json={"credits": 2**62}, headers=stack.admin)
        assert_envelope(reply, 422, "validation_error")
    else:
        assert_envelope(first, 422, "validation_error")


@pytest.mark.parametrize(
    "path",
    [
        "/v1/gpus/gpu-%00",
        "/v1/runs/run-ab%00cd-1234",
        "/v1/runs?gpu_id=gpu-%00",
        "/v1/runs/run-abcd-1234?gpu_id=gpu-%00",
    ],
)
def test_nul_in_ids_is_a_404(stack, user, path):
    assert_envelope(requests.get(stack.base + path, headers=user.auth), 404)


@pytest.mark.parametrize(
    "method,path,body",
    [
        ("POST", "/v1/admin/users", {"email": "nul\x00@lab.example"}),
        ("POST", "/v1/admin/users", {"email": "nulname@lab.example", "name": "a\x00b"}),
        ("PATCH", "/v1/admin/users/{uid}", {"name": "a\x00b"}),
        ("POST", "/v1/admin/orgs", {"slug": "nulorg", "name": "a\x00b"}),
        ("POST", "/v1/admin/users", {"email": "surrogate@lab.example", "name": "\ud800"}),
    ],
)
def test_nul_in_stored_text_is_a_422(stack, user, method, path, body):
    """A NUL cannot be stored in a PostgreSQL text column (a 500 there before)."""
    reply = requests.request(method, stack.base + path.format(uid=user.id), json=body, headers=stack.admin)
    assert_envelope(reply, 422, "validation_error")
    assert requests.get(f"{stack.base}/v1/me", headers=user.auth).json()["user"]["name"] == "Test Researcher"


@pytest.fixture(scope="module")
def rented(stack):
    """One rental per stack, shared by the run tests below."""
    account = stack.new_user(name="runner")
    reply = requests.post(f"{stack.base}/v1/gpus", json={"name": "bad-input"}, headers=account.auth)
    assert reply.status_code == 201, reply.text
    gpu = reply.json()["gpu_id"]
    yield account, gpu
    requests.delete(f"{stack.base}/v1/gpus/{gpu}", headers=account.auth)


def start_run(stack, account, gpu: str, **body) -> requests.Response:
    return requests.post(
        f"{stack.base}/v1/runs", json={"gpu_id": gpu, "wait_seconds": 10, **body}, headers=account.auth
    )


@pytest.mark.parametrize(
    "body",
    [
        {"command": ["echo", "a\x00b"]},
        {"command": ["echo\x00", "x"]},
        {"command": ["true"], "env": {"X": "a\x00b"}},
        {"command": ["true"], "env": {"X": "x" * (3 << 20)}},
        {"command": ["true"], "env": {f"V{n}": "x" * 1000 for n in range(3000)}},
        {"command": ["echo", "x" * (3 << 20)]},
        {"command": ["echo"] + ["x" * 1000] * 3000},
        {"command": ["true"], "gpu_id": "gpu-\x00"},
    ],
    ids=["nul-argv", "nul-argv0", "nul-env", "env-3MB", "env-3000-vars", "argv-3MB", "argv-3000", "nul-gpu-id"],
)
def test_bad_runs_are_refused_and_the_pod_still_runs(stack, rented, body):
    account, gpu = rented
    body = dict(body)  # the parameter is shared by every stack
    reply = start_run(stack, account, body.pop("gpu_id", gpu), **body)
    assert 400 <= reply.status_code < 500, (reply.status_code, reply.text[:300])
    assert_envelope(reply, reply.status_code)
    fine = start_run(stack, account, gpu, command=["sh", "-c", "echo ok"])
    assert fine.status_code == 200 and fine.json()["stdout"] == "ok\n", fine.text[:300]


def test_a_run_id_that_cannot_exist_is_a_404(stack, rented):
    account, gpu = rented
    hexpart = gpu.removeprefix("gpu-")
    for run_id in (f"run-{hexpart}-ab%00", f"run-{hexpart}-ABC", f"run-{hexpart}-" + "a" * 5000):
        for method in ("GET", "DELETE"):
            reply = requests.request(method, f"{stack.base}/v1/runs/{run_id}", headers=account.auth)
            assert_envelope(reply, 404, "run_not_found")
        stream = requests.get(f"{stack.base}/v1/runs/{run_id}/stream", headers=account.auth)
        assert_envelope(stream, 404, "run_not_found")


@pytest.mark.parametrize(
    "body",
    [
        {"env": {"X": "a\x00b"}},
        {"env": {"X": "x" * (3 << 20)}},
        {"memory": "9" * 400 + "Ti"},
        {"cpu": "9" * 400},
        {"gpu_model": "x" * 100_000},
        {"duration_hours": BIG},
    ],
    ids=["nul-env", "env-3MB", "huge-memory", "huge-cpu", "long-model", "huge-duration"],
)
def test_bad_rentals_are_refused(stack, user, body):
    reply = requests.post(f"{stack.base}/v1/gpus", json={"name": "bad", **body}, headers=user.auth)
    assert_envelope(reply, 422, "validation_error")
    mine = requests.get(f"{stack.base}/v1/gpus", headers=user.auth).json()
    assert mine["my_gpus"] == []  # nothing was rented


# ------------------------------------------------------------------ names


XML_INVALID = ["\ufffe", "\uffff", "a\ufffeb.txt", "x\uffff"]


@pytest.mark.parametrize("name", XML_INVALID, ids=["fffe", "ffff", "inner-fffe", "trailing-ffff"])
def test_xml_invalid_names_are_refused_on_every_write(stack, user, name):
    put(stack, user, "names/keep.txt", b"keep")
    encoded = quote(name)
    writes = {
        "PUT": requests.put(f"{stack.base}/v1/files/names/{encoded}", data=b"x", headers=user.auth),
        "PUT expect": requests.put(
            f"{stack.base}/v1/files/names/{encoded}", data=b"x", headers={**user.auth, "Expect": "100-continue"},
            allow_redirects=False,
        ),
        "POST": requests.post(f"{stack.base}/v1/files/names/{encoded}", data=b"x", headers=user.auth),
        "POST mint": requests.post(f"{stack.base}/v1/files/names/{encoded}", headers=user.auth),
        "PUT dav": dav(stack, user, "PUT", f"names/{encoded}", mount="dav"),
        "MKCOL": dav(stack, user, "MKCOL", f"names/{encoded}/"),
        "MKCOL dav": dav(stack, user, "MKCOL", f"names/{encoded}/", mount="dav"),
        "COPY": dav(stack, user, "COPY", "names/keep.txt", Destination=f"{stack.base}/v1/files/names/{encoded}"),
        "MOVE": dav(stack, user, "MOVE", "names/keep.txt", Destination=f"{stack.base}/v1/files/names/{encoded}"),
        "folder": requests.put(f"{stack.base}/v1/files/names/{encoded}/in.txt", data=b"x", headers=user.auth),
    }
    for how, reply in writes.items():
        body = assert_envelope(reply, 400, "invalid_path")
        assert "XML" in body["message"] or "character" in body["message"], (how, body)
    hrefs = propfind_ok(stack, user, "names/")  # the folder still lists as well-formed XML
    assert hrefs == ["/v1/files/names/", "/v1/files/names/keep.txt"]
    assert content(stack, user, "names/keep.txt") == b"keep"


def test_a_256_byte_name_is_a_400_without_a_trace(stack, user):
    put(stack, user, "long/keep.txt", b"keep")
    for name in ("a" * 256, "é" * 128, "a" * 200 + "😀" * 14):
        assert len(name.encode()) >= 256
        for reply in (
            requests.put(f"{stack.base}/v1/files/long/{quote(name)}", data=b"x", headers=user.auth),
            requests.put(f"{stack.base}/v1/files/long/{quote(name)}/inner.txt", data=b"x", headers=user.auth),
            dav(stack, user, "MKCOL", f"long/{quote(name)}/"),
            dav(stack, user, "COPY", "long/keep.txt", Destination=f"{stack.base}/v1/files/long/{quote(name)}"),
        ):
            body = assert_envelope(reply, 400, "invalid_path")
            assert "255" in body["message"] and "retry-after" not in reply.headers
    assert propfind_ok(stack, user, "long/") == ["/v1/files/long/", "/v1/files/long/keep.txt"]
    listed = requests.get(f"{stack.base}/v1/files/long/?json=1", headers=user.auth).json()["entries"]
    assert [entry["name"] for entry in listed] == ["keep.txt"]  # no phantom entry
    put(stack, user, "long/" + "a" * 255, b"fits")  # 255 bytes is the limit, and fits
    assert content(stack, user, "long/" + "a" * 255) == b"fits"


# ------------------------------------------------------------------ WebDAV


@pytest.mark.parametrize("name", [" ", "%20%20", "%09", "%C2%A0"], ids=["space", "spaces", "tab", "nbsp"])
def test_whitespace_only_names_are_a_400(stack, user, name):
    put(stack, user, "ws/keep.txt", b"keep")
    # A header value loses its trailing whitespace on the way (RFC 9110 5.5), so a client names
    # a Destination that ends in a space percent-encoded; a request line's path is encoded by requests.
    destination = f"{stack.base}/v1/files/ws/{name.replace(' ', '%20')}"
    for reply in (
        dav(stack, user, "MKCOL", f"ws/{name}/"),
        dav(stack, user, "MKCOL", f"ws/{name}"),
        dav(stack, user, "PROPFIND", f"ws/{name}", Depth="0"),
        dav(stack, user, "PUT", f"ws/{name}", mount="dav"),
        requests.put(f"{stack.base}/v1/files/ws/{name}", data=b"x", headers=user.auth),
        dav(stack, user, "COPY", "ws/keep.txt", Destination=destination),
        dav(stack, user, "MOVE", "ws/keep.txt", Destination=destination),
    ):
        assert_envelope(reply, 400, "invalid_path")
    assert content(stack, user, "ws/keep.txt") == b"keep"


@pytest.mark.parametrize("method", ["COPY", "MOVE"])
@pytest.mark.parametrize("mount", ["files", "dav"])
def test_copy_or_move_onto_the_root_is_a_4xx(stack, user, method, mount):
    put(stack, user, "root/keep.txt", b"keep")
    for destination in (f"{stack.base}/v1/{mount}/", f"{stack.base}/v1/{mount}", f"/v1/{mount}/"):
        for source in ("root/keep.txt", "root/"):
            reply = dav(stack, user, method, source, mount=mount, Destination=destination)
            assert 400 <= reply.status_code < 500, (destination, source, reply.status_code, reply.text[:300])
            assert_envelope(reply, reply.status_code)
    assert content(stack, user, "root/keep.txt") == b"keep"


@pytest.mark.parametrize("method", ["COPY", "MOVE"])
@pytest.mark.parametrize("mount", ["files", "dav"])
@pytest.mark.parametrize("suffix,name", [(";v2", ";v2"), ("%3Bv2", ";v2"), ("%3F", "?"), (";", ";"), ("%3Fx=1", "?x=1")])
def test_destination_semicolons_and_question_marks_are_part_of_the_name(stack, user, method, mount, suffix, name):
    """RFC 4918: the Destination is a URI whose path is the name; ';' does not start parameters."""
    put(stack, user, f"sc-{method}/report.txt", b"report")
    put(stack, user, f"sc-{method}/src.txt", b"source")
    destination = f"{stack.base}/v1/{mount}/sc-{method}/report.txt{suffix}"
    reply = dav(stack, user, method, f"sc-{method}/src.txt", mount=mount, Destination=destination)
    assert reply.status_code in (201, 204), (reply.status_code, reply.text[:300])
    assert content(stack, user, f"sc-{method}/report.txt") == b"report"  # not overwritten
    assert content(stack, user, f"sc-{method}/report.txt{name}") == b"source"
    assert (content(stack, user, f"sc-{method}/src.txt") is None) == (method == "MOVE")
    listed = propfind_ok(stack, user, f"sc-{method}/")
    assert f"/v1/files/sc-{method}/{quote('report.txt' + name)}" in listed
    requests.delete(f"{stack.base}/v1/files/sc-{method}/", headers=user.auth)


@pytest.mark.parametrize(
    "destination",
    ["http://[::1", "http://[::1]:x/v1/files/a.txt", "http://h:99999/v1/files/a.txt", "%", "/v1/files/%zz", "\u00ff"],
)
def test_odd_destinations_are_a_400(stack, user, destination):
    put(stack, user, "odd/keep.txt", b"keep")
    auth = user.auth["Authorization"]
    for method in ("COPY", "MOVE"):
        status, headers, body = raw(
            stack, method, "/v1/files/odd/keep.txt", {"Authorization": auth, "Destination": destination}
        )
        assert 400 <= status < 500, (destination, status, body[:300])
        assert headers["content-type"].startswith("application/json"), body[:300]
        assert b"error_code" in body and "x-request-id" in headers
    assert content(stack, user, "odd/keep.txt") == b"keep"


def test_propfind_without_depth_on_a_file_answers_like_depth_0(stack, user):
    """What webdav4 / fsspec send to read a file's properties."""
    put(stack, user, "nodepth/file.txt", b"12345")
    for mount in ("files", "dav"):
        reply = dav(stack, user, "PROPFIND", "nodepth/file.txt", mount=mount)
        assert reply.status_code == 207, reply.text[:300]
        hrefs = [href.text for href in ET.fromstring(reply.content).iter(f"{D}href")]
        assert hrefs == [f"/v1/{mount}/nodepth/file.txt"]
    # A folder still refuses infinity: walk it one level at a time.
    reply = dav(stack, user, "PROPFIND", "nodepth/")
    assert reply.status_code == 403 and b"propfind-finite-depth" in reply.content
    reply = dav(stack, user, "PROPFIND", "nodepth/missing.txt")
    assert reply.status_code == 404


@pytest.mark.parametrize("mount", ["files", "dav"])
def test_dav_errors_are_the_envelope(stack, user, mount):
    put(stack, user, "errs/keep.txt", b"keep")
    put(stack, user, "errs/other.txt", b"other")
    base = f"{stack.base}/v1/{mount}/errs"
    cases = [
        (dav(stack, user, "MOVE", "errs/missing.txt", mount=mount, Destination=f"{base}/x.txt"), 404),
        (dav(stack, user, "COPY", "errs/missing.txt", mount=mount, Destination=f"{base}/x.txt"), 404),
        (dav(stack, user, "COPY", "errs/keep.txt", mount=mount, Destination=f"{base}/nowhere/x.txt"), 409),
        (dav(stack, user, "COPY", "errs/keep.txt", mount=mount, Destination=f"{base}/other.txt", Overwrite="F"), 412),
        (dav(stack, user, "COPY", "errs/keep.txt", mount=mount, Destination=f"{base}/keep.txt"), 403),  # onto itself
        (dav(stack, user, "MOVE", "errs/keep.txt", mount=mount), 400),  # no Destination
        (dav(stack, user, "COPY", "errs/keep.txt", mount=mount, Destination=f"http://elsewhere.example/v1/{mount}/errs/x.txt"), 502),
    ]
    for reply, status in cases:
        assert_envelope(reply, status)
    assert content(stack, user, "errs/keep.txt") == b"keep" and content(stack, user, "errs/other.txt") == b"other"


# ------------------------------------------------------------------ the 307


def test_curl_without_follow_is_told_to_follow_the_307(stack, user, tmp_path):
    source = tmp_path / "up.txt"
    source.write_bytes(b"hello\n")
    result = curl(
        "-fsS", "-H", "Expect: 100-continue", "-T", str(source), f"{stack.base}/v1/files/nofollow/up.txt",
        token=user.token,
    )
    said = result.stdout.decode()
    assert "-L" in said and "307" in said, said  # curl prints the body: the person learns what to do
    assert content(stack, user, "nofollow/up.txt") is None  # nothing was stored, and the reply said why
    followed = curl(
        "-fsS", "-L", "-H", "Expect: 100-continue", "-T", str(source), f"{stack.base}/v1/files/nofollow/up.txt",
        token=user.token,
    )
    assert followed.returncode == 0
    assert content(stack, user, "nofollow/up.txt") == b"hello\n"


ODD_HEADERS = [
    ("PUT", "files", {"If": "(<garbage"}),
    ("PUT", "files", {"If": "<http://x/[::1> (<opaquelocktoken:x>)"}),
    ("DELETE", "files", {"If": "(Not"}),
    ("LOCK", "dav", {"Timeout": "Second-" + "9" * 40}),
    ("LOCK", "dav", {"Timeout": "Second-x"}),
    ("LOCK", "files", {"Timeout": "Infinite, Second-" + "9" * 400}),
    ("PROPFIND", "files", {"Depth": "2"}),
    ("PROPFIND", "files", {"Depth": "9" * 40}),
    ("COPY", "files", {"Overwrite": "maybe", "Destination": "/v1/files/hdr/b.txt"}),
    ("COPY", "files", {"Depth": "9" * 40, "Destination": "/v1/files/hdr/b.txt"}),
    ("GET", "dav", {"Range": "bytes=" + "9" * 40 + "-"}),
    ("GET", "dav", {"Range": "bytes=5-1"}),
    ("GET", "dav", {"If-Modified-Since": "x" * 100}),
    ("GET", "files", {"Accept": "application/json", "X-Request-ID": "x" * 10_000}),
]


@pytest.mark.parametrize("method,mount,headers", ODD_HEADERS)
def test_odd_headers_are_never_a_5xx(stack, user, method, mount, headers):
    put(stack, user, "hdr/a.txt", b"0123456789")
    body = b"new" if method == "PUT" else b""
    if method == "LOCK":
        body = (
            b'<?xml version="1.0"?><D:lockinfo xmlns:D="DAV:"><D:lockscope><D:exclusive/></D:lockscope>'
            b"<D:locktype><D:write/></D:locktype></D:lockinfo>"
        )
    status, answer, text = raw(stack, method, f"/v1/{mount}/hdr/a.txt", {**user.auth, **headers}, body)
    assert status < 500, (status, text[:300])
    assert "x-request-id" in answer
    if status >= 400 and not answer.get("content-type", "").startswith("application/xml"):
        assert answer["content-type"].startswith("application/json"), text[:300]
    if method == "LOCK" and status < 300:
        token = answer["lock-token"]
        raw(stack, "UNLOCK", f"/v1/{mount}/hdr/a.txt", {**user.auth, "Lock-Token": token})
    if method in ("PUT", "DELETE") and status >= 400:
        assert content(stack, user, "hdr/a.txt") == b"0123456789"


@pytest.mark.parametrize(
    "content_type", ["text/plain; x=" + "a" * 9000, "text/plain; x=" + "a" * 2100, "text/plain; name=\u00e9\u00ff"],
    ids=["9000", "2100", "latin1"],
)
@pytest.mark.parametrize("mount", ["files", "dav"])
def test_odd_content_types_are_never_a_5xx(stack, user, mount, content_type):
    put(stack, user, "ctype/a.txt", b"keep")
    status, answer, text = raw(stack, "PUT", f"/v1/{mount}/ctype/a.txt", {**user.auth, "Content-Type": content_type}, b"new")
    assert status < 500, (status, text[:300])
    if status >= 400:
        assert answer["content-type"].startswith("application/json"), text[:300]
        assert content(stack, user, "ctype/a.txt") == b"keep"
    if len(content_type) > 256:
        assert status == 400 and b"bad_header" in text
    else:
        assert status in (200, 201, 204) and content(stack, user, "ctype/a.txt") == b"new"




@pytest.mark.parametrize(
    "authorization",
    [
        "Bearer " + "x" * 10_000,
        "Basic !!!",
        "Basic " + "w7/Dvw==",
        "Basic " + "YTpi" * 3000,
        "Bearer",
        "Digest x",
        "Bearer kgpu_\u00e9",
        "Basic dTrDqQ==",  # u:é
    ],
    ids=["long-bearer", "bad-base64", "latin1-basic", "long-basic", "bare", "digest", "latin1-bearer", "utf8-password"],
)
@pytest.mark.parametrize("where", ["/v1/files/a.txt", "/v1/dav/a.txt", "/v1/me", "/v1/shared/x/a.txt"])
def test_odd_credentials_are_a_401(stack, authorization, where):
    for method in ("GET", "PROPFIND", "PUT"):
        status, answer, text = raw(stack, method, where, {"Authorization": authorization, "Depth": "0"}, b"x")
        assert status in (401, 405), (method, status, text[:300])
        assert answer["content-type"].startswith("application/json") and b"error_code" in text


@pytest.mark.parametrize("length", [str(2**63), "9" * 30, str(2**53)], ids=["2^63", "30-digits", "2^53"])
@pytest.mark.parametrize("expect", [True, False], ids=["expect", "streamed"])
def test_huge_content_lengths_are_a_4xx(stack, user, length, expect):
    org = f"cl-{user.id}"
    requests.post(f"{stack.base}/v1/admin/orgs", json={"slug": org, "owner_user_id": user.id}, headers=stack.admin)
    head = {**user.auth, "Content-Length": length}
    if expect:
        head["Expect"] = "100-continue"
    for where in (f"/v1/files/cl/a.bin", f"/v1/shared/{org}/a.bin", "/v1/dav/cl/a.bin"):
        text = "".join(f"{k}: {v}\r\n" for k, v in head.items())
        answer = raw_request(stack.base, f"PUT {where} HTTP/1.1\r\nHost: x\r\n{text}\r\n".encode(), b"abc", read_timeout=3)
        status = int(answer.split(b" ", 2)[1]) if answer else 0
        assert 400 <= status < 500, (where, answer[:400])
    listed = requests.get(f"{stack.base}/v1/files?json=1", headers=user.auth).json()
    assert listed["quota"]["used_bytes"] < 1 << 40  # nothing was counted


def test_rclone_moveto_a_name_with_a_semicolon_keeps_the_other_file(stack, user, tmp_path):
    """`rclone moveto tmp.txt "a.txt;1"` on the webdav backend clobbered a.txt (issue 12)."""
    import os

    from drive.rclone import rclone_binary

    put(stack, user, "rc/a.txt", b"original")
    put(stack, user, "rc/tmp.txt", b"moved")
    flags = [
        "--webdav-url", f"{stack.base}/v1/files/", "--webdav-vendor", "other",
        "--webdav-headers", f"Authorization,Bearer {user.token}",
    ]
    for source, target in (("rc/tmp.txt", "rc/a.txt;1"), ("rc/a.txt;1", "rc/b.txt?x")):
        done = subprocess.run(
            [rclone_binary(), "--config", os.devnull, "moveto", f":webdav:{source}", f":webdav:{target}", *flags],
            capture_output=True, text=True, timeout=120,
        )
        assert done.returncode == 0, done.stderr
    assert content(stack, user, "rc/a.txt") == b"original"
    assert content(stack, user, "rc/a.txt;1") is None and content(stack, user, "rc/tmp.txt") is None
    assert content(stack, user, "rc/b.txt?x") == b"moved"


ODD_NAMES = [
    " a", "a ", "a.", "..a", "a..", "-", "~", "'", '"', "<b>", "&amp;", "a\u2028b", "\u200b", "\ufeff", "\ufffd",
    "\U0001ffff", "\ufdd0", "e\u0301", "\u00e9", "CON", "nul", "a:b", "a*b", "a|b", "%", "%25", "+", "a;b", "a?b", "a#b",
    "\u3000x", "x" * 255, "\u00e9" * 127,
]


def test_odd_but_valid_names_work_on_every_path(stack, user):
    """Names the rule lets through: every write path takes them and every listing stays XML."""
    base = f"{stack.base}/v1/files/oddn"
    put(stack, user, "oddn/src.txt", b"src")
    for n, name in enumerate(ODD_NAMES):
        enc = quote(name, safe="")
        for reply in (
            requests.put(f"{base}/{enc}", data=b"x", headers=user.auth),
            dav(stack, user, "MKCOL", f"oddn/d{n}/"),
            dav(stack, user, "MKCOL", f"oddn/d{n}/{enc}/"),
            dav(stack, user, "COPY", "oddn/src.txt", Destination=f"{base}/d{n}/{enc}/{enc}"),
            dav(stack, user, "MOVE", f"oddn/d{n}/{enc}/{enc}", Destination=f"{base}/d{n}/{enc}/m"),
            dav(stack, user, "PROPFIND", f"oddn/d{n}/{enc}/m"),
            dav(stack, user, "PROPFIND", f"oddn/d{n}/", Depth="1"),
        ):
            assert reply.status_code < 400, (name, reply.request.method, reply.status_code, reply.text[:300])
        assert content(stack, user, f"oddn/{name}") == b"x", name
        assert content(stack, user, f"oddn/d{n}/{name}/m") == b"src", name
    listed = propfind_ok(stack, user, "oddn/")
    assert len(listed) == 1 + 1 + 2 * len(ODD_NAMES)


# ------------------------------------------------------------------ issue 19: lastmodified and COPY over the quota


def _set_lastmodified(value: str) -> bytes:
    return (
        '<?xml version="1.0" encoding="utf-8"?><D:propertyupdate xmlns:D="DAV:"><D:set><D:prop>'
        f"<D:lastmodified>{value}</D:lastmodified></D:prop></D:set></D:propertyupdate>"
    ).encode()


IMPOSSIBLE_TIMES = [
    "Sat, 01 Jan 10000 00:00:00 GMT",  # past the year 9999 (was a 500 with the Python error in the 207)
    "Sun, 32 Jan 2021 10:00:00 GMT",  # no such day (was taken, as 1 Feb)
    "Tue, 30 Feb 2021 10:00:00 GMT",
    "Mon, 01 Feb 2021 25:00:00 GMT",
    "Mon, 01 Feb 2021 10:61:00 GMT",
    "Wed, 31 Dec 1969 23:59:59 GMT",  # before the epoch (was a 500 too)
    "Thu Jan 32 10:00:00 2021",
    "Sunday, 32-Jan-21 10:00:00 GMT",
    "253402300800",  # one second past 9999-12-31T23:59:59Z
    "-5",
    "yesterday",
    "",
]


@pytest.mark.parametrize("mount", ["files", "dav"])
def test_an_impossible_lastmodified_is_a_4xx_of_its_property(stack, user, mount):
    """PROPPATCH {DAV:}lastmodified (ownCloud's, rclone's) with a date that cannot be: a 409 for
    that property inside the 207, a human message and no Python text; the file keeps its time."""
    put(stack, user, f"times-{mount}/f.txt", b"f")
    url = f"{stack.base}/v1/{mount}/times-{mount}/f.txt"
    before = requests.head(f"{stack.base}/v1/files/times-{mount}/f.txt", headers=user.auth).headers["Last-Modified"]
    for value in IMPOSSIBLE_TIMES:
        reply = requests.request("PROPPATCH", url, data=_set_lastmodified(value), headers=user.auth)
        assert reply.status_code == 207, (value, reply.status_code, reply.text[:500])
        answer = ET.fromstring(reply.content)
        statuses = [status.text for status in answer.iter(f"{D}status")]
        assert statuses == ["HTTP/1.1 409 Conflict"], (value, reply.text)
        said = " ".join(element.text or "" for element in answer.iter(f"{D}responsedescription"))
        assert "lastmodified" in said, (value, said)
        for python in ("Error", "Exception", "Traceback", "exception", "X-OC-Mtime", "[bad_mtime]"):
            assert python not in reply.text, (value, reply.text)
    after = requests.head(f"{stack.base}/v1/files/times-{mount}/f.txt", headers=user.auth).headers["Last-Modified"]
    assert after == before
    # What can be still sets the time: seconds, and each HTTP date form.
    for value, expected in (
        ("784111777", "Sun, 06 Nov 1994 08:49:37 GMT"),
        ("Sun, 06 Nov 1994 08:49:38 GMT", "Sun, 06 Nov 1994 08:49:38 GMT"),
        ("Sunday, 06-Nov-94 08:49:39 GMT", "Sun, 06 Nov 1994 08:49:39 GMT"),
        ("Sun Nov  6 08:49:40 1994", "Sun, 06 Nov 1994 08:49:40 GMT"),
        ("Thu, 29 Feb 2024 12:00:00 GMT", "Thu, 29 Feb 2024 12:00:00 GMT"),
        ("Fri, 31 Dec 9999 23:59:59 GMT", "Fri, 31 Dec 9999 23:59:59 GMT"),
    ):
        reply = requests.request("PROPPATCH", url, data=_set_lastmodified(value), headers=user.auth)
        assert reply.status_code == 207 and "200 OK" in reply.text, (value, reply.text)
        got = requests.head(f"{stack.base}/v1/files/times-{mount}/f.txt", headers=user.auth).headers["Last-Modified"]
        assert got == expected, value


def test_a_copy_over_the_quota_says_so(stack, user):
    """A COPY that does not fit: 507 with quota_exceeded and the quota's own message (was
    "internal server error"), for a file and for a folder, on both mounts."""
    put(stack, user, "qc/one.bin", b"1" * 1000)
    old = stack.settings.user_quota_bytes
    stack.settings.user_quota_bytes = 1500
    try:
        put_refused = requests.put(f"{stack.base}/v1/files/qc/two.bin", data=b"2" * 1000, headers=user.auth)
        put_said = assert_envelope(put_refused, 413, "quota_exceeded")["message"]
        for mount in ("files", "dav"):
            base = f"{stack.base}/v1/{mount}/qc"
            for source, target in (("qc/one.bin", f"{base}/copy.bin"), ("qc/", f"{stack.base}/v1/{mount}/qc2/")):
                reply = dav(stack, user, "COPY", source, mount=mount, Destination=target)
                said = assert_envelope(reply, 507, "quota_exceeded")["message"]
                assert "internal" not in said and "would take the drive to" in said and "of 1500 bytes" in said, said
                assert put_said.split(" would ")[1:] and "would take the drive to" in put_said
    finally:
        stack.settings.user_quota_bytes = old
    assert content(stack, user, "qc/copy.bin") is None


def _set_dead(properties: dict[str, str]) -> bytes:
    props = "".join(f"<x:{name}>{value}</x:{name}>" for name, value in properties.items())
    return (
        '<?xml version="1.0" encoding="utf-8"?><D:propertyupdate xmlns:D="DAV:" xmlns:x="urn:x">'
        f"<D:set><D:prop>{props}</D:prop></D:set></D:propertyupdate>"
    ).encode()


@pytest.mark.parametrize("mount", ["files", "dav"])
def test_dead_properties_are_capped(stack, user, mount):
    """Issue 19 (12): PROPPATCH put 100 MiB of dead properties into the database, outside the
    quota, and one allprop PROPFIND answered 120 MiB. A property holds at most 64 KiB, a resource's
    properties 256 KiB in all; a refused PROPPATCH changes no property (all or none)."""
    put(stack, user, f"props-{mount}/f.txt", b"f")
    url = f"{stack.base}/v1/{mount}/props-{mount}/f.txt"
    ok = requests.request("PROPPATCH", url, data=_set_dead({"note": "small"}), headers=user.auth)
    assert ok.status_code == 207 and "200 OK" in ok.text, ok.text
    huge = requests.request("PROPPATCH", url, data=_set_dead({"huge": "a" * (1 << 20), "other": "b"}), headers=user.auth)
    assert huge.status_code == 207 and "507" in huge.text and "at most" in huge.text, huge.text[:500]
    for i in range(4):  # 4 x 60 KiB fit in 256 KiB; a 5th and 6th do not
        fits = requests.request("PROPPATCH", url, data=_set_dead({f"p{i}": "c" * (60 << 10)}), headers=user.auth)
        assert "200 OK" in fits.text, fits.text[:500]
    for i in (4, 5):
        full = requests.request("PROPPATCH", url, data=_set_dead({f"p{i}": "c" * (60 << 10)}), headers=user.auth)
        assert "507" in full.text and "in all" in full.text, full.text[:500]
    replaced = requests.request("PROPPATCH", url, data=_set_dead({"p0": "d" * (60 << 10)}), headers=user.auth)
    assert "200 OK" in replaced.text, replaced.text[:500]  # a property replaced is not counted twice
    listed = requests.request("PROPFIND", url, data=b'<?xml version="1.0"?><D:propfind xmlns:D="DAV:"><D:allprop/></D:propfind>',
                              headers={**user.auth, "Depth": "0"})
    assert listed.status_code == 207 and len(listed.content) < 300 << 10
    assert "other" not in listed.text and "huge" not in listed.text and "small" in listed.text
