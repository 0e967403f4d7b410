"""Path → key mapping: every request path stays inside the caller's drive prefix.

Three layers:

* unit tests of :mod:`drive.keys` (``from_raw_path``, ``from_text``,
  ``listing_prefix``) on accepted and rejected inputs;
* Hypothesis properties of ``from_raw_path`` on inputs built from dangerous
  pieces (dot segments, encoded separators, NUL, overlong and invalid UTF-8,
  fullwidth look-alikes, double encoding): refused, or a key inside the prefix;
* HTTP tests against the live server on every stack: attack paths get a 400
  error envelope for GET, HEAD, PUT and DELETE, and a second user's sentinel
  object survives every attack byte for byte.

Attack paths are sent with :mod:`http.client`, which puts the request target on
the wire exactly as given (``requests``/``urllib3`` may normalise ``..``).
"""

from __future__ import annotations

import http.client
import json
import posixpath
import re
import unicodedata
import uuid
from dataclasses import dataclass
from urllib.parse import quote, unquote, urlsplit

import pytest
import requests
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from drive.keys import (
    MAX_KEY_BYTES,
    MAX_NAME_BYTES,
    DrivePath,
    InvalidPath,
    from_raw_path,
    from_text,
    from_url_path,
    listing_prefix,
    under_mount,
    user_prefix,
)

PREFIX = "users/1/"
THOROUGH = settings(max_examples=500, deadline=None)  # the properties of one parser


# ============================================================== helpers


def assert_inside(prefix: str, path: DrivePath) -> None:
    """Everything a key accepted by drive.keys must satisfy."""
    key = path.key
    assert path.prefix == prefix
    assert key.startswith(prefix)
    assert key == prefix + path.rel
    assert "\\" not in key, key
    assert not any(unicodedata.category(ch) == "Cc" for ch in key), ascii(key)  # C0, DEL, C1
    encoded = key.encode("utf-8")  # strict: a lone surrogate would raise here
    assert encoded.decode("utf-8") == key
    assert len(encoded) <= MAX_KEY_BYTES
    rel = path.rel
    assert not rel.startswith("/")
    if rel:
        body = rel[:-1] if rel.endswith("/") else rel
        for segment in body.split("/"):
            assert segment not in ("", ".", ".."), rel
            folded = unicodedata.normalize("NFKC", segment)
            assert folded not in (".", ".."), ascii(segment)
            assert "/" not in folded and "\\" not in folded, ascii(segment)
    # Whatever a store or file system does with the key, resolving it stays below the prefix.
    resolved = posixpath.normpath("/" + key)
    assert (resolved + "/").startswith("/" + prefix), (key, resolved)
    assert path.is_dir == (rel == "" or rel.endswith("/"))


def accepted(parse, prefix: str, value):
    """What ``parse(prefix, value)`` makes of ``value``, or None where it refuses it (InvalidPath)."""
    try:
        return parse(prefix, value)
    except InvalidPath:
        return None


def quote_path(rel: str) -> bytes:
    """A legitimate client's encoding of a drive-relative path."""
    return quote(rel, safe="/").encode("ascii")


# ============================================================== unit: from_raw_path, accepted

ACCEPTED_RAW = [
    # raw, rel, is_dir
    (b"", "", True),
    (b"a.txt", "a.txt", False),
    (b"dir/", "dir/", True),
    (b"a/b/c.txt", "a/b/c.txt", False),
    (b"a/b/c/", "a/b/c/", True),
    (b"my%20file.txt", "my file.txt", False),
    (b"my file.txt", "my file.txt", False),
    (b"%23hash.txt", "#hash.txt", False),
    (b"100%25.txt", "100%.txt", False),
    (b"a+b.txt", "a+b.txt", False),  # '+' is not a space in a path
    (b"a%2Bb.txt", "a+b.txt", False),
    (b"caf%C3%A9.txt", "caf\u00e9.txt", False),
    (b"caf%c3%a9.txt", "caf\u00e9.txt", False),
    (b"caf%C3%a9.txt", "caf\u00e9.txt", False),  # mixed-case escapes
    (b"%F0%9F%98%80.png", "\U0001f600.png", False),
    (b"%E6%97%A5%E6%9C%AC/", "\u65e5\u672c/", True),
    (b"%E6%97%A5%E6%9C%AC/%E8%AA%9E.txt", "\u65e5\u672c/\u8a9e.txt", False),
    (b".hidden", ".hidden", False),
    (b"...", "...", False),
    (b"a..b", "a..b", False),
    (b"..a", "..a", False),
    (b"a.", "a.", False),
    (b"%2E%2Ea", "..a", False),
    (b"..;", "..;", False),
    (b"x?y", "x?y", False),  # the route strips the query before this; here it is literal
    # double encoding decodes once and stays a harmless literal name
    (b"%252e%252e", "%2e%2e", False),
    (b"%252E%252E/%252fetc", "%2E%2E/%2fetc", False),
    (b"%252e%252e%252f%252e%252e%252fusers%252f2", "%2e%2e%2f%2e%2e%2fusers%2f2", False),
    (b"%255c", "%5c", False),
    (b"%2500", "%00", False),
]


@pytest.mark.parametrize("raw, rel, is_dir", ACCEPTED_RAW, ids=[ascii(r[0]) for r in ACCEPTED_RAW])
def test_from_raw_path_accepts(raw, rel, is_dir):
    path = from_raw_path(PREFIX, raw)
    assert path.rel == rel
    assert path.key == PREFIX + rel
    assert path.is_dir is is_dir
    assert_inside(PREFIX, path)


