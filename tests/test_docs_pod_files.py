"""docs/pod-files.md: its examples run as written (bash -euo pipefail, in an empty directory,
against the rclone-sqlite stack's local pods) and print what their "# →" lines say; every route
of /v1/gpus/{id}/files is in its table."""

from __future__ import annotations

import re

import pytest
import requests

from tests.test_docs_examples import assert_in_step, assert_sha256_checks_passed, bash_blocks, run_doc

pytestmark = pytest.mark.parametrize("stack", ["rclone-sqlite"], indirect=True)

DOC = "pod-files.md"


def test_docs_in_step_with_the_server(stack):
    assert_in_step(stack, DOC, lambda path: path.startswith("/v1/gpus/") and "/files/" in path)


def _said(doc: str) -> list[str]:
    """The "# → ..." lines of the bash blocks, in order, without rental ids (they differ each run)."""
    said = []
    for block in bash_blocks(doc):
        said += [line.split("# → ", 1)[1] for line in block.splitlines() if line.startswith("# → ")]
    return said


def test_pod_files_examples(stack, user, tmp_path):
    result, workdir = run_doc(DOC, tmp_path, {"KGPU_API_BASE": stack.base, "KGPU_API_TOKEN": user.token})
    out = result.stdout
    assert_sha256_checks_passed(DOC, out)
    printed = [line.strip() for line in out.splitlines()]
    for line in _said(DOC):
        pattern = re.escape(line).replace("gpu\\-3f2a9c0d1e4b", "gpu-[0-9a-f]+")
        assert any(re.fullmatch(pattern, p) for p in printed), (line, out)
    assert (workdir / "refused.json").exists()
    gpus = requests.get(f"{stack.base}/v1/gpus", headers=user.auth).json()["my_gpus"]
    assert gpus == []
