"""The schema tells the truth (issue 12, item 6): /openapi.json declares every status each route
answers, with the error envelope as the body of its errors and the bearer and Basic security
schemes; and a bounded schemathesis run against a live server (the ``rclone-sqlite`` stack, a
user's token) finds no 5xx and no answer the schema does not describe.

Two runs, both bounded and repeatable (CI runs them in under a minute): the fuzzing phase in
process, ``KGPU_SCHEMATHESIS_EXAMPLES`` examples per operation and generation mode (default 20,
derandomized; raise it and set ``KGPU_SCHEMATHESIS_SEED`` to explore by hand), and schemathesis's
own coverage phase through its CLI (boundary values: huge integers, empty and over-long strings,
missing and extra fields, each parameter made invalid in turn). WebDAV (PROPFIND, MKCOL, … on
/v1/files/, all of /v1/dav/) is outside the schema; tests/test_webdav*.py cover it.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections import Counter

import pytest
import requests
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis.errors import Unsatisfiable

import schemathesis
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

ONLY_STACK = "rclone-sqlite"
pytestmark = pytest.mark.parametrize("stack", [ONLY_STACK], indirect=True)

EXAMPLES = int(os.environ.get("KGPU_SCHEMATHESIS_EXAMPLES", "20"))
SEED = os.environ.get("KGPU_SCHEMATHESIS_SEED")
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
FUZZ_ORG = "schema-fuzz"

# Cases a fuzzer finds in code this module's owner does not own, each named narrowly with its
# owner: (operation label, a substring of the failure) -> why. Empty: nothing known.
KNOWN: dict[tuple[str, str], str] = {}


@pytest.fixture(scope="module")
def spec(stack) -> dict:
    reply = requests.get(f"{stack.base}/openapi.json", timeout=30)
    assert reply.status_code == 200
    return reply.json()


def operations(spec: dict):
    for path, methods in spec["paths"].items():
        for method, operation in methods.items():
            yield method.upper(), path, operation


def test_every_operation_has_its_own_id(spec):
    """OpenAPI wants each operationId unique (client generators name functions by it): a route
    serving two methods must not give both one id."""
    ids = [operation["operationId"] for _, _, operation in operations(spec)]
    assert len(ids) == len(set(ids)), sorted(i for i in ids if ids.count(i) > 1)


def test_every_error_is_the_envelope(spec):
    envelope = spec["components"]["schemas"]["ErrorEnvelope"]
    assert set(envelope["required"]) == {"error_code", "message", "trace_id"}
    assert "HTTPValidationError" not in spec["components"]["schemas"]  # our 422s are envelopes too
    for method, path, operation in operations(spec):
        for status, response in operation["responses"].items():
            if not status.isdigit() or int(status) < 400 or method == "HEAD" or path == "/healthz":
                continue
            schema = response["content"]["application/json"]["schema"]
            assert schema == {"$ref": "#/components/schemas/ErrorEnvelope"}, (method, path, status)


def test_security_schemes(spec):
    schemes = spec["components"]["securitySchemes"]
    assert schemes["bearer"]["type"] == "http" and schemes["bearer"]["scheme"] == "bearer"
    assert schemes["basic"]["type"] == "http" and schemes["basic"]["scheme"] == "basic"
    for method, path, operation in operations(spec):
        security = operation["security"]
        if path in ("/healthz", "/v1/gpu-models"):
            assert security == []  # public
        elif (method, path) == ("GET", "/v1/gpus"):
            assert {} in security and {"bearer": []} in security  # public; a token adds your rentals
        else:
            assert {"bearer": []} in security and {} not in security, (method, path)
            assert "401" in operation["responses"], (method, path)
            drive = path.startswith(("/v1/files", "/v1/shared"))
            assert ({"basic": []} in security) == drive, (method, path)


def test_documented_statuses_of_the_drive(spec):
    """What docs/my-drive.md promises, and the finding of issue 12 said was missing."""
    paths = spec["paths"]

    def statuses(method: str, path: str) -> set[str]:
        return set(paths[path][method]["responses"])

    assert {"302", "200", "400", "401", "403", "404", "503"} <= statuses("get", "/v1/files/{path}")
    assert {"200", "201", "307", "400", "401", "403", "408", "409", "413", "423", "503"} <= statuses("put", "/v1/files/{path}")
    assert {"200", "201", "400", "409", "413"} <= statuses("post", "/v1/files/{path}")
    assert {"204", "404"} <= statuses("delete", "/v1/files/{path}")
    assert {"302", "404"} <= statuses("get", "/v1/shared/{org}/{path}")
    assert {"201", "402", "409", "503"} <= statuses("post", "/v1/gpus")
    assert {"200", "503"} <= statuses("get", "/healthz")
    redirect = paths["/v1/files/{path}"]["get"]["responses"]["302"]
    assert "content" not in redirect and "Location" in redirect["headers"]
    follow = paths["/v1/files/{path}"]["put"]["responses"]["307"]
    assert "text/plain" in follow["content"]
    assert "application/octet-stream" in paths["/v1/files/{path}"]["put"]["requestBody"]["content"]
    # WebDAV is answered before FastAPI and is not described here.
    assert not any(p.startswith("/v1/dav") for p in paths)
    assert all(m in ("get", "head", "put", "post", "delete", "patch") for p in paths.values() for m in p)


def test_real_errors_match_the_schema(stack, spec):
    """A 401, a 404 and a 422 as they are really answered, against what the schema says."""
    import jsonschema

    envelope = spec["components"]["schemas"]["ErrorEnvelope"]
    answers = [
        requests.get(f"{stack.base}/v1/me", timeout=30),
        requests.get(f"{stack.base}/v1/files/nothing/", headers=stack.admin, timeout=30),
        requests.post(f"{stack.base}/v1/admin/users", json={"email": 5}, headers=stack.admin, timeout=30),
    ]
    assert [a.status_code for a in answers] == [401, 403, 422]
    for answer in answers:
        jsonschema.validate(answer.json(), envelope)


@pytest.fixture(scope="module")
def fuzz_account(stack) -> dict:
    """A user with no credits (so POST /v1/gpus never starts a pod: 402) and the uploader role in
    an org of its own (so the shared-drive routes reach the store, not only 404s)."""
    account = stack.new_user(name="Schema Fuzzer", credits=0)
    created = requests.post(
        f"{stack.base}/v1/admin/orgs", json={"slug": FUZZ_ORG, "name": "fuzz"}, headers=stack.admin, timeout=30
    )
    assert created.status_code in (201, 409), created.text
    added = requests.post(
        f"{stack.base}/v1/admin/orgs/{FUZZ_ORG}/members",
        json={"user_id": account.id, "role": "uploader"},
        headers=stack.admin,
        timeout=30,
    )
    assert added.status_code == 200, added.text
    return {"Authorization": f"Bearer {account.token}"}


# Headers that frame the HTTP message itself: a random value in one is refused by uvicorn's parser
# with its own plain-text 400 before any of our code runs (tests/test_bad_input.py covers how we
# answer the ones that reach us).
FRAMING_HEADERS = {"transfer-encoding", "content-length", "connection", "host", "expect", "upgrade", "te", "trailer"}


def _known(label: str, failure: str) -> str | None:
    for (operation, needle), why in KNOWN.items():
        if operation == label and needle in failure:
            return why
    return None


def test_schemathesis_finds_no_5xx_and_no_undocumented_answer(stack, fuzz_account):
    schema = schemathesis.openapi.from_url(f"{stack.base}/openapi.json")
    session = requests.Session()
    failures: list[str] = []
    known: list[str] = []
    ran = 0
    seen: dict[str, Counter] = {}
    started = time.monotonic()

    for result in schema.get_all_operations():
        operation = result.ok()
        label = f"{operation.method.upper()} {operation.path}"
        fixed = {"org": FUZZ_ORG} if "{org}" in operation.path else None
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            strategy = operation.as_strategy(generation_mode=mode, path_parameters=fixed)

            @settings(
                max_examples=EXAMPLES,
                deadline=None,
                database=None,
                derandomize=SEED is None,
                phases=[Phase.generate],  # no shrinking: bounded, and each failure says its input
                suppress_health_check=list(HealthCheck),
            )
            @given(case=strategy)
            def check(case):
                nonlocal ran
                ran += 1
                for name in list(case.headers or {}):
                    if name.lower() in FRAMING_HEADERS:
                        del case.headers[name]
                response = case.call_and_validate(
                    session=session,
                    headers=dict(fuzz_account),  # schemathesis adds its own headers to the dict
                    checks=CHECKS,
                    allow_redirects=False,  # the 302/307 themselves are what the schema describes
                    timeout=60,
                )
                seen.setdefault(label, Counter())[response.status_code] += 1

            if SEED is not None:
                check = seed(int(SEED))(check)
            try:
                check()
            except Unsatisfiable:
                continue  # nothing to make invalid (no parameters, no body)
            except Exception as exc:  # noqa: BLE001 - every operation runs; all failures are listed
                text = f"{label} ({mode.value}): {exc}"
                why = _known(label, text)
                (known if why else failures).append(f"{text}\n  known: {why}" if why else text)

    elapsed = time.monotonic() - started
    print(f"schemathesis: {ran} requests in {elapsed:.0f} s; known and skipped: {len(known)}")
    for label, statuses in seen.items():
        print(f"  {label}: {dict(sorted(statuses.items()))}")
    for line in known:
        print(line)
    assert ran > 0
    assert not failures, "\n\n".join(failures)


def test_schemathesis_coverage_phase_finds_nothing(stack, fuzz_account, tmp_path):
    """Schemathesis's coverage phase (deterministic boundary and invalid values per parameter),
    through its CLI as a person would run it: no 5xx, every answer as the schema says."""
    config = tmp_path / "schemathesis.toml"
    config.write_text(f'[parameters]\n"path.org" = "{FUZZ_ORG}"\n')
    command = [
        sys.executable, "-m", "schemathesis.cli", "--config-file", str(config), "--no-color",
        "run", f"{stack.base}/openapi.json",
        "--header", f"Authorization:{fuzz_account['Authorization']}",
        "--checks", ",".join(check.__name__ for check in CHECKS),
        "--phases", "examples,coverage",
        "--mode", "all",
        "--generation-deterministic", "--seed", "0",
        "--max-redirects", "0",
        "--workers", "1",
        "--request-timeout", "60",
    ]  # fmt: skip
    started = time.monotonic()
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    summary = [line.strip() for line in done.stdout.splitlines() if re.search(r"\d+ generated", line)]
    print(f"schemathesis coverage phase: {summary} in {time.monotonic() - started:.0f} s")
    assert done.returncode == 0, done.stdout[-20000:] + done.stderr[-5000:]
    assert summary and "passed" in summary[-1]
