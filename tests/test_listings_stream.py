"""Listings that stream (issue 23, item 3): a PROPFIND Depth 1 and the JSON/HTML folder listings
write a folder's first members as soon as the store returns its first page, never hold the
whole folder in memory, fill the listing cache (drive/store/caching.py) only with a listing read
to its end, and cut the connection when the store fails after the answer began."""

from __future__ import annotations

import http.client
import json
import threading
import xml.etree.ElementTree as ET
from urllib.parse import urlsplit

import pytest
import requests

from drive.store import ListPage, ObjectInfo, StoreUnavailable
from drive.store.caching import CacheLimits, CachingStore
from tests.clients import curl

D = "{DAV:}"


class _Marks:
    def generation(self, drive):
        return 0

    def bump(self, drive):
        pass

    def urls_out(self, drive, keys, expires_in):
        pass

    def look(self, drive, folder, limit):
        return 0, []


class _PagedStore:
    """A folder of ``count`` objects listed ``max_keys`` at a time; counts the list calls, and
    fails those listed in ``fail_pages`` (0: the first)."""

    def __init__(self, count: int, fail_pages=()):
        self.keys = [f"users/1/f/x{i:04d}" for i in range(count)]
        self.calls = 0
        self.fail_pages = set(fail_pages)

    def list_page(self, prefix, delimiter=None, token=None, max_keys=1000):
        start = int(token or 0)
        page_number = start // max_keys
        self.calls += 1
        if page_number in self.fail_pages:
            raise StoreUnavailable("object store unreachable: the test's")
        keys = self.keys[start : start + max_keys]
        more = start + max_keys < len(self.keys)
        return ListPage([ObjectInfo(k, 1, '"e"', None) for k in keys], str(start + max_keys) if more else None)


def _caching(inner, **extra) -> CachingStore:
    store = CachingStore(inner, _Marks(), CacheLimits(**extra))
    store.page_size = 10
    return store


def test_a_cold_listing_streams_page_by_page_and_is_kept_only_once_read_to_its_end():
    inner = _PagedStore(35)
    store = _caching(inner)
    pages = store.folder_pages("users/1/f/")
    assert inner.calls == 1  # the first page is asked before anything is returned
    assert [e.key for e in next(pages)] == inner.keys[:10]
    assert inner.calls == 1  # ... and the second only when the caller reads on
    next(pages)
    assert inner.calls == 2
    pages.close()  # a client gone halfway: nothing is kept
    assert store.cached_folders() == []
    assert [e.key for e in store.folder_entries("users/1/f/")] == inner.keys
    assert store.cached_folders() == ["users/1/f/"]
    calls = inner.calls
    cached = [len(page) for page in store.folder_pages("users/1/f/")]
    assert cached == [10, 10, 10, 5] and inner.calls == calls  # from the cache, in pages too


def test_a_folder_too_big_to_keep_is_streamed_every_time_and_never_kept():
    inner = _PagedStore(35)
    store = _caching(inner, folder_max_entries=30)
    for _ in range(2):
        calls = inner.calls
        assert [e.key for e in store.folder_entries("users/1/f/")] == inner.keys
        assert inner.calls == calls + 4
    assert store.cached_folders() == []


def test_a_tenants_huge_folder_does_not_push_out_the_others_listings():
    """Before, a folder of up to the cache's 100,000 entries was kept whole, and every other
    folder went to make room: one tenant listing one big folder emptied the cache for all."""
    small, huge = _PagedStore(5), _PagedStore(35)
    limits = CacheLimits(max_entries=40, folder_max_entries=30)
    store = CachingStore(_Router({"users/1/": small, "users/2/": huge}), _Marks(), limits)
    store.page_size = 10
    assert len(list(store.folder_entries("users/1/f/"))) == 5
    for _ in range(3):
        assert len(list(store.folder_entries("users/2/f/"))) == 35
    assert store.cached_folders() == ["users/1/f/"]
    calls = small.calls
    list(store.folder_entries("users/1/f/"))
    assert small.calls == calls  # still answered from the cache


class _Router:
    """Each drive's folder listed by its own store."""

    def __init__(self, stores: dict):
        self.stores = stores

    def list_page(self, prefix, delimiter=None, token=None, max_keys=1000):
        store = next(s for drive, s in self.stores.items() if prefix.startswith(drive))
        return store.list_page(prefix, delimiter, token, max_keys)