def test_root_and_names():
    root = from_raw_path(PREFIX, b"")
    assert (root.rel, root.key, root.is_dir, root.name) == ("", PREFIX, True, "")
    assert from_raw_path(PREFIX, b"a/b/c.txt").name == "c.txt"
    assert from_raw_path(PREFIX, b"a/b/").name == "b"
    assert from_raw_path(PREFIX, b"%F0%9F%98%80").name == "\U0001f600"


def test_url_path_under_a_mount():
    """The one parser of a request's path (the HTTP routes, WebDAV's dispatcher, the edge's 302):
    the mount with or without its slash is the drive's root; a mount spelled otherwise (encoded,
    or a longer name that starts like it) is not under it, and names no key."""
    for mount in (b"/v1/files", b"/v1/files/"):
        assert under_mount(mount, b"/v1/files") == b""
        assert under_mount(mount, b"/v1/files/") == b""
        assert under_mount(mount, b"/v1/files/a%20b/c") == b"a%20b/c"
        assert from_url_path(PREFIX, mount, b"/v1/files") == DrivePath(PREFIX, "")
        assert from_url_path(PREFIX, mount, b"/v1/files/a%20b/c/") == DrivePath(PREFIX, "a b/c/")
        for elsewhere in (b"/v1/filesx/a", b"/v1/files%2fa", b"/v1/%66iles/a", b"/v1/file", b"/v1/dav/a"):
            assert under_mount(mount, elsewhere) is None, elsewhere
            with pytest.raises(InvalidPath, match="percent-encoded"):
                from_url_path(PREFIX, mount, elsewhere)
        with pytest.raises(InvalidPath):
            from_url_path(PREFIX, mount, b"/v1/files/a/%2e%2e/%2e%2e/b")


def test_key_length_limit_is_exact():
    room = MAX_KEY_BYTES - len(PREFIX.encode())
    assert room == 1016
    fits = "/".join(["a" * 200] * 5) + "/" + "a" * 11  # names of at most 255 bytes, 1016 in all
    assert from_raw_path(PREFIX, fits.encode()).key == PREFIX + fits
    with pytest.raises(InvalidPath):
        from_raw_path(PREFIX, fits.encode() + b"a")
    # bytes, not characters: U+00E9 is two bytes of UTF-8
    acute = "/".join(["%C3%A9" * 100] * 5) + "/"
    assert len(from_raw_path(PREFIX, (acute + "%C3%A9" * 5).encode()).key.encode()) == MAX_KEY_BYTES - 1  # 1015 + 8
    with pytest.raises(InvalidPath):
        from_raw_path(PREFIX, (acute + "%C3%A9" * 6).encode())
    # a trailing slash counts too
    with pytest.raises(InvalidPath):
        from_raw_path(PREFIX, fits.encode() + b"/")
    with pytest.raises(InvalidPath):
        from_text(PREFIX, fits + "a")


def test_name_length_limit_is_exact():
    assert from_text(PREFIX, "a" * MAX_NAME_BYTES).name == "a" * 255
    assert from_raw_path(PREFIX, b"%C3%A9" * 127 + b"/").name == "\u00e9" * 127  # 254 bytes
    for too_long in ("a" * 256, "\u00e9" * 128, "d/" + "a" * 256 + "/f.txt"):
        with pytest.raises(InvalidPath, match="255 bytes"):
            from_text(PREFIX, too_long)


@pytest.mark.parametrize("name", ["\ufffe", "a\uffffb", "\ud800", " ", "  ", "\u00a0", "\u3000"])
def test_names_a_listing_cannot_carry_are_refused(name):
    with pytest.raises(InvalidPath):
        from_text(PREFIX, f"d/{name}/f.txt")
    with pytest.raises(InvalidPath):
        listing_prefix(PREFIX, f"d/{name}")


# ============================================================== unit: from_raw_path, rejected

