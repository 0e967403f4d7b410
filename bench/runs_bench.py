"""Benchmark of /v1/runs long-polls on the local or docker pod backend (run by hand; 127.0.0.1 only).

  (1) latency from a run's exit to the long-poll's answer (target p50 <= 100 ms); on docker,
      also the execs into the pod per run (docker events; target <= 2 for the long-poll,
      start included: 3)
  (2) N long-polls held at once by one gateway process: all return, and its RSS

Starts its own `kgpu serve` on a temporary data directory and removes it afterwards.
Usage: .venv/bin/python bench/runs_bench.py [--backend local|docker] [--samples 30] [--concurrent 500]
(docker: the daemon and the kgpu-test image of tests/images/build-test-image.sh)
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402  (this folder's shared bench code)

ADMIN = "bench-admin-token"


def rss_mib(pid: int) -> float:
    return harness.rss_kib(pid) / 1024


def docker_events() -> subprocess.Popen:
    """`docker events` of exec creations from now on (read by count_execs)."""
    return subprocess.Popen(
        ["docker", "events", "--filter", "type=container", "--filter", "event=exec_create", "--format", "{{.Action}}"],
        stdout=subprocess.PIPE, text=True,
    )


def count_execs(events: subprocess.Popen) -> int:
    time.sleep(1)  # the daemon reports events a moment late
    events.terminate()
    out, _ = events.communicate(timeout=10)
    return sum(1 for line in out.splitlines() if line.startswith("exec_create"))


def main() -> int:
    parser = harness.bench_parser(__doc__)
    parser.add_argument("--samples", type=int, default=30)
    parser.add_argument("--concurrent", type=int, default=500)
    parser.add_argument("--hold-seconds", type=float, default=5.0)
    parser.add_argument("--backend", choices=("local", "docker"), default="local")
    parser.add_argument("--image", default="kgpu-test:latest", help="the pod image on docker")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="kgpu-runs-bench-"))

    tmp.chmod(0o711)  # local pods run under uids of their own, which pass through it to their folders
    settings = {"KGPU_POD_BACKEND": args.backend}
    if args.backend == "docker":
        settings["KGPU_DEFAULT_IMAGE"] = args.image
    server = harness.start_kgpu(tmp / "data", harness.free_port(), ADMIN, tmp, 0, settings=settings)
    base = server.base
    try:
        token = harness.new_user(base, ADMIN, "bench@lab.example")["token"]
        auth = {"Authorization": f"Bearer {token}"}
        gpu = requests.post(f"{base}/v1/gpus", json={"name": "bench"}, headers=auth).json()["gpu_id"]
        while not requests.get(f"{base}/v1/gpus/{gpu}", headers=auth).json()["ready"]:  # mounts first
            time.sleep(0.1)

        print(f"(1) exit -> long-poll answer latency ({args.backend} backend)")
        latencies = []
        session = requests.Session()
        events = docker_events() if args.backend == "docker" else None
        for _ in range(args.samples):
            reply = session.post(
                f"{base}/v1/runs",
                json={"gpu_id": gpu, "command": ["sh", "-c", "sleep 0.3; date +%s.%N"], "wait_seconds": 10},
                headers=auth,
            )
            received = time.time()
            body = reply.json()
            assert body["phase"] == "Succeeded", body
            latencies.append((received - float(body["stdout"])) * 1000)
        latencies.sort()
        p50 = statistics.median(latencies)
        p95 = latencies[int(0.95 * (len(latencies) - 1))]
        print(f"    {args.samples} runs: p50 {p50:.1f} ms, p95 {p95:.1f} ms, max {latencies[-1]:.1f} ms "
              f"(target p50 <= 100 ms: {'ok' if p50 <= 100 else 'MISSED'})")
        if events is not None:
            execs = count_execs(events)
            print(f"    docker execs into the pod: {execs} for {args.samples} runs, {execs / args.samples:.1f} a run "
                  "(start + wait for its pid + the long-poll)")

        print("(1b) a quick run's round trip: POST /v1/runs of `true` -> its answer")
        rounds = []
        for _ in range(args.samples):
            started = time.perf_counter()
            reply = session.post(f"{base}/v1/runs", json={"gpu_id": gpu, "command": ["true"], "wait_seconds": 10}, headers=auth)
            rounds.append((time.perf_counter() - started) * 1000)
            assert reply.json()["phase"] == "Succeeded", reply.text
        rounds.sort()
        print(f"    {args.samples} runs: p50 {statistics.median(rounds):.1f} ms, p95 {rounds[int(0.95 * (len(rounds) - 1))]:.1f} ms")

        print(f"(2) {args.concurrent} long-polls held at once (each run sleeps {args.hold_seconds} s)")
        before = rss_mib(server.pid)
        peak = [before]
        results: list[str] = []
        lock = threading.Lock()

        def one() -> None:
            try:
                reply = requests.post(
                    f"{base}/v1/runs",
                    json={"gpu_id": gpu, "command": ["sleep", str(args.hold_seconds)], "wait_seconds": 60},
                    headers=auth, timeout=120,
                )
                outcome = reply.json().get("phase", str(reply.status_code))
            except Exception as exc:  # noqa: BLE001 - reported, not hidden
                outcome = f"error: {exc.__class__.__name__}"
            with lock:
                results.append(outcome)

        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                peak[0] = max(peak[0], rss_mib(server.pid))
                time.sleep(0.1)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        started = time.monotonic()
        threads = [threading.Thread(target=one) for _ in range(args.concurrent)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        stop.set()
        elapsed = time.monotonic() - started
        succeeded = results.count("Succeeded")
        print(f"    {succeeded} of {args.concurrent} returned Succeeded in {elapsed:.1f} s "
              f"(others: {sorted(set(r for r in results if r != 'Succeeded'))})")
        print(f"    gateway RSS {before:.0f} MiB before, peak {peak[0]:.0f} MiB (+{peak[0] - before:.0f} MiB)")
        requests.delete(f"{base}/v1/gpus/{gpu}", headers=auth)
    finally:
        harness.clean_up([server], [tmp])
    return 0


if __name__ == "__main__":
    sys.exit(main())
