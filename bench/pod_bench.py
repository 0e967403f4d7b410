#!/usr/bin/env python3
"""Benchmark of the in-pod mounts on the docker backend, on 127.0.0.1 only.

Starts its own ``kgpu serve`` (embedded store, SQLite, docker backend on the host
network, default image ``kgpu-pytorch-test:latest`` built by
tests/images/build-test-image.sh), makes a user and an org, then:

  (a) POST /v1/gpus -> ``ready: true`` with both mounts up (GET polled every 50 ms),
      ``--rentals`` times: median and max;
  (b) a ``--size-mib`` file in the org's shared drive, read inside one pod
      sequentially through /shared (``cat > /dev/null``, a cold read: the mount has
      never seen it) against ``curl -o /dev/null`` of its presigned URL from the same
      pod, curl before and after; ratio mount / mean(curl) (goal >= 0.8);
  (c) flush on return: ``--small-files`` files of 4 KiB, then one ``--big-mib`` file,
      written to /files by the last run before ``DELETE /v1/gpus/{id}``; the DELETE's
      time against a DELETE with nothing written, and whether everything arrived.

Usage: .venv/bin/python bench/pod_bench.py [--rentals 5] [--size-mib 1024] [--big-mib 256] [--backend local]
Everything it starts is stopped and its temporary directory deleted at the end.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402  (this folder's shared bench code)

IMAGE = "kgpu-pytorch-test:latest"


class Api:
    def __init__(self, base: str, token: str):
        self.base, self.auth = base, {"Authorization": f"Bearer {token}"}

    def rent_ready(self) -> tuple[str, float]:
        started = time.monotonic()
        gpu = requests.post(f"{self.base}/v1/gpus", json={"name": "bench"}, headers=self.auth).json()["gpu_id"]
        while True:
            state = requests.get(f"{self.base}/v1/gpus/{gpu}", headers=self.auth).json()
            if state["ready"]:
                elapsed = time.monotonic() - started
                mounts = {name: m["status"] for name, m in (state["mounts"] or {}).items()}
                if mounts != {"shared": "mounted", "files": "mounted"}:
                    raise RuntimeError(f"mounts did not come up: {state['mounts']}")
                return gpu, elapsed
            if state["phase"] in ("Ended", "Failed") or time.monotonic() - started > 120:
                raise RuntimeError(f"rental never ready: {state}")
            time.sleep(0.05)

    def run(self, gpu: str, script: str, timeout: float = 900) -> str:
        return harness.run_in_pod(self.base, self.auth["Authorization"].split()[1], gpu, script, timeout)

    def delete(self, gpu: str) -> tuple[dict, float]:
        started = time.monotonic()
        ended = requests.delete(f"{self.base}/v1/gpus/{gpu}", headers=self.auth).json()
        return ended, time.monotonic() - started


TIMED = 's=$(date +%s.%N); {cmd}; e=$(date +%s.%N); echo "$s $e"'


def seconds(line: str) -> float:
    start, end = map(float, line.split()[-2:])
    return end - start


def main() -> int:
    parser = harness.bench_parser(__doc__)
    parser.add_argument("--rentals", type=int, default=5)
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--small-files", type=int, default=100)
    parser.add_argument("--big-mib", type=int, default=256)
    parser.add_argument("--time-limit", type=int, default=1800)
    parser.add_argument("--backend", choices=["docker", "local"], default="docker",
                        help="local: the pods' mounts run on this host, bound into the bubblewrap sandbox")
    args = parser.parse_args()
    harness.arm_time_limit(args.time_limit)

    tmp = Path(tempfile.mkdtemp(prefix="kgpu-pod-bench-"))

    tmp.chmod(0o711)  # local pods run under uids of their own, which pass through it to their folders
    admin_token = secrets.token_hex(16)
    server = harness.start_kgpu(
        tmp / "data", harness.free_port(), admin_token, tmp, 0,
        settings={"KGPU_POD_BACKEND": args.backend, "KGPU_DEFAULT_IMAGE": IMAGE, "KGPU_DOCKER_PULL": "false"},
    )
    base = server.base
    admin = {"Authorization": f"Bearer {admin_token}"}
    results: dict = {}
    try:
        user = harness.new_user(base, admin_token, "bench@lab.example")
        api = Api(base, user["token"])
        requests.post(f"{base}/v1/admin/orgs", json={"slug": "benchlab", "name": "Bench", "owner_user_id": user["user"]["id"]}, headers=admin)

        # (a) time to ready
        times = []
        for _ in range(args.rentals):
            gpu, elapsed = api.rent_ready()
            times.append(elapsed)
            api.delete(gpu)
        results["ready"] = times
        harness.log(f"(a) POST -> ready with both mounts, {args.rentals} rentals: median {statistics.median(times):.2f} s, "
               f"max {max(times):.2f} s ({', '.join(f'{t:.2f}' for t in times)})")

        # (b) sequential read through /shared against curl of the presigned URL, in one pod
        source = tmp / "big.bin"
        digest = harness.make_file(source, args.size_mib * harness.MiB)
        started = time.monotonic()
        subprocess.run(
            ["curl", "-fsS", "-L", "-T", str(source), "-H", "Expect: 100-continue", "-o", "/dev/null",
             "-H", f"Authorization: Bearer {user['token']}", f"{base}/v1/shared/benchlab/big.bin"],
            check=True,
        )
        upload = time.monotonic() - started
        source.unlink()
        os.sync()  # the upload's dirty pages would otherwise be written back during the reads
        gpu, _ = api.rent_ready()
        presigned = (
            'url=$(curl -fsS -H "Authorization: Bearer $KGPU_API_TOKEN" -H "Accept: application/json" '
            '"$KGPU_API_BASE/v1/shared/benchlab/big.bin" | python3 -c "import json,sys; print(json.load(sys.stdin)[\'url\'])")'
        )
        curl_cmd = 'curl -fsS -o /dev/null "$url"'
        first = seconds(api.run(gpu, f"{presigned}; " + TIMED.format(cmd=curl_cmd)))
        mount_line = api.run(gpu, TIMED.format(cmd="cat /shared/benchlab/big.bin > /dev/null"))
        second = seconds(api.run(gpu, f"{presigned}; " + TIMED.format(cmd=curl_cmd)))
        mount = seconds(mount_line)
        checked = api.run(gpu, "sha256sum /shared/benchlab/big.bin").split()[0]
        size = args.size_mib
        direct = size / statistics.mean([first, second])
        results["read"] = {"mount_mib_s": size / mount, "curl_mib_s": direct, "ratio": size / mount / direct}
        harness.log(f"(b) {size} MiB sequential read in the pod: /shared {size / mount:.0f} MiB/s, presigned curl "
               f"{size / first:.0f} and {size / second:.0f} MiB/s; ratio {size / mount / direct:.2f} (goal >= 0.8); "
               f"sha256 {'ok' if checked == digest else 'MISMATCH'}; upload took {upload:.1f} s")
        api.delete(gpu)

        # (c) flush on return
        gpu, _ = api.rent_ready()
        _, empty = api.delete(gpu)
        gpu, _ = api.rent_ready()
        api.run(gpu, f"mkdir -p /files/small && for i in $(seq 1 {args.small_files}); do head -c 4096 /dev/urandom > /files/small/f$i.bin; done")
        ended, small = api.delete(gpu)
        listed = requests.get(f"{base}/v1/files?prefix=small/", headers=api.auth).json()
        arrived = len([f for f in listed.get("files", []) if f.get("path", f.get("key", "")).startswith("small/")])
        harness.log(f"(c) DELETE after {args.small_files} x 4 KiB just written: {small:.2f} s (empty pod: {empty:.2f} s); "
               f"{arrived}/{args.small_files} in the drive; flush_error {ended['flush_error']!r}")
        gpu, _ = api.rent_ready()
        big_digest = api.run(gpu, f"head -c {args.big_mib}M /dev/urandom > /files/big.bin && sha256sum /files/big.bin").split()[0]
        ended, big = api.delete(gpu)
        got = hashlib.sha256(requests.get(f"{base}/v1/files/big.bin", headers=api.auth).content).hexdigest()
        harness.log(f"(c) DELETE after one {args.big_mib} MiB file just written: {big:.2f} s; "
               f"in the drive byte-exact: {got == big_digest}; flush_error {ended['flush_error']!r}")
        results["flush"] = {"empty_s": empty, "small_s": small, "small_arrived": arrived, "big_s": big, "big_ok": got == big_digest}
        print(json.dumps(results))
    finally:
        harness.clean_up([server], [tmp])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