REJECTED_RAW = {
    # dot segments, plain and encoded in every case mix
    "dot": b".",
    "dotdot": b"..",
    "dotdot-slash": b"../",
    "dotdot-up": b"../users/2/secret.txt",
    "dotdot-twice": b"../../etc/passwd",
    "dotdot-inner": b"a/../../b",
    "dot-inner": b"a/./b",
    "dotdot-last": b"a/..",
    "dotdot-dir": b"a/../",
    "enc-dotdot-lower": b"%2e%2e/x",
    "enc-dotdot-upper": b"%2E%2E/x",
    "enc-dotdot-mixed": b"%2e%2E/x",
    "enc-dot-half-1": b".%2e/x",
    "enc-dot-half-2": b"%2E./x",
    "enc-dot": b"%2e",
    "enc-dotdot-inner": b"a/%2e%2e/%2e%2e/users/2/x",
    # encoded separators
    "enc-slash": b"%2f",
    "enc-slash-upper": b"a%2Fb",
    "enc-slash-dotdot": b"..%2f..%2fetc",
    "enc-slash-all": b"%2e%2e%2f%2e%2e%2fusers%2f2%2fsecret.txt",
    "enc-slash-lead": b"%2fetc%2fpasswd",
    "enc-backslash": b"%5c",
    "enc-backslash-upper": b"a%5Cb",
    "enc-backslash-dotdot": b"..%5c..%5cusers%5c2",
    "backslash": b"\\",
    "backslash-inner": b"a\\b",
    "backslash-dotdot": b"..\\..\\users\\2\\secret.txt",
    # NUL and other control characters
    "nul": b"%00",
    "nul-suffix": b"secret.txt%00.jpg",
    "nul-dir": b"a%00/",
    "nul-dotdot": b"..%00/x",
    "ctl-01": b"%01",
    "ctl-1f": b"%1F",
    "ctl-lf": b"a%0ab",
    "ctl-crlf": b"a%0d%0aX-Injected:%20yes",
    "ctl-tab": b"a%09b",
    "del": b"%7f",
    "raw-nul": b"a\x00b",
    "raw-lf": b"a\nb",
    # absolute and empty segments
    "slash": b"/",
    "abs": b"/etc",
    "abs-double": b"//etc",
    "abs-users": b"/users/2/secret.txt",
    "double-slash": b"a//b",
    "double-slash-end": b"a/b//",
    # overlong UTF-8 encodings of '.', '/', '\\'
    "overlong-dotdot": b"%c0%ae%c0%ae",
    "overlong-dotdot-dir": b"%c0%ae%c0%ae/x",
    "overlong-dotdot-upper": b"%C0%AE%C0%AE%C0%AFusers",
    "overlong-slash": b"%c0%af",
    "overlong-backslash": b"%c1%9c",
    "overlong-3byte-dot": b"%e0%80%ae%e0%80%ae",
    "overlong-4byte-dot": b"%f0%80%80%ae",
    # invalid UTF-8
    "ff": b"%ff",
    "ff-inner": b"secret%ff.txt",
    "fe-ff": b"%fe%ff",
    "lone-continuation": b"%80",
    "truncated": b"%c3",
    "truncated-mid": b"a%e6%97/b",
    "surrogate": b"%ed%a0%80",
    "above-max": b"%f4%90%80%80",
    "raw-ff": b"\xff",
    # fullwidth / compatibility look-alikes that fold (NFKC) to dots and separators
    "fullwidth-dotdot": b"%EF%BC%8E%EF%BC%8E",
    "fullwidth-dotdot-lower": b"%ef%bc%8e%ef%bc%8e/x",
    "fullwidth-dot": b"%EF%BC%8E",
    "fullwidth-mixed-dotdot": b"%2e%EF%BC%8E",
    "fullwidth-solidus": b"a%EF%BC%8Fb",
    "fullwidth-solidus-dotdot": b"%EF%BC%8E%EF%BC%8E%EF%BC%8Fusers",
    "fullwidth-reverse-solidus": b"%EF%BC%BC",
    "two-dot-leader": b"%E2%80%A5",
    "one-dot-leader-x2": b"%E2%80%A4%E2%80%A4",
    "small-full-stop-x2": b"%EF%B9%92%EF%B9%92",
    "raw-fullwidth-dotdot": "\uff0e\uff0e".encode(),
    # malformed percent-encoding
    "percent": b"%",
    "percent-one": b"%2",
    "percent-end": b"a%",
    "percent-nonhex": b"%zz",
    "percent-g": b"%g0",
    "percent-iis-unicode": b"%u002e%u002e",
    "percent-nested": b"%%32%65%%32%65",
    # too long
    "too-long": b"a" * (MAX_KEY_BYTES + 1),
    "too-long-segments": b"/".join([b"abcdefghij"] * 100),
}


@pytest.mark.parametrize("raw", list(REJECTED_RAW.values()), ids=list(REJECTED_RAW))
def test_from_raw_path_rejects(raw):
    with pytest.raises(InvalidPath):
        from_raw_path(PREFIX, raw)


def test_invalid_path_is_a_value_error():
    assert issubclass(InvalidPath, ValueError)


# ============================================================== unit: from_text

ACCEPTED_TEXT = [
    ("", "", True),
    ("a.txt", "a.txt", False),
    ("dir/", "dir/", True),
    ("a b/#c+d%25.txt", "a b/#c+d%25.txt", False),  # already decoded: '%25' is literal
    ("%2e%2e", "%2e%2e", False),  # literal, harmless
    ("%2f", "%2f", False),
    ("\U0001f600/\u65e5\u672c.txt", "\U0001f600/\u65e5\u672c.txt", False),
    ("...", "...", False),
    (".config/x", ".config/x", False),
]


@pytest.mark.parametrize("text, rel, is_dir", ACCEPTED_TEXT, ids=[ascii(t[0]) for t in ACCEPTED_TEXT])
def test_from_text_accepts(text, rel, is_dir):
    path = from_text(PREFIX, text)
    assert (path.rel, path.is_dir) == (rel, is_dir)
    assert_inside(PREFIX, path)


REJECTED_TEXT = [
    ".",
    "..",
    "../x",
    "a/../b",
    "a/./b",
    "a/..",
    "/",
    "/etc",
    "//etc",
    "/users/2/secret.txt",
    "a//b",
    "a\\b",
    "\\",
    "..\\x",
    "a\x00b",
    "\x00",
    "\x1f",
    "a\nb",
    "\x7f",
    "\uff0e\uff0e",
    "a/\uff0e\uff0e/b",
    "\uff0e",
    "\uff0f",
    "a\uff0fb",
    "\uff3c",
    "\u2025",
    "\ufe52\ufe52",
    "a" * (MAX_KEY_BYTES + 1),
]


@pytest.mark.parametrize("text", REJECTED_TEXT, ids=[ascii(t)[:40] for t in REJECTED_TEXT])
def test_from_text_rejects(text):
    with pytest.raises(InvalidPath):
        from_text(PREFIX, text)


# ============================================================== unit: listing_prefix

ACCEPTED_LISTING = [
    ("", PREFIX),
    ("a", PREFIX + "a"),
    ("a/", PREFIX + "a/"),
    ("a/b", PREFIX + "a/b"),
    ("photos/2024-", PREFIX + "photos/2024-"),
    ("photos/", PREFIX + "photos/"),
    ("\u65e5\u672c", PREFIX + "\u65e5\u672c"),
    ("a b/#x+", PREFIX + "a b/#x+"),
    ("%2e%2e", PREFIX + "%2e%2e"),
    ("...", PREFIX + "..."),
    ("a/.hid", PREFIX + "a/.hid"),
]


