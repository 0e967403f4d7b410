"""Shared fixtures: real object stores, real databases, a real HTTP server.

Stacks the HTTP tests run on (``stack`` fixture):
  rclone-sqlite    embedded ``rclone serve s3`` (checks signatures) + SQLite
  moto-sqlite      moto's S3 server + SQLite
  rclone-postgres  embedded ``rclone serve s3`` + the PostgreSQL on 127.0.0.1:5432
"""

from __future__ import annotations

import dataclasses
import logging
import os
import secrets
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests
import uvicorn

from drive.store.embedded import EmbeddedS3Server, EmbeddedStore, free_port
from drive.store.s3 import S3ObjectStore
from gateway.app import create_app
from gateway.settings import Settings

def require_system_part(present: bool, part: str) -> None:
    """A system part the test needs (FUSE, litmus, …): where it is missing the test skips under a
    plain `make test`, and fails in CI (env CI set), where .ci/run installs it."""
    if present:
        return
    if os.environ.get("CI"):
        pytest.fail(f"{part} is missing in CI (.ci/run installs it)", pytrace=False)
    pytest.skip(f"{part} is not installed here (.ci/run installs it)")


def fuse_present() -> bool:
    import shutil

    return Path("/dev/fuse").exists() and shutil.which("fusermount3") is not None


def _local_sandbox_missing() -> str | None:
    """Why the local pod backend cannot isolate pods on this machine (None: it can)."""
    from gateway.pods.sandbox import SandboxUnavailable, check_available

    try:
        check_available(uid_switching=os.geteuid() == 0)
    except SandboxUnavailable as exc:
        return str(exc)
    return None


LOCAL_SANDBOX_MISSING = _local_sandbox_missing()


class _CountedRefusal:
    """LocalPodBackend.refusal, counting the rentals turned away by it (on the class: this module
    is imported twice, as ``conftest`` and as ``tests.conftest``)."""

    count = 0

    def __get__(self, backend, owner):
        if backend is None:
            return self
        refusal = backend.__dict__.get("_refusal")
        if refusal and backend.__dict__.get("_refusal_announced"):
            type(self).count += 1
        backend.__dict__["_refusal_announced"] = True  # the first read is the backend's own, at start-up
        return refusal

    def __set__(self, backend, value):
        backend.__dict__["_refusal"] = value


def _refused_rentals() -> int:
    from gateway.pods.local import LocalPodBackend

    counted = LocalPodBackend.__dict__.get("refusal")
    return type(counted).count if counted is not None else 0


if LOCAL_SANDBOX_MISSING and not os.environ.get("CI"):
    from gateway.pods.local import LocalPodBackend

    if "refusal" not in LocalPodBackend.__dict__:
        LocalPodBackend.refusal = _CountedRefusal()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    item.refused_before = _refused_rentals()
    yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """`make test` alone, on a machine without bubblewrap: a test that failed after the local pod
    backend turned one of its rentals away for want of its sandbox is reported skipped, with the
    reason. In CI (env CI set), where .ci/run installs everything, and wherever the sandbox
    works, nothing changes."""
    outcome = yield
    report = outcome.get_result()
    if not LOCAL_SANDBOX_MISSING or os.environ.get("CI") or not report.failed:
        return
    if _refused_rentals() > getattr(item, "refused_before", _refused_rentals()):
        report.outcome = "skipped"
        report.longrepr = (str(item.path), item.location[1] or 0, f"Skipped: local pods unavailable here: {LOCAL_SANDBOX_MISSING}")


# A suite started in the background by a shell without job control (`cmd &` in a script, or
# under nohup) ignores SIGINT, and every process it starts inherits that: the tests that press
# Ctrl-C on a `kgpu` command would press it in vain. Handled here, children get the default.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

ADMIN_TOKEN = "test-admin-" + secrets.token_hex(8)
PG_ADMIN_URL = os.environ.get("KGPU_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")


@pytest.fixture(scope="session", autouse=True)
def pods_can_pass_through_the_temp_folders(tmp_path_factory):
    """Local pods run under uids of their own (when the suite runs as root), and must pass
    through the folders above their pod folders, as under a real data directory: pytest makes
    its temp folders 0700."""
    base = tmp_path_factory.getbasetemp()
    for folder in (base, *base.parents):
        if folder == Path("/tmp") or folder == Path("/"):
            break
        folder.chmod(folder.stat().st_mode | 0o711)


