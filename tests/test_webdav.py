"""WebDAV on /v1/files/ and /v1/dav/ (gateway/dav_app.py, drive/dav/), with requests on every stack."""

from __future__ import annotations

import base64
import dataclasses
import email.utils
import hashlib
import os
import uuid
import xml.etree.ElementTree as ET
from contextlib import contextmanager
from typing import Iterator
from urllib.parse import quote, unquote

import pytest
import requests

from drive.content_types import served_type
from drive.listing import FOLDER_MARKER
from tests.conftest import Account, LiveServer

D = "{DAV:}"
EXCLUSIVE_LOCK = (
    b'<?xml version="1.0"?><D:lockinfo xmlns:D="DAV:"><D:lockscope><D:exclusive/></D:lockscope>'
    b"<D:locktype><D:write/></D:locktype><D:owner>me</D:owner></D:lockinfo>"
)
NAMES = ["a b.txt", "hash#.txt", "pct%41.txt", "plus+.txt", "ünï.txt", "🚀 emoji.bin"]


def dav(method: str, url: str, account, **kwargs) -> requests.Response:
    headers = {**account.auth, **kwargs.pop("headers", {})}
    return requests.request(method, url, headers=headers, allow_redirects=False, **kwargs)


def propfind(url: str, account, depth: str = "1", body: bytes | None = None) -> dict[str, dict[str, ET.Element]]:
    reply = dav("PROPFIND", url, account, headers={"Depth": depth}, data=body)
    assert reply.status_code == 207, (reply.status_code, reply.text)
    found = {}
    for response in ET.fromstring(reply.content).iter(f"{D}response"):
        href = response.find(f"{D}href").text
        props = {}
        for propstat in response.iter(f"{D}propstat"):
            if propstat.find(f"{D}status").text.split()[1] == "200":
                for prop in propstat.find(f"{D}prop"):
                    props[prop.tag] = prop
        found[href] = props
    return found


def names_in(listing: dict, folder_href: str) -> set[str]:
    return {unquote(href[len(folder_href) :]).rstrip("/") for href in listing if href != folder_href}


def put(stack, account, rel: str, data: bytes) -> None:
    reply = requests.put(f"{stack.base}/v1/files/{quote(rel)}", data=data, headers=account.auth)
    assert reply.status_code in (200, 201), reply.text


def fetch(stack, account, rel: str, mount: str = "files") -> bytes:
    reply = requests.get(f"{stack.base}/v1/{mount}/{quote(rel)}", headers=account.auth)
    assert reply.status_code == 200, (rel, reply.status_code)
    return reply.content


def test_propfind_properties_and_names_round_trip(stack, user):
    for n, name in enumerate(NAMES):
        put(stack, user, f"dir/{name}", name.encode() * (n + 1))
    base = f"{stack.base}/v1/files/dir/"
    listing = propfind(base, user)
    assert names_in(listing, "/v1/files/dir/") == set(NAMES)
    for n, name in enumerate(NAMES):
        href = "/v1/files/dir/" + quote(name)
        assert href in listing, (href, list(listing))  # hrefs are percent-encoded
        props = listing[href]
        assert props[f"{D}getcontentlength"].text == str(len(name.encode()) * (n + 1))
        assert props[f"{D}displayname"].text == name
        assert len(props[f"{D}resourcetype"]) == 0
        head = requests.head(base + quote(name), headers=user.auth)
        assert props[f"{D}getetag"].text == head.headers["ETag"] and props[f"{D}getetag"].text.startswith('"')
        modified = props[f"{D}getlastmodified"].text
        assert email.utils.format_datetime(email.utils.parsedate_to_datetime(modified), usegmt=True) == modified
        assert props[f"{D}getcontenttype"].text
        single = propfind(base + quote(name), user, depth="0")
        assert list(single) == [href]
        assert fetch(stack, user, f"dir/{name}") == name.encode() * (n + 1)
    assert listing["/v1/files/dir/"][f"{D}resourcetype"].find(f"{D}collection") is not None


@pytest.mark.parametrize("sent", [None, "application/x-www-form-urlencoded"])  # no type, and curl -d's
def test_http_and_webdav_puts_store_one_name_with_one_type(stack, user, sent):
    expected = {"a.tar.gz": "application/gzip", "README": "application/octet-stream",
                "x.JSON": "application/json", "noext": "application/octet-stream"}
    headers = {"Content-Type": sent} if sent else {}
    folder = uuid.uuid4().hex[:8]
    for made in (f"{folder}/", f"{folder}/dav/"):
        assert dav("MKCOL", f"{stack.base}/v1/dav/{made}", user).status_code == 201
    for name in expected:
        assert dav("PUT", f"{stack.base}/v1/files/{folder}/http/{name}", user, data=b"{}", headers=headers).ok
        assert dav("PUT", f"{stack.base}/v1/dav/{folder}/dav/{name}", user, data=b"{}", headers=headers).ok
    for name, kind in expected.items():
        stored = {way: dav("HEAD", f"{stack.base}/v1/files/{folder}/{way}/{name}", user).headers["Content-Type"]
                  for way in ("http", "dav")}
        assert stored == {"http": kind, "dav": kind}, name


# Objects stored with no Content-Type (straight into the store, a presigned PUT that sent none),
# and the one type every read reports for each: the name's guess (drive/content_types.py: served_type).
UNTYPED = {"a.csv": "text/csv", "a.tar.gz": "application/gzip", "noext": "application/octet-stream",
           "weird.ZZZ": "application/octet-stream", "ünï données.txt": "text/plain"}


def _store_untyped(stack, user, folder: str, way: str) -> None:
    from tests.test_files_api import object_store_client

    client = object_store_client(stack)
    for name in UNTYPED:
        if way == "boto3":
            client.put_object(Bucket=stack.settings.s3_bucket, Key=f"users/{user.id}/{folder}/{name}", Body=b"x,y\n")
            continue
        grant = dav("POST", f"{stack.base}/v1/files/{folder}/{quote(name)}", user)
        assert grant.status_code == 200, grant.text
        assert requests.put(grant.json()["url"], data=b"x,y\n").status_code == 200  # no Content-Type sent
    for name in UNTYPED:  # the store holds each with no type of its own (what S3 answers for none)
        stored = client.head_object(Bucket=stack.settings.s3_bucket, Key=f"users/{user.id}/{folder}/{name}")
        assert "ContentType" not in stored or stored["ContentType"] in (
            "binary/octet-stream", "application/octet-stream"
        ) or stored["ContentType"].split(";")[0] == UNTYPED[name], (name, stored["ContentType"])


