"""litmus, the WebDAV conformance suite, against /v1/dav/ (the mount that serves bytes itself).

/v1/files/ answers GET with a 302 to the object store, which litmus does not
follow; /v1/dav/ is the same drive with GET and PUT served by the gateway, for
such clients. litmus logs in with HTTP Basic: any user name, the token as the
password. `.ci/run` installs litmus (Debian package `litmus`).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest

SUITES = ["basic", "copymove", "props", "locks", "http"]
SUMMARY = re.compile(r"summary for `(\w+)': of (\d+) tests run: (\d+) passed, (\d+) failed")

# litmus checks the server, not the store or database behind it.
pytestmark = pytest.mark.parametrize("stack", ["rclone-sqlite"], indirect=True)


def test_litmus_suites_all_pass(stack, user, tmp_path):
    if shutil.which("litmus") is None:
        pytest.fail("litmus is needed: .ci/run installs it (apt-get install litmus)")
    result = subprocess.run(
        ["litmus", "-k", f"{stack.base}/v1/dav/", user.email, user.token],
        env={**os.environ, "TESTS": " ".join(SUITES)},
        cwd=tmp_path,  # litmus writes debug.log and child.log here
        capture_output=True,
        text=True,
        timeout=240,
    )
    print(result.stdout)
    counts = {suite: (int(run), int(passed), int(failed)) for suite, run, passed, failed in SUMMARY.findall(result.stdout)}
    assert list(counts) == SUITES, result.stdout + result.stderr
    assert {suite: failed for suite, (_, _, failed) in counts.items()} == {suite: 0 for suite in SUITES}, result.stdout
    assert all(run == passed for run, passed, _ in counts.values())
    assert sum(run for run, _, _ in counts.values()) >= 100  # 104 with litmus 0.13
    assert result.returncode == 0