def passable(folder: Path) -> Path:
    """``folder`` (a pytest temp folder, 0700) made passable by other uids, as a data directory is."""
    folder.chmod(folder.stat().st_mode | 0o711)
    return folder


@dataclass
class S3Target:
    name: str
    endpoint: str
    access_key: str
    secret_key: str
    checks_signatures: bool
    embedded: EmbeddedS3Server | None = None  # set: stores are EmbeddedStore over it, as `kgpu serve` makes them

    def store(self, bucket: str) -> S3ObjectStore:
        keys = (self.endpoint, self.access_key, self.secret_key, bucket)
        store = EmbeddedStore(self.embedded, *keys) if self.embedded else S3ObjectStore(*keys)
        store.ensure_bucket()
        return store


@pytest.fixture(scope="session")
def rclone_server(tmp_path_factory) -> EmbeddedS3Server:
    server = EmbeddedS3Server(tmp_path_factory.mktemp("rclone-s3"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def rclone_target(rclone_server) -> S3Target:
    """The embedded ``rclone serve s3``, through the plain S3 store class."""
    credentials = rclone_server.credentials
    return S3Target("rclone", rclone_server.endpoint_url, credentials.access_key, credentials.secret_key, True)


@pytest.fixture(scope="session")
def embedded_target(rclone_target, rclone_server) -> S3Target:
    """The same server through ``EmbeddedStore``, the class `kgpu serve` uses with no S3 configured."""
    return dataclasses.replace(rclone_target, name="embedded", embedded=rclone_server)


def _moto_reads_whole_parameter_names() -> None:
    """moto (5.2) checks a presigned GET of a missing key by searching its URL for
    ``content-type=``, which the ``response-content-type=`` of every download's 302 contains, and
    answers 403 SignatureDoesNotMatch where S3, R2 and rclone answer 404. It is shown the URL
    without the ``response-*`` parameters, which it does not mean to read there."""
    import re

    from moto.s3.responses import S3Response

    invalid_headers = S3Response._invalid_headers
    if getattr(invalid_headers, "whole_names", False):
        return

    def whole_names(self, url: str, headers: dict) -> bool:
        return invalid_headers(self, re.sub(r"(?<=[?&])response-[\w-]+=[^&]*&?", "", url), headers)

    whole_names.whole_names = True
    S3Response._invalid_headers = whole_names


@pytest.fixture(scope="session")
def moto_target() -> S3Target:
    from moto.server import ThreadedMotoServer

    _moto_reads_whole_parameter_names()
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield S3Target("moto", f"http://127.0.0.1:{port}", "testing", "testing", False)
    server.stop()


@pytest.fixture(scope="session", params=["rclone", "moto"])
def s3_target(request) -> S3Target:
    return request.getfixturevalue(f"{request.param}_target")


@pytest.fixture
def store(s3_target) -> S3ObjectStore:
    return s3_target.store("t" + uuid.uuid4().hex[:12])


@contextmanager
def new_postgres_database() -> Iterator[str]:
    """The URL of a new, empty database on the PostgreSQL of the tests, dropped afterwards; the
    test skips where that PostgreSQL is not reachable (it fails in CI)."""
    import psycopg

    name = "kgpu_test_" + secrets.token_hex(4)
    try:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=3) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
    except psycopg.OperationalError as exc:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"PostgreSQL not reachable: {exc}")
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    finally:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def postgres_url() -> str:
    with new_postgres_database() as url:
        yield url