@pytest.mark.parametrize("partial, expected", ACCEPTED_LISTING, ids=[ascii(p[0]) for p in ACCEPTED_LISTING])
def test_listing_prefix_accepts(partial, expected):
    got = listing_prefix(PREFIX, partial)
    assert got == expected
    assert got.startswith(PREFIX)


REJECTED_LISTING = [
    ".",
    "..",
    "../",
    "../x",
    "a/..",
    "a/../b",
    "a/./",
    "a//",
    "a//b",
    "//",
    "//etc",
    "/a/b",
    "\\",
    "a\\b",
    "a/b\\",
    "\x00",
    "a/\x00",
    "a/b\x01",
    "\uff0e\uff0e",
    "a/\uff0e\uff0e",
    "a/\uff0fx",
    "\u2025/x",
]


@pytest.mark.parametrize("partial", REJECTED_LISTING, ids=[ascii(p) for p in REJECTED_LISTING])
def test_listing_prefix_rejects(partial):
    with pytest.raises(InvalidPath):
        listing_prefix(PREFIX, partial)


def test_listing_prefix_rejects_leading_slash():
    for partial in ("/", "/etc"):
        with pytest.raises(InvalidPath):
            listing_prefix(PREFIX, partial)


@pytest.mark.parametrize("raw", [b"%C2%80", b"a%C2%85b", b"%C2%9F", b"x/%c2%85/y"])
def test_c1_control_characters_are_rejected(raw):
    """Every Unicode control character (category Cc), C1 included, is refused."""
    with pytest.raises(InvalidPath):
        from_raw_path(PREFIX, raw)
    with pytest.raises(InvalidPath):
        from_text(PREFIX, unquote(raw.decode()))


# ============================================================== user prefixes


def test_user_prefixes_do_not_nest():
    assert user_prefix(1) == "users/1/"
    assert user_prefix(10) == "users/10/"
    for a, b in [(1, 10), (1, 11), (1, 100), (2, 20), (12, 123)]:
        assert not user_prefix(b).startswith(user_prefix(a))
        assert not user_prefix(a).startswith(user_prefix(b))


# ============================================================== properties

DANGEROUS_PIECES = [
    ".", "..", "...", "/", "//", "\\", "%2e", "%2E", "%2e%2e", "%2f", "%2F", "%5c", "%5C", "%00", "%01",
    "%0a", "%7f", "%c0%ae", "%C0%AF", "%c1%9c", "%e0%80%ae", "%ff", "%fe", "%80", "%ed%a0%80", "%",
    "%2", "%25", "%252e", "%252f", "%u002e", "%EF%BC%8E", "%ef%bc%8f", "%EF%BC%BC", "%E2%80%A5",
    "\uff0e", "\uff0f", "\u2025", "%C2%85",
]
SAFE_PIECES = ["a", "b", "users", "2", "10", "secret.txt", " ", "#", "+", "%20", "%C3%A9", "\u00e9",
               "\U0001f600", "%F0%9F%98%80", "\u65e5", "-", "_", "~", ";"]

piece = st.one_of(
    st.sampled_from(DANGEROUS_PIECES),
    st.sampled_from(DANGEROUS_PIECES),
    st.sampled_from(SAFE_PIECES),
    st.text(max_size=3),
)
piece_string = st.lists(piece, max_size=24).map("".join)
raw_from_pieces = piece_string.map(lambda s: s.encode("utf-8", errors="surrogatepass"))
segment_lists = st.builds(
    lambda lead, segs, trail: ("/" if lead else "") + "/".join(segs) + ("/" if trail else ""),
    st.booleans(),
    st.lists(st.lists(piece, max_size=5).map("".join), max_size=8),
    st.booleans(),
).map(lambda s: s.encode("utf-8", errors="surrogatepass"))
raw_paths = st.one_of(raw_from_pieces, segment_lists, st.binary(max_size=64))
user_ids = st.integers(min_value=1, max_value=10**9)


@settings(max_examples=1500, deadline=None)
@given(raw=raw_paths, uid=user_ids)
@example(raw=b"%2e%2e/%2e%2e/users/2/x", uid=1)
@example(raw=b"%c0%ae%c0%ae/x", uid=1)
@example(raw=b"%EF%BC%8E%EF%BC%8E/x", uid=1)
@example(raw=b"//etc", uid=1)
def test_property_raw_path_refused_or_inside(raw, uid):
    prefix = user_prefix(uid)
    path = accepted(from_raw_path, prefix, raw)
    if path is None:
        return
    assert_inside(prefix, path)
    # The three entry points agree on what a key means.
    assert from_text(prefix, path.rel) == path
    assert listing_prefix(prefix, path.rel) == path.key
    # Re-encoding the accepted path and parsing it again is the identity.
    assert from_raw_path(prefix, quote_path(path.rel)) == path


plain_pieces = st.sampled_from(["a", "Z9", ".", "..", "-", "_", "~", "+=,@", "/", "//", "%2F", "%41", " ", "\\", "é", "\x00"])
plain_like = st.lists(plain_pieces, max_size=12).map(lambda p: "".join(p).encode("utf-8"))


@settings(max_examples=3000, deadline=None)
@given(raw=st.one_of(plain_like, raw_paths))
@example(raw=b"a" * 255)
@example(raw=b"a" * 256)
@example(raw=b"a/" * 127)
@example(raw=b"a/.b/..c/")
def test_the_plain_path_shortcut_answers_as_the_general_rule(raw):
    """from_raw_path's shortcut for plain ASCII paths (the 302's hot case) gives exactly what the
    segment-by-segment rule gives: the same DrivePath, or InvalidPath for both."""
    import drive.keys as keys_module

    def outcome():
        try:
            return from_raw_path("users/1/", raw)
        except InvalidPath:
            return InvalidPath

    fast = outcome()
    saved = keys_module._PLAIN_RAW
    keys_module._PLAIN_RAW = re.compile(rb"(?!)")  # matches nothing: the general rule only
    try:
        general = outcome()
    finally:
        keys_module._PLAIN_RAW = saved
    assert fast == general


