"""A file's 302 is signed once a second, not once a request (gateway/edge.py RecentRedirects):
what is remembered is one tenant's, for that second, and never handed out by a store that is down."""

from __future__ import annotations

import requests

from gateway.edge import RecentRedirects


class Clock:
    def __init__(self, now: float = 1_000_000.25):
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_a_redirect_is_remembered_for_its_second_only():
    clock = Clock()
    recent = RecentRedirects(clock)
    assert recent.get("users/1/", b"a.txt") is None
    recent.put("users/1/", b"a.txt", b"https://store/a?1")
    clock.now += 0.7  # the same second
    assert recent.get("users/1/", b"a.txt") == b"https://store/a?1"
    assert recent.get("users/2/", b"a.txt") is None  # another drive's file of that name
    assert recent.get("users/1/", b"a.txt/") is None
    clock.now += 0.1  # the next second: signed afresh
    assert recent.get("users/1/", b"a.txt") is None
    recent.put("users/1/", b"a.txt", b"https://store/a?2")
    assert recent.get("users/1/", b"a.txt") == b"https://store/a?2"


def test_what_is_held_is_bounded():
    """A tenant asking for many names in a second fills it to LIMIT; the rest are signed each time."""
    recent = RecentRedirects(Clock())
    recent.get("users/1/", b"first")
    for n in range(RecentRedirects.LIMIT + 50):
        recent.put("users/1/", f"f{n}".encode(), b"u")
    assert recent.get("users/1/", f"f{RecentRedirects.LIMIT - 1}".encode()) == b"u"
    assert recent.get("users/1/", f"f{RecentRedirects.LIMIT}".encode()) is None
    assert len(recent._locations) == RecentRedirects.LIMIT


def test_the_server_answers_a_remembered_redirect_to_its_own_tenant_only(stack, user, monkeypatch):
    """A URL remembered in this second is what the next GET of that file is answered with (a
    marker put in its place shows it), only for the drive it was signed for, and not once the
    store stops serving: then the full application answers, as it does without the memory."""
    app = stack.server.app
    files = f"{stack.base}/v1/files"
    assert requests.put(f"{files}/memo/a.txt", data=b"memo", headers=user.auth).status_code in (200, 201)
    first = requests.get(f"{files}/memo/a.txt", headers=user.auth, allow_redirects=False)
    assert first.status_code == 302 and requests.get(first.headers["Location"]).content == b"memo"
    assert app.state.authenticator.cached(user.token) is not None  # so the edge answers the next ones

    clock = Clock()
    monkeypatch.setattr(app._recent, "_clock", clock)
    assert app._recent.get(f"users/{user.id}/", b"memo/a.txt") is None  # this second starts empty
    signed = requests.get(f"{files}/memo/a.txt", headers=user.auth, allow_redirects=False)
    assert signed.status_code == 302
    assert app._recent.get(f"users/{user.id}/", b"memo/a.txt") == signed.headers["Location"].encode()
    marker = b"http://marker.invalid/remembered"
    app._recent.put(f"users/{user.id}/", b"memo/a.txt", marker)
    again = requests.get(f"{files}/memo/a.txt", headers=user.auth, allow_redirects=False)
    assert again.status_code == 302 and again.headers["Location"] == marker.decode()
    assert again.headers["X-Request-ID"] and again.headers["Cache-Control"] == "no-store"

    other = stack.new_user()
    requests.get(f"{stack.base}/v1/me", headers=other.auth)  # cached: answered by the edge too
    theirs = requests.get(f"{files}/memo/a.txt", headers=other.auth, allow_redirects=False)
    assert theirs.status_code == 302
    assert theirs.headers["Location"] != marker.decode() and f"/users/{other.id}/memo/a.txt?" in theirs.headers["Location"]

    monkeypatch.setattr(app.state.drive.store.inner, "serving", False, raising=False)
    down = requests.get(f"{files}/memo/a.txt", headers=user.auth, allow_redirects=False)
    assert down.headers.get("Location") != marker.decode()  # the full application answered it
    if down.status_code == 302:  # a store elsewhere is asked by the full application, not by the edge
        assert f"/users/{user.id}/memo/a.txt?" in down.headers["Location"]
