#!/usr/bin/env python3
"""Benchmark of WebDAV on my drive (/v1/files/), on 127.0.0.1 only.

Starts its own ``kgpu serve`` (embedded ``rclone serve s3``, SQLite, a temporary
data directory), makes a user through the admin API, then:

  (1) PROPFIND Depth 1 on a folder of ``--objects`` (10,000) small objects of the
      user's drive: kgpu's ``/v1/files/big/`` against ``rclone serve webdav`` run
      over the same bucket and prefix of the same store
      (``:s3,provider=Other,endpoint=…:kgpu/users/{id}``), in the same run. Cold
      (each server's first PROPFIND) and warm (median of ``--warm``, the two
      servers alternated), with response sizes, the ratio kgpu/rclone (target
      <= 1.0) and the kgpu server's peak RSS growth during each request. Done
      with an empty body (allprop) and with the body rclone's own webdav backend
      sends (what a pod's ``/files`` mount asks for). Then kgpu's HTTP folder
      listings of it (``GET /v1/files/big/``, JSON and HTML), cold (after a PUT
      into the folder, which drops its cached listing) and warm.
  (2) ``rclone mount :webdav:`` of /v1/files/ read-write (``--vfs-cache-mode
      writes``, ``--webdav-vendor other``, a Bearer header): a ``--size-mib``
      random file written into the mount, timed until rclone's upload queue is
      drained (``vfs/queue`` on its remote-control port) and the server has it;
      unmount, remount with a fresh cache, read it back and compare sha256; then
      one appended line, timed until the whole file is stored again, and the
      result downloaded (``curl -L``) and compared by sha256.

Everything it starts is stopped, every mount unmounted and its temporary
directories deleted at the end (``--keep`` keeps them). See bench/README.md.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import http.client
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402  (this folder's shared bench code)

HOST = harness.HOST
MiB = harness.MiB
FOLDER = "big"

# What rclone's webdav backend sends to list a folder (backend/webdav/webdav.go, listAll).
RCLONE_PROPFIND_BODY = b"""<?xml version="1.0"?>
<d:propfind  xmlns:d="DAV:" xmlns:oc="http://owncloud.org/ns" xmlns:nc="http://nextcloud.org/ns">
 <d:prop>
  <d:displayname />
  <d:getlastmodified />
  <d:getcontentlength />
  <d:resourcetype />
  <d:getcontenttype />
  <oc:checksums />
  <oc:permissions />
 </d:prop>
</d:propfind>
"""
BODIES = {"allprop": b"", "rclone": RCLONE_PROPFIND_BODY}
MOUNT_FLAGS = ["--webdav-vendor", "other", "--vfs-cache-mode", "writes"]


def store_endpoint(kgpu: harness.Proc, data_dir: Path) -> str:
    """The embedded store's address: from the server's log, else from the store's own log."""
    with contextlib.suppress(RuntimeError):
        return harness.store_endpoint(kgpu)
    found = re.findall(r"(http://127\.0\.0\.1:\d+)", (data_dir / "embedded-s3.log").read_text())
    if not found:
        raise RuntimeError("no embedded store address in the logs")
    return found[-1]


# ------------------------------------------------------------------ (1) PROPFIND


@dataclass
class Propfind:
    seconds: float
    first_byte_s: float
    status: int
    size: int
    responses: int
    server_cpu_s: float = 0.0
    store_cpu_s: float = 0.0
    rss_growth_mib: float = 0.0
    rss_peak_mib: float = 0.0


RESPONSE_END = re.compile(rb"</(?:[A-Za-z0-9_]+:)?response>")


def propfind(port: int, path: str, headers: dict, body: bytes, server_pid: int, store_pid: int) -> Propfind:
    """One PROPFIND Depth 1 on a fresh connection, timed to the last byte of the answer."""
    conn = http.client.HTTPConnection(HOST, port, timeout=120)
    all_headers = {"Depth": "1", **headers}
    if body:
        all_headers["Content-Type"] = "application/xml"
    cpu_before = harness.cpu_seconds(server_pid), harness.cpu_seconds(store_pid)
    with harness.RssSampler(server_pid, interval=0.01) as sampler:
        started = time.perf_counter()
        conn.request("PROPFIND", path, body=body or None, headers=all_headers)
        reply = conn.getresponse()
        first_byte = time.perf_counter() - started
        data = reply.read()
        seconds = time.perf_counter() - started
    conn.close()
    result = Propfind(
        seconds, first_byte, reply.status, len(data), len(RESPONSE_END.findall(data)),
        server_cpu_s=harness.cpu_seconds(server_pid) - cpu_before[0],
        store_cpu_s=harness.cpu_seconds(store_pid) - cpu_before[1],
        rss_growth_mib=sampler.growth_mib, rss_peak_mib=sampler.peak / 1024,
    )
    if reply.status != 207:
        raise RuntimeError(f"PROPFIND {path} on :{port} answered {reply.status}: {data[:300]!r}")
    return result