@THOROUGH
@given(raw=raw_paths, a=user_ids, b=user_ids)
@example(raw=b"x", a=1, b=10)
@example(raw=b"x", a=10, b=1)
@example(raw=b"..%2f10%2fx", a=1, b=10)
@example(raw=b"0/x", a=1, b=10)
def test_property_users_never_collide(raw, a, b):
    assume(a != b)
    path = accepted(from_raw_path, user_prefix(a), raw)
    if path is None:
        return
    assert path.key.startswith(user_prefix(a))
    assert not path.key.startswith(user_prefix(b))


@THOROUGH
@given(text=piece_string, uid=user_ids)
def test_property_text_and_listing_prefix_refused_or_inside(text, uid):
    """The two parsers of a decoded name, on the same text: each refuses it or stays inside."""
    prefix = user_prefix(uid)
    path = accepted(from_text, prefix, text)
    if path is not None:
        assert_inside(prefix, path)
        assert path.rel == text
    got = accepted(listing_prefix, prefix, text)
    if got is None:
        return
    assert got.startswith(prefix)
    rest = got[len(prefix) :]
    assert "\\" not in rest and not any(unicodedata.category(ch) == "Cc" for ch in rest)
    assert ".." not in rest.split("/") and "." not in rest.split("/")
    assert (posixpath.normpath("/" + got) + "/").startswith("/" + prefix)


SAFE_CHARS = (
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
    " #+%-_.~'()&=@!$,;:?[]{}^`|\"<>*"
    "\u00e9\u00fc\u00df\u03a9\u65e5\u672c\u8a9e\u0416\u05d0\u0627\U0001f600\U0001f680\U0001f468\u200d\U0001f469"
)
safe_segment = st.one_of(
    st.text(alphabet=SAFE_CHARS, min_size=1, max_size=12),
    st.text(st.characters(categories=["L", "N"]), min_size=1, max_size=6),
).filter(
    lambda s: s not in (".", "..")
    and s.strip() != ""  # a whitespace-only name is refused (check_name)
    and unicodedata.normalize("NFKC", s) not in (".", "..")
    and not {"/", "\\"} & set(unicodedata.normalize("NFKC", s))
)


@THOROUGH
@given(
    segments=st.lists(safe_segment, min_size=1, max_size=6),
    is_dir=st.booleans(),
    uid=user_ids,
    case=st.randoms(use_true_random=False),
)
def test_property_legitimate_paths_round_trip(segments, is_dir, uid, case):
    rel = "/".join(segments) + ("/" if is_dir else "")
    prefix = user_prefix(uid)
    assume(len((prefix + rel).encode()) <= MAX_KEY_BYTES)
    encoded = quote_path(rel)
    path = from_raw_path(prefix, encoded)
    assert path.rel == rel
    assert path.key == prefix + rel
    assert path.is_dir is is_dir
    assert_inside(prefix, path)
    # escapes in any case mix decode the same
    mixed = re.sub(
        rb"%[0-9A-F]{2}", lambda m: m.group(0).lower() if case.random() < 0.5 else m.group(0), encoded
    )
    assert from_raw_path(prefix, mixed) == path
    # fully percent-encoded (every byte) decodes the same too
    every_byte = "".join(
        "/" if c == "/" else "".join(f"%{b:02X}" for b in c.encode()) for c in rel
    ).encode()
    assert from_raw_path(prefix, every_byte) == path
    # the decoded form goes through from_text unchanged
    assert from_text(prefix, rel) == path


# ============================================================== HTTP


@dataclass
class Reply:
    status: int
    headers: http.client.HTTPMessage
    body: bytes

    def json(self):
        return json.loads(self.body)


def raw_request(stack, method: str, target: str, headers: dict | None = None, body: bytes | None = None) -> Reply:
    """Send ``target`` on the request line byte for byte (no normalisation)."""
    conn = http.client.HTTPConnection("127.0.0.1", stack.server.port, timeout=30)
    try:
        conn.putrequest(method, target, skip_accept_encoding=True)
        for name, value in (headers or {}).items():
            conn.putheader(name, value)
        if body is not None or method in ("PUT", "POST"):
            conn.putheader("Content-Length", str(len(body or b"")))
        conn.endheaders(body or None)
        reply = conn.getresponse()
        return Reply(reply.status, reply.headers, reply.read())
    finally:
        conn.close()


SENTINEL = b"victim's sentinel bytes \x00\xff " + uuid.uuid4().bytes
INNER = b"inner sentinel " + uuid.uuid4().bytes


@dataclass
class Victim:
    """A second user, and the keys and ETags of the two files every attack must leave alone."""

    account: object
    id: int
    key: str
    inner_key: str
    etag: str
    inner_etag: str


@pytest.fixture
def victim(stack) -> Victim:
    """A second user with a sentinel file and a file inside a folder."""
    account = stack.new_user(name="Victim")
    for rel, data in (("secret.txt", SENTINEL), ("folder/inner.txt", INNER)):
        reply = requests.put(f"{stack.base}/v1/files/{rel}", data=data, headers=account.auth)
        assert reply.status_code == 201, reply.text
    prefix = user_prefix(account.id)
    info = stack.store.head(prefix + "secret.txt")
    inner = stack.store.head(prefix + "folder/inner.txt")
    assert info is not None and info.size == len(SENTINEL)
    assert inner is not None and inner.size == len(INNER)
    return Victim(account, account.id, prefix + "secret.txt", prefix + "folder/inner.txt", info.etag, inner.etag)


