#!/usr/bin/env python3
"""Benchmark of reading a shared-drive file through a read-only rclone http mount, on 127.0.0.1 only.

Starts its own ``kgpu serve`` (embedded ``rclone serve s3``, SQLite, a temporary
data directory), makes a user and an org through the admin API, uploads a big
random file to ``/v1/shared/{org}/big.bin`` (``curl -L -T`` with
``Expect: 100-continue``), then measures, in the same run and alternating:

  (a) sequential read of the file through ``rclone mount :http:`` on
      ``/v1/shared/`` (``--read-only --vfs-cache-mode full --vfs-read-chunk-size 16M
      --vfs-read-chunk-streams 4``, a fresh mount and cache directory each round),
      ``dd bs=4M`` to /dev/null
  (b) ``curl -o /dev/null`` of the file's presigned URL (from ``GET ?json=1``)

and prints MiB/s and the ratio mount/direct (target >= 0.8). The first mount read
is verified by sha256 against the source. Then (c) random-offset reads through a
fresh mount (``--random-reads`` reads of ``--random-read-kib`` at random offsets),
each compared byte for byte with the source, cold and then again warm (cached).

Everything it starts is stopped, every mount unmounted, and its temporary
directories deleted at the end (``--keep`` keeps them). See bench/README.md.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import secrets
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402  (this folder's shared bench code)

HOST = harness.HOST
MiB = harness.MiB
MOUNT_FLAGS = [
    "--read-only", "--vfs-cache-mode", "full", "--vfs-read-chunk-size", "16M", "--vfs-read-chunk-streams", "4",
]


def tree_bytes(path: Path) -> int:
    """Bytes actually allocated under ``path`` (the VFS cache files are sparse)."""
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
    return total


class Mount(harness.RcloneMount):
    """One ``rclone mount :http:`` of /v1/shared/, on a fresh cache directory."""

    @classmethod
    def start(cls, base: str, token: str, where: Path, tag: str, extra: list[str], timeout: float = 30) -> "Mount":
        mountpoint, cache_dir, log_path = where / f"mnt-{tag}", where / f"cache-{tag}", where / f"rclone-mount-{tag}.log"
        mountpoint.mkdir()
        cache_dir.mkdir()
        env = {k: v for k, v in os.environ.items() if not k.startswith("RCLONE_")}
        # The token in the environment, not on the command line (where ps shows it).
        env["RCLONE_HTTP_HEADERS"] = f"Authorization,Bearer {token}"
        popen = subprocess.Popen(
            [harness.rclone_binary(), "--config", os.devnull, "mount", ":http:", str(mountpoint),
             "--http-url", f"{base}/v1/shared/", *MOUNT_FLAGS, *extra,
             "--cache-dir", str(cache_dir), "--log-file", str(log_path)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
        )
        mount = cls(mountpoint, cache_dir, popen, log_path)
        mount.wait_mounted(timeout)
        return mount



def timed_dd(path: Path, size: int, timeout: float) -> float:
    started = time.perf_counter()
    done = subprocess.run(
        ["dd", f"if={path}", "of=/dev/null", "bs=4M", "status=none"], capture_output=True, text=True, timeout=timeout
    )
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"dd of {path} failed: {done.stderr.strip()}")
    return seconds


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 * MiB):
            digest.update(chunk)
    return digest.hexdigest()


def timed_curl(url: str, size: int, timeout: float) -> tuple[float, str]:
    started = time.perf_counter()
    done = subprocess.run(
        ["curl", "-sS", "-f", "-o", "/dev/null", "-w", "%{http_code} %{size_download} %{time_total}", url],
        capture_output=True, text=True, timeout=timeout,
    )
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"curl of the presigned URL failed: {done.stderr.strip()}")
    code, downloaded, _ = done.stdout.split()
    if int(downloaded) != size:
        raise RuntimeError(f"curl got {downloaded} bytes of {size} (HTTP {code})")
    return seconds, done.stdout


def random_reads(mounted: Path, source: Path, count: int, length: int, seed: int) -> dict:
    """``count`` reads of ``length`` bytes at random offsets, each compared with the source."""
    size = source.stat().st_size
    rng = random.Random(seed)
    offsets = [rng.randrange(0, size - length + 1) for _ in range(count)]
    times = []
    mismatches = 0
    got_fd = os.open(mounted, os.O_RDONLY)
    want_fd = os.open(source, os.O_RDONLY)
    try:
        started = time.perf_counter()
        for offset in offsets:
            t0 = time.perf_counter()
            got = os.pread(got_fd, length, offset)
            times.append(time.perf_counter() - t0)
            if got != os.pread(want_fd, length, offset):
                mismatches += 1
        total = time.perf_counter() - started
    finally:
        os.close(got_fd)
        os.close(want_fd)
    return {
        "reads": count, "bytes_each": length, "mismatches": mismatches, "total_s": total,
        "median_ms": statistics.median(times) * 1000, "p95_ms": harness.pct(times, 0.95) * 1000,
        "max_ms": max(times) * 1000, "mib_s": count * length / MiB / sum(times),
    }


def main(argv: list[str] | None = None) -> int:
    parser = harness.bench_parser(__doc__)
    parser.add_argument("--size-mib", type=int, default=1024, help="size of the shared file (default 1024)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of (a) and (b) (default 3)")
    parser.add_argument("--random-reads", type=int, default=200, help="random-offset reads in (c) (default 200)")
    parser.add_argument("--random-read-kib", type=int, default=1024, help="size of each random read (default 1024)")
    parser.add_argument("--seed", type=int, default=7, help="seed of the random offsets")
    parser.add_argument("--mount-flag", action="append", default=[], metavar="FLAG",
                        help="an extra rclone mount flag (repeat; a flag with a value: --mount-flag=--buffer-size=32M)")
    harness.add_run_options(parser)
    args = parser.parse_args(argv)
    if not Path("/dev/fuse").exists() or not shutil.which("fusermount3"):
        parser.error("needs FUSE: /dev/fuse and fusermount3 (apt-get install -y fuse3)")
    size = args.size_mib * MiB
    read_len = args.random_read_kib * 1024
    if read_len > size:
        parser.error("--random-read-kib is larger than the file")

    harness.arm_time_limit(args.time_limit)
    tmp, fast, data_dir, log_dir = harness.make_dirs("kgpu-shared-bench-", args.tmp, 3 * size, args.on_disk)
    procs: list[harness.Proc] = []
    mounts: list[Mount] = []
    harness.log(f"temporary directory {tmp}; store objects, source file and mount caches in {fast}")
    results: dict = {"tmp": str(tmp), "fast": str(fast), "config": vars(args), "mount_flags": MOUNT_FLAGS + args.mount_flag}
    results["loadavg_start"] = os.getloadavg()
    run_started = time.monotonic()
    timeout = max(60.0, size / MiB / 10)  # no single transfer slower than 10 MiB/s
    try:
        kgpu, admin_token = harness.start_bench_server(procs, data_dir, log_dir, args.src)
        base = kgpu.base
        store_pid = (harness.children(kgpu.pid) or [0])[0]
        user = harness.new_user(base, admin_token, "bench-shared@example.org")
        token = user["token"]
        org = "bench-" + secrets.token_hex(4)
        harness.http_json("POST", f"{base}/v1/admin/orgs", admin_token,
                     {"slug": org, "name": "Shared bench", "owner_user_id": user["user"]["id"]})
        harness.log(f"user {user['user']['id']} is the admin of org {org}")

        source = fast / "big.bin"
        harness.log(f"writing a {args.size_mib} MiB random file")
        source_sha = harness.make_file(source, size)
        file_url = f"{base}/v1/shared/{org}/big.bin"
        started = time.perf_counter()
        done = subprocess.run(
            ["curl", "-sS", "-f", "-L", "-o", "/dev/null", "-w", "%{http_code} %{num_redirects}",
             "-H", f"Authorization: Bearer {token}", "-H", "Expect: 100-continue", "-T", str(source), file_url],
            capture_output=True, text=True, timeout=timeout,
        )
        upload_s = time.perf_counter() - started
        if done.returncode != 0 or done.stdout.split() != ["200", "1"]:
            raise RuntimeError(f"upload failed ({done.returncode}, {done.stdout!r}): {done.stderr.strip()}")
        info = harness.http_json("GET", f"{file_url}?json=1", token)
        if info["size"] != size:
            raise RuntimeError(f"the shared file has {info['size']} bytes, not {size}")
        results["upload"] = {"seconds": upload_s, "mib_s": size / MiB / upload_s}
        harness.log(f"uploaded through the 307 in {upload_s:.2f} s ({size / MiB / upload_s:.0f} MiB/s)")

        # ---------------------------------------------------------------- (a) and (b), alternating
        rounds = []
        for r in range(args.rounds):
            # Mount first in odd rounds, direct first in even ones, so drift hits both alike.
            order = ["mount", "direct"] if r % 2 == 0 else ["direct", "mount"]
            row: dict = {}
            for kind in order:
                if kind == "direct":
                    url = harness.http_json("GET", f"{file_url}?json=1", token)["url"]  # a fresh presigned GET
                    with harness.ProcessWatch({"store": store_pid}) as watch:
                        seconds, curl_w = timed_curl(url, size, timeout)
                    row["direct"] = {"seconds": seconds, "mib_s": size / MiB / seconds, "curl": curl_w,
                                     "store_cpu_s": watch.cpu["store"]}
                else:
                    mount = Mount.start(base, token, fast, f"seq{r + 1}", args.mount_flag)
                    mounts.append(mount)
                    mounted = mount.mountpoint / org / "big.bin"
                    if mounted.stat().st_size != size:
                        raise RuntimeError(f"the mount shows {mounted.stat().st_size} bytes, not {size}")
                    with harness.ProcessWatch({"rclone_mount": mount.popen.pid, "store": store_pid, "gateway": kgpu.pid}) as watch:
                        seconds = timed_dd(mounted, size, timeout)
                    row["mount"] = {
                        "seconds": seconds, "mib_s": size / MiB / seconds,
                        "rclone_cpu_s": watch.cpu["rclone_mount"], "store_cpu_s": watch.cpu["store"],
                        "gateway_cpu_s": watch.cpu["gateway"], "rclone_peak_rss_mib": watch.peak_kib["rclone_mount"] / 1024,
                        "cache_bytes": tree_bytes(mount.cache_dir),
                    }
                    if r == 0:  # verify once: the bytes the mount serves (now from its cache) are the source's
                        got = sha256_of(mounted)
                        row["mount"]["sha256_ok"] = got == source_sha
                        if got != source_sha:
                            raise RuntimeError(f"sha256 through the mount is {got}, the source's is {source_sha}")
                    mount.remove()
                    mounts.remove(mount)
                harness.log(f"round {r + 1}/{args.rounds} {kind:6s}: {row[kind]['seconds']:.2f} s, {row[kind]['mib_s']:.0f} MiB/s")
            row["ratio"] = row["mount"]["mib_s"] / row["direct"]["mib_s"]
            rounds.append(row)
        results["rounds"] = rounds
        results["direct_median_mib_s"] = statistics.median(r["direct"]["mib_s"] for r in rounds)
        results["mount_median_mib_s"] = statistics.median(r["mount"]["mib_s"] for r in rounds)
        results["ratio"] = results["mount_median_mib_s"] / results["direct_median_mib_s"]

        # ---------------------------------------------------------------- (c) random reads
        mount = Mount.start(base, token, fast, "random", args.mount_flag)
        mounts.append(mount)
        mounted = mount.mountpoint / org / "big.bin"
        harness.log(f"(c) {args.random_reads} random reads of {args.random_read_kib} KiB, cold")
        cold = random_reads(mounted, source, args.random_reads, read_len, args.seed)
        harness.log("(c) the same reads again, warm")
        warm = random_reads(mounted, source, args.random_reads, read_len, args.seed)
        cold["cache_bytes_after"] = tree_bytes(mount.cache_dir)
        results["random"] = {"cold": cold, "warm": warm}
        mount.remove()
        mounts.remove(mount)
        if cold["mismatches"] or warm["mismatches"]:
            raise RuntimeError(f"random reads differ from the source: {cold['mismatches']} cold, {warm['mismatches']} warm")
        results["total_seconds"] = time.monotonic() - run_started
        results["loadavg_end"] = os.getloadavg()
    finally:
        harness.end_run(args, procs, (tmp, fast), mounts)

    harness.publish(args, results, report(results, args))
    return 0 if results["ratio"] >= 0.8 else 1


def report(results: dict, args) -> list[str]:
    mib = args.size_mib
    out = ["", f"kgpu shared-drive read benchmark (127.0.0.1; {os.cpu_count()} CPUs)",
           f"store objects, source file and mount caches in {results['fast']}",
           f"mount: rclone mount :http: $BASE/v1/shared/ {' '.join(results['mount_flags'])}", "",
           f"upload of the {mib} MiB file (curl -L -T, Expect: 100-continue, 307 to the store): "
           f"{results['upload']['seconds']:.2f} s, {results['upload']['mib_s']:.0f} MiB/s", "",
           f"sequential read of {mib} MiB: (a) dd bs=4M through a fresh mount and cache, (b) curl -o /dev/null of the presigned URL"]
    for n, r in enumerate(results["rounds"], start=1):
        m, d = r["mount"], r["direct"]
        sha = ", sha256 ok" if m.get("sha256_ok") else ""
        out.append(f"    round {n}: mount {m['mib_s']:6.0f} MiB/s ({m['seconds']:.2f} s)   direct {d['mib_s']:6.0f} MiB/s "
                   f"({d['seconds']:.2f} s)   ratio {r['ratio']:.2f}{sha}")
        out.append(f"             mount CPU s: rclone {m['rclone_cpu_s']:.2f}, store {m['store_cpu_s']:.2f}, gateway "
                   f"{m['gateway_cpu_s']:.2f}; rclone peak RSS {m['rclone_peak_rss_mib']:.0f} MiB; cache {m['cache_bytes'] / MiB:.0f} MiB"
                   f"   | direct store CPU s {d['store_cpu_s']:.2f}")
    out.append(f"    median: mount {results['mount_median_mib_s']:.0f} MiB/s, direct {results['direct_median_mib_s']:.0f} MiB/s, "
               f"ratio {results['ratio']:.2f} (target >= 0.8: {harness.verdict(results['ratio'] >= 0.8)})")
    out.append("")
    c, w = results["random"]["cold"], results["random"]["warm"]
    out.append(f"random reads through a fresh mount: {c['reads']} x {c['bytes_each'] // 1024} KiB at random offsets "
               f"(seed {args.seed}), each compared with the source")
    for name, x in (("cold", c), ("warm", w)):
        out.append(f"    {name}: {x['total_s']:.2f} s, median {x['median_ms']:.1f} ms, p95 {x['p95_ms']:.1f} ms, "
                   f"max {x['max_ms']:.1f} ms, {x['mib_s']:.0f} MiB/s; mismatches {x['mismatches']}")
    out.append(f"    cache after the cold pass: {c['cache_bytes_after'] / MiB:.0f} MiB")
    out.append("")
    return out


if __name__ == "__main__":
    sys.exit(main())
