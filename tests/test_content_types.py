"""drive/content_types.py: the one Content-Type of a drive file."""

from __future__ import annotations

import os

from hypothesis import example, given, settings
from hypothesis import strategies as st

from drive.content_types import known_type, served_type, suffix

name_pieces = st.sampled_from(["a", "Z9", ".", "..", "/", "tar", "gz", "CSV", " ", "é", "-"])
names = st.lists(name_pieces, max_size=10).map("".join)


@settings(max_examples=3000, deadline=None)
@given(name=names)
@example(name=".bashrc")
@example(name="..a")
@example(name="a.")
@example(name="a..b")
@example(name="dir.d/file")
@example(name="dir/.hidden")
def test_suffix_is_what_splitext_answers(name):
    """The 302's one-call suffix gives what os.path.splitext gives, so a name's type is the same
    whichever read asks."""
    assert suffix(name) == os.path.splitext(name)[1]


def test_a_names_type_comes_from_its_last_suffix_case_aside():
    assert known_type("data.CSV") == "text/csv"
    assert known_type("a.tar.gz") == "application/gzip"
    assert known_type(".csv") is None and known_type("README") is None
    assert served_type(None, ".csv") == "application/octet-stream"
    assert served_type(None, "notes.txt") == "text/plain"