def assert_victim_intact(stack, victim: Victim) -> None:
    info = stack.store.head(victim.key)
    assert info is not None, "the victim's sentinel was deleted"
    assert (info.size, info.etag) == (len(SENTINEL), victim.etag), "the victim's sentinel was overwritten"
    inner = stack.store.head(victim.inner_key)
    assert inner is not None, "the victim's folder sentinel was deleted"
    assert (inner.size, inner.etag) == (len(INNER), victim.inner_etag)
    got = requests.get(f"{stack.base}/v1/files/secret.txt", headers=victim.account.auth)
    assert got.status_code == 200 and got.content == SENTINEL
    got = requests.get(f"{stack.base}/v1/files/folder/inner.txt", headers=victim.account.auth)
    assert got.status_code == 200 and got.content == INNER


# Full request targets; {v} is the victim's user id. Each must be refused with invalid_path.
ATTACKS = {
    "dotdot": "/v1/files/..",
    "dot": "/v1/files/.",
    "dotdot-dir": "/v1/files/../",
    "dotdot-victim": "/v1/files/../{v}/secret.txt",
    "dotdot-users": "/v1/files/../../users/{v}/secret.txt",
    "dotdot-inner": "/v1/files/x/../../{v}/secret.txt",
    "dotdot-mount": "/v1/files/../files/secret.txt",
    "dot-inner": "/v1/files/./secret.txt",
    "dotdot-folder": "/v1/files/../{v}/folder/",
    "enc-dotdot": "/v1/files/%2e%2e/{v}/secret.txt",
    "enc-dotdot-upper": "/v1/files/%2E%2E/%2E%2E/users/{v}/secret.txt",
    "enc-dotdot-mixed": "/v1/files/%2e%2E/{v}/secret.txt",
    "enc-dot-half": "/v1/files/.%2e/{v}/secret.txt",
    "enc-dot-half-2": "/v1/files/%2E./{v}/secret.txt",
    "enc-dotdot-folder": "/v1/files/%2e%2e/{v}/folder/",
    "enc-slash": "/v1/files/%2e%2e%2f{v}%2fsecret.txt",
    "enc-slash-upper": "/v1/files/..%2F..%2Fusers%2F{v}%2Fsecret.txt",
    "enc-slash-inner": "/v1/files/x%2f..%2f..%2f{v}%2fsecret.txt",
    "enc-slash-lead": "/v1/files/%2fusers%2f{v}%2fsecret.txt",
    "enc-backslash": "/v1/files/..%5c{v}%5csecret.txt",
    "enc-backslash-upper": "/v1/files/..%5C..%5Cusers%5C{v}%5Csecret.txt",
    "backslash": "/v1/files/..\\{v}\\secret.txt",
    "backslash-users": "/v1/files/..\\..\\users\\{v}\\secret.txt",
    "nul": "/v1/files/%00",
    "nul-suffix": "/v1/files/secret.txt%00",
    "nul-dotdot": "/v1/files/..%00/{v}/secret.txt",
    "nul-enc-dotdot": "/v1/files/%2e%2e%00/{v}/secret.txt",
    "ctl-cr": "/v1/files/a%0db",
    "ctl-lf": "/v1/files/a%0ab",
    "ctl-crlf": "/v1/files/a%0d%0aX-Evil:%201",
    "ctl-tab": "/v1/files/a%09b",
    "ctl-01": "/v1/files/..%01/{v}/secret.txt",
    "del": "/v1/files/a%7f",
    "c1-nel": "/v1/files/a%c2%85b",
    "abs": "/v1/files//users/{v}/secret.txt",
    "abs-double": "/v1/files///users/{v}/secret.txt",
    "abs-etc": "/v1/files//etc/passwd",
    "empty-segment": "/v1/files/a//b",
    "overlong": "/v1/files/%c0%ae%c0%ae/{v}/secret.txt",
    "overlong-upper-slash": "/v1/files/%C0%AE%C0%AE%C0%AF{v}%C0%AFsecret.txt",
    "overlong-3byte": "/v1/files/%e0%80%ae%e0%80%ae/{v}/secret.txt",
    "overlong-slash": "/v1/files/..%c0%af{v}",
    "invalid-ff": "/v1/files/%ff",
    "invalid-ff-inner": "/v1/files/secret%ff.txt",
    "invalid-surrogate": "/v1/files/%ed%a0%80",
    "fullwidth-dotdot": "/v1/files/%EF%BC%8E%EF%BC%8E/{v}/secret.txt",
    "fullwidth-dotdot-lower": "/v1/files/%ef%bc%8e%ef%bc%8e/{v}/secret.txt",
    "fullwidth-all": "/v1/files/%EF%BC%8E%EF%BC%8E%EF%BC%8F{v}%EF%BC%8Fsecret.txt",
    "fullwidth-solidus": "/v1/files/..%EF%BC%8F{v}%EF%BC%8Fsecret.txt",
    "fullwidth-backslash": "/v1/files/..%EF%BC%BC{v}",
    "two-dot-leader": "/v1/files/%E2%80%A5/{v}/secret.txt",
    "percent": "/v1/files/%",
    "percent-one": "/v1/files/a%2",
    "percent-nonhex": "/v1/files/%zz",
    "percent-iis": "/v1/files/%u002e%u002e/{v}/secret.txt",
    "percent-nested": "/v1/files/%%32%65%%32%65/{v}/secret.txt",
    "too-long": "/v1/files/" + "a" * (MAX_KEY_BYTES + 10),
}
METHODS = ["GET", "HEAD", "PUT", "DELETE"]


