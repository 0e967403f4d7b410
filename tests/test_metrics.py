"""GET /metrics (gateway/metrics.py, gateway/traffic.py): Prometheus text that parses, counters
that move with requests, labels from fixed sets only (never a path, a token or a signature),
admins only on the API's port, and KGPU_METRICS_ADDRESS's listener without a token."""

from __future__ import annotations

import subprocess
import sys

import requests
from prometheus_client.parser import text_string_to_metric_families

from drive.store import StoreUnavailable
from drive.store.embedded import free_port
from drive.store.s3 import S3ObjectStore
from gateway import metrics, traffic
from gateway.rentals.phases import Phase
from tests.conftest import passable
from tests.test_serve import Served

SIGNATURE = "5ec2e7" * 10 + "abcd"


def scrape(base: str, headers: dict | None = None) -> dict[tuple[str, tuple], float]:
    """Every sample of GET {base}/metrics: (name, sorted labels) -> value."""
    reply = requests.get(f"{base}/metrics", headers=headers or {})
    assert reply.status_code == 200, reply.text
    assert reply.headers["Content-Type"].startswith("text/plain")
    return samples_of(reply.text)


def samples_of(text: str) -> dict[tuple[str, tuple], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_counters_move_with_requests(stack, user):
    body = b"m" * 3000
    before = scrape(stack.base, stack.admin)
    put = requests.put(f"{stack.base}/v1/files/metrics/a.bin", data=body, headers={**user.auth, "Expect": ""})
    assert put.status_code == 201, put.text
    redirects = [
        requests.get(f"{stack.base}/v1/files/metrics/a.bin", headers=user.auth, allow_redirects=False)
        for _ in range(3)
    ]
    assert [r.status_code for r in redirects] == [302, 302, 302]
    listing = requests.get(f"{stack.base}/v1/files/metrics/", headers={**user.auth, "Accept": "application/json"})
    assert listing.status_code == 200
    assert requests.get(f"{stack.base}/v1/gpus", headers=user.auth).status_code == 200
    after = scrape(stack.base, stack.admin)

    def moved(name: str, **labels) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("kgpu_http_requests_total", family="files", status="302") >= 3
    assert moved("kgpu_redirects_total", family="files", status="302") >= 3
    assert moved("kgpu_http_requests_total", family="files", status="201") >= 1
    assert moved("kgpu_http_requests_total", family="gpus", status="200") >= 1
    assert moved("kgpu_http_request_duration_seconds_count", family="files") >= 5
    assert moved("kgpu_http_request_duration_seconds_bucket", family="files", le="+Inf") >= 5
    assert moved("kgpu_http_request_duration_seconds_sum", family="files") > 0
    assert moved("kgpu_http_request_body_bytes_total", family="files") >= len(body)
    assert moved("kgpu_http_response_body_bytes_total", family="files") >= len(listing.content)
    # the first scrape itself was counted before the second
    assert moved("kgpu_http_requests_total", family="metrics", status="200") >= 1
    assert value(after, "kgpu_database_up") == 1
    for phase in Phase:
        assert ("kgpu_rentals", (("phase", phase.value),)) in after
    assert ("kgpu_credits_charged_total", ()) in after and ("kgpu_store_errors_total", ()) in after


def test_rentals_queue_and_pods_come_from_the_database(stack):
    with stack.server.app.state.sessions() as session:
        from sqlalchemy import func, select

        from gateway.models import Rental

        running = session.scalar(select(func.count()).where(Rental.phase == Phase.RUNNING))
        queued = dict(
            session.execute(
                select(Rental.gpu_model, func.count()).where(Rental.phase == Phase.QUEUED).group_by(Rental.gpu_model)
            ).all()
        )
    samples = scrape(stack.base, stack.admin)
    assert value(samples, "kgpu_rentals", phase="Running") == running
    for model, n in queued.items():
        assert value(samples, "kgpu_queue_length", gpu_model=model) == n


def test_no_path_token_or_signature_in_any_label(stack, user):
    hostile = [
        f"/v1/files/{user.token}/x?X-Amz-Signature={SIGNATURE}",
        f"/v1/{user.token}?token={user.token}",
        f"/{SIGNATURE}/v1/files/a",
        "/v1/files/a%0Ab%22c",
        "/view/../../etc/passwd",
    ]
    for path in hostile:
        requests.get(f"{stack.base}{path}", headers=user.auth, allow_redirects=False)
    requests.get(f"{stack.base}/v1/me", headers={"Authorization": f"Bearer {user.token}x"})
    reply = requests.get(f"{stack.base}/metrics", headers=stack.admin)
    assert reply.status_code == 200
    assert user.token not in reply.text and user.token[6:] not in reply.text and SIGNATURE not in reply.text
    for family in text_string_to_metric_families(reply.text):
        for sample in family.samples:
            for name, label in sample.labels.items():
                if name == "family":
                    assert label in traffic.FAMILIES, sample
                elif name == "status":
                    assert label.isdigit() and len(label) == 3, sample
                elif name == "phase":
                    assert label in {p.value for p in Phase}, sample
                elif name == "outcome":
                    assert label in ("accepted", "refused"), sample
                elif name == "le":
                    float(label)
                else:
                    assert name in ("gpu_model", "backend"), sample
                assert "/" not in label and "?" not in label, sample


def test_metrics_are_for_admins(stack, user):
    anonymous = requests.get(f"{stack.base}/metrics")
    assert anonymous.status_code == 401 and anonymous.json()["error_code"] == "unauthorized"
    assert requests.get(f"{stack.base}/metrics", headers={"Authorization": "Bearer kgpu_" + "0" * 48}).status_code == 401
    refused = requests.get(f"{stack.base}/metrics", headers=user.auth)
    assert refused.status_code == 403 and refused.json()["error_code"] == "admin_only"
    assert "kgpu_http_requests_total" in requests.get(f"{stack.base}/metrics", headers=stack.admin).text


def test_store_failures_are_counted():
    before = StoreUnavailable.raised
    unreachable = S3ObjectStore(f"http://127.0.0.1:{free_port()}", "k", "s", "b", "us-east-1")
    try:
        unreachable.head("x")
    except StoreUnavailable:
        pass
    else:
        raise AssertionError("a store on a closed port answered")
    assert StoreUnavailable.raised == before + 1


COUNT_IN_ANOTHER_PROCESS = """
import sys
from pathlib import Path
from gateway import traffic
t = traffic.Traffic()
for _ in range(7):
    t.request("files", 302, 0.002)
t.request("dav", 207, 0.3, received=10, sent=500)
traffic.Snapshots(Path(sys.argv[1]), t).write()
"""


def test_a_scrape_adds_the_other_processes_counts(tmp_path):
    subprocess.run([sys.executable, "-c", COUNT_IN_ANOTHER_PROCESS, str(tmp_path)], check=True, timeout=60)
    mine = traffic.Traffic()
    mine.request("files", 302, 0.001)
    collector = metrics.TrafficCollector(traffic.Snapshots(tmp_path), live=mine)
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value for family in collector.collect() for s in family.samples
    }
    assert value(samples, "kgpu_http_requests_total", family="files", status="302") == 8
    assert value(samples, "kgpu_http_request_duration_seconds_bucket", family="files", le="0.001") == 1
    assert value(samples, "kgpu_http_request_duration_seconds_bucket", family="files", le="0.0025") == 8
    assert value(samples, "kgpu_http_request_body_bytes_total", family="dav") == 10
    assert value(samples, "kgpu_http_response_body_bytes_total", family="dav") == 500
    # a file being replaced (or anything unreadable) is skipped, not an error
    (tmp_path / "1.json").write_text("{not json")
    assert len(traffic.Snapshots(tmp_path).others()) == 1


def test_route_families_are_a_fixed_set():
    assert traffic.family_of(b"/v1/files/a/b") == "files"
    assert traffic.family_of(b"/v1/gpu-models") == "gpus"
    assert traffic.family_of(b"/v1/files") == "files"
    assert traffic.family_of(b"/view/admin") == "web"
    assert traffic.family_of(b"/") == "web"
    assert traffic.family_of(b"/metrics") == "metrics"
    assert traffic.family_of(b"/v1/kgpu_0123/x") == "other"
    assert traffic.family_of(b"/anything/else") == "other"


def test_serve_with_a_metrics_address_answers_without_a_token(tmp_path):
    data = passable(tmp_path) / "data"
    port = free_port()
    served = Served(data, {"KGPU_METRICS_ADDRESS": f"127.0.0.1:{port}"})
    try:
        assert requests.get(f"{served.base}/healthz").status_code == 200
        samples = scrape(f"http://127.0.0.1:{port}")
        assert value(samples, "kgpu_http_requests_total", family="health", status="200") >= 1
        assert value(samples, "kgpu_database_up") == 1
        assert requests.get(f"{served.base}/metrics").status_code == 401  # the API's port still asks for admin
    finally:
        served.process.terminate()
        served.process.wait(timeout=30)
