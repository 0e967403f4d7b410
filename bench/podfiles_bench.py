#!/usr/bin/env python3
"""Benchmark of pod files (/v1/gpus/{id}/files, docs/pod-files.md), on 127.0.0.1 only.

Starts its own ``kgpu serve`` (embedded store, SQLite, the local pod backend unless --backend),
rents one pod, then, ``--rounds`` times, side by side:

  up:    ``curl -T`` of a ``--size-mib`` file from this host into the pod's /workspace through
         the gateway, against the lower bound: the pod's own fetch of the same bytes into its
         /workspace, ``curl -o`` of a presigned GET (a transit object), so both write the same
         disk; before each, both files are deleted and the disks synced (untimed), so neither
         pays for the other's writeback or for freeing the previous round's file;
  down:  ``curl -o /dev/null`` of the pod's file through the gateway, against ``curl -o
         /dev/null`` of a presigned GET from inside the pod (the same fetch as up's bound, to
         no disk: the two bounds side by side are what the pod's disk costs);

and the gateway's RSS growth and CPU time (ms per MiB) over each transfer (goal: gateway / lower
bound >= 0.7 both ways, RSS growth <= 64 MiB). Then the issue's "done when": the file goes up, is cut at 40 % (the
connection closed), resumes with ``curl -C N`` (Content-Range) and arrives with the same SHA-256
in the pod; the same down, cut at 40 % and resumed with ``curl -C -``.

Usage: .venv/bin/python bench/podfiles_bench.py [--size-mib 1024] [--rounds 3] [--backend local|docker|slurm]
                                                [--srun-stdio]  (slurm: without the direct channel)
Everything it starts is stopped and its temporary directory deleted at the end.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shlex
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402  (this folder's shared bench code)

IMAGES = {"local": "local", "docker": "kgpu-pytorch-test:latest", "slurm": "kgpu-pytorch-test:latest"}  # with curl
CLUSTER = harness.REPO / "tests" / "slurm" / "cluster.sh"


def backend_settings(backend: str, srun_stdio: bool = False) -> dict[str, str]:
    """What ``kgpu serve`` needs for the backend; slurm: the local test cluster's (it must be up:
    ``bash tests/slurm/cluster.sh up``), whose ``env`` prints them."""
    settings = {"KGPU_POD_BACKEND": backend, "KGPU_DEFAULT_IMAGE": IMAGES[backend], "KGPU_DOCKER_PULL": "false",
                "KGPU_LOCAL_POD_MOUNTS": "false", "KGPU_SSH_PORT": "0"}
    if backend == "slurm":
        printed = subprocess.run(["bash", str(CLUSTER), "env"], capture_output=True, text=True, check=True).stdout
        for line in printed.splitlines():
            name, _, value = line.removeprefix("export ").partition("=")
            settings[name] = shlex.split(value)[0] if value else ""
        settings.update(KGPU_SLURM_PULL="false", KGPU_SLURM_JOB_PREFIX="kgpu-pfbench", KGPU_POD_BACKEND="slurm",
                        KGPU_SLURM_DIRECT_CHANNEL="false" if srun_stdio else "true")
    return settings
# Before an upload's round: its file gone, and every dirty page written, so each transfer starts
# on the same clean disk (freeing a GiB on a disk mounted with discard, or the last round's
# writeback, would otherwise land in whichever transfer comes next).
FRESH_DISK = "rm -f /workspace/{name} && sync"
TIMED = 's=$(date +%s.%N); {cmd}; e=$(date +%s.%N); echo "$s $e"'


class Api:
    def __init__(self, base: str, token: str):
        self.base, self.token, self.auth = base, token, {"Authorization": f"Bearer {token}"}

    def rent_ready(self) -> str:
        gpu = requests.post(f"{self.base}/v1/gpus", json={"name": "bench"}, headers=self.auth).json()["gpu_id"]
        deadline = time.monotonic() + 120
        while not requests.get(f"{self.base}/v1/gpus/{gpu}", headers=self.auth).json()["ready"]:
            if time.monotonic() > deadline:
                raise RuntimeError("the rental never became ready")
            time.sleep(0.2)
        return gpu

    def run(self, gpu: str, script: str, timeout: float = 900) -> str:
        return harness.run_in_pod(self.base, self.token, gpu, script, timeout)

    def mint(self, size: int) -> dict:
        reply = requests.post(f"{self.base}/v1/objects", json={"label": "bench", "size_bytes": size}, headers=self.auth)
        reply.raise_for_status()
        return reply.json()

    def get_url(self, object_id: str) -> str:
        return requests.get(f"{self.base}/v1/objects/{object_id}", headers=self.auth).json()["get_url"]


class ServerCpu:
    """The gateway's CPU time over a transfer, in ms per MiB moved: what the gateway itself costs,
    which a wall-clock ratio on a loaded machine or a slow disk can hide."""

    def __init__(self, pid: int, mib: int):
        self.pid, self.mib = pid, mib

    def __enter__(self) -> "ServerCpu":
        self.start = harness.server_cpu_seconds(self.pid)
        return self

    def __exit__(self, *exc) -> None:
        self.ms_per_mib = (harness.server_cpu_seconds(self.pid) - self.start) * 1000 / self.mib


def curl_seconds(*args: str) -> float:
    started = time.monotonic()
    subprocess.run(["curl", "-fsS", *args], check=True, stdout=subprocess.DEVNULL, timeout=1800)
    return time.monotonic() - started


def in_pod_seconds(api: Api, gpu: str, command: str) -> float:
    start, end = map(float, api.run(gpu, TIMED.format(cmd=command)).split()[-2:])
    return end - start


def cut_upload(url: str, token: str, path: Path, size: int, sent: int) -> None:
    """A PUT of the whole file with Content-Range from 0, its connection closed after ``sent`` bytes."""
    host, port = url.split("//", 1)[1].split("/", 1)[0].split(":")
    route = "/" + url.split("//", 1)[1].split("/", 1)[1]
    head = (f"PUT {route} HTTP/1.1\r\nHost: {host}:{port}\r\nAuthorization: Bearer {token}\r\n"
            f"Content-Length: {size}\r\nContent-Range: bytes 0-{size - 1}/{size}\r\n\r\n").encode()
    with socket.create_connection((host, int(port))) as sock, open(path, "rb") as source:
        sock.sendall(head)
        left = sent
        while left:
            chunk = source.read(min(harness.MiB, left))
            sock.sendall(chunk)
            left -= len(chunk)
        time.sleep(1)


def settled_size(url: str, auth: dict) -> int:
    last = -1
    while True:
        size = int(requests.head(url, headers=auth).headers.get("content-length", 0))
        if size == last:
            return size
        last = size
        time.sleep(1)


def main() -> int:
    parser = harness.bench_parser(__doc__)
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--backend", choices=sorted(IMAGES), default="local")
    parser.add_argument("--srun-stdio", action="store_true", help="slurm: pod files over srun's stdio (the direct channel off)")
    harness.add_run_options(parser, time_limit=1800)
    args = parser.parse_args()
    harness.arm_time_limit(args.time_limit)
    size = args.size_mib * harness.MiB
    tmp, fast, data_dir, log_dir = harness.make_dirs("kgpu-podfiles-bench-", args.tmp, 3 * size, args.on_disk)
    tmp.chmod(0o711)  # local pods run under uids of their own, which pass through it to their folders
    admin_token = secrets.token_hex(16)
    server = harness.start_kgpu(
        data_dir, harness.free_port(), admin_token, log_dir, 0, args.src,
        settings=backend_settings(args.backend, args.srun_stdio),
    )
    base = server.base
    results: dict = {"loadavg_start": os.getloadavg(), "size_mib": args.size_mib, "backend": args.backend,
                     "srun_stdio": args.srun_stdio}
    started = time.monotonic()
    api, gpu = None, None
    try:
        api = Api(base, harness.new_user(base, admin_token, "bench@lab.example")["token"])
        gpu = api.rent_ready()
        source = fast / "source.bin"
        digest = harness.make_file(source, size)
        url = f"{base}/v1/gpus/{gpu}/files/bench.bin"
        auth = ["-H", f"Authorization: Bearer {api.token}"]
        # The lower bound's object: uploaded once from here, fetched from inside the pod.
        fetched = api.mint(size)
        subprocess.run(["curl", "-fsS", "-T", str(source), fetched["put_url"]], check=True, stdout=subprocess.DEVNULL)
        rows = {"up": [], "up_bound": [], "down": [], "down_bound": [], "rss_up": [], "rss_down": [],
                "cpu_up": [], "cpu_down": []}
        for n in range(args.rounds):
            get_url = api.get_url(fetched["object_id"])
            api.run(gpu, FRESH_DISK.format(name="bench.bin"))
            with harness.RssSampler(server.pid) as rss, ServerCpu(server.pid, args.size_mib) as cpu:
                rows["up"].append(curl_seconds(*auth, "-T", str(source), url))
            rows["rss_up"].append(rss.growth_mib)
            rows["cpu_up"].append(cpu.ms_per_mib)
            api.run(gpu, FRESH_DISK.format(name="bound.bin"))
            rows["up_bound"].append(in_pod_seconds(api, gpu, f"curl -fsS -o /workspace/bound.bin '{get_url}'"))
            with harness.RssSampler(server.pid) as rss, ServerCpu(server.pid, args.size_mib) as cpu:
                rows["down"].append(curl_seconds(*auth, "-o", "/dev/null", url))
            rows["rss_down"].append(rss.growth_mib)
            rows["cpu_down"].append(cpu.ms_per_mib)
            rows["down_bound"].append(in_pod_seconds(api, gpu, f"curl -fsS -o /dev/null '{get_url}'"))
            harness.log(f"round {n + 1}: " + ", ".join(f"{k} {v[-1]:.2f}" for k, v in rows.items()))
        for name, values in rows.items():
            results[name] = statistics.median(values)
            results[name + "_all"] = values
        mib = args.size_mib
        lines = [f"pod files, {mib} MiB, {args.backend} backend, median of {args.rounds} rounds:"]
        for way in ("up", "down"):
            gateway, bound = mib / results[way], mib / results[way + "_bound"]
            results[way + "_ratio"] = gateway / bound
            where = "/workspace" if way == "up" else "/dev/null"
            lines.append(f"  {way:4}: gateway {gateway:.0f} MiB/s, the pod's presigned fetch to {where} {bound:.0f} MiB/s, "
                         f"ratio {gateway / bound:.2f} (goal >= 0.7); gateway RSS +{results['rss_' + way]:.0f} MiB (goal <= 64), "
                         f"gateway CPU {results['cpu_' + way]:.2f} ms/MiB")
        # The "done when": cut at 40 % and resumed, both ways, the same SHA-256.
        api.run(gpu, "rm -f /workspace/bench.bin")
        cut_upload(url, api.token, source, size, size * 2 // 5)
        have = settled_size(url, api.auth)
        subprocess.run(["curl", "-fsS", *auth, "-C", str(have), "-T", str(source), url], check=True, stdout=subprocess.DEVNULL)
        in_pod = api.run(gpu, "sha256sum /workspace/bench.bin").split()[0]
        partial = fast / "down.bin"
        subprocess.run(["curl", "-fsS", *auth, "-r", f"0-{size * 2 // 5 - 1}", "-o", str(partial), url], check=True)
        subprocess.run(["curl", "-fsS", *auth, "-C", "-", "-o", str(partial), url], check=True)
        down_digest = subprocess.run(["sha256sum", str(partial)], capture_output=True, text=True).stdout.split()[0]
        results.update(resume_up_from=have, resume_up_ok=in_pod == digest, resume_down_ok=down_digest == digest)
        lines.append(f"  cut at 40 % and resumed: up from {have} bytes, SHA-256 {'same' if in_pod == digest else 'DIFFERENT'}; "
                     f"down, SHA-256 {'same' if down_digest == digest else 'DIFFERENT'}")
        results["total_seconds"] = time.monotonic() - started
        results["loadavg_end"] = os.getloadavg()
        harness.publish(args, results, lines)
    finally:
        if gpu is not None:  # returned, so a slurm pod's job ends with it (stopping the server leaves it)
            with contextlib.suppress(requests.RequestException):
                requests.delete(f"{base}/v1/gpus/{gpu}", headers=api.auth, timeout=120)
        harness.end_run(args, [server], [tmp] + ([fast] if fast != tmp else []))
    return 0


if __name__ == "__main__":
    sys.exit(main())