def assert_envelope(reply: Reply, request_id: str, method: str, where: str) -> None:
    assert reply.status == 400, f"{where}: {reply.status} {reply.body[:200]!r}"
    assert reply.headers.get("X-Request-ID") == request_id, where
    if method == "HEAD":
        assert reply.body == b"", where
        return
    assert reply.headers.get("Content-Type", "").startswith("application/json"), where
    body = reply.json()
    assert set(body) == {"error_code", "message", "trace_id"}, f"{where}: {body}"
    assert body["error_code"] == "invalid_path", f"{where}: {body}"
    assert body["trace_id"] == request_id, where
    assert isinstance(body["message"], str) and body["message"], where


def attempt(stack, user, method: str, target: str, request_id: str) -> Reply:
    """``method target`` sent as ``user``, tagged with ``request_id`` (a PUT carries bytes to write)."""
    return raw_request(stack, method, target, {**user.auth, "X-Request-ID": request_id}, b"pwned" if method == "PUT" else None)


def assert_refused_by_every_method(stack, user, target: str, request_id: str) -> None:
    for method in METHODS:
        assert_envelope(attempt(stack, user, method, target, request_id), request_id, method, f"{method} {target}")


@pytest.mark.parametrize("method", METHODS)
def test_http_attack_paths_are_refused(stack, user, victim, method):
    failures = []
    for name, template in ATTACKS.items():
        target = template.format(v=victim.id)
        request_id = f"keys-{method}-{name}"
        reply = attempt(stack, user, method, target, request_id)
        try:
            assert_envelope(reply, request_id, method, f"{method} {target}")
        except AssertionError as exc:
            failures.append(str(exc))
    assert not failures, "\n".join(failures)
    assert_victim_intact(stack, victim)


def test_http_newline_is_invalid_path(stack, user, victim):
    """A decoded newline must still reach drive.keys (400 invalid_path), not fall out of the route (404)."""
    for template in ("/v1/files/a%0ab", "/v1/files/a%0d%0aX-Evil:%201", "/v1/files/..%0a/{v}/secret.txt"):
        assert_refused_by_every_method(stack, user, template.format(v=victim.id), "keys-newline")


LISTING_ATTACKS = ["..", "../", "../{v}/", "a/../..", "./", "a//", "\\", "..\\{v}", "\x00", "a/\x00",
                   "\uff0e\uff0e/{v}", "\u2025/", "//users/{v}/"]


def test_http_listing_prefix_attacks_are_refused(stack, user, victim):
    for template in LISTING_ATTACKS:
        partial = template.format(v=victim.id)
        request_id = "keys-listing"
        reply = raw_request(stack, "GET", "/v1/files?prefix=" + quote(partial, safe=""),
                            {**user.auth, "X-Request-ID": request_id})
        assert_envelope(reply, request_id, "GET", f"?prefix={partial!r}")
    listing = raw_request(stack, "GET", "/v1/files", user.auth)
    assert listing.status == 200 and f"users/{victim.id}/".encode() not in listing.body


def test_http_unauthenticated_attack_is_401_not_400(stack):
    reply = raw_request(stack, "GET", "/v1/files/%2e%2e/1/secret.txt")
    assert reply.status == 401
    assert set(reply.json()) == {"error_code", "message", "trace_id"}


# Accepted, but must land inside the attacker's own drive as a literal name.
LITERALS = {
    "double-enc-dotdot": ("/v1/files/%252e%252e/{v}/secret.txt", "%2e%2e/{v}/secret.txt"),
    "double-enc-users": ("/v1/files/%252e%252e/%252e%252e/users/{v}/secret.txt", "%2e%2e/%2e%2e/users/{v}/secret.txt"),
    "double-enc-one-segment": (
        "/v1/files/%252e%252e%252f%252e%252e%252fusers%252f{v}%252fsecret.txt",
        "%2e%2e%2f%2e%2e%2fusers%2f{v}%2fsecret.txt",
    ),
    "double-enc-upper": ("/v1/files/%252E%252E%255C{v}%255Csecret.txt", "%2E%2E%5C{v}%5Csecret.txt"),
    "double-enc-nul": ("/v1/files/secret.txt%2500", "secret.txt%00"),
    "tomcat-semicolon": ("/v1/files/..;/{v}/secret.txt", "..;/{v}/secret.txt"),
    "triple-dot": ("/v1/files/.../{v}/secret.txt", ".../{v}/secret.txt"),
}


@pytest.mark.parametrize("name", list(LITERALS))
def test_http_double_encoding_stays_literal_and_harmless(stack, user, victim, name):
    template, rel_template = LITERALS[name]
    target, rel = template.format(v=victim.id), rel_template.format(v=victim.id)
    own_key = user_prefix(user.id) + rel
    body = b"attacker bytes " + name.encode()

    put = raw_request(stack, "PUT", target, user.auth, body)
    assert put.status == 201, put.body
    assert put.json()["path"] == rel
    info = stack.store.head(own_key)
    assert info is not None and info.size == len(body)
    assert_victim_intact(stack, victim)

    head = raw_request(stack, "HEAD", target, user.auth)
    assert head.status == 200 and int(head.headers["Content-Length"]) == len(body)

    got = raw_request(stack, "GET", target, user.auth)
    assert got.status == 302
    location = unquote(urlsplit(got.headers["Location"]).path)
    assert location == f"/{stack.store.bucket}/{own_key}", location
    fetched = requests.get(got.headers["Location"])
    assert fetched.status_code == 200 and fetched.content == body

    gone = raw_request(stack, "DELETE", target, user.auth)
    assert gone.status == 204
    assert stack.store.head(own_key) is None
    assert_victim_intact(stack, victim)