def test_a_store_failing_mid_listing_raises_to_the_reader_and_nothing_is_kept():
    store = _caching(_PagedStore(35, fail_pages={2}))
    pages = store.folder_pages("users/1/f/")
    assert len(next(pages)) == len(next(pages)) == 10
    with pytest.raises(StoreUnavailable):
        next(pages)
    assert store.cached_folders() == []
    with pytest.raises(StoreUnavailable):  # failing at once: raised before a page is returned
        _caching(_PagedStore(35, fail_pages={0})).folder_pages("users/1/f/")


# ------------------------------------------------------------------ through the gateway


class _Held:
    """The live store, with the pages after the first of one folder held back until the test
    says the client has read the members of the first (or failed, with ``fail``)."""

    def __init__(self, inner, folder: str, fail: bool = False):
        self.inner, self.folder, self.fail = inner, folder, fail
        self.client_read_first = threading.Event()
        self.later_pages_asked_after_first_read: list[bool] = []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def list_page(self, prefix, delimiter=None, token=None, max_keys=1000):
        if token and prefix == self.folder:
            if self.fail:
                raise StoreUnavailable("object store unreachable: the test cut it")
            self.later_pages_asked_after_first_read.append(self.client_read_first.wait(30))
        return self.inner.list_page(prefix, delimiter=delimiter, token=token, max_keys=max_keys)


def _open(url: str, method: str, headers: dict, body: bytes | None = None) -> http.client.HTTPResponse:
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    conn.request(method, parts.path + (f"?{parts.query}" if parts.query else ""), body=body, headers=headers)
    return conn.getresponse()


def _read_until(reply: http.client.HTTPResponse, marker: bytes) -> bytes:
    got = b""
    while marker not in got:
        chunk = reply.read1(65536)
        assert chunk, f"the answer ended before {marker!r}: {got[-300:]!r}"
        got += chunk
    return got


LISTINGS = {
    "propfind": ("PROPFIND", "", {"Depth": "1"}),
    "json": ("GET", "?json=1", {}),
    "html": ("GET", "", {"Accept": "text/html"}),
}


@pytest.mark.parametrize("kind", list(LISTINGS))
def test_listings_write_the_first_page_before_the_store_lists_the_next(stack, user, monkeypatch, kind):
    method, query, headers = LISTINGS[kind]
    folder = f"stream-{kind}"
    names = [f"f{n}.txt" for n in range(5)]
    for n, name in enumerate(names):  # kept times and hashes on every page, read a page at a time
        reply = requests.put(
            f"{stack.base}/v1/files/{folder}/{name}", data=name.encode(), headers={**user.auth, "X-OC-Mtime": str(1600000000 + n)}
        )
        assert reply.status_code == 201, reply.text
    held = _Held(stack.store.inner, f"users/{user.id}/{folder}/")
    monkeypatch.setattr(stack.store, "inner", held)
    monkeypatch.setattr(stack.store, "page_size", 2)
    reply = _open(f"{stack.base}/v1/files/{folder}/{query}", method, {**user.auth, **headers})
    assert reply.status in (200, 207)
    first = _read_until(reply, b"f1.txt")  # the first page's members, while the second is held back
    held.client_read_first.set()
    body = first + reply.read()
    assert held.later_pages_asked_after_first_read == [True, True]
    if kind == "propfind":
        listing = {
            r.find(f"{D}href").text: r for r in ET.fromstring(body).iter(f"{D}response")
        }
        assert sorted(h.rsplit("/", 1)[1] for h in listing if not h.endswith("/")) == names
        last = listing[f"/v1/files/{folder}/f4.txt"]
        assert last.find(f".//{D}getlastmodified").text == "Sun, 13 Sep 2020 12:26:44 GMT"
    elif kind == "json":
        entries = json.loads(body)["entries"]
        assert [e["name"] for e in entries] == names
        assert entries[4]["last_modified"] == "2020-09-13T12:26:44Z" and entries[4]["sha1"]
    else:
        assert body.count(b"<tr><td><a href=") == 1 + len(names) and body.endswith(b"</html>\n")
    # Read to its end: the listing is kept, and the next one comes from the cache.
    assert f"users/{user.id}/{folder}/" in stack.store.cached_folders()


