#!/usr/bin/env python3
"""Benchmark of the SSH bastion (docs/ssh.md) against OpenSSH's own sshd, on 127.0.0.1 only.

Starts its own ``kgpu serve`` (embedded store, SQLite, the ``--backend`` pod backend, the bastion on
a free port) and an OpenSSH ``sshd`` on another free port (the same machine, the same disk, its
sftp-server), rents one pod with a key of its own, then:

  (a) a ``--size-mib`` file up and down with ``scp`` (SFTP, OpenSSH's default) and with ``rsync -e
      ssh``, through the bastion into the pod's /workspace and to sshd into a folder here: MiB/s of
      each, the ratio bastion / sshd (goal >= 0.8), SHA-256 checked both ways, and the gateway's CPU
      seconds per GiB;
  (b) time to the end of ``ssh host true`` (a new connection each), median of ``--logins``, both
      (goal <= 300 ms on local, <= 600 ms on docker);
  (c) ``--sessions`` concurrent ``ssh host 'sleep 2; echo ok'``: how many answered, and the gateway's
      RSS before and at its highest.

Usage: .venv/bin/python bench/ssh_bench.py [--size-mib 1024] [--logins 10] [--sessions 50] [--backend local|docker|slurm]
                                           [--srun-stdio]  (slurm: sessions without the direct channel)
Needs openssh-server (sshd), rsync and, for the local backend, root. Everything it starts is
stopped and its temporary directory deleted at the end.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import shutil
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

SSHD = "/usr/sbin/sshd"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def start_sshd(folder: Path, port: int, public_key: str) -> subprocess.Popen:
    Path("/run/sshd").mkdir(exist_ok=True)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(folder / "sshd_host_key")], check=True)
    (folder / "authorized_keys").write_text(public_key)
    config = folder / "sshd_config"
    config.write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {folder / 'sshd_host_key'}\n"
        f"AuthorizedKeysFile {folder / 'authorized_keys'}\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
        "UsePAM no\nPermitRootLogin yes\nStrictModes no\nPidFile none\nSubsystem sftp /usr/lib/openssh/sftp-server\n"
        "MaxStartups 200\nMaxSessions 200\n"
    )
    process = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)], stderr=subprocess.DEVNULL, start_new_session=True)
    time.sleep(0.5)
    return process


class Target:
    def __init__(self, name: str, port: int, user: str, key: Path, known_hosts: Path, remote_dir: str):
        self.name, self.port, self.user, self.key, self.known_hosts, self.remote_dir = (
            name, port, user, key, known_hosts, remote_dir)

    @property
    def ssh_options(self) -> list[str]:
        return ["-F", "/dev/null", "-i", str(self.key), "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
                "-o", f"UserKnownHostsFile={self.known_hosts}", "-o", "StrictHostKeyChecking=no", "-o", "LogLevel=ERROR"]

    def ssh(self, command: str, **run) -> subprocess.CompletedProcess:
        return subprocess.run(["ssh", *self.ssh_options, "-p", str(self.port), f"{self.user}@127.0.0.1", command],
                              capture_output=True, **run)

    def scp(self, source: str, destination: str) -> None:
        subprocess.run(["scp", *self.ssh_options, "-P", str(self.port), source, destination], check=True,
                       capture_output=True)

    def rsync(self, source: str, destination: str) -> None:
        shell = " ".join(["ssh", *self.ssh_options, "-p", str(self.port)])
        subprocess.run(["rsync", "-a", "--whole-file", "-e", shell, source, destination], check=True, capture_output=True)

    def remote(self, name: str) -> str:
        return f"{self.user}@127.0.0.1:{self.remote_dir}/{name}"


def timed(function, *args) -> float:
    started = time.monotonic()
    function(*args)
    return time.monotonic() - started


def transfers(target: Target, source: Path, size_mib: int, scratch: Path, gateway_pid: int | None) -> dict:
    results = {}
    digest = sha256(source)
    for tool in ("scp", "rsync"):
        move = target.scp if tool == "scp" else target.rsync
        cpu = harness.cpu_seconds(gateway_pid) if gateway_pid else 0.0
        up = timed(move, str(source), target.remote(f"{tool}.bin"))
        if gateway_pid:
            harness.log(f"{target.name} {tool}: gateway RSS after up {harness.rss_kib(gateway_pid) / 1024:.0f} MiB")
        back = scratch / f"{target.name}-{tool}.bin"
        down = timed(move, target.remote(f"{tool}.bin"), str(back))
        if gateway_pid:
            harness.log(f"{target.name} {tool}: gateway RSS after down {harness.rss_kib(gateway_pid) / 1024:.0f} MiB")
        spent = (harness.cpu_seconds(gateway_pid) - cpu) if gateway_pid else None
        remote = target.ssh(f"sha256sum {target.remote_dir}/{tool}.bin").stdout.split()[0].decode()
        assert remote == digest and sha256(back) == digest, f"{target.name} {tool}: checksums differ"
        back.unlink()
        target.ssh(f"rm -f {target.remote_dir}/{tool}.bin")
        results[tool] = {"up_mib_s": size_mib / up, "down_mib_s": size_mib / down,
                         "gateway_cpu_s_per_gib": (spent / (2 * size_mib / 1024)) if spent is not None else None}
        harness.log(f"{target.name} {tool}: up {size_mib / up:.0f} MiB/s, down {size_mib / down:.0f} MiB/s")
    return results


def login_times(target: Target, count: int) -> float:
    times = []
    for _ in range(count):
        started = time.monotonic()
        assert target.ssh("true", timeout=60).returncode == 0
        times.append(time.monotonic() - started)
    return statistics.median(times) * 1000


def sessions_at_once(target: Target, count: int, gateway_pid: int) -> dict:
    rss_before = harness.rss_kib(gateway_pid)
    peak = [rss_before]
    answers: list[bool] = []
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], harness.rss_kib(gateway_pid))
            time.sleep(0.05)

    def one():
        answers.append(target.ssh("sleep 2; echo ok", timeout=120).stdout == b"ok\n")

    sampler = threading.Thread(target=sample)
    sampler.start()
    threads = [threading.Thread(target=one) for _ in range(count)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    done.set()
    sampler.join()
    return {"sessions": count, "answered": sum(answers), "seconds": time.monotonic() - started,
            "rss_before_mib": rss_before / 1024, "rss_peak_mib": peak[0] / 1024}


def main() -> int:
    parser = harness.bench_parser(__doc__)
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--logins", type=int, default=10)
    parser.add_argument("--sessions", type=int, default=50)
    parser.add_argument("--backend", choices=("local", "docker", "slurm"), default="local")
    parser.add_argument("--srun-stdio", action="store_true", help="slurm: sessions over srun's stdio (no direct channel)")
    args = parser.parse_args()
    for tool in ("ssh", "scp", "rsync", SSHD):
        if not shutil.which(tool):
            sys.exit(f"{tool} is not installed (Debian: openssh-client, openssh-server, rsync)")
    work = Path(tempfile.mkdtemp(prefix="kgpu-ssh-bench-"))
    work.chmod(0o711)
    started: list = []
    returned = None  # pods outlive their gateway: the rental is returned before it stops
    try:
        admin = secrets.token_hex(16)
        ssh_port = harness.free_port()
        settings = {"KGPU_SSH_PORT": str(ssh_port), "KGPU_LOCAL_POD_MOUNTS": "false", "KGPU_POD_BACKEND": args.backend,
                    # (c) measures what the bastion carries, not the per-user cap (20 by default)
                    "KGPU_SSH_MAX_CONNECTIONS_PER_USER": str(args.sessions + 10)}
        if args.backend == "docker":
            settings.update(KGPU_DOCKER_PULL="false", KGPU_DEFAULT_IMAGE="kgpu-test:latest")
        elif args.backend == "slurm":  # the test cluster's exports (tests/slurm/cluster.sh up)
            cluster = subprocess.run(["bash", str(Path(__file__).parents[1] / "tests/slurm/cluster.sh"), "up"],
                                     capture_output=True, text=True, check=True).stdout
            for line in cluster.splitlines():
                name, _, value = line.removeprefix("export ").partition("=")
                settings[name] = value.strip("'")
            settings.update(KGPU_SLURM_PULL="false", KGPU_DEFAULT_IMAGE="kgpu-test:latest",
                            KGPU_SLURM_DIRECT_CHANNEL="false" if args.srun_stdio else "true")
        (work / "data").mkdir()
        kgpu = harness.start_kgpu(work / "data", harness.free_port(), admin, work, 0, settings=settings)
        started.append(kgpu)
        base = kgpu.base
        user = harness.new_user(base, admin, "bench@lab.example")
        auth = {"Authorization": f"Bearer {user['token']}"}
        key = work / "id_ed25519"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
        public = Path(f"{key}.pub").read_text()
        rental = requests.post(f"{base}/v1/gpus", json={"name": "bench", "ssh_pubkey": public}, headers=auth).json()
        returned = lambda: requests.delete(f"{base}/v1/gpus/{rental['gpu_id']}", headers=auth)  # noqa: E731
        while requests.get(f"{base}/v1/gpus/{rental['gpu_id']}", headers=auth).json()["phase"] != "Running":
            time.sleep(0.2)
        known = work / "known_hosts"
        known.write_text(requests.get(f"{base}/v1/gpus").json()["ssh"]["known_hosts"] + "\n")
        bastion = Target("bastion", ssh_port, "kgpu", key, known, "/workspace")
        sshd_port = harness.free_port()
        (work / "sshd-files").mkdir()
        sshd = start_sshd(work, sshd_port, public)
        started.append(sshd)
        direct = Target("sshd", sshd_port, "root", key, work / "known_hosts_sshd", str(work / "sshd-files"))
        source = work / "source.bin"
        harness.make_file(source, args.size_mib << 20)
        report = {"backend": args.backend, "size_mib": args.size_mib, "gateway_rss_mib": {}}
        report["gateway_rss_mib"]["after_rent"] = harness.rss_kib(kgpu.pid) / 1024
        report["bastion"] = transfers(bastion, source, args.size_mib, work, kgpu.pid)
        report["gateway_rss_mib"]["after_transfers"] = harness.rss_kib(kgpu.pid) / 1024
        report["sshd"] = transfers(direct, source, args.size_mib, work, None)
        report["ratios"] = {
            f"{tool}_{way}": report["bastion"][tool][f"{way}_mib_s"] / report["sshd"][tool][f"{way}_mib_s"]
            for tool in ("scp", "rsync") for way in ("up", "down")
        }
        report["login_ms"] = {"bastion": login_times(bastion, args.logins), "sshd": login_times(direct, args.logins)}
        report["concurrent"] = sessions_at_once(bastion, args.sessions, kgpu.pid)
        print(json.dumps(report, indent=2))
    finally:
        if returned is not None:
            returned()
        for process in reversed(started):
            if isinstance(process, harness.Proc):
                process.stop()
            else:
                process.terminate()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
