"""What the benches share: temporary folders, a ``kgpu serve`` of their own, process watches
(CPU, RSS), an ``rclone mount`` as a child, small HTTP and file helpers, and the command-line
options of the benches that start a server. Every bench in this folder imports it (``import
harness``, with this folder put first on its path), and none imports another bench."""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from drive.rclone import rclone_binary  # noqa: F401  (the benches that run rclone take it from here)
from drive.store.embedded import free_port  # noqa: F401  (the tests' free port, for the benches too)

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
HOST = "127.0.0.1"
MiB = 1 << 20


def shm_has_room(need: int) -> bool:
    """Room on /dev/shm for ``need`` bytes, with 1 GiB to spare."""
    try:
        stat = os.statvfs("/dev/shm")
    except OSError:
        return False
    return stat.f_bavail * stat.f_frsize > need + (1 << 30)


def arm_time_limit(seconds: int) -> None:
    """End the whole run (with its cleanup) after ``seconds``, or on SIGTERM."""

    def on_alarm(*_):
        raise TimeoutError(f"benchmark exceeded --time-limit {seconds}s")

    signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))


def make_dirs(prefix: str, parent: str | None, fast_bytes: int, on_disk: bool) -> tuple[Path, Path, Path, Path]:
    """(tmp, fast, data_dir, log_dir) of one run.

    The data directory (SQLite, logs) goes on disk, as in a deployment: the PUT 307 path commits to the
    database. The store's objects and big files go on tmpfs when it has room for ``fast_bytes`` (unless
    ``on_disk``): on this kind of machine creating and deleting 100,000 small files on the ext4 root
    (mounted with discard) took 42 s and 165 s, against 1.6 s and 1.0 s on /dev/shm."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    fast = Path(tempfile.mkdtemp(prefix=prefix, dir="/dev/shm")) if not on_disk and shm_has_room(fast_bytes) else tmp
    data_dir = tmp / "data"
    data_dir.mkdir()
    if fast != tmp:
        (fast / "objects").mkdir()
        (data_dir / "objects").symlink_to(fast / "objects")
    log_dir = tmp / "logs"
    log_dir.mkdir()
    return tmp, fast, data_dir, log_dir


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def http_json(method: str, url: str, token: str | None = None, body: dict | None = None, timeout: float = 30,
              headers: dict[str, str] | None = None):
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    if data is not None:
        request.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(request, timeout=timeout) as reply:
        return json.loads(reply.read() or b"null")


def rss_kib(pid: int, field_name: str = "VmRSS") -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process so far (all its threads)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def server_cpu_seconds(pid: int) -> float:
    """CPU time of a ``kgpu serve`` so far: its own and its worker processes' (``--workers N``),
    not its embedded store's."""
    workers = [c for c in children(pid) if b"multiprocessing.spawn" in _cmdline(c)]
    return cpu_seconds(pid) + sum(cpu_seconds(c) for c in workers)


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def is_mounted(path: Path) -> bool:
    target = str(path)
    for line in Path("/proc/mounts").read_text().splitlines():
        if line.split()[1].replace("\\040", " ") == target:
            return True
    return False


@dataclass
class RcloneMount:
    """An ``rclone mount`` running in the foreground as our child, on a cache directory of its own.
    The benches that mount subclass it with the ``start`` of their backend."""

    mountpoint: Path
    cache_dir: Path
    popen: subprocess.Popen
    log_path: Path

    def wait_mounted(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not is_mounted(self.mountpoint):
            if self.popen.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"rclone mount did not come up; see {self.log_path}:\n{self.log_path.read_text()[-2000:]}")
            time.sleep(0.05)

    def stop(self) -> None:
        if is_mounted(self.mountpoint):
            done = subprocess.run(["fusermount3", "-u", str(self.mountpoint)], capture_output=True)
            if done.returncode != 0:
                subprocess.run(["fusermount3", "-u", "-z", str(self.mountpoint)], capture_output=True)
        if self.popen.poll() is None:
            try:
                self.popen.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.popen.terminate()
                try:
                    self.popen.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    self.popen.kill()
                    self.popen.wait(timeout=5)

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.cache_dir, ignore_errors=True)
        with contextlib.suppress(OSError):
            self.mountpoint.rmdir()


class ProcessWatch:
    """CPU seconds and peak RSS of some processes (by name; a pid of 0 or None is skipped) over a ``with`` block."""

    def __init__(self, pids: dict[str, int]):
        self.pids = {name: pid for name, pid in pids.items() if pid}
        self.peak_kib = {name: 0 for name in self.pids}
        self.base_kib = {name: rss_kib(pid) for name, pid in self.pids.items()}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for name, pid in self.pids.items():
                self.peak_kib[name] = max(self.peak_kib[name], rss_kib(pid))
            self._stop.wait(0.05)

    def __enter__(self) -> "ProcessWatch":
        self.before = {name: cpu_seconds(pid) for name, pid in self.pids.items()}
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.cpu = {name: cpu_seconds(pid) - self.before[name] for name, pid in self.pids.items()}

    def summary(self) -> str:
        cpu = ", ".join(f"{name} {s:.1f}" for name, s in self.cpu.items())
        rss = ", ".join(f"{name} {self.peak_kib[name] / 1024:.0f} (+{(self.peak_kib[name] - self.base_kib[name]) / 1024:.0f})"
                        for name in self.pids)
        return f"CPU s: {cpu}; peak RSS MiB: {rss}"


