"""On a machine with NVIDIA GPUs: the detected inventory and a rental's `nvidia-smi -L` (local backend).

Starts its own `kgpu serve` (embedded store, SQLite, local pod backend, inventory detected
from nvidia-smi) on a temporary data directory, then over HTTP: GET /v1/gpus, rent every
GPU, run `nvidia-smi -L` (and torch, where installed) in the rental, try one GPU more
(409 no_capacity expected), return the rental. Prints each answer; exit 1 on a mismatch.
Usage: python bench/gpu_check.py   (the `kgpu` script beside that python is the server)
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402  (this folder's shared bench code)

ADMIN = "gpu-check-admin-token"
TORCH = "import torch; print('torch sees', torch.cuda.device_count(), 'GPU(s):', torch.cuda.get_device_name(0))"


def main() -> int:
    parser = harness.bench_parser(__doc__)
    parser.parse_args()
    if not shutil.which("nvidia-smi"):
        print("no nvidia-smi on this machine: nothing to check")
        return 2
    smi = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True)
    print("host nvidia-smi -L:\n" + smi.stdout.strip())
    host_gpus = [line for line in smi.stdout.splitlines() if line.startswith("GPU ")]

    tmp = Path(tempfile.mkdtemp(prefix="kgpu-gpu-check-"))

    tmp.chmod(0o711)  # local pods run under uids of their own, which pass through it to their folders
    server = harness.start_kgpu(tmp / "data", harness.free_port(), ADMIN, tmp, 0, settings={"KGPU_POD_BACKEND": "local"})
    base = server.base
    failures = []
    try:
        token = harness.new_user(base, ADMIN, "gpu@lab.example")["token"]
        auth = {"Authorization": f"Bearer {token}"}

        cluster = requests.get(f"{base}/v1/gpus").json()["cluster"]
        print("GET /v1/gpus cluster:", json.dumps(cluster))
        if sum(c["gpu_total"] for c in cluster) != len(host_gpus):
            failures.append(f"inventory has {sum(c['gpu_total'] for c in cluster)} GPUs, nvidia-smi {len(host_gpus)}")

        rented = requests.post(f"{base}/v1/gpus", json={"name": "check", "gpu_count": len(host_gpus)}, headers=auth)
        print("POST /v1/gpus:", rented.status_code, rented.text[:300])
        gpu = rented.json()["gpu_id"]
        while not (state := requests.get(f"{base}/v1/gpus/{gpu}", headers=auth).json())["ready"]:
            time.sleep(0.1)  # with FUSE here the pod mounts /shared and /files first
        print("mounts:", json.dumps(state["mounts"]))
        probes = (
            ["nvidia-smi", "-L"],
            ["python3", "-c", TORCH],
            ["sh", "-c", "echo /dev holds: $(ls /dev); echo CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES"],
            ["sh", "-c", "grep -E ' /(shared|files) ' /proc/mounts || echo no mounts; echo x > /files/gpu-check.txt && ls /files"],
        )
        for argv in probes:
            if argv[0] == "python3" and not shutil.which("python3"):
                continue
            run = requests.post(
                f"{base}/v1/runs", json={"gpu_id": gpu, "command": argv, "wait_seconds": 60}, headers=auth
            ).json()
            print(f"run {argv[0]}: exit {run.get('exit_code')}\n{run.get('stdout', '').strip()}\n{run.get('stderr', '').strip()}")
            if argv == ["nvidia-smi", "-L"] and sorted(run.get("stdout", "").strip().splitlines()) != sorted(host_gpus):
                failures.append("the rental's nvidia-smi -L differs from the host's")
        more = requests.post(f"{base}/v1/gpus", json={"name": "more", "gpu_count": 1}, headers=auth)
        print("one GPU more:", more.status_code, more.json().get("error_code"))
        if more.status_code != 409:
            failures.append(f"a rental beyond the inventory answered {more.status_code}")
        ended = requests.delete(f"{base}/v1/gpus/{gpu}", headers=auth).json()
        print("DELETE:", ended["phase"], ended["end_reason"], "credits charged", ended["credits_charged"])
    finally:
        harness.clean_up([server], [tmp])
    print("FAILURES: " + "; ".join(failures) if failures else "gpu check: all as expected")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