class LiveServer:
    """The real application on uvicorn in a background thread, as `kgpu serve` runs it."""

    def __init__(self, settings: Settings, host: str = "127.0.0.1"):
        self.settings = settings
        self.app = create_app(settings)
        self.host = host
        self.port = free_port(host)
        config = uvicorn.Config(self.app, host=host, port=self.port, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def base(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> "LiveServer":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("test server did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        # Pods outlive their gateway by design; the suite's local pods (a sandbox and a relay
        # each) must not outlive the suite.
        rentals = getattr(self.app.state, "rentals", None)
        if rentals is not None and rentals.backend.name == "local":
            for ref in rentals.backend.adopt().values():
                rentals.backend.destroy(ref)


@dataclass
class Account:
    id: int
    email: str
    token: str
    base: str
    extra: dict = field(default_factory=dict)

    @property
    def auth(self) -> dict:
        return {"Authorization": f"Bearer {self.token}"}


@dataclass
class Stack:
    name: str
    server: LiveServer
    target: S3Target

    @property
    def base(self) -> str:
        return self.server.base

    @property
    def settings(self) -> Settings:
        return self.server.settings

    @property
    def admin(self) -> dict:
        return {"Authorization": f"Bearer {ADMIN_TOKEN}"}

    @property
    def store(self):
        return self.server.app.state.store

    def new_user(self, **fields) -> Account:
        email = fields.pop("email", f"u{uuid.uuid4().hex[:10]}@lab.example")
        reply = requests.post(f"{self.base}/v1/admin/users", json={"email": email, **fields}, headers=self.admin)
        assert reply.status_code == 201, reply.text
        body = reply.json()
        return Account(body["user"]["id"], email, body["token"], self.base, body)

    def new_org(self, owner: Account, **roles: Account) -> str:
        """An organisation owned by ``owner``, with each of ``roles`` (role=account) a member; its slug."""
        slug = "lab-" + uuid.uuid4().hex[:8]
        reply = requests.post(f"{self.base}/v1/admin/orgs", json={"slug": slug, "owner_user_id": owner.id},
                              headers=self.admin)
        assert reply.status_code == 201, reply.text
        for role, member in roles.items():
            reply = requests.post(f"{self.base}/v1/admin/orgs/{slug}/members",
                                  json={"user_id": member.id, "role": role}, headers=self.admin)
            assert reply.status_code in (200, 201), reply.text
        return slug


STACKS = {
    "rclone-sqlite": ("rclone_target", None),
    "moto-sqlite": ("moto_target", None),
    "rclone-postgres": ("rclone_target", "postgres_url"),
}


def make_settings(tmp: Path, target: S3Target, database_url: str = "", **extra) -> Settings:
    # Local pods mount /shared and /files only where a test asks (two rclone daemons per pod).
    extra.setdefault("local_pod_mounts", False)
    extra.setdefault("ssh_port", 0)  # the SSH tests ask for a bastion, on a free port (0 here means none)
    # Tests tick the reaper by hand (often with a fake clock): a background tick racing them
    # could end a rental first, or while a run's answer is on its way.
    extra.setdefault("reaper_interval_seconds", 3600)
    return Settings(
        data_dir=passable(tmp),
        database_url=database_url,
        admin_token=ADMIN_TOKEN,
        s3_endpoint_url=target.endpoint,
        s3_access_key_id=target.access_key,
        s3_secret_access_key=target.secret_key,
        s3_bucket="b" + uuid.uuid4().hex[:12],
        **extra,
    )


@pytest.fixture(scope="session", params=list(STACKS))
def stack(request, tmp_path_factory) -> Stack:
    target_fixture, db_fixture = STACKS[request.param]
    target = request.getfixturevalue(target_fixture)
    database_url = request.getfixturevalue(db_fixture) if db_fixture else ""
    tmp = tmp_path_factory.mktemp(request.param)
    # Small parts so multipart paths run on small test files.
    settings = make_settings(
        tmp, target, database_url, upload_part_bytes=5 << 20, upload_unknown_length_part_bytes=5 << 20
    )
    server = LiveServer(settings).start()
    yield Stack(request.param, server, target)
    server.stop()


@pytest.fixture
def server_log(caplog):
    """Every record of the server: the gateway's (to the root logger) and uvicorn's own (which
    does not propagate to the root)."""
    caplog.set_level(logging.INFO)
    uvicorn_log = logging.getLogger("uvicorn")
    uvicorn_log.addHandler(caplog.handler)
    yield caplog
    uvicorn_log.removeHandler(caplog.handler)


@pytest.fixture
def user(stack) -> Account:
    return stack.new_user(name="Test Researcher")


@pytest.fixture
def gpu(stack, user) -> str:
    """A rental of ``user``'s on ``stack`` (local pods), returned after the test."""
    reply = requests.post(f"{stack.base}/v1/gpus", json={"name": "t"}, headers=user.auth)
    assert reply.status_code == 201, reply.text
    gpu_id = reply.json()["gpu_id"]
    yield gpu_id
    requests.delete(f"{stack.base}/v1/gpus/{gpu_id}", headers=user.auth)


DOCKER_TEST_IMAGE = "kgpu-test:latest"
DOCKER_TEST_PREFIX = "kgpu-test"  # its own names and labels: a real gateway on this host never adopts them


@pytest.fixture(scope="session")
def docker_pod_client():
    """A docker client with kgpu-test:latest present (tests/images/build-test-image.sh, once a session).

    Without docker here the docker tests skip, except in CI (env CI set), where they fail.
    """
    import subprocess
    import sys

    def unavailable(why: str):
        if os.environ.get("CI"):
            pytest.fail(f"docker pod backend unavailable in CI: {why}", pytrace=False)
        pytest.skip(f"docker pod backend unavailable: {why}")

    import shutil

    # The script installs docker.io only for .ci/run: a plain `make test` installs nothing.
    reachable = shutil.which("docker") and subprocess.run(["docker", "info"], capture_output=True, timeout=60).returncode == 0
    if shutil.which("dockerd") is None and not reachable:
        unavailable("Docker is not installed here (.ci/run installs docker.io and builds the test images)")
    script = Path(__file__).parent / "images" / "build-test-image.sh"
    started = time.monotonic()
    try:
        done = subprocess.run(
            ["bash", str(script)], stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=900
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        unavailable(f"{script.name}: {exc}")
    if done.returncode != 0:
        unavailable(f"{script.name} exited {done.returncode}:\n{done.stdout}{done.stderr}")
    print(f"{done.stdout.strip()} [{time.monotonic() - started:.1f} s]", file=sys.stderr)
    try:
        import docker

        client = docker.from_env()
        client.images.get(DOCKER_TEST_IMAGE)
    except Exception as exc:  # noqa: BLE001 - any failure here means "no docker"
        unavailable(f"{type(exc).__name__}: {exc}")
    yield client
    # Containers a failed test left behind.
    for container in client.containers.list(all=True, filters={"label": f"{DOCKER_TEST_PREFIX}.managed=true"}):
        container.remove(force=True)
    client.close()


SLURM_CLUSTER = Path(__file__).parent / "slurm" / "cluster.sh"


@dataclass
class SlurmCluster:
    """The local two-node test cluster (tests/slurm/cluster.sh): what `up` exported."""

    env: dict[str, str]

    def backend(self, **extra):
        from gateway.pods.slurm import SlurmPodBackend

        return SlurmPodBackend(
            conf=self.env["KGPU_SLURM_CONF"], gpu_device_dir=self.env["KGPU_SLURM_GPU_DEVICE_DIR"],
            prefix=DOCKER_TEST_PREFIX, pull=False, gateway_address=self.env["KGPU_SLURM_GATEWAY_ADDRESS"], **extra,
        )


@pytest.fixture(scope="session")
def slurm_cluster(docker_pod_client) -> SlurmCluster:
    """tests/slurm/cluster.sh up once a session (down at the end, unless it was up before); the
    nodes' containers run on this host's dockerd (docker_pod_client). Without Slurm here the
    slurm tests skip, except in CI, where they fail."""
    import shlex
    import subprocess

    from gateway.pods.slurm import slurm_available

    def unavailable(why: str):
        if os.environ.get("CI"):
            pytest.fail(f"slurm test cluster unavailable in CI: {why}", pytrace=False)
        pytest.skip(f"slurm test cluster unavailable: {why}")

    if not slurm_available():
        unavailable("no Slurm commands here (apt-get install slurm-wlm munge)")
    was_up = subprocess.run(["bash", str(SLURM_CLUSTER), "status"], capture_output=True).returncode == 0
    done = subprocess.run(["bash", str(SLURM_CLUSTER), "up"], stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        unavailable(f"cluster.sh up exited {done.returncode}: {done.stderr}")
    env = {}
    for line in done.stdout.splitlines():
        name, _, value = line.removeprefix("export ").partition("=")
        env[name] = shlex.split(value)[0] if value else ""
    yield SlurmCluster(env)
    if not was_up:
        subprocess.run(["bash", str(SLURM_CLUSTER), "down"], stdin=subprocess.DEVNULL, capture_output=True, timeout=120)


@pytest.fixture(params=["local", "docker", "slurm"])
def pod_backend(request, tmp_path):
    """Every pod backend, one after the other."""
    if request.param == "local":
        from gateway.pods.local import LocalPodBackend

        return LocalPodBackend(passable(tmp_path) / "pods")
    if request.param == "docker":
        from gateway.pods.docker import DockerPodBackend

        client = request.getfixturevalue("docker_pod_client")
        backend = DockerPodBackend(client, labels_prefix=DOCKER_TEST_PREFIX, pull=False, disk_dir=passable(tmp_path) / "disks")
        backend.test_image = DOCKER_TEST_IMAGE
        return backend
    if request.param == "slurm":
        backend = request.getfixturevalue("slurm_cluster").backend()
        backend.test_image = DOCKER_TEST_IMAGE
        return backend
    raise AssertionError(request.param)