def verdict(ok: bool) -> str:
    """How a report marks a figure against its target."""
    return "ok" if ok else "MISSED"


def print_report(lines: list[str], results: dict) -> None:
    """A bench's report, closed by its duration and the load average before and after."""
    load = " -> ".join(" ".join(f"{x:.1f}" for x in results[k]) for k in ("loadavg_start", "loadavg_end") if k in results)
    lines.append(f"total {results.get('total_seconds', 0):.0f} s; load average {load} on {os.cpu_count()} CPUs")
    print("\n".join(lines), flush=True)


def publish(args: argparse.Namespace, results: dict, lines: list[str]) -> None:
    """A run's figures out: its report printed (print_report) and, with ``--json``, the figures written."""
    print_report(lines, results)
    write_json(args, results)


class RssSampler:
    """Peak VmRSS of a process, sampled every ``interval`` seconds in a thread."""

    def __init__(self, pid: int, interval: float = 0.05):
        self.pid = pid
        self.interval = interval
        self.base = rss_kib(pid)
        self.hwm_before = rss_kib(pid, "VmHWM")
        self.peak = self.base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_kib(self.pid))
            self._stop.wait(self.interval)

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_kib(self.pid))
        self.hwm_after = rss_kib(self.pid, "VmHWM")

    @property
    def growth_mib(self) -> float:
        return (self.peak - self.base) / 1024


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log_path: Path
    port: int

    @property
    def pid(self) -> int:
        return self.popen.pid

    def stop(self) -> None:
        if self.popen.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGTERM)  # its own session: the server and its rclone child
        try:
            self.popen.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(timeout=5)

    @property
    def base(self) -> str:
        """Where it answers HTTP."""
        return f"http://{HOST}:{self.port}"


def wait_ready(proc: Proc, timeout: float = 30) -> None:
    """Until ``proc`` answers /healthz; stopped (it is on no caller's list yet) if it does not."""
    try:
        _wait_healthy(proc, timeout)
    except BaseException:
        proc.stop()
        raise