def get_listing(port: int, path: str, headers: dict, server_pid: int, store_pid: int) -> Propfind:
    """One GET of a folder listing (JSON or HTML) on a fresh connection, timed like :func:`propfind`."""
    conn = http.client.HTTPConnection(HOST, port, timeout=120)
    cpu_before = harness.cpu_seconds(server_pid), harness.cpu_seconds(store_pid)
    with harness.RssSampler(server_pid, interval=0.01) as sampler:
        started = time.perf_counter()
        conn.request("GET", path, headers=headers)
        reply = conn.getresponse()
        first_byte = time.perf_counter() - started
        data = reply.read()
        seconds = time.perf_counter() - started
    conn.close()
    if reply.status != 200:
        raise RuntimeError(f"GET {path} on :{port} answered {reply.status}: {data[:300]!r}")
    entries = data.count(b'"name":') if data.startswith(b"{") else data.count(b"<tr><td><a href=") - 1
    return Propfind(
        seconds, first_byte, reply.status, len(data), entries,
        server_cpu_s=harness.cpu_seconds(server_pid) - cpu_before[0],
        store_cpu_s=harness.cpu_seconds(store_pid) - cpu_before[1],
        rss_growth_mib=sampler.growth_mib, rss_peak_mib=sampler.peak / 1024,
    )


def drop_cached_listing(port: int, token: str, name: str) -> None:
    """A small file put into the folder through the gateway: its cached listing is dropped, so the
    next listing is read from the store again (cold)."""
    conn = http.client.HTTPConnection(HOST, port, timeout=60)
    conn.request("PUT", f"/v1/files/{FOLDER}/{name}", body=b"x", headers={"Authorization": f"Bearer {token}"})
    reply = conn.getresponse()
    reply.read()
    conn.close()
    if reply.status not in (200, 201, 204):
        raise RuntimeError(f"PUT {name} answered {reply.status}")


def write_objects(folder: Path, count: int, size: int) -> float:
    """``count`` files of ``size`` random bytes, written as plain files into the store's directory."""
    started = time.perf_counter()
    folder.mkdir(parents=True, exist_ok=True)
    payload = os.urandom(size + count)
    for i in range(count):
        fd = os.open(folder / f"f{i:06d}.bin", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.write(fd, payload[i : i + size])  # each one different
        os.close(fd)
    return time.perf_counter() - started


def list_all(s3, prefix: str) -> tuple[int, float]:
    started = time.perf_counter()
    total = 0
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket="kgpu", Prefix=prefix, Delimiter="/"):
        total += page.get("KeyCount", 0)
    return total, time.perf_counter() - started


def start_rclone_webdav(endpoint: str, data_dir: Path, user_id: int, log_dir: Path) -> harness.Proc:
    creds = json.loads((data_dir / "embedded-s3.json").read_text())
    port = harness.free_port()
    remote = (
        f":s3,provider=Other,endpoint='{endpoint}',access_key_id={creds['access_key']},"
        f"secret_access_key={creds['secret_key']}:kgpu/users/{user_id}"
    )
    log_path = log_dir / "rclone-serve-webdav.log"
    with open(log_path, "wb") as out:
        popen = subprocess.Popen(
            [harness.rclone_binary(), "--config", os.devnull, "serve", "webdav", remote,
             "--addr", f"{HOST}:{port}", "--log-level", "NOTICE"],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )
    proc = harness.Proc("rclone serve webdav", popen, log_path, port)
    deadline = time.monotonic() + 30
    while True:
        if popen.poll() is not None:
            raise RuntimeError(f"rclone serve webdav exited early:\n{log_path.read_text()[-2000:]}")
        try:
            with socket.create_connection((HOST, port), timeout=1):
                return proc
        except OSError:
            if time.monotonic() > deadline:
                proc.stop()
                raise RuntimeError("rclone serve webdav did not start within 30 s")
            time.sleep(0.05)