@pytest.mark.parametrize("kind", list(LISTINGS))
def test_a_store_failing_mid_listing_cuts_the_connection(stack, user, monkeypatch, kind):
    """The status is sent already: the client must see an unfinished body, never a listing that
    ends early but looks complete; and the short listing is not kept."""
    method, query, headers = LISTINGS[kind]
    folder = f"cut-{kind}"
    for n in range(5):
        requests.put(f"{stack.base}/v1/files/{folder}/f{n}.txt", data=b"x", headers=user.auth)
    inner = stack.store.inner
    monkeypatch.setattr(stack.store, "inner", _Held(inner, f"users/{user.id}/{folder}/", fail=True))
    monkeypatch.setattr(stack.store, "page_size", 2)
    reply = _open(f"{stack.base}/v1/files/{folder}/{query}", method, {**user.auth, **headers})
    assert reply.status in (200, 207)
    with pytest.raises(http.client.IncompleteRead):
        reply.read()
    extra = [arg for name, value in headers.items() for arg in ("-H", f"{name}: {value}")]
    cut = curl("-X", method, *extra, f"{stack.base}/v1/files/{folder}/{query}", token=user.token, check=False)
    assert cut.returncode == 18, (cut.returncode, cut.stderr)  # "transfer closed with outstanding read data"
    assert f"users/{user.id}/{folder}/" not in stack.store.cached_folders()
    monkeypatch.setattr(stack.store, "inner", inner)
    whole = requests.request(method, f"{stack.base}/v1/files/{folder}/{query}", headers={**user.auth, **headers})
    assert whole.status_code in (200, 207) and all(f"f{n}.txt" in whole.text for n in range(5))


def test_a_client_gone_mid_listing_leaves_no_short_listing_behind(stack, user, monkeypatch):
    """A hostile (or impatient) client reads the first page and hangs up: whatever the server
    had listed by then, what it keeps (if anything) is whole, and the next listing is too."""
    folder = "gone"
    for n in range(5):
        requests.put(f"{stack.base}/v1/files/{folder}/f{n}.txt", data=b"x", headers=user.auth)
    key = f"users/{user.id}/{folder}/"
    held = _Held(stack.store.inner, key)
    monkeypatch.setattr(stack.store, "inner", held)
    monkeypatch.setattr(stack.store, "page_size", 2)
    reply = _open(f"{stack.base}/v1/files/{folder}/", "PROPFIND", {**user.auth, "Depth": "1"})
    _read_until(reply, b"f1.txt")
    reply.close()  # gone, with the second page still held back
    held.client_read_first.set()
    monkeypatch.setattr(stack.store, "page_size", 1000)
    listing = propfind_names(stack, user, folder)
    assert listing == [f"f{n}.txt" for n in range(5)]
    assert key in stack.store.cached_folders()  # this one was read to its end


def propfind_names(stack, user, folder: str) -> list[str]:
    reply = requests.request("PROPFIND", f"{stack.base}/v1/files/{folder}/", headers={**user.auth, "Depth": "1"})
    assert reply.status_code == 207, reply.text
    hrefs = [r.find(f"{D}href").text for r in ET.fromstring(reply.content).iter(f"{D}response")]
    return sorted(h.rsplit("/", 1)[1] for h in hrefs if not h.endswith("/"))


def test_a_store_down_before_the_first_page_is_a_503_for_every_listing(stack, user, monkeypatch):
    requests.put(f"{stack.base}/v1/files/down/f.txt", data=b"x", headers=user.auth)

    class Down:
        def __getattr__(self, name):
            return getattr(inner, name)

        def list_page(self, *args, **kwargs):
            raise StoreUnavailable("object store unreachable: the test's")

    inner = stack.store.inner
    monkeypatch.setattr(stack.store, "inner", Down())
    for kind, (method, query, headers) in LISTINGS.items():
        reply = requests.request(method, f"{stack.base}/v1/files/down/{query}", headers={**user.auth, **headers})
        assert reply.status_code == 503, (kind, reply.status_code, reply.text)
        assert reply.json()["error_code"] == "store_unavailable", kind