def _wait_healthy(proc: Proc, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    url = f"{proc.base}/healthz"
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            raise RuntimeError(f"{proc.name} exited early; see {proc.log_path}:\n{proc.log_path.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as reply:
                if reply.status == 200:
                    return
        except (OSError, urllib.error.HTTPError):
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{proc.name} not ready within {timeout}s; see {proc.log_path}")


def start_kgpu(
    data_dir: Path, port: int, admin_token: str, log_dir: Path, n: int, src: str | None = None,
    settings: dict[str, str] | None = None,
) -> Proc:
    """``settings``: more environment variables, KGPU_* settings or what a pod backend needs (SLURM_CONF…);
    none of this process's KGPU_* variables is passed on, only the admin token is set. One worker
    process unless ``settings`` sets ``KGPU_WORKERS`` (the server's CPU is then its workers':
    :func:`server_cpu_seconds`); no SSH bastion unless it sets ``KGPU_SSH_PORT`` (the default port
    may be another server's on this machine)."""
    log_path = log_dir / f"kgpu-serve-{n}.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("KGPU_")}
    env["KGPU_ADMIN_TOKEN"] = admin_token
    env["KGPU_WORKERS"] = "1"
    env["KGPU_SSH_PORT"] = "0"
    env.update(settings or {})
    if src:  # another checkout of the code (e.g. `git archive` of a commit), ahead of the editable install
        env["PYTHONPATH"] = str(Path(src).resolve())
    with open(log_path, "wb") as out:
        popen = subprocess.Popen(
            [str(VENV_BIN / "kgpu"), "serve", "--data-dir", str(data_dir), "--port", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=str(REPO),
            start_new_session=True,
        )
    proc = Proc("kgpu serve", popen, log_path, port)
    wait_ready(proc)
    return proc


def start_bench_server(procs: list[Proc], data_dir: Path, log_dir: Path, src: str | None = None) -> tuple[Proc, str]:
    """A bench's own ``kgpu serve`` (one worker) on a free port with a fresh admin token, put on
    ``procs`` (what the run stops): the process and the token."""
    admin_token = "bench-admin-" + secrets.token_hex(12)
    port = free_port()
    log(f"starting kgpu serve on :{port}, data in {data_dir}")
    procs.append(start_kgpu(data_dir, port, admin_token, log_dir, 1, src))
    return procs[-1], admin_token


def new_user(base: str, admin_token: str, email: str) -> dict:
    """A user made through the admin API (``POST /v1/admin/users``): its ``user`` and its first ``token``."""
    return http_json("POST", f"{base}/v1/admin/users", admin_token, {"email": email})


def run_in_pod(base: str, token: str, gpu: str, script: str, timeout: float = 900) -> str:
    """``bash -euo pipefail -c script`` as a run on the rental ``gpu``, waited for; its stdout
    (RuntimeError with its output when it fails or outlives ``timeout``)."""
    import requests

    auth = {"Authorization": f"Bearer {token}"}
    reply = requests.post(
        f"{base}/v1/runs",
        json={"gpu_id": gpu, "command": ["bash", "-euo", "pipefail", "-c", script], "wait_seconds": 60},
        headers=auth,
    ).json()
    deadline = time.monotonic() + timeout
    while reply["phase"] not in ("Succeeded", "Failed"):
        if time.monotonic() > deadline:
            raise RuntimeError(f"run did not end: {reply}")
        time.sleep(0.5)
        reply = requests.get(f"{base}/v1/runs/{reply['run_id']}", headers=auth).json()
    if reply["exit_code"] != 0:
        raise RuntimeError(f"{script}\n{reply['stdout']}\n{reply['stderr']}")
    return reply["stdout"]


def store_endpoint(kgpu: Proc) -> str:
    found = re.findall(r"embedded object store \(rclone serve s3\) at (http://\S+)", kgpu.log_path.read_text())
    if not found:
        raise RuntimeError("no embedded store address in the server log")
    return found[-1]


def store_client(data_dir: Path, endpoint: str):
    import boto3
    from botocore.config import Config

    creds = json.loads((data_dir / "embedded-s3.json").read_text())
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=creds["access_key"],
        aws_secret_access_key=creds["secret_key"],
        region_name="us-east-1",
        config=Config(signature_version="s3v4", s3={"addressing_style": "path"}),
    )


def make_file(path: Path, size: int) -> str:
    digest = hashlib.sha256()
    block = 8 * MiB
    with open(path, "wb") as f:
        left = size
        while left:
            chunk = os.urandom(min(block, left))
            f.write(chunk)
            digest.update(chunk)
            left -= len(chunk)
    return digest.hexdigest()


def download_sha256(url: str, token: str, timeout: float = 180) -> tuple[str, int]:
    """sha256 and size of `curl -L` GET through the gateway (302 to the presigned GET)."""
    curl = subprocess.Popen(
        ["curl", "-sS", "-f", "-L", "-H", f"Authorization: Bearer {token}", url],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    digest = hashlib.sha256()
    size = 0
    deadline = time.monotonic() + timeout
    while True:
        chunk = curl.stdout.read(4 * MiB)
        if not chunk:
            break
        digest.update(chunk)
        size += len(chunk)
        if time.monotonic() > deadline:
            curl.kill()
            raise RuntimeError(f"download of {url} too slow")
    rc = curl.wait(timeout=30)
    if rc != 0:
        raise RuntimeError(f"download of {url} failed ({rc}): {curl.stderr.read().decode().strip()}")
    return digest.hexdigest(), size


# ------------------------------------------------------------------ a bench's run


def bench_parser(doc: str) -> argparse.ArgumentParser:
    """A bench's command line, its --help opening with the bench's docstring as written."""
    return argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


def add_run_options(parser: argparse.ArgumentParser, time_limit: int = 600) -> None:
    """The options of every bench that starts its own server: where its folders go, which code it
    runs, whether it keeps them, its time limit, and a JSON copy of its figures."""
    parser.add_argument("--tmp", default=None,
                        help="parent of the temporary data directory (SQLite, logs); default $TMPDIR or /tmp")
    parser.add_argument("--on-disk", action="store_true",
                        help="keep the store's objects, the big files and the mount caches on disk, not /dev/shm")
    parser.add_argument("--src", help="run kgpu serve from this source tree (first on PYTHONPATH) instead of the repo")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directories (logs, data)")
    parser.add_argument("--time-limit", type=int, default=time_limit,
                        help=f"hard limit in seconds for the whole run (default {time_limit})")
    parser.add_argument("--json", dest="json_out", help="also write the figures to this file as JSON")


def end_run(args: argparse.Namespace, procs: Sequence[Proc], folders: Sequence[Path], mounts: Sequence[RcloneMount] = ()) -> None:
    """``clean_up`` for a bench with the run options (``--keep``)."""
    clean_up(procs, folders, mounts, keep=args.keep)


def clean_up(procs: Sequence[Proc], folders: Sequence[Path], mounts: Sequence[RcloneMount] = (), keep: bool = False) -> None:
    """What a run started stops, last first (its mounts, then its processes), and its temporary
    folders go unless ``keep``. The time limit is disarmed first: cleaning up is not cut short."""
    signal.alarm(0)
    started = time.monotonic()
    for mount in reversed(mounts):
        with contextlib.suppress(Exception):
            mount.stop()
    for proc in reversed(procs):
        proc.stop()
    if keep:
        log(f"kept {' and '.join(map(str, folders))}")
    else:
        for folder in folders:
            shutil.rmtree(folder, ignore_errors=True)
    log(f"cleaned up in {time.monotonic() - started:.1f} s")


def write_json(args: argparse.Namespace, results: dict) -> None:
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(results, indent=2, default=str))