def profile_requests(pid: int, out_prefix: Path, rate: int, run) -> dict:
    """py-spy record of the server while ``run()`` makes requests; a summary of where the time went."""
    raw = out_prefix.with_suffix(".txt")
    spy = subprocess.Popen(
        [str(harness.VENV_BIN / "py-spy"), "record", "--pid", str(pid), "--rate", str(rate), "--format", "raw",
         "--output", str(raw), "--nonblocking", "--duration", "600"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    time.sleep(1.0)  # py-spy attaches
    try:
        run()
    finally:
        spy.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
        try:
            spy.wait(timeout=30)
        except subprocess.TimeoutExpired:
            spy.kill()
            spy.wait()
    if not raw.exists():
        return {"error": (spy.stderr.read() or b"").decode()[-500:]}
    self_time: collections.Counter = collections.Counter()
    inclusive: collections.Counter = collections.Counter()
    below_propfind: collections.Counter = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [simplify_frame(f) for f in stack.split(";")]
        names = [f.split(" (")[0] for f in frames]
        total += n
        self_time[frames[-1]] += n
        for name in set(names):
            inclusive[name] += n
        if "RequestServer.do_PROPFIND" in names:
            i = names.index("RequestServer.do_PROPFIND")
            below_propfind[names[i + 1] if i + 1 < len(names) else "(do_PROPFIND itself)"] += n
        else:
            below_propfind["(outside do_PROPFIND: " + names[-1] + ")"] += n
    if not total:
        return {"error": "no samples"}
    share = lambda c: c / total  # noqa: E731
    return {
        "file": str(raw),
        "samples": total,
        "self": [(f, share(c)) for f, c in self_time.most_common(12)],
        "below_propfind": [(f, share(c)) for f, c in below_propfind.most_common(8)],
        "parts": [(label, share(inclusive[frame])) for label, frame in PROFILE_PARTS],
    }


# Where a PROPFIND's time goes, by frames of its call tree (inclusive shares of busy samples).
PROFILE_PARTS = [
    ("store listing (10 ListObjectsV2 calls per 10,000 entries)", "FolderResource.get_member_list"),
    ("  botocore: parsing the list XML into dicts", "ResponseParser.parse"),
    ("  botocore: the 200-error check (parses each body once more)", "_handle_200_error"),
    ("per-member properties (wsgidav get_properties)", "_DAVResource.get_properties"),
    ("  dead-property lookups, one SQLite query a member", "PropertyManager.get_properties"),
    ("  lock lookups (lockdiscovery), one SQLite query a member", "LockManager.get_url_lock_list"),
    ("  all SQLite queries", "SqliteMap._query"),
    ("building the XML elements (wsgidav add_property_response)", "add_property_response"),
    ("serialising the whole multistatus (ElementTree)", "xml_to_bytes"),
]


def simplify_frame(frame: str) -> str:
    """``func (path/to/site-packages/pkg/mod.py:123)`` → ``func (pkg/mod.py)``."""
    match = re.match(r"(.*) \((.*?):\d+\)$", frame.strip())
    if not match:
        return frame.strip()
    func, path = match.groups()
    for marker in ("site-packages/", "/lib/python3.11/", str(harness.REPO) + "/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{func} ({path})"


# ------------------------------------------------------------------ (2) the read-write mount


@dataclass
class Mount(harness.RcloneMount):
    """One ``rclone mount :webdav:`` of /v1/files/, on a fresh cache, with rclone's remote control."""

    rc_port: int

    @classmethod
    def start(cls, base: str, token: str, where: Path, tag: str, extra: list[str], timeout: float = 30) -> "Mount":
        mountpoint, cache_dir = where / f"mnt-{tag}", where / f"cache-{tag}"
        log_path = where / f"rclone-mount-{tag}.log"
        mountpoint.mkdir()
        cache_dir.mkdir()
        rc_port = harness.free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("RCLONE_")}
        env["RCLONE_WEBDAV_HEADERS"] = f"Authorization,Bearer {token}"  # not on the command line (ps)
        popen = subprocess.Popen(
            [harness.rclone_binary(), "--config", os.devnull, "mount", ":webdav:", str(mountpoint),
             "--webdav-url", f"{base}/v1/files/", *MOUNT_FLAGS, *extra,
             "--rc", "--rc-addr", f"{HOST}:{rc_port}", "--rc-no-auth",
             "--cache-dir", str(cache_dir), "--log-file", str(log_path), "--log-level", "INFO",
             "--log-format", "date,time,microseconds"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
        )
        mount = cls(mountpoint, cache_dir, popen, log_path, rc_port)
        mount.wait_mounted(timeout)
        return mount

    def queue(self) -> list | None:
        """rclone's upload queue (``vfs/queue``); None while the rc server does not answer."""
        request = urllib.request.Request(
            f"http://{HOST}:{self.rc_port}/vfs/queue", data=b"{}", method="POST",
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=5) as reply:
                return json.loads(reply.read()).get("queue") or []
        except (OSError, urllib.error.HTTPError, ValueError):
            return None


def head_size(base: str, path: str, token: str) -> int | None:
    request = urllib.request.Request(f"{base}{path}", method="HEAD", headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, timeout=60) as reply:
            return int(reply.headers.get("Content-Length", "-1"))
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return None
        raise


def wait_stored(mount: Mount, base: str, path: str, token: str, want_size: int, started: float, timeout: float) -> dict:
    """Seconds from ``started`` until rclone's upload queue is empty again (after holding the file);
    then one HEAD must show the new size. (HEAD is not polled, to keep the server's work during the
    upload the upload's own; it is the fallback when the file is never seen queued.)"""
    deadline = time.monotonic() + timeout
    seen_queued = None
    drained = None
    max_len = 0
    while time.monotonic() < deadline:
        queue = mount.queue()
        now = time.perf_counter()
        if queue is None:
            time.sleep(0.05)
            continue
        max_len = max(max_len, len(queue))
        if queue and seen_queued is None:
            seen_queued = now - started
        if not queue and seen_queued is not None:
            drained = now - started
            break
        if not queue and seen_queued is None and now - started > 15:
            break  # never saw it queued (uploaded before the first poll?): fall back to HEAD
        time.sleep(0.05)
    if drained is None:
        # fall back to polling HEAD once a second
        while time.monotonic() < deadline:
            if head_size(base, path, token) == want_size:
                drained = time.perf_counter() - started
                break
            time.sleep(1)
        else:
            raise RuntimeError(f"{path} not stored within {timeout:.0f} s; see {mount.log_path}")
    t0 = time.perf_counter()
    size = head_size(base, path, token)
    head_s = time.perf_counter() - t0
    if size != want_size:
        raise RuntimeError(f"{path}: the server has {size} bytes after the queue drained, not {want_size}")
    return {"stored_s": drained, "queued_at_s": seen_queued, "head_s": head_s, "max_queue": max_len}


LOG_LINE = re.compile(r"^(\d{4}/\d\d/\d\d \d\d:\d\d:\d\d\.\d+) \w+\s*: (.*)$")


def upload_span(log_path: Path, name: str, started_wall: float) -> dict:
    """From the mount's log: when the last upload of ``name`` was queued (seconds after
    ``started_wall``), for how long it was held back (--vfs-write-back), and how long the upload
    itself took (queued + hold → succeeded)."""
    from datetime import datetime

    queued = hold = done = None
    for line in log_path.read_text(errors="replace").splitlines():
        match = LOG_LINE.match(line)
        if not match or not match.group(2).startswith(name + ":"):
            continue
        when = datetime.strptime(match.group(1), "%Y/%m/%d %H:%M:%S.%f").timestamp()
        held = re.search(r"queuing for upload in ([\d.]+)s", match.group(2))
        if held:
            queued, hold, done = when, float(held.group(1)), None
        elif "upload succeeded" in match.group(2) and queued is not None:
            done = when
    if queued is None or done is None:
        return {}
    return {"log_queued_at_s": queued - started_wall, "write_back_s": hold, "upload_s": done - queued - hold}


def make_file(path: Path, size: int):
    """A random file; returns its sha256 object (not finalised, so an append can be hashed on)."""
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        left = size
        while left:
            chunk = os.urandom(min(8 * MiB, left))
            f.write(chunk)
            digest.update(chunk)
            left -= len(chunk)
    return digest


# ------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    parser = harness.bench_parser(__doc__)
    parser.add_argument("--objects", type=int, default=10_000, help="objects in the listed folder (default 10000)")
    parser.add_argument("--object-kib", type=int, default=1, help="size of each of them in KiB (default 1)")
    parser.add_argument("--warm", type=int, default=5, help="warm PROPFINDs per server and body (default 5)")
    parser.add_argument("--warm-pause", type=float, default=3.0,
                        help="seconds between warm rounds, longer than a short cache lifetime (default 3)")
    parser.add_argument("--size-mib", type=int, default=1024, help="size of the file written through the mount")
    parser.add_argument("--only", default="12", help="which parts to run: 1, 2 or 12 (default)")
    parser.add_argument("--kgpu-only", action="store_true",
                        help="(1) without rclone serve webdav (no ratios): for a big folder's memory run, e.g. --objects 100000")
    parser.add_argument("--cold-only", action="store_true",
                        help="(1) only each server's cold PROPFIND and one cold JSON listing, the store's listing not "
                             "warmed first: a big folder's memory figures, e.g. --kgpu-only --objects 100000")
    parser.add_argument("--profile", action="store_true",
                        help="also py-spy record kgpu serve during 3 more allprop PROPFINDs and print where the time goes")
    parser.add_argument("--profile-rate", type=int, default=250, help="py-spy samples a second (default 250)")
    parser.add_argument("--mount-flag", action="append", default=[], metavar="FLAG",
                        help="an extra rclone mount flag for (2) (repeat; with a value: --mount-flag=--vfs-write-back=1s)")
    harness.add_run_options(parser, time_limit=480)
    args = parser.parse_args(argv)
    if "2" in args.only and (not Path("/dev/fuse").exists() or not shutil.which("fusermount3")):
        parser.error("(2) needs FUSE: /dev/fuse and fusermount3 (apt-get install -y fuse3); or --only 1")
    size = args.size_mib * MiB

    harness.arm_time_limit(args.time_limit)
    tmp, fast, data_dir, log_dir = harness.make_dirs("kgpu-webdav-bench-", args.tmp, 4 * size, args.on_disk)
    procs: list[harness.Proc] = []
    mounts: list[Mount] = []
    harness.log(f"temporary directory {tmp}; store objects, source file and mount caches in {fast}")
    results: dict = {"tmp": str(tmp), "fast": str(fast), "config": vars(args)}
    results["loadavg_start"] = os.getloadavg()
    run_started = time.monotonic()
    try:
        kgpu, admin_token = harness.start_bench_server(procs, data_dir, log_dir, args.src)
        port, base = kgpu.port, kgpu.base
        created = harness.new_user(base, admin_token, "bench-webdav@example.org")
        token, user_id = created["token"], created["user"]["id"]
        auth = {"Authorization": f"Bearer {token}"}
        harness.log(f"user {user_id} created")

        # ---------------------------------------------------------------- (1)
        if "1" in args.only:
            folder = data_dir / "objects" / "kgpu" / "users" / str(user_id) / FOLDER
            results["write_objects_s"] = write_objects(folder, args.objects, args.object_kib * 1024)
            harness.log(f"(1) {args.objects} x {args.object_kib} KiB objects written into {folder} "
                   f"in {results['write_objects_s']:.1f} s")
            endpoint = store_endpoint(kgpu, data_dir)
            s3 = harness.store_client(data_dir, endpoint)
            prefix = f"users/{user_id}/{FOLDER}/"
            listed, counted_s = list_all(s3, prefix)
            results["restarted"] = False
            if listed != args.objects:
                # The store caches directory listings: restart so it reads the directory afresh.
                harness.log(f"(1) the store lists {listed}, not {args.objects}: restarting kgpu serve on the same data directory")
                kgpu.stop()
                procs.remove(kgpu)
                kgpu = harness.start_kgpu(data_dir, port, admin_token, log_dir, 2, args.src)
                procs.append(kgpu)
                endpoint = store_endpoint(kgpu, data_dir)
                s3 = harness.store_client(data_dir, endpoint)
                listed, counted_s = list_all(s3, prefix)
                results["restarted"] = True
                if listed != args.objects:
                    raise RuntimeError(f"the store lists {listed} objects under {prefix}, not {args.objects}")
            # Warm the store itself, so neither server's cold PROPFIND pays for the store's first listing.
            if not args.cold_only:
                _, results["store_listing_s"] = list_all(s3, prefix)
            else:  # the listing that counted them: the store's first, so it is not warm
                results["store_listing_s"] = counted_s
            harness.log(f"(1) the store lists the folder ({listed} keys, {-(-listed // 1000)} list calls) "
                   f"in {results['store_listing_s']:.2f} s")
            store_pid = (harness.children(kgpu.pid) or [0])[0]
            servers = {"kgpu": (port, f"/v1/files/{FOLDER}/", auth, kgpu.pid)}
            dav = None
            if not args.kgpu_only:
                dav = start_rclone_webdav(endpoint, data_dir, user_id, log_dir)
                procs.append(dav)
                servers["rclone"] = (dav.port, f"/{FOLDER}/", {}, dav.pid)
            want = args.objects + 1

            def one(name: str, body: str) -> Propfind:
                p, path, headers, pid = servers[name]
                got = propfind(p, path, headers, BODIES[body], pid, store_pid)
                if got.responses != want:
                    raise RuntimeError(f"{name} PROPFIND ({body}) listed {got.responses} entries, not {want}")
                return got

            pf: dict = {"cold": {}, "warm": {}}
            for name in servers:
                harness.log(f"(1) cold PROPFIND Depth 1 (allprop) on {name}")
                pf["cold"][name] = one(name, "allprop")
                harness.log(f"    {pf['cold'][name].seconds:.2f} s, {pf['cold'][name].size / 1e6:.1f} MB")
            for body in BODIES if not args.cold_only else ():
                pf["warm"][body] = {name: [] for name in servers}
                for r in range(args.warm):
                    time.sleep(args.warm_pause)  # every round, not only those that follow the last at once
                    order = list(servers) if r % 2 == 0 else list(reversed(servers))
                    for name in order:
                        pf["warm"][body][name].append(one(name, body))
                harness.log(f"(1) warm ({body}): " + ", ".join(
                    f"{name} median {statistics.median(x.seconds for x in pf['warm'][body][name]):.2f} s" for name in servers))
            results["propfind"] = {
                "cold": {k: v.__dict__ for k, v in pf["cold"].items()},
                "warm": {b: {k: [x.__dict__ for x in v] for k, v in d.items()} for b, d in pf["warm"].items()},
            }
            if dav is not None:
                results["rclone_webdav_rss_mib"] = harness.rss_kib(dav.pid) / 1024
            if args.profile:
                harness.log("(1) py-spy record of kgpu serve during 3 warm allprop PROPFINDs (before the HTTP listings add files)")
                results["profile"] = profile_requests(
                    kgpu.pid, tmp / "pyspy-propfind", args.profile_rate,
                    lambda: [one("kgpu", "allprop") for _ in range(3)],
                )
            # The HTTP folder listings of the same folder (kgpu only: rclone serve webdav has none):
            # cold (a file put into the folder first drops its cached listing) and warm.
            http_listings: dict = {}
            kinds = (("json", "?json=1", "application/json"), ("html", "", "text/html"))
            for kind, query, accept in kinds if not args.cold_only else kinds[:1]:
                path = f"/v1/files/{FOLDER}/{query}"
                got: dict = {"cold": [], "warm": []}
                for r in range(args.warm if not args.cold_only else 1):
                    drop_cached_listing(port, token, f"zz-{kind}-{r}.txt")
                    got["cold"].append(get_listing(port, path, {**auth, "Accept": accept}, kgpu.pid, store_pid).__dict__)
                    if not args.cold_only:
                        got["warm"].append(get_listing(port, path, {**auth, "Accept": accept}, kgpu.pid, store_pid).__dict__)
                http_listings[kind] = got
                harness.log(f"(1) GET {path}: cold median {statistics.median(x['seconds'] for x in got['cold']):.2f} s"
                            + (f", warm {statistics.median(x['seconds'] for x in got['warm']):.2f} s" if got["warm"] else ""))
            results["http_listings"] = http_listings
            if dav is not None:
                dav.stop()
                procs.remove(dav)

        # ---------------------------------------------------------------- (2)
        if "2" in args.only:
            timeout = max(120.0, size / MiB / 5)  # nothing slower than 5 MiB/s
            source = fast / "source.bin"
            harness.log(f"(2) writing a {args.size_mib} MiB random file")
            digest = make_file(source, size)
            source_sha = digest.hexdigest()
            store_pid = (harness.children(kgpu.pid) or [0])[0]
            rel = "mount-bench/big.bin"
            url_path = f"/v1/files/{rel}"
            mount = Mount.start(base, token, fast, "write", args.mount_flag)
            mounts.append(mount)
            out: dict = {"mount_flags": MOUNT_FLAGS + args.mount_flag}
            (mount.mountpoint / "mount-bench").mkdir()
            harness.log("(2) copying it into the mount, then waiting for rclone's upload queue to drain")
            with harness.ProcessWatch({"gateway": kgpu.pid, "store": store_pid, "rclone": mount.popen.pid}) as watch:
                started, started_wall = time.perf_counter(), time.time()
                with open(source, "rb") as src, open(mount.mountpoint / rel, "wb") as dst:
                    while chunk := src.read(4 * MiB):
                        dst.write(chunk)
                out["write_returned_s"] = time.perf_counter() - started
                out["write"] = wait_stored(mount, base, url_path, token, size, started, timeout)
            out["write"] |= upload_span(mount.log_path, rel, started_wall)
            out["write_watch"] = watch.summary()
            harness.log(f"    write() and close() returned in {out['write_returned_s']:.2f} s; "
                   f"stored {out['write']['stored_s']:.2f} s after the write began; {watch.summary()}")
            mount.remove()
            mounts.remove(mount)

            mount = Mount.start(base, token, fast, "read", args.mount_flag)
            mounts.append(mount)
            harness.log("(2) reading it back through a fresh mount and cache")
            got = hashlib.sha256()
            got_size = 0
            with harness.ProcessWatch({"gateway": kgpu.pid, "store": store_pid, "rclone": mount.popen.pid}) as watch:
                started = time.perf_counter()
                with open(mount.mountpoint / rel, "rb") as f:
                    while chunk := f.read(4 * MiB):
                        got.update(chunk)
                        got_size += len(chunk)
                out["read_s"] = time.perf_counter() - started
            out["read_watch"] = watch.summary()
            out["read_sha_ok"] = got.hexdigest() == source_sha and got_size == size
            if not out["read_sha_ok"]:
                raise RuntimeError(f"read back {got_size} bytes, sha256 {got.hexdigest()}, not the source's")
            harness.log(f"    {out['read_s']:.2f} s, {size / MiB / out['read_s']:.0f} MiB/s, sha256 ok; {watch.summary()}")

            line = b"one appended line\n"
            harness.log("(2) appending one line through the mount, then waiting for it to be stored")
            with harness.ProcessWatch({"gateway": kgpu.pid, "store": store_pid, "rclone": mount.popen.pid}) as watch:
                started, started_wall = time.perf_counter(), time.time()
                with open(mount.mountpoint / rel, "ab") as f:
                    out["append_open_s"] = time.perf_counter() - started
                    f.write(line)
                out["append_returned_s"] = time.perf_counter() - started
                out["append"] = wait_stored(mount, base, url_path, token, size + len(line), started, timeout)
            out["append"] |= upload_span(mount.log_path, rel, started_wall)
            out["append_watch"] = watch.summary()
            digest.update(line)
            got_sha, got_size = harness.download_sha256(f"{base}{url_path}", token, timeout=timeout)
            out["append_sha_ok"] = got_sha == digest.hexdigest() and got_size == size + len(line)
            if not out["append_sha_ok"]:
                raise RuntimeError(f"after the append the server has {got_size} bytes, sha256 {got_sha}: not expected")
            harness.log(f"    open() {out['append_open_s']:.2f} s, close() returned at {out['append_returned_s']:.2f} s, "
                   f"stored at {out['append']['stored_s']:.2f} s, sha256 ok (curl -L); {watch.summary()}")
            mount.remove()
            mounts.remove(mount)
            source.unlink()
            results["mount"] = out
        results["total_seconds"] = time.monotonic() - run_started
        results["loadavg_end"] = os.getloadavg()
    finally:
        harness.end_run(args, procs, (tmp, fast), mounts)

    harness.publish(args, results, report(results, args))
    ratios = [r for r in results.get("ratios", {}).values()]
    return 0 if all(r <= 1.0 for r in ratios) else 1


def rclone_log(span: dict, then: str, size: int | None = None) -> list[str]:
    """The report's line of what rclone's log says of one upload (upload_span): when it was queued,
    how long held back, and ``then`` what it took (at what speed, given its ``size``); none where
    the log showed no upload."""
    if "upload_s" not in span:
        return []
    line = (f"        rclone's log: queued at {span['log_queued_at_s']:.2f} s, held back {span['write_back_s']:g} s"
            f"{then} {span['upload_s']:.2f} s")
    return [line + f", {size / MiB / span['upload_s']:.0f} MiB/s" if size else line]


def report(results: dict, args) -> list[str]:
    out = ["", "kgpu WebDAV benchmark (127.0.0.1; kgpu serve with its embedded rclone serve s3)", ""]
    results["ratios"] = {}
    if "propfind" in results:
        pf = results["propfind"]
        out.append(f"(1) PROPFIND Depth 1 on a folder of {args.objects} x {args.object_kib} KiB objects "
                   f"(written straight into the store's directory{'; kgpu serve restarted to see them' if results['restarted'] else ''})")
        out.append(f"    kgpu:   /v1/files/{FOLDER}/ (Bearer)")
        out.append(f"    rclone: rclone serve webdav :s3,provider=Other,endpoint=<the same store>:kgpu/users/ID, /{FOLDER}/")
        out.append(f"    the store's own listing of the folder (boto3, done first"
                   f"{' to count them: the store is not warm' if args.cold_only else ' so both servers find it warm'}): "
                   f"{results['store_listing_s']:.2f} s")

        def row(label: str, x: dict) -> str:
            return (f"    {label:26s} {x['seconds']:6.2f} s  (first byte {x['first_byte_s']:5.2f} s)  {x['size'] / 1e6:5.1f} MB  "
                    f"CPU s: server {x['server_cpu_s']:.2f}, store {x['store_cpu_s']:.2f}")

        cold = pf["cold"]
        out.append("    cold (each server's first PROPFIND, allprop):")
        out.append(row("kgpu", cold["kgpu"]) + f"  RSS +{cold['kgpu']['rss_growth_mib']:.0f} MiB")
        with_rclone = "rclone" in cold
        if with_rclone:
            out.append(row("rclone serve webdav", cold["rclone"]))
            ratio = cold["kgpu"]["seconds"] / cold["rclone"]["seconds"]
            results["ratios"]["cold"] = ratio
            out.append(f"    cold ratio kgpu/rclone {ratio:.2f} (target <= 1.0: {harness.verdict(ratio <= 1.0)})")
        for body, d in pf["warm"].items():
            k = statistics.median(x["seconds"] for x in d["kgpu"])
            if not with_rclone:
                kx = min(d["kgpu"], key=lambda x: abs(x["seconds"] - k))
                out.append(f"    warm ({body}), median of {len(d['kgpu'])}:")
                out.append(row("kgpu", {**kx, "seconds": k}) + f"  RSS +{max(x['rss_growth_mib'] for x in d['kgpu']):.0f} MiB max")
                continue
            r = statistics.median(x["seconds"] for x in d["rclone"])
            kx = min(d["kgpu"], key=lambda x: abs(x["seconds"] - k))
            rx = min(d["rclone"], key=lambda x: abs(x["seconds"] - r))
            what = "empty body: allprop" if body == "allprop" else "the body rclone's webdav backend sends (a pod's mount)"
            out.append(f"    warm, median of {len(d['kgpu'])} each, alternated, {args.warm_pause:g} s apart ({what}):")
            out.append(row("kgpu", {**kx, "seconds": k}) + f"  RSS +{max(x['rss_growth_mib'] for x in d['kgpu']):.0f} MiB max")
            out.append(row("rclone serve webdav", {**rx, "seconds": r}))
            kgpu_rounds = ", ".join(format(x["seconds"], ".2f") for x in d["kgpu"])
            rclone_rounds = ", ".join(format(x["seconds"], ".2f") for x in d["rclone"])
            out.append(f"      rounds: kgpu {kgpu_rounds}; rclone {rclone_rounds}")
            per_round = [x["seconds"] / y["seconds"] for x, y in zip(d["kgpu"], d["rclone"])]
            out.append(f"      ratio per round: {', '.join(format(x, '.2f') for x in per_round)}")
            results["ratios"][f"warm_{body}"] = k / r
            results["ratios"][f"warm_{body}_worst_round"] = max(per_round)
            out.append(f"    warm ratio kgpu/rclone ({body}) {k / r:.2f}, worst round {max(per_round):.2f} "
                       f"(target <= 1.0 on every round: {harness.verdict(max(per_round) <= 1.0)})")
        out.append("    (both answer a repeated PROPFIND from a directory cache: rclone's --dir-cache-time 5m, kgpu's"
                   " drive/store/caching.py, checked against the database on every use)")
        peak = max([cold["kgpu"]["rss_peak_mib"]] + [x["rss_peak_mib"] for d in pf["warm"].values() for x in d["kgpu"]])
        warm_growth = [x["rss_growth_mib"] for d in pf["warm"].values() for x in d["kgpu"]]
        out.append(f"    kgpu serve peak RSS growth during a PROPFIND: cold +{cold['kgpu']['rss_growth_mib']:.0f} MiB, "
                   + (f"warm max +{max(warm_growth):.0f} MiB " if warm_growth else "no warm rounds (--cold-only) ")
                   + f"(peak RSS {peak:.0f} MiB)" + (f"; rclone serve webdav RSS afterwards {results['rclone_webdav_rss_mib']:.0f} MiB"
                                                   if "rclone_webdav_rss_mib" in results else ""))
        if "http_listings" in results:
            rounds = len(next(iter(results["http_listings"].values()))["cold"])
            out.append(f"    HTTP folder listings of the same folder (kgpu), median of {rounds} each; cold: after a PUT into the folder:")
            for kind, got in results["http_listings"].items():
                for temp in ("cold", "warm"):
                    xs = got[temp]
                    if not xs:
                        continue
                    m = statistics.median(x["seconds"] for x in xs)
                    fb = statistics.median(x["first_byte_s"] for x in xs)
                    out.append(f"      GET ({kind}) {temp}: {m:5.2f} s (first byte {fb:5.2f} s), {xs[0]['responses']} entries, "
                               f"{xs[0]['size'] / 1e6:.1f} MB, RSS +{max(x['rss_growth_mib'] for x in xs):.0f} MiB max")
        if "profile" in results:
            prof = results["profile"]
            if "error" in prof:
                out.append(f"    py-spy failed: {prof['error']}")
            else:
                out.append(f"    py-spy, kgpu serve during 3 allprop PROPFINDs ({prof['samples']} samples of busy threads, "
                           f"raw stacks in {prof['file']}{'' if args.keep else ', deleted; --keep keeps it'}):")
                out.append("      where it goes (inclusive):")
                out += [f"        {share * 100:5.1f}%  {label}" for label, share in prof["parts"]]
                out.append("      below do_PROPFIND:")
                out += [f"        {share * 100:5.1f}%  {frame}" for frame, share in prof["below_propfind"]]
                out.append("      self time:")
                out += [f"        {share * 100:5.1f}%  {frame}" for frame, share in prof["self"][:8]]
        out.append("")
    if "mount" in results:
        m = results["mount"]
        size = args.size_mib * MiB
        out.append(f"(2) rclone mount :webdav: {' '.join(m['mount_flags'])} of /v1/files/, {args.size_mib} MiB random file")
        w = m["write"]
        out.append(f"    write into the mount: write()+close() returned in {m['write_returned_s']:.2f} s; queued for upload at "
                   f"{w['queued_at_s'] or 0:.2f} s; stored (upload queue drained) {w['stored_s']:.2f} s after the write began "
                   f"({size / MiB / w['stored_s']:.0f} MiB/s end to end)")
        out += rclone_log(w, " (--vfs-write-back), then the upload (PUT streamed through the gateway into the store, "
                             "and rclone's PROPFIND of the new file)", size)
        out.append(f"        one HEAD of the stored file afterwards: {w['head_s']:.2f} s")
        out.append(f"        {m['write_watch']}")
        out.append(f"    read back through a fresh mount and cache: {m['read_s']:.2f} s, {size / MiB / m['read_s']:.0f} MiB/s, "
                   f"sha256 {'ok' if m['read_sha_ok'] else 'MISMATCH'}")
        out.append(f"        {m['read_watch']}")
        a = m["append"]
        out.append(f"    append one line: open() took {m['append_open_s']:.2f} s, close() returned at {m['append_returned_s']:.2f} s, "
                   f"stored {a['stored_s']:.2f} s after the open (the whole {args.size_mib} MiB downloaded and uploaded again); "
                   f"sha256 of a curl -L download {'ok' if m['append_sha_ok'] else 'MISMATCH'}")
        out += rclone_log(a, ", then the download of the old content (if not done during the hold) and the upload")
        out.append(f"        {m['append_watch']}")
        out.append("")
    return out


if __name__ == "__main__":
    sys.exit(main())