@pytest.mark.parametrize("way", ["boto3", "presigned PUT"])
def test_a_file_stored_without_a_type_has_one_type_on_every_protocol(stack, user, way):
    folder = uuid.uuid4().hex[:8]
    _store_untyped(stack, user, folder, way)
    base = f"{stack.base}/v1/files/{folder}/"
    listed = propfind(base, user)
    entries = {e["name"]: e for e in requests.get(base + "?json=1", headers=user.auth).json()["entries"]}
    flat = requests.get(f"{stack.base}/v1/files", params={"prefix": folder + "/"}, headers=user.auth).json()
    flat = {f["path"].rsplit("/", 1)[-1]: f for f in flat["files"]}
    for name, kind in UNTYPED.items():
        url = base + quote(name)
        redirect = dav("GET", url, user)
        assert redirect.status_code == 302
        link = requests.get(url + "?json=1", headers=user.auth).json()
        seen = {
            "HEAD": dav("HEAD", url, user).headers["Content-Type"],
            "GET": requests.get(redirect.headers["Location"]).headers["Content-Type"],
            "GET /v1/dav": dav("GET", f"{stack.base}/v1/dav/{folder}/{quote(name)}", user).headers["Content-Type"],
            "?json=1": link["content_type"],
            "?json=1 url": requests.get(link["url"]).headers["Content-Type"],
            "PROPFIND 1": listed["/v1/files/" + quote(f"{folder}/{name}")][f"{D}getcontenttype"].text,
            "PROPFIND 0": propfind(url, user, depth="0")[
                "/v1/files/" + quote(f"{folder}/{name}")][f"{D}getcontenttype"].text,
            "folder ?json=1": entries[name]["content_type"],
            "flat listing": flat[name]["content_type"],
        }
        assert seen == dict.fromkeys(seen, kind), (way, name, seen)
        if stack.target.checks_signatures:  # a tenant cannot have the store answer another type
            forged = redirect.headers["Location"].replace(quote(kind, safe=""), "text%2Fhtml")
            assert forged != redirect.headers["Location"] and requests.get(forged).status_code == 403


@pytest.mark.parametrize("stored, name, served", [
    (None, "a.csv", "text/csv"), ("binary/octet-stream", "a.tar.gz", "application/gzip"),
    ("application/octet-stream", "ünï.txt", "text/plain"), ("", "noext", "application/octet-stream"),
    ("TEXT/CSV; charset=utf-8", "a.csv", "text/csv"), ("text/plain", "data.bin", "text/plain"),
    ("text/plain; charset=latin-1", "notes.csv", "text/plain; charset=latin-1"),
])
def test_the_served_type_is_the_stored_one_else_the_name_s(stored, name, served):
    assert served_type(stored, name) == served


def test_a_type_sent_on_upload_is_kept_where_the_store_is_asked(stack, user):
    """A type other than the name's: HEAD, a PROPFIND of the file and ?json=1 (its URL too) give
    it; a listing and the 302, which ask the store nothing per file, give the name's
    (docs/my-drive.md)."""
    folder = uuid.uuid4().hex[:8]
    put = dav("PUT", f"{stack.base}/v1/files/{folder}/data.bin", user, data=b"hi", headers={"Content-Type": "text/plain"})
    assert put.status_code == 201
    url = f"{stack.base}/v1/files/{folder}/data.bin"
    link = requests.get(url + "?json=1", headers=user.auth).json()
    assert dav("HEAD", url, user).headers["Content-Type"] == link["content_type"] == "text/plain"
    assert requests.get(link["url"]).headers["Content-Type"] == "text/plain"
    assert propfind(url, user, depth="0")[f"/v1/files/{folder}/data.bin"][f"{D}getcontenttype"].text == "text/plain"
    listed = requests.get(f"{stack.base}/v1/files/{folder}/?json=1", headers=user.auth).json()["entries"]
    assert [e["content_type"] for e in listed] == ["application/octet-stream"]
    assert requests.get(url, headers=user.auth).headers["Content-Type"] == "application/octet-stream"


def test_depth_infinity_is_refused(stack, user):
    for depth in ({"Depth": "infinity"}, {}):
        reply = dav("PROPFIND", f"{stack.base}/v1/files/", user, headers=depth)
        assert reply.status_code == 403
        assert ET.fromstring(reply.content).find(f"{D}propfind-finite-depth") is not None


def test_listing_needs_no_head_per_object(stack, user):
    for n in range(25):
        stack.store.put_object(f"users/{user.id}/many/f{n:02d}.txt", b"x" * n)
    store = stack.store
    calls = {"head": 0, "list_page": 0}
    originals = {name: getattr(store, name) for name in calls}

    def counting(name):
        def call(*args, **kwargs):
            calls[name] += 1
            return originals[name](*args, **kwargs)

        return call

    for name in calls:
        setattr(store, name, counting(name))
    try:
        listing = propfind(f"{stack.base}/v1/files/many/", user)
    finally:
        for name in calls:
            delattr(store, name)
    assert len(listing) == 26
    assert calls["head"] <= 1 and calls["list_page"] <= 2, calls


def test_mkcol_makes_empty_folders_with_a_hidden_marker(stack, user):
    base = f"{stack.base}/v1/files"
    assert dav("MKCOL", f"{base}/empty/", user).status_code == 201
    assert dav("MKCOL", f"{base}/empty/", user).status_code == 405
    assert dav("MKCOL", f"{base}/no/parent/", user).status_code == 409
    assert dav("MKCOL", f"{base}/empty/inner", user).status_code == 201
    assert names_in(propfind(f"{base}/", user), "/v1/files/") == {"empty"}
    assert names_in(propfind(f"{base}/empty/", user), "/v1/files/empty/") == {"inner"}
    assert names_in(propfind(f"{base}/empty/inner/", user), "/v1/files/empty/inner/") == set()
    assert stack.store.head(f"users/{user.id}/empty/inner/{FOLDER_MARKER}") is not None
    # Hidden from the HTTP listings too.
    assert requests.get(f"{base}?json=1", headers=user.auth).json()["files"] == []
    assert requests.get(f"{base}/empty/inner/?json=1", headers=user.auth).json()["entries"] == []
    assert FOLDER_MARKER not in requests.get(f"{base}/empty/inner/", headers=user.auth).text
    # The marker's name is reserved; a file cannot take a folder's name.
    assert dav("MKCOL", f"{base}/empty/{FOLDER_MARKER}", user).status_code == 403
    assert dav("PROPFIND", f"{base}/empty/inner/{FOLDER_MARKER}", user, headers={"Depth": "0"}).status_code == 404
    assert requests.put(f"{base}/empty", data=b"x", headers=user.auth).status_code == 409
    assert requests.delete(f"{base}/empty/", headers=user.auth).status_code == 204
    assert names_in(propfind(f"{base}/", user), "/v1/files/") == set()