def test_http_sentinel_survives_every_attack(stack, user, victim):
    """Every attack path with every method, then the victim's bytes are unchanged."""
    targets = [t.format(v=victim.id) for t in ATTACKS.values()]
    targets += [t.format(v=victim.id) for t, _ in LITERALS.values()]
    targets += [
        # the mount itself encoded (see test_http_encoded_mount_is_refused)
        "/v1/files%2f..%2f..%2fusers%2f{v}%2fsecret.txt".format(v=victim.id),
        "/v1/files%2f%2e%2e%2f{v}%2fsecret.txt".format(v=victim.id),
        "/v1/%66iles/../{v}/secret.txt".format(v=victim.id),
        "/v1/files/../../v1/files/secret.txt",
    ]
    own = user_prefix(user.id)
    for target in targets:
        for method in ("GET", "HEAD", "PUT", "POST", "DELETE"):
            reply = raw_request(stack, method, target, user.auth, b"pwned" if method in ("PUT", "POST") else None)
            assert reply.status < 500, (method, target, reply.status, reply.body[:200])
            location = reply.headers.get("Location")
            if location:
                assert unquote(urlsplit(location).path).startswith(f"/{stack.store.bucket}/{own}"), (target, location)
            if method == "POST" and reply.status == 200 and "url" in reply.json():
                url = reply.json()["url"]
                assert unquote(urlsplit(url).path).startswith(f"/{stack.store.bucket}/{own}"), (target, url)
            if method in ("PUT", "POST") and reply.status in (200, 201) and "path" in reply.json():
                written = own + reply.json()["path"]  # whatever was written is the caller's own
                assert stack.store.head(written) is not None, (target, written)
            if method == "GET" and reply.status == 200:
                assert SENTINEL not in reply.body and INNER not in reply.body
    assert_victim_intact(stack, victim)
    # and the victim's own listing still shows exactly their two files
    listing = requests.get(f"{stack.base}/v1/files", headers=victim.account.auth).json()
    assert sorted(f["path"] for f in listing["files"]) == ["folder/inner.txt", "secret.txt"]


def test_http_encoded_mount_is_refused(stack, user, victim):
    """The mount itself percent-encoded must be refused, not read as the drive root."""
    for template in (
        "/v1/files%2f..%2f..%2fusers%2f{v}%2fsecret.txt",
        "/v1/files%2fsecret.txt",
        "/v1/files%2F%2e%2e%2f{v}%2fsecret.txt",
        "/v1/%66iles/secret.txt",
        "/v1/%66iles/../{v}/secret.txt",
    ):
        assert_refused_by_every_method(stack, user, template.format(v=victim.id), "keys-mount")
    assert_victim_intact(stack, victim)


def test_http_raw_bytes_in_request_line_never_reach_the_drive(stack, user, victim):
    """Raw NUL/control/non-ASCII bytes on the request line: uvicorn itself answers 400 (no envelope)."""
    import socket

    token = user.auth["Authorization"].encode()
    for raw in (b"/v1/files/a\x00b", b"/v1/files/..\x01", b"/v1/files/\xff", b"/v1/files/\xc0\xae\xc0\xae/x",
                b"/v1/files/\xef\xbc\x8e\xef\xbc\x8e/x"):
        for method in (b"GET", b"PUT", b"DELETE"):
            with socket.create_connection(("127.0.0.1", stack.server.port), timeout=10) as sock:
                sock.sendall(method + b" " + raw + b" HTTP/1.1\r\nHost: t\r\nAuthorization: " + token
                             + b"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                data = b""
                while chunk := sock.recv(65536):
                    data += chunk
            status_line = data.split(b"\r\n", 1)[0]
            assert status_line.startswith(b"HTTP/1.1 400"), (method, raw, status_line)
    assert_victim_intact(stack, victim)


# ---------------------------------------------------------------- HTTP property

HTTP_PIECES = [
    ".", "..", "/", "\\", "%2e", "%2E", "%2e%2e", "%2f", "%2F", "%5c", "%5C", "%00", "%c0%ae", "%C0%AF",
    "%ff", "%", "%25", "%252e", "%252f", "%EF%BC%8E", "%EF%BC%8F", "%E2%80%A5", "%0a", "%0d", "%09", "%7f",
    "a", "secret.txt", "users", "{v}", "%C3%A9", "%F0%9F%98%80", "%20", "+", ";", "folder",
]
http_targets = st.lists(st.sampled_from(HTTP_PIECES), max_size=12).map("".join)


@settings(
    max_examples=50,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(rel=http_targets, method=st.sampled_from(METHODS))
def test_http_property_matches_keys_and_stays_inside(stack, user, victim, rel, method):
    rel = rel.replace("{v}", str(victim.id))
    target = "/v1/files/" + rel
    expected = accepted(from_raw_path, user_prefix(user.id), rel.encode())
    request_id = "prop-" + uuid.uuid4().hex[:12]
    reply = attempt(stack, user, method, target, request_id)
    assert reply.headers.get("X-Request-ID") == request_id
    if expected is None:
        assert_envelope(reply, request_id, method, f"{method} {target}")
    else:
        assert reply.status < 500, (method, target, reply.status, reply.body[:200])
        if method != "HEAD" and reply.status >= 400:
            assert reply.json()["error_code"] != "invalid_path", (method, target, reply.body)
        location = reply.headers.get("Location")
        if location:
            assert unquote(urlsplit(location).path) == f"/{stack.store.bucket}/{expected.key}", (target, location)
        if method == "PUT" and reply.status in (200, 201):
            assert reply.json()["path"] == expected.rel
            assert stack.store.head(expected.key).size == 5
    assert_victim_intact(stack, victim)
