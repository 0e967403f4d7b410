"""docs/transit-objects.md: its examples run as written (bash -euo pipefail, in an empty directory,
against the rclone-sqlite stack: the embedded rclone checks presigned signatures) and do what they
say; every route of /v1/objects is in its table."""

from __future__ import annotations

import hashlib
import re

import pytest
import requests

from tests.test_docs_examples import assert_in_step, assert_sha256_checks_passed, run_doc

pytestmark = pytest.mark.parametrize("stack", ["rclone-sqlite"], indirect=True)

DOC = "transit-objects.md"


def test_docs_in_step_with_the_server(stack):
    assert_in_step(stack, DOC, lambda path: path.startswith("/v1/objects"))


def test_transit_examples(stack, user, tmp_path):
    result, workdir = run_doc(DOC, tmp_path, {"KGPU_API_BASE": stack.base, "KGPU_API_TOKEN": user.token})
    out = result.stdout
    assert_sha256_checks_passed(DOC, out)
    assert (workdir / "wrong-size.txt").read_text().strip() == "403"
    dataset = (workdir / "dataset.bin").read_bytes()
    digest = hashlib.sha256(dataset).hexdigest()
    listing = (workdir / "listing.txt").read_text().splitlines()
    assert re.fullmatch(r"obj-[0-9a-f]{24} dataset 3000000", listing[0]), listing
    limit = stack.settings.transit_quota_bytes
    assert listing[-1] == f"free {limit - len(dataset)} of {limit}"
    # The pod fetched the dataset with the get_url and handed its hash back as an object of its own.
    assert f"the pod read {digest}" in out
    assert (workdir / "deleted.json").read_text().count('"object_not_found"') == 1
    # What is left: the pod's result object; the dataset is deleted, in the listing and the store.
    left = requests.get(f"{stack.base}/v1/objects", headers=user.auth).json()["objects"]
    assert [o["label"] for o in left] == ["result"]
    gpus = requests.get(f"{stack.base}/v1/gpus", headers=user.auth).json()["my_gpus"]
    assert gpus == []