def test_copy_and_move_files_and_folders(stack, user):
    base = f"{stack.base}/v1/files"
    put(stack, user, "src/a.txt", b"A")
    put(stack, user, "src/sub/b c.txt", b"B" * 100)
    assert dav("MKCOL", f"{base}/src/sub/empty/", user).status_code == 201
    # COPY a file: 201 new, 412 with Overwrite: F on an existing one, 204 with Overwrite: T.
    copy = {"Destination": f"{base}/dst/a%20copy.txt"}
    assert dav("MKCOL", f"{base}/dst/", user).status_code == 201
    assert dav("COPY", f"{base}/src/a.txt", user, headers=copy).status_code == 201
    assert dav("COPY", f"{base}/src/a.txt", user, headers={**copy, "Overwrite": "F"}).status_code == 412
    put(stack, user, "src/a.txt", b"A2")
    assert dav("COPY", f"{base}/src/a.txt", user, headers={**copy, "Overwrite": "T"}).status_code == 204
    assert fetch(stack, user, "dst/a copy.txt") == b"A2"
    # COPY a folder (Depth infinity), empty subfolders included.
    assert dav("COPY", f"{base}/src/", user, headers={"Destination": f"{base}/dst/tree/"}).status_code == 201
    assert fetch(stack, user, "dst/tree/sub/b c.txt") == b"B" * 100
    assert names_in(propfind(f"{base}/dst/tree/sub/", user), "/v1/files/dst/tree/sub/") == {"b c.txt", "empty"}
    # COPY Depth 0 of a folder makes an empty folder.
    assert dav("COPY", f"{base}/src/", user, headers={"Destination": f"{base}/shallow/", "Depth": "0"}).status_code == 201
    assert names_in(propfind(f"{base}/shallow/", user), "/v1/files/shallow/") == set()
    # MOVE a file, then a folder over an existing one.
    assert dav("MOVE", f"{base}/dst/a%20copy.txt", user, headers={"Destination": f"{base}/moved.txt"}).status_code == 201
    assert requests.head(f"{base}/dst/a%20copy.txt", headers=user.auth).status_code == 404
    assert fetch(stack, user, "moved.txt") == b"A2"
    move = {"Destination": f"{base}/shallow/"}
    assert dav("MOVE", f"{base}/dst/tree/", user, headers={**move, "Overwrite": "F"}).status_code == 412
    assert dav("MOVE", f"{base}/dst/tree/", user, headers=move).status_code == 204
    assert dav("PROPFIND", f"{base}/dst/tree/", user, headers={"Depth": "0"}).status_code == 404
    assert fetch(stack, user, "shallow/sub/b c.txt") == b"B" * 100
    assert fetch(stack, user, "shallow/a.txt") == b"A2"
    # Quota usage follows the copies and moves: src (2 + 100) + shallow (2 + 100) + moved.txt (2).
    assert requests.get(f"{base}?json=1", headers=user.auth).json()["total_bytes"] == 206
    # Onto itself, below itself, into a missing folder.
    assert dav("MOVE", f"{base}/src/", user, headers={"Destination": f"{base}/src/sub/x/"}).status_code == 403
    assert dav("COPY", f"{base}/src/a.txt", user, headers={"Destination": f"{base}/nowhere/a.txt"}).status_code == 409


def test_paths_and_destinations_cannot_escape(stack, user):
    base = f"{stack.base}/v1/files"
    put(stack, user, "a.txt", b"a")
    for bad in ["a%2Fb", "%2e%2e/", "x/%2e%2e/%2e%2e/", "bad%ffutf8", "nul%00", "back%5cslash"]:
        reply = dav("PROPFIND", f"{base}/{bad}", user, headers={"Depth": "0"})
        assert reply.status_code == 400, (bad, reply.status_code)
        assert reply.json()["error_code"] == "invalid_path"
    for bad in ["../../users/1/x", "%2e%2e/%2e%2e/users/1/x", "a%2Fb", "ok/%ff"]:
        reply = dav("COPY", f"{base}/a.txt", user, headers={"Destination": f"{base}/{bad}"})
        assert reply.status_code in (400, 502), (bad, reply.status_code)
    other = stack.new_user()
    reply = dav("COPY", f"{base}/a.txt", user, headers={"Destination": f"{stack.base}/v1/shared/x/a.txt"})
    assert reply.status_code == 502
    assert requests.get(f"{base}?json=1", headers=other.auth).json()["files"] == []


def test_proppatch_keeps_dead_properties(stack, user):
    base = f"{stack.base}/v1/files"
    put(stack, user, "p.txt", b"p")
    body = (
        b'<?xml version="1.0"?><D:propertyupdate xmlns:D="DAV:" xmlns:K="urn:kgpu:test">'
        b"<D:set><D:prop><K:color>blue \xc3\xbc</K:color></D:prop></D:set></D:propertyupdate>"
    )
    assert dav("PROPPATCH", f"{base}/p.txt", user, data=body).status_code == 207
    wanted = b'<D:propfind xmlns:D="DAV:" xmlns:K="urn:kgpu:test"><D:prop><K:color/></D:prop></D:propfind>'
    assert propfind(f"{base}/p.txt", user, "0", wanted)["/v1/files/p.txt"]["{urn:kgpu:test}color"].text == "blue ü"
    # Properties follow a MOVE, and are the same through /v1/dav/.
    assert dav("MOVE", f"{base}/p.txt", user, headers={"Destination": f"{base}/q.txt"}).status_code == 201
    listing = propfind(f"{stack.base}/v1/dav/q.txt", user, "0", wanted)
    assert listing["/v1/dav/q.txt"]["{urn:kgpu:test}color"].text == "blue ü"
    # A DELETE through the HTTP route drops them: a new file of the same name starts bare.
    assert requests.delete(f"{base}/q.txt", headers=user.auth).status_code == 204
    put(stack, user, "q.txt", b"q")
    assert "{urn:kgpu:test}color" not in propfind(f"{base}/q.txt", user, "0", wanted)["/v1/files/q.txt"]
    # Protected live properties stay protected.
    protected = b'<D:propertyupdate xmlns:D="DAV:"><D:set><D:prop><D:getetag>x</D:getetag></D:prop></D:set></D:propertyupdate>'
    reply = dav("PROPPATCH", f"{base}/q.txt", user, data=protected)
    assert reply.status_code == 207 and "403" in reply.text


def put_and_lock(stack, account, rel: str) -> str:
    """The Lock-Token ("<opaquelocktoken:…>") of a 600 s exclusive lock on a new file ``rel``."""
    put(stack, account, rel, b"v1")
    reply = dav("LOCK", f"{stack.base}/v1/files/{rel}", account, data=EXCLUSIVE_LOCK, headers={"Timeout": "Second-600"})
    assert reply.status_code == 200, reply.text
    return reply.headers["Lock-Token"]


def test_lock_and_unlock(stack, user):
    base = f"{stack.base}/v1/files"
    body = EXCLUSIVE_LOCK
    token = put_and_lock(stack, user, "locked.txt")
    other = {"Destination": f"{base}/elsewhere.txt"}
    assert dav("MOVE", f"{base}/locked.txt", user, headers=other).status_code == 423
    # The HTTP routes respect the lock too: 423 without the token, as they were with it.
    assert requests.put(f"{base}/locked.txt", data=b"v2", headers=user.auth).status_code == 423
    assert requests.delete(f"{base}/locked.txt", headers=user.auth).json()["error_code"] == "locked"
    assert requests.put(f"{base}/locked.txt", data=b"v2", headers={**user.auth, "If": f"({token})"}).status_code == 200
    assert dav("PUT", f"{stack.base}/v1/dav/locked.txt", user, data=b"v3").status_code == 423
    assert dav("MOVE", f"{base}/locked.txt", user, headers={**other, "If": f"({token})"}).status_code == 201
    # A LOCK on an unmapped URL creates an empty file.
    reply = dav("LOCK", f"{base}/new-locked.txt", user, data=body)
    assert reply.status_code == 201
    assert requests.head(f"{base}/new-locked.txt", headers=user.auth).headers["Content-Length"] == "0"
    assert dav("UNLOCK", f"{base}/new-locked.txt", user, headers={"Lock-Token": reply.headers["Lock-Token"]}).status_code == 204


