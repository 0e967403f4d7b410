"""Benchmark of the slurm pod backend on the local two-node test cluster (run by hand).

  (1) rent -> ready: POST /v1/gpus (1 GPU) until GET /v1/gpus/{id} says ready (median of --rents)
  (2) run exit -> long-poll answer: a run that prints the time it ends, posted with a long
      wait_seconds; from that time to the answer's arrival (p50 of --samples; target <= 100 ms)
  (3) srun calls per long-poll: slurmctld's step count before and after one long-poll
  (4) the queue: the cluster's four GPUs rented, a fifth with "queue": true; from the return of
      one of the four to the fifth's ready (median of --queue-rounds; issue 13's goal: <= 30 s)

Brings the cluster up with tests/slurm/cluster.sh (left up if it was; stopped after if this
started it), starts its own `kgpu serve` on a temporary data directory with the cluster's
exports, and removes both afterwards. Needs root, slurm-wlm, munge, docker with the kgpu-test image
(tests/images/build-test-image.sh).
Usage: .venv/bin/python bench/slurm_bench.py [--rents 5] [--samples 20]
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402  (this folder's shared bench code)

CLUSTER = harness.REPO / "tests" / "slurm" / "cluster.sh"
ADMIN = "bench-admin-token"


def cluster_up() -> tuple[dict[str, str], bool]:
    was_up = subprocess.run(["bash", str(CLUSTER), "status"], capture_output=True).returncode == 0
    done = subprocess.run(["bash", str(CLUSTER), "up"], capture_output=True, text=True, check=True)
    env = {}
    for line in done.stdout.splitlines():
        name, _, value = line.removeprefix("export ").partition("=")
        env[name] = shlex.split(value)[0] if value else ""
    return env, was_up


def steps_started(env: dict[str, str]) -> int:
    """Job steps slurmctld has started so far (sdiag's RPC count of step creations)."""
    out = subprocess.run(["sdiag"], env={"PATH": os.environ["PATH"], "SLURM_CONF": env["SLURM_CONF"]},
                         capture_output=True, text=True).stdout
    for line in out.splitlines():
        if "REQUEST_JOB_STEP_CREATE" in line:
            return int(line.split("count:")[1].split()[0])
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rents", type=int, default=5)
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument("--queue-rounds", type=int, default=3)
    args = parser.parse_args()
    env, was_up = cluster_up()
    data = Path(tempfile.mkdtemp(prefix="kgpu-slurm-bench-"))
    settings = {**env, "KGPU_DEFAULT_IMAGE": "kgpu-test:latest", "KGPU_SLURM_PULL": "false",
                "KGPU_SLURM_JOB_PREFIX": "kgpu-bench", "KGPU_REAPER_INTERVAL_SECONDS": "3600", "KGPU_MAX_GPUS_PER_USER": "8"}
    server = harness.start_kgpu(data / "data", harness.free_port(), ADMIN, data, 0, settings=settings)
    base = server.base
    try:
        token = harness.new_user(base, ADMIN, "bench@lab.example")["token"]
        me = {"Authorization": f"Bearer {token}"}

        ready_s = []
        for _ in range(args.rents):
            started = time.monotonic()
            gpu = requests.post(f"{base}/v1/gpus", json={"gpu_count": 1, "cpu": "1", "memory": "1Gi"}, headers=me).json()["gpu_id"]
            while not (state := requests.get(f"{base}/v1/gpus/{gpu}", headers=me).json())["ready"]:
                assert state["phase"] in ("Pending", "Running"), state
                time.sleep(0.02)
            ready_s.append(time.monotonic() - started)
            requests.delete(f"{base}/v1/gpus/{gpu}", headers=me)
        print(f"(1) rent -> ready: median {statistics.median(ready_s):.2f} s "
              f"(min {min(ready_s):.2f}, max {max(ready_s):.2f}, n={len(ready_s)})")

        gpu = requests.post(f"{base}/v1/gpus", json={"gpu_count": 1, "cpu": "1", "memory": "1Gi"}, headers=me).json()["gpu_id"]
        while not requests.get(f"{base}/v1/gpus/{gpu}", headers=me).json()["ready"]:
            time.sleep(0.05)
        latencies = []
        session = requests.Session()
        for _ in range(args.samples):
            reply = session.post(f"{base}/v1/runs", headers=me, json={
                "gpu_id": gpu, "command": ["sh", "-c", "sleep 0.3; date +%s.%N"], "wait_seconds": 10})
            received = time.time()
            run = reply.json()
            assert run["phase"] == "Succeeded", run
            latencies.append(received - float(run["stdout"]))  # one host clock: the pods are containers here
        latencies.sort()
        print(f"(2) run exit -> long-poll answer: p50 {statistics.median(latencies) * 1000:.0f} ms, "
              f"p90 {latencies[int(len(latencies) * 0.9) - 1] * 1000:.0f} ms (n={len(latencies)})")

        before = steps_started(env)
        run = requests.post(f"{base}/v1/runs", headers=me, json={"gpu_id": gpu, "command": ["true"], "wait_seconds": 0}).json()
        after_start = steps_started(env)
        requests.get(f"{base}/v1/runs/{run['run_id']}", headers=me)
        after_get = steps_started(env)
        print(f"(3) sruns: a run's start and its first answer {after_start - before}, a GET of its state {after_get - after_start}")
        requests.delete(f"{base}/v1/gpus/{gpu}", headers=me)

        def rent_ready(**extra) -> str:
            body = {"gpu_count": 1, "cpu": "1", "memory": "1Gi", **extra}
            gpu_id = requests.post(f"{base}/v1/gpus", json=body, headers=me).json()["gpu_id"]
            while not (state := requests.get(f"{base}/v1/gpus/{gpu_id}", headers=me).json())["ready"]:
                assert state["phase"] in ("Queued", "Pending", "Running"), state
                time.sleep(0.02)
            return gpu_id

        held = [rent_ready() for _ in range(4)]
        waits = []
        for _ in range(args.queue_rounds):
            queued = requests.post(f"{base}/v1/gpus", json={"gpu_count": 1, "cpu": "1", "memory": "1Gi", "queue": True},
                                   headers=me).json()
            assert queued["phase"] == "Queued", queued
            returned = time.monotonic()
            requests.delete(f"{base}/v1/gpus/{held.pop(0)}", headers=me)
            while not (state := requests.get(f"{base}/v1/gpus/{queued['gpu_id']}", headers=me).json())["ready"]:
                assert state["phase"] in ("Queued", "Pending", "Running"), state
                time.sleep(0.02)
            waits.append(time.monotonic() - returned)
            held.append(queued["gpu_id"])
        print(f"(4) queue: a return -> the queued rental ready: median {statistics.median(waits):.2f} s "
              f"(max {max(waits):.2f}, n={len(waits)}; the return itself included; goal <= 30 s)")
        for gpu_id in held:
            requests.delete(f"{base}/v1/gpus/{gpu_id}", headers=me)
    finally:
        harness.clean_up([server], [data])
        if not was_up:
            subprocess.run(["bash", str(CLUSTER), "down"], capture_output=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