@contextmanager
def statements_on(stack, *tables: str) -> Iterator[list[str]]:
    """The SQL statements the server under test sends about ``tables`` while the block runs."""
    from sqlalchemy import event

    statements: list[str] = []
    engine = stack.server.app.state.sessions.kw["bind"]

    def noting(conn, cursor, statement, parameters, context, executemany):
        if any(table in statement for table in tables):
            statements.append(statement)

    event.listen(engine, "before_cursor_execute", noting)
    try:
        yield statements
    finally:
        event.remove(engine, "before_cursor_execute", noting)


def test_a_write_where_nothing_is_locked_asks_the_lock_table_once(stack, user):
    with statements_on(stack, "dav_locks") as queries:
        put(stack, user, "deep/er/still/f.txt", b"x")  # HTTP PUT: the dispatcher checks locks first
        assert len(queries) == 1, queries  # not one per folder above it
        queries.clear()
        assert dav("PUT", f"{stack.base}/v1/dav/deep/er/still/g.txt", user, data=b"y").status_code == 201
        assert len(queries) == 2, queries  # wsgidav checks the folder that gets the file, then the file


def test_properties_and_locks_on_the_longest_path_a_drive_takes(stack, user):
    """Keys are at most 1,024 bytes; quoted, as properties and locks are keyed, about three times that."""
    import random

    prefix = f"users/{user.id}/"
    rng = random.Random(7)
    segments, room = [], 1024 - len(prefix.encode())
    while room > 4:
        name = "".join(chr(rng.randrange(0x4E00, 0x9FFF)) for _ in range(min(84, (room - 1) // 3)))
        segments.append(name)
        room -= len(name.encode()) + 1
    rel = "/".join(segments)
    assert 1000 < len((prefix + rel).encode()) <= 1024
    put(stack, user, rel, b"deep")
    url = f"{stack.base}/v1/files/" + quote(rel)
    patch = (
        b'<?xml version="1.0"?><D:propertyupdate xmlns:D="DAV:" xmlns:K="urn:kgpu:test">'
        b"<D:set><D:prop><K:note>long</K:note></D:prop></D:set></D:propertyupdate>"
    )
    assert dav("PROPPATCH", url, user, data=patch).status_code == 207
    reply = dav("LOCK", url, user, data=EXCLUSIVE_LOCK)
    assert reply.status_code == 200, reply.text
    props = next(iter(propfind(url, user, "0").values()))
    assert props["{urn:kgpu:test}note"].text == "long" and props[f"{D}lockdiscovery"].find(f"{D}activelock") is not None
    assert dav("UNLOCK", url, user, headers={"Lock-Token": reply.headers["Lock-Token"]}).status_code == 204


def test_a_lock_whose_time_ran_out_is_ignored_and_swept(stack, user):
    from sqlalchemy import text

    base = f"{stack.base}/v1/files"
    token = put_and_lock(stack, user, "expiring.txt").strip("<>")
    assert requests.put(f"{base}/expiring.txt", data=b"v2", headers=user.auth).status_code == 423
    sessions = stack.server.app.state.sessions
    with sessions.begin() as session:  # as if its 600 s had passed
        session.execute(text("UPDATE dav_locks SET expire = expire - 601 WHERE token = :t"), {"t": token})
    listing = propfind(f"{base}/expiring.txt", user, "0")["/v1/files/expiring.txt"]
    assert listing[f"{D}lockdiscovery"].find(f"{D}activelock") is None
    assert requests.put(f"{base}/expiring.txt", data=b"v2", headers=user.auth).status_code == 200
    assert dav("LOCK", f"{base}/expiring.txt", user, data=EXCLUSIVE_LOCK).status_code == 200  # a new lock sweeps the old
    with sessions() as session:
        assert session.execute(text("SELECT count(*) FROM dav_locks WHERE token = :t"), {"t": token}).scalar() == 0


def test_auth_basic_bearer_and_challenges(stack, user):
    url = f"{stack.base}/v1/files/"
    reply = requests.request("PROPFIND", url, headers={"Depth": "0"})
    assert reply.status_code == 401
    challenges = reply.headers["WWW-Authenticate"]
    assert 'Basic realm="kgpu"' in challenges and "Bearer" in challenges
    assert reply.json()["error_code"] == "unauthorized"
    basic = requests.request("PROPFIND", url, headers={"Depth": "0"}, auth=("anyone@anywhere", user.token))
    assert basic.status_code == 207
    wrong = requests.request("PROPFIND", url, headers={"Depth": "0"}, auth=(user.email, "kgpu_" + "0" * 48))
    assert wrong.status_code == 401 and 'Basic realm="kgpu"' in wrong.headers["WWW-Authenticate"]
    # Basic also works on the plain HTTP routes of the drive, so WebDAV clients can GET and PUT.
    assert requests.put(f"{url}basic.txt", data=b"hi", auth=("x", user.token)).status_code == 201
    assert requests.get(f"{url}basic.txt", auth=("x", user.token), allow_redirects=False).status_code == 302
    header = "Basic " + base64.b64encode(b"x:" + user.token.encode()).decode()
    assert requests.get(f"{stack.base}/v1/me", headers={"Authorization": header}).status_code == 401
    pending = stack.new_user(status="pending")
    assert dav("PROPFIND", url, pending, headers={"Depth": "0"}).status_code == 403
    assert requests.request("PROPFIND", url, headers={**stack.admin, "Depth": "0"}).json()["error_code"] == "no_drive"


def test_dav_mount_proxies_bytes_and_can_be_turned_off(stack, user):
    base = f"{stack.base}/v1/dav"
    data = os.urandom(7 << 20)  # more than one 5 MiB part: a multipart upload through wsgidav
    reply = dav("PUT", f"{base}/proxied/big%20file.bin", user, data=data)
    assert reply.status_code == 409  # no parent folder yet: WebDAV semantics on this mount
    assert dav("MKCOL", f"{base}/proxied/", user).status_code == 201
    reply = dav("PUT", f"{base}/proxied/big%20file.bin", user, data=data)
    assert reply.status_code == 201 and reply.headers["ETag"].startswith('"')
    reply = dav("GET", f"{base}/proxied/big%20file.bin", user)
    assert reply.status_code == 200 and hashlib.sha256(reply.content).digest() == hashlib.sha256(data).digest()
    ranged = dav("GET", f"{base}/proxied/big%20file.bin", user, headers={"Range": "bytes=6000000-6000009"})
    assert ranged.status_code == 206 and ranged.content == data[6000000:6000010]
    # The same object through /v1/files: a 302, and the same bytes.
    assert fetch(stack, user, "proxied/big file.bin") == data
    assert dav("GET", f"{stack.base}/v1/files/proxied/big%20file.bin", user).status_code == 302
    assert dav("DELETE", f"{base}/proxied/", user).status_code == 204
    assert dav("GET", f"{base}/proxied/big%20file.bin", user).status_code == 404
    stack.settings.dav_proxy_enabled = False
    try:
        assert dav("PROPFIND", f"{base}/", user, headers={"Depth": "0"}).status_code == 404
        assert dav("PROPFIND", f"{stack.base}/v1/files/", user, headers={"Depth": "0"}).status_code == 207
    finally:
        stack.settings.dav_proxy_enabled = True


def test_copy_checks_the_quota(stack, user):
    put(stack, user, "q/one.bin", b"1" * 1000)
    old = stack.settings.user_quota_bytes
    stack.settings.user_quota_bytes = 1500
    try:
        reply = dav("COPY", f"{stack.base}/v1/files/q/", user, headers={"Destination": f"{stack.base}/v1/files/q2/"})
        assert reply.status_code == 507
        reply = dav("PUT", f"{stack.base}/v1/dav/q/two.bin", user, data=b"2" * 1000)
        # A PUT over the quota is refused like on /v1/files/ (tests/test_quota_concurrency.py).
        assert reply.status_code == 413 and reply.json()["error_code"] == "quota_exceeded"
    finally:
        stack.settings.user_quota_bytes = old


def test_shared_subtree_is_read_only(stack):
    owner, member, outsider = stack.new_user(), stack.new_user(), stack.new_user()
    slug = "dav-" + uuid.uuid4().hex[:8]
    reply = requests.post(f"{stack.base}/v1/admin/orgs", json={"slug": slug, "owner_user_id": owner.id}, headers=stack.admin)
    assert reply.status_code == 201
    requests.post(f"{stack.base}/v1/admin/orgs/{slug}/members", json={"user_id": member.id}, headers=stack.admin)
    assert requests.put(f"{stack.base}/v1/shared/{slug}/d/data%201.csv", data=b"a,b\n", headers=owner.auth).ok
    base = f"{stack.base}/v1/files"
    assert "shared" in names_in(propfind(f"{base}/", member), "/v1/files/")
    assert names_in(propfind(f"{base}/shared/", member), "/v1/files/shared/") == {slug}
    listing = propfind(f"{base}/shared/{slug}/d/", member)
    assert names_in(listing, f"/v1/files/shared/{slug}/d/") == {"data 1.csv"}
    assert fetch(stack, member, f"shared/{slug}/d/data 1.csv") == b"a,b\n"
    assert fetch(stack, member, f"shared/{slug}/d/data 1.csv", mount="dav") == b"a,b\n"
    target = f"{base}/shared/{slug}/d/data%201.csv"
    refused = {
        "PUT": dav("PUT", f"{base}/shared/{slug}/new.txt", member, data=b"x"),
        "DELETE": dav("DELETE", target, member),
        "MKCOL": dav("MKCOL", f"{base}/shared/{slug}/new/", member),
        "MOVE": dav("MOVE", target, member, headers={"Destination": f"{base}/mine.csv"}),
        "PROPPATCH": dav("PROPPATCH", target, member, data=b'<D:propertyupdate xmlns:D="DAV:"/>'),
        "LOCK": dav("LOCK", target, member, data=b'<D:lockinfo xmlns:D="DAV:"/>'),
        "COPY in": dav("COPY", f"{base}/shared/{slug}/d/", member, headers={"Destination": f"{base}/shared/{slug}/e/"}),
        "PUT dav": dav("PUT", f"{stack.base}/v1/dav/shared/{slug}/new.txt", member, data=b"x"),
    }
    assert {what: reply.status_code for what, reply in refused.items()} == {what: 403 for what in refused}
    # Even an uploader of the org writes through /v1/shared/, never through this subtree.
    assert dav("PUT", f"{base}/shared/{slug}/new.txt", owner, data=b"x").status_code == 403
    # Copying out of it into my drive is fine.
    copied = dav("COPY", target, member, headers={"Destination": f"{base}/mine.csv"})
    assert copied.status_code == 201
    assert fetch(stack, member, "mine.csv") == b"a,b\n"
    # Others see nothing.
    assert "shared" not in names_in(propfind(f"{base}/", outsider), "/v1/files/")
    assert dav("PROPFIND", f"{base}/shared/{slug}/", outsider, headers={"Depth": "0"}).status_code == 404
    assert dav("GET", f"{base}/shared/{slug}/d/data%201.csv", outsider).status_code == 404


@pytest.mark.parametrize("stack", ["rclone-sqlite"], indirect=True)
def test_locks_and_properties_survive_a_restart(stack, tmp_path):
    settings = stack.settings.model_copy(update={"data_dir": tmp_path})
    server = LiveServer(settings).start()
    try:
        reply = requests.post(f"{server.base}/v1/admin/users", json={"email": "r@lab.example"}, headers=stack.admin)
        account = Account(reply.json()["user"]["id"], "r@lab.example", reply.json()["token"], server.base)
        base = f"{server.base}/v1/files"
        assert requests.put(f"{base}/keep.txt", data=b"k", headers=account.auth).status_code == 201
        body = b'<D:propertyupdate xmlns:D="DAV:" xmlns:K="urn:k"><D:set><D:prop><K:x>1</K:x></D:prop></D:set></D:propertyupdate>'
        assert dav("PROPPATCH", f"{base}/keep.txt", account, data=body).status_code == 207
        lock = b'<D:lockinfo xmlns:D="DAV:"><D:lockscope><D:exclusive/></D:lockscope><D:locktype><D:write/></D:locktype></D:lockinfo>'
        token = dav("LOCK", f"{base}/keep.txt", account, data=lock).headers["Lock-Token"]
    finally:
        server.stop()
    server = LiveServer(settings).start()
    try:
        base = f"{server.base}/v1/files"
        props = propfind(f"{base}/keep.txt", account, "0")["/v1/files/keep.txt"]
        assert props["{urn:k}x"].text == "1"
        assert token.strip("<>") in ET.tostring(props[f"{D}lockdiscovery"]).decode()
        assert dav("MOVE", f"{base}/keep.txt", account, headers={"Destination": f"{base}/k2.txt"}).status_code == 423
        moved = dav("MOVE", f"{base}/keep.txt", account, headers={"Destination": f"{base}/k2.txt", "If": f"({token})"})
        assert moved.status_code == 201
    finally:
        server.stop()


@pytest.mark.parametrize("stack", ["rclone-sqlite"], indirect=True)
def test_dead_properties_of_an_older_servers_sqlite_file_are_imported_once(stack, tmp_path):
    """Servers before migration 0008 kept dead properties in {data_dir}/webdav.sqlite3 (ref URL ->
    pickled {name: XML}); the first WebDAV request imports them and renames the file."""
    import pickle
    import subprocess
    import sys

    settings = stack.settings.model_copy(update={"data_dir": tmp_path})
    server = LiveServer(settings).start()
    try:
        reply = requests.post(f"{server.base}/v1/admin/users", json={"email": "old@lab.example"}, headers=stack.admin)
        account = Account(reply.json()["user"]["id"], "old@lab.example", reply.json()["token"], server.base)
        old = tmp_path / "webdav.sqlite3"
        value = pickle.dumps({"{urn:k}x": b'<ns0:x xmlns:ns0="urn:k">old</ns0:x>'})
        script = (  # as the old server left it: in WAL mode, its log not yet checkpointed (it never closed it)
            "import os, sqlite3, sys\n"
            "conn = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
            "conn.execute('PRAGMA journal_mode=WAL')\n"
            "conn.execute('CREATE TABLE dav_properties (k TEXT PRIMARY KEY, v BLOB NOT NULL)')\n"
            "conn.execute('CREATE TABLE dav_locks (k TEXT PRIMARY KEY, v BLOB NOT NULL)')\n"
            "conn.execute('INSERT INTO dav_properties VALUES (?, ?)', (sys.argv[2], bytes.fromhex(sys.argv[3])))\n"
            "os._exit(0)\n"
        )
        subprocess.run(
            [sys.executable, "-c", script, str(old), f"/users/{account.id}/kept%20file.txt", value.hex()], check=True
        )
        assert (tmp_path / "webdav.sqlite3-wal").exists()
        base = f"{server.base}/v1/files"
        assert requests.put(f"{base}/kept%20file.txt", data=b"k", headers=account.auth).status_code == 201
        props = propfind(f"{base}/kept%20file.txt", account, "0")["/v1/files/kept%20file.txt"]
        assert props["{urn:k}x"].text == "old"
        assert sorted(p.name for p in tmp_path.glob("webdav.sqlite3*")) == [
            "webdav.sqlite3.imported", "webdav.sqlite3.imported-shm", "webdav.sqlite3.imported-wal"
        ]
    finally:
        server.stop()


def test_folder_listings_are_cached_and_never_stale_after_a_write(stack, user):
    base = f"{stack.base}/v1/files"
    folder = "/v1/files/cached/"
    put(stack, user, "cached/a.txt", b"a")
    store = stack.store  # the gateway's CachingStore (drive/store/caching.py)
    calls = {"list_page": 0}
    original = store.list_page

    def counting(*args, **kwargs):
        calls["list_page"] += 1
        return original(*args, **kwargs)

    store.list_page = counting
    try:
        assert names_in(propfind(f"{base}/cached/", user), folder) == {"a.txt"}
        listed = calls["list_page"]
        assert names_in(propfind(f"{base}/cached/", user), folder) == {"a.txt"}
        assert calls["list_page"] - listed <= 1  # the folder's existence check; its listing came from the cache
    finally:
        del store.list_page

    def names() -> set[str]:
        return names_in(propfind(f"{base}/cached/", user), folder)

    def sub_names() -> set[str]:
        return names_in(propfind(f"{base}/cached/sub/", user), folder + "sub/")

    def size_of(name: str) -> str:
        return propfind(f"{base}/cached/", user)[folder + name][f"{D}getcontentlength"].text

    # Every write shows at once, on both mounts, whichever way it came.
    put(stack, user, "cached/b.txt", b"b")  # HTTP PUT, streamed
    assert names() == {"a.txt", "b.txt"}
    assert requests.post(f"{base}/cached/c.txt", data=b"c", headers=user.auth).status_code in (200, 201)
    assert names() == {"a.txt", "b.txt", "c.txt"}
    assert requests.delete(f"{base}/cached/c.txt", headers=user.auth).status_code == 204
    assert names() == {"a.txt", "b.txt"}
    assert dav("PUT", f"{stack.base}/v1/dav/cached/d.txt", user, data=b"d").status_code == 201
    assert names() == {"a.txt", "b.txt", "d.txt"}
    assert dav("MKCOL", f"{base}/cached/sub", user).status_code == 201
    assert names() == {"a.txt", "b.txt", "d.txt", "sub"}
    assert sub_names() == set()
    copy = {"Destination": f"{base}/cached/sub/a2.txt"}
    assert dav("COPY", f"{base}/cached/a.txt", user, headers=copy).status_code == 201
    assert sub_names() == {"a2.txt"}
    move = {"Destination": f"{base}/cached/sub/b.txt"}
    assert dav("MOVE", f"{base}/cached/b.txt", user, headers=move).status_code == 201
    assert names() == {"a.txt", "d.txt", "sub"}
    assert sub_names() == {"a2.txt", "b.txt"}
    folder_copy = {"Destination": f"{base}/cached/sub2/"}
    assert dav("COPY", f"{base}/cached/sub/", user, headers=folder_copy).status_code == 201
    assert names() == {"a.txt", "d.txt", "sub", "sub2"}
    assert names_in(propfind(f"{base}/cached/sub2/", user), folder + "sub2/") == {"a2.txt", "b.txt"}
    assert requests.delete(f"{base}/cached/sub2/", headers=user.auth).status_code == 204
    assert dav("DELETE", f"{stack.base}/v1/dav/cached/d.txt", user).status_code == 204
    assert names() == {"a.txt", "sub"}
    assert requests.delete(f"{base}/cached/sub/", headers=user.auth).status_code == 204  # a folder, HTTP route
    assert names() == {"a.txt"}
    put(stack, user, "cached/deep/er/e.txt", b"e")  # new folders appear in the listings above them
    assert names() == {"a.txt", "deep"}
    assert dav("DELETE", f"{base}/cached/deep", user).status_code == 204
    assert names() == {"a.txt"}

    # Presigned PUTs: the client writes straight to the store, after the listing was cached.
    redirect = requests.put(
        f"{base}/cached/r.txt", data=b"r", headers={**user.auth, "Expect": "100-continue"}, allow_redirects=False
    )
    assert redirect.status_code == 307
    assert names() == {"a.txt"}  # nothing landed yet
    assert requests.put(redirect.headers["Location"], data=b"r").status_code == 200
    assert names() == {"a.txt", "r.txt"}
    minted = requests.post(f"{base}/cached/new/m.txt", headers={**user.auth, "X-Content-Length": "3"}).json()
    assert names() == {"a.txt", "r.txt"}
    assert requests.put(minted["url"], data=b"mmm", headers=minted["headers"]).status_code == 200
    assert names() == {"a.txt", "r.txt", "new"}  # a new folder, through a URL for a key below it
    again = requests.post(f"{base}/cached/r.txt", headers={**user.auth, "X-Content-Length": "5"}).json()
    assert size_of("r.txt") == "1"
    assert requests.put(again["url"], data=b"rrrrr", headers=again["headers"]).status_code == 200
    assert size_of("r.txt") == "5"  # replaced through a URL: the listing shows the new object

    # Only a write no gateway made or handed a URL for goes unseen, until the listing's max age.
    store.inner.put_object(f"users/{user.id}/cached/direct.txt", b"z")
    assert names() == {"a.txt", "r.txt", "new"}
    limits, store.limits = store.limits, dataclasses.replace(store.limits, max_age=0.0)
    try:
        assert names() == {"a.txt", "r.txt", "new", "direct.txt"}
    finally:
        store.limits = limits


class _Marks:
    """ChangeMarks in memory, as two replicas on one database would share them."""

    def __init__(self):
        self.generations: dict[str, int] = {}
        self.urls: list[tuple[str, str]] = []

    def generation(self, drive):
        return self.generations.get(drive, 0)

    def bump(self, drive):
        self.generations[drive] = self.generations.get(drive, 0) + 1

    def urls_out(self, drive, keys, expires_in):
        self.urls += [(drive, key) for key in keys]

    def look(self, drive, folder, limit):
        return self.generation(drive), [k for d, k in self.urls if d == drive and k.startswith(folder)][:limit]


class _ListedStore:
    """A store whose delimited listings are counted (only what CachingStore asks of it)."""

    def __init__(self, folders: dict[str, int]):
        from drive.store import ListPage, ObjectInfo

        self._page = lambda folder: ListPage(
            [ObjectInfo(f"{folder}x{i}", 1, '"e"', None, None) for i in range(folders.get(folder, 1))], None
        )
        self.lists: dict[str, int] = {}
        self.during_list = None

    def list_page(self, prefix, delimiter=None, token=None, max_keys=1000):
        self.lists[prefix] = self.lists.get(prefix, 0) + 1
        if self.during_list:
            self.during_list()
        return self._page(prefix)

    def put_object(self, key, data, content_type=None):
        return '"e"'

    def head(self, key):
        return None


def test_listing_cache_is_bounded_per_drive_and_in_all():
    from drive.store.caching import CacheLimits, CachingStore

    inner = _ListedStore({"users/1/big/": 6, "users/3/huge/": 9})
    store = CachingStore(inner, _Marks(), CacheLimits(max_folders=6, max_entries=8, drive_max_folders=3))
    mine = [f"users/1/f{n}/" for n in range(3)]
    for folder in mine:
        list(store.folder_entries(folder))
    # A hostile tenant lists many folders: it keeps at most its share, and pushes out only its own.
    for n in range(50):
        list(store.folder_entries(f"users/2/f{n}/"))
    cached = store.cached_folders()
    assert [f for f in cached if f.startswith("users/2/")] == [f"users/2/f{n}/" for n in range(47, 50)]
    assert all(folder in cached for folder in mine)
    for folder in mine:
        list(store.folder_entries(folder))
        assert inner.lists[folder] == 1  # still cached
    list(store.folder_entries("users/1/big/"))  # 6 entries: the oldest folders go to stay within 8 in all
    assert sum(len(list(store.folder_entries(f))) for f in store.cached_folders()) <= 8
    assert len(store.cached_folders()) <= 6
    list(store.folder_entries("users/3/huge/"))  # more than max_entries: never kept
    list(store.folder_entries("users/3/huge/"))
    assert inner.lists["users/3/huge/"] == 2


def test_listing_cache_one_drive_never_touches_another_and_other_replicas_are_seen():
    from drive.store.caching import CachingStore

    marks = _Marks()
    inner = _ListedStore({})
    here = CachingStore(inner, marks)
    there = CachingStore(inner, marks)  # another replica on the same database
    list(here.folder_entries("users/1/a/"))
    list(there.folder_entries("users/1/a/"))
    assert inner.lists["users/1/a/"] == 2
    # Another tenant writes, here and there: tenant 1's listings stay cached on both.
    here.put_object("users/2/a/x", b"")
    there.put_object("users/2/a/y", b"")
    list(here.folder_entries("users/1/a/"))
    list(there.folder_entries("users/1/a/"))
    assert inner.lists["users/1/a/"] == 2
    # Tenant 1 writes on the other replica: this one lists again at once.
    there.put_object("users/1/a/new", b"")
    list(here.folder_entries("users/1/a/"))
    assert inner.lists["users/1/a/"] == 3
    # A listing that raced a write here is not kept.
    inner.during_list = lambda: here.put_object("users/1/b/new", b"")
    list(here.folder_entries("users/1/b/"))
    inner.during_list = None
    list(here.folder_entries("users/1/b/"))
    assert inner.lists["users/1/b/"] == 2


def test_propfind_reads_properties_and_locks_once_per_folder(stack, user):
    base = f"{stack.base}/v1/files"
    for n in range(20):
        put(stack, user, f"props/f{n:02d}.txt", b"x")
    body = (
        b'<?xml version="1.0"?><D:propertyupdate xmlns:D="DAV:" xmlns:K="urn:kgpu:test">'
        b"<D:set><D:prop><K:color>red</K:color></D:prop></D:set></D:propertyupdate>"
    )
    assert dav("PROPPATCH", f"{base}/props/f03.txt", user, data=body).status_code == 207
    lock = EXCLUSIVE_LOCK
    reply = dav("LOCK", f"{base}/props/f07.txt", user, data=lock, headers={"Timeout": "Second-600"})
    assert reply.status_code == 200
    with statements_on(stack, "dav_properties", "dav_locks") as queries:
        listing = propfind(f"{base}/props/", user)
    assert len(listing) == 21
    assert 2 <= len(queries) < 20, queries  # the folder's two range queries, not two per member
    assert listing["/v1/files/props/f03.txt"]["{urn:kgpu:test}color"].text == "red"
    for href, props in listing.items():
        assert (props[f"{D}lockdiscovery"].find(f"{D}activelock") is not None) == href.endswith("f07.txt"), href
        assert ("{urn:kgpu:test}color" in props) == href.endswith("f03.txt"), href
    named = b'<D:propfind xmlns:D="DAV:" xmlns:K="urn:kgpu:test"><D:prop><K:color/><D:lockdiscovery/></D:prop></D:propfind>'
    listing = propfind(f"{base}/props/", user, body=named)
    assert listing["/v1/files/props/f03.txt"]["{urn:kgpu:test}color"].text == "red"
    assert listing["/v1/files/props/f07.txt"][f"{D}lockdiscovery"].find(f"{D}activelock") is not None
    assert dav("UNLOCK", f"{base}/props/f07.txt", user, headers={"Lock-Token": reply.headers["Lock-Token"]}).status_code == 204


def test_propfind_depth_1_fast_path_matches_wsgidav(stack, user, monkeypatch):
    import drive.dav.propfind as dav_module

    base = f"{stack.base}/v1/files"
    odd = [*NAMES, "amp&<lt>.txt", "quote\"'.txt", "sp  two.txt", "semi;colon=@.txt"]
    for n, name in enumerate(odd):
        put(stack, user, f"odd/{name}", b"y" * n)
    for sub in ("sub dir", "ü#%41 😀", "plain"):
        put(stack, user, f"odd/{sub}/inner.txt", b"z")
    assert dav("MKCOL", f"{base}/odd/empty%20one", user).status_code == 201
    put(stack, user, "top.txt", b"t")
    stamped = requests.put(f"{base}/odd/stamped.txt", data=b"s", headers={**user.auth, "X-OC-Mtime": "1600000000"})
    assert stamped.status_code == 201  # a kept modification time, and hashes (oc:checksums), in the fast path
    stack.store.put_object(f"users/{user.id}/odd/behind.txt", b"b")  # no facts: the store's time, no hash
    real = dav_module.fast_propfind
    used = []

    def counting(*args):
        result = real(*args)
        used.append(result is not None)
        return result

    bodies = [
        None,
        b'<?xml version="1.0"?><D:propfind xmlns:D="DAV:"><D:allprop/></D:propfind>',
        (
            b'<D:propfind xmlns:D="DAV:"><D:prop><D:getetag/><D:displayname/><D:resourcetype/>'
            b"<D:getlastmodified/><D:creationdate/><D:getcontentlength/><D:getcontenttype/>"
            b"<D:lockdiscovery/><D:supportedlock/></D:prop></D:propfind>"
        ),
        b'<D:propfind xmlns:D="DAV:"><D:prop><D:creationdate/><D:displayname/></D:prop></D:propfind>',
        b'<D:propfind xmlns:D="DAV:" xmlns:X="urn:x"><D:prop><X:nothing/><D:getcontentlength/><D:unknown/></D:prop></D:propfind>',
        (  # what rclone's webdav backend sends
            b'<?xml version="1.0"?>\n<d:propfind  xmlns:d="DAV:" xmlns:oc="http://owncloud.org/ns" xmlns:nc="http://nextcloud.org/ns">'
            b"<d:prop><d:displayname /><d:getlastmodified /><d:getcontentlength /><d:resourcetype /><d:getcontenttype />"
            b"<oc:checksums /><oc:permissions /></d:prop></d:propfind>"
        ),
    ]
    for url in (f"{base}/odd/", f"{base}/odd", f"{base}/", f"{base}/odd/sub%20dir/"):
        for body in bodies:
            used.clear()
            monkeypatch.setattr(dav_module, "fast_propfind", counting)
            fast = dav("PROPFIND", url, user, headers={"Depth": "1"}, data=body)
            monkeypatch.setattr(dav_module, "fast_propfind", lambda *args: None)
            slow = dav("PROPFIND", url, user, headers={"Depth": "1"}, data=body)
            assert used == [True], (url, body)
            assert fast.status_code == slow.status_code == 207, (fast.text, slow.text)
            assert fast.content == slow.content, (url, body)  # byte for byte
            assert fast.headers["Content-Type"] == slow.headers["Content-Type"]
            parsed = ET.fromstring(fast.content)  # and it is well-formed XML
            if url.endswith("/odd/") and body is None:
                hrefs = [r.find(f"{D}href").text for r in parsed.iter(f"{D}response")]
                assert {unquote(h[len("/v1/files/odd/") :]).rstrip("/") for h in hrefs[1:]} == {
                    *odd, "sub dir", "ü#%41 😀", "plain", "empty one", "stamped.txt", "behind.txt"
                }
                assert b"Sun, 13 Sep 2020 12:26:40 GMT" in fast.content
    monkeypatch.setattr(dav_module, "fast_propfind", real)
    for bad in (b"<D:propfind xmlns:D='DAV:'><D:prop>", b"<D:other xmlns:D='DAV:'/>"):
        assert dav("PROPFIND", f"{base}/odd/", user, headers={"Depth": "1"}, data=bad).status_code == 400
    # A member with a dead property, or a lock, or a body asking for quota: wsgidav's way, same answer.
    patch = (
        b'<?xml version="1.0"?><D:propertyupdate xmlns:D="DAV:" xmlns:K="urn:kgpu:test">'
        b"<D:set><D:prop><K:color>red</K:color></D:prop></D:set></D:propertyupdate>"
    )
    assert dav("PROPPATCH", f"{base}/odd/plain", user, data=patch).status_code == 207
    monkeypatch.setattr(dav_module, "fast_propfind", counting)
    used.clear()
    listing = propfind(f"{base}/odd/", user)
    assert used == [False] and listing["/v1/files/odd/plain/"]["{urn:kgpu:test}color"].text == "red"
    used.clear()
    quota = b'<D:propfind xmlns:D="DAV:"><D:prop><D:quota-used-bytes/></D:prop></D:propfind>'
    propfind(f"{base}/", user, body=quota)
    assert used == [False]


def test_a_file_in_the_way_is_the_same_name_conflict_over_http_and_webdav(stack, user):
    """One rule, one wording (drive/names.py): a file cannot hold anything, whichever way the
    write comes; a missing parent folder stays WebDAV's own 409 (RFC 4918), not a name conflict."""
    put(stack, user, "blocker.txt", b"x")
    want = "blocker.txt is a file, so it cannot hold blocker.txt/inner"
    answers = [
        requests.put(f"{stack.base}/v1/files/blocker.txt/inner", data=b"y", headers={**user.auth, "Expect": ""}),
        dav("PUT", f"{stack.base}/v1/dav/blocker.txt/inner", user, data=b"y"),
        dav("MKCOL", f"{stack.base}/v1/files/blocker.txt/inner/", user),
        dav("COPY", f"{stack.base}/v1/files/blocker.txt", user,
            headers={"Destination": f"{stack.base}/v1/files/blocker.txt/inner"}),
        dav("MOVE", f"{stack.base}/v1/dav/blocker.txt", user,
            headers={"Destination": f"{stack.base}/v1/dav/blocker.txt/inner"}),
    ]
    for reply in answers:
        assert reply.status_code == 409, (reply.request.method, reply.text)
        assert (reply.json()["error_code"], reply.json()["message"]) == ("name_conflict", want), reply.text
    missing = dav("MKCOL", f"{stack.base}/v1/files/no-such-folder/inner/", user)
    assert missing.status_code == 409 and missing.json()["error_code"] == "conflict"
    assert fetch(stack, user, "blocker.txt") == b"x"  # still there, unchanged
    # A folder just written into, emptied, then made a file: at once no folder any more.
    put(stack, user, "was-a-folder/x.txt", b"x")
    assert requests.delete(f"{stack.base}/v1/files/was-a-folder/x.txt", headers=user.auth).status_code == 204
    minted = requests.post(f"{stack.base}/v1/files/was-a-folder", headers={**user.auth, "X-Content-Length": "10"})
    assert minted.status_code == 200, minted.text  # the two-step upload: the bytes go straight to the store
    assert requests.put(minted.json()["url"], data=b"now a file", headers=minted.json()["headers"]).status_code == 200
    under = requests.put(f"{stack.base}/v1/files/was-a-folder/y.txt", data=b"y", headers={**user.auth, "Expect": ""})
    assert under.status_code == 409 and under.json()["error_code"] == "name_conflict", under.text
