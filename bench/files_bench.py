#!/usr/bin/env python3
"""Benchmark of the /v1/files hot paths against their lower bounds, on 127.0.0.1 only.

Starts its own ``kgpu serve`` (embedded ``rclone serve s3``, SQLite, a temporary
data directory) and a bare uvicorn app, measures, prints figures, and removes
everything it made. Nothing but 127.0.0.1 is touched. See bench/README.md.

  (a) GET /v1/files/x 302 req/s vs two lower bounds: a bare ASGI app answering a constant
      302 under uvicorn without access log (the goal: >= 0.5 of it), and a bare FastAPI
      constant 302 served as `kgpu serve` ran uvicorn before (with its access log); kgpu
      with one worker process and with two (`--workers 2`)
  (b) 1 GiB `curl -L -T` through the 307 vs `curl -T` straight to a presigned PUT
  (c) 1 GiB streamed PUT (`-H 'Expect:'`, from a file and from a pipe) vs the same
      direct PUT, with the server's peak RSS growth; the one from a pipe (no length: a
      multipart upload) also vs the same parts sent straight to the store
  (d) PUT 307 answer time at 0 objects and at N objects in the drive

Every uploaded object is downloaded again (curl -L through the gateway) and its
sha256 compared with the source file's.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from harness import (
    HOST, REPO, MiB, Proc, RssSampler, add_run_options, arm_time_limit, bench_parser, children, cpu_seconds, download_sha256,
    end_run, free_port, http_json, log, make_dirs, make_file, new_user, pct, publish, rss_kib, server_cpu_seconds, start_kgpu,
    start_bench_server, store_client, store_endpoint, verdict, wait_ready,
)

from gateway.settings import Settings

# The server's defaults, which the bench's server runs with: the direct multipart upload sends the
# parts the gateway would.
STORE_BUCKET = Settings.model_fields["s3_bucket"].default
UNKNOWN_LENGTH_PART_BYTES = Settings.model_fields["upload_unknown_length_part_bytes"].default

# A Location of the same shape and length as a presigned GET the gateway sends.
BARE_LOCATION = (
    "http://127.0.0.1:40000/kgpu/users/1/x?X-Amz-Algorithm=AWS4-HMAC-SHA256"
    "&X-Amz-Credential=kgpu0123456789abcdef%2F20260101%2Fus-east-1%2Fs3%2Faws4_request"
    "&X-Amz-Date=20260101T000000Z&X-Amz-Expires=3600&X-Amz-SignedHeaders=host"
    "&X-Amz-Signature=" + "0" * 64
)


# ------------------------------------------------------------------ the bare 302 server


def serve_bare_302(port: int) -> None:
    """A tiny FastAPI app with one constant-302 route, run exactly as `kgpu serve` runs uvicorn."""
    import logging

    import uvicorn
    from fastapi import FastAPI, Response

    app = FastAPI()

    @app.get("/v1/files/{path:path}")
    async def redirect(path: str) -> Response:
        return Response(status_code=302, headers={"Location": BARE_LOCATION, "Cache-Control": "no-store"})

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    uvicorn.run(app, host=HOST, port=port, proxy_headers=True)


def serve_bare_asgi_302(port: int) -> None:
    """The lower bound of (a): a plain ASGI callable answering a constant 302, under uvicorn
    without access log (what any Python server on uvicorn pays per request)."""
    import uvicorn

    redirect = {
        "type": "http.response.start",
        "status": 302,
        "headers": [(b"location", BARE_LOCATION.encode()), (b"cache-control", b"no-store"), (b"content-length", b"0")],
    }
    healthy = {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]}

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        if scope["path"] == "/healthz":
            await send(healthy)
            await send({"type": "http.response.body", "body": b"ok"})
            return
        await send(redirect)
        await send({"type": "http.response.body", "body": b""})

    uvicorn.run(app, host=HOST, port=port, access_log=False, lifespan="off")


# ------------------------------------------------------------------ the servers


BARE_SERVERS = {"asgi": "--serve-bare-asgi-302", "fastapi": "--serve-bare-302"}


def start_bare(port: int, log_dir: Path, kind: str = "fastapi") -> Proc:
    log_path = log_dir / f"bare-{kind}-302.log"
    with open(log_path, "wb") as out:
        popen = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), BARE_SERVERS[kind], str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=str(REPO),
            start_new_session=True,
        )
    proc = Proc(f"bare {kind} 302", popen, log_path, port)
    wait_ready(proc)
    return proc


# ------------------------------------------------------------------ (a) 302 throughput


def check_302(port: int, path: str, token: str | None) -> str:
    import http.client

    conn = http.client.HTTPConnection(HOST, port, timeout=10)
    conn.request("GET", path, headers={"Authorization": f"Bearer {token}"} if token else {})
    reply = conn.getresponse()
    reply.read()
    conn.close()
    if reply.status != 302 or not reply.getheader("location"):
        raise RuntimeError(f"GET {path} on :{port} answered {reply.status}, not a 302 with a Location")
    return reply.getheader("location")


def measured_load(load, server_pid: int, *args) -> dict:
    """One load run, plus the server's CPU time per request (robust to other load on the machine)."""
    cpu_before = server_cpu_seconds(server_pid)
    result = load(*args)
    cpu = server_cpu_seconds(server_pid) - cpu_before
    result["server_cpu_s"] = cpu
    result["server_cpu_us_per_request"] = cpu / max(result["requests"], 1) * 1e6
    return result


DISTINCT = "{n}"  # in a path of (a): each request asks for another name (n = 0, 1, 2, ...), never the same twice


def load_wrk(port: int, path: str, token: str | None, seconds: float, conns: int, threads: int) -> dict:
    command = ["wrk", f"-t{threads}", f"-c{conns}", f"-d{seconds:g}s", "--timeout", "5s"]
    if token:
        command += ["-H", f"Authorization: Bearer {token}"]
    with tempfile.NamedTemporaryFile("w", suffix=".lua") as script:
        if DISTINCT in path:
            head, tail = path.split(DISTINCT)
            script.write(f'local n = 0\nrequest = function()\n  n = n + 1\n  return wrk.format(nil, "{head}" .. n .. "{tail}")\nend\n')
            script.flush()
            command += ["-s", script.name]
        command.append(f"http://{HOST}:{port}{path.replace(DISTINCT, '0')}")
        out = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 30, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    total = int(re.search(r"(\d+) requests in", out).group(1))
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: (.*)", out)
    latency = re.search(r"Latency\s+(\S+)\s+(\S+)\s+(\S+)", out)
    return {
        "rps": rps,
        "requests": total,
        "non_2xx_3xx": int(bad.group(1)) if bad else 0,
        "socket_errors": errors.group(1) if errors else "",
        "latency_avg": latency.group(1) if latency else "",
    }


def load_python(port: int, path: str, token: str | None, seconds: float, conns: int, threads: int) -> dict:
    """Fallback load generator: ``conns`` threads, each with one keep-alive http.client connection."""
    import http.client

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    stop_at = time.monotonic() + seconds
    counts = [0] * conns
    bad = [0] * conns

    def worker(i: int) -> None:
        conn = http.client.HTTPConnection(HOST, port, timeout=10)
        while time.monotonic() < stop_at:
            conn.request("GET", path.replace(DISTINCT, f"{i}-{counts[i]}"), headers=headers)
            reply = conn.getresponse()
            reply.read()
            if reply.status != 302:
                bad[i] += 1
            counts[i] += 1
        conn.close()

    started = time.monotonic()
    workers = [threading.Thread(target=worker, args=(i,)) for i in range(conns)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    elapsed = time.monotonic() - started
    return {"rps": sum(counts) / elapsed, "requests": sum(counts), "non_2xx_3xx": sum(bad), "socket_errors": "", "latency_avg": ""}


# ------------------------------------------------------------------ (b) (c) big uploads


@dataclass
class Upload:
    label: str
    seconds: float
    size: int
    http_code: str
    detail: str = ""
    server_rss_growth_mib: float | None = None
    server_hwm_delta_mib: float | None = None
    store_rss_peak_mib: float | None = None
    verified: bool | None = None
    server_cpu_s: float = 0.0
    store_cpu_s: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def mib_s(self) -> float:
        return self.size / MiB / self.seconds


def run_curl(
    label: str, command: list[str], size: int, server_pid: int, stdin_file: Path | None = None, timeout: float = 180
) -> Upload:
    store_pids = children(server_pid)
    store_peak = [0]
    stop = threading.Event()

    def watch_store() -> None:
        while not stop.is_set():
            for pid in store_pids:
                store_peak[0] = max(store_peak[0], rss_kib(pid))
            stop.wait(0.05)

    watcher = threading.Thread(target=watch_store, daemon=True)
    watcher.start()
    cpu_before = cpu_seconds(server_pid), sum(cpu_seconds(p) for p in store_pids)
    with RssSampler(server_pid) as sampler:
        started = time.perf_counter()
        if stdin_file is None:
            done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        else:
            cat = subprocess.Popen(["cat", str(stdin_file)], stdout=subprocess.PIPE)
            try:
                done = subprocess.run(command, stdin=cat.stdout, capture_output=True, text=True, timeout=timeout)
            finally:
                cat.stdout.close()
                cat.wait(timeout=30)
        seconds = time.perf_counter() - started
    stop.set()
    watcher.join()
    server_cpu = cpu_seconds(server_pid) - cpu_before[0]
    store_cpu = sum(cpu_seconds(p) for p in store_pids) - cpu_before[1]
    if done.returncode != 0:
        raise RuntimeError(f"{label}: curl failed ({done.returncode}): {done.stderr.strip()} {done.stdout[-500:]}")
    # -w output is the last line; a JSON body (if any) precedes it.
    lines = done.stdout.strip().splitlines()
    code = lines[-1].split()[0] if lines else "?"
    upload = Upload(label, seconds, size, code, detail=" ".join(lines[:-1])[:300])
    upload.server_rss_growth_mib = sampler.growth_mib
    upload.server_hwm_delta_mib = (sampler.hwm_after - sampler.hwm_before) / 1024
    upload.store_rss_peak_mib = store_peak[0] / 1024 if store_pids else None
    upload.extra["curl_w"] = lines[-1] if lines else ""
    upload.server_cpu_s = server_cpu
    upload.store_cpu_s = store_cpu
    return upload


# ------------------------------------------------------------------ (d) 307 latency


def put_redirect_once(port: int, path: str, token: str, length: int) -> float:
    """Seconds from connect to the end of the 307's headers; the body is never sent."""
    request = (
        f"PUT {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\nUser-Agent: kgpu-bench\r\nAccept: */*\r\n"
        f"Authorization: Bearer {token}\r\nContent-Length: {length}\r\nExpect: 100-continue\r\n\r\n"
    ).encode()
    started = time.perf_counter()
    with socket.create_connection((HOST, port), timeout=10) as sock:
        sock.sendall(request)
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = sock.recv(65536)
            if not chunk:
                break
            buf += chunk
        elapsed = time.perf_counter() - started
    status_line = buf.split(b"\r\n", 1)[0]
    if not status_line.startswith(b"HTTP/1.1 307") or b"\r\nlocation: " not in buf.lower():
        raise RuntimeError(f"PUT {path} with Expect answered {status_line!r}, not a 307 (the body was not sent)")
    return elapsed


def redirect_latency(port: int, token: str, count: int, tag: str) -> dict:
    for i in range(10):  # warm-up: auth cache, connection pools, code paths
        put_redirect_once(port, f"/v1/files/lat/warm-{tag}-{i}.bin", token, 1024)
    times = [put_redirect_once(port, f"/v1/files/lat/{tag}-{i}.bin", token, 1024) for i in range(count)]
    return {
        "n": count,
        "median_ms": statistics.median(times) * 1000,
        "p95_ms": pct(times, 0.95) * 1000,
        "max_ms": max(times) * 1000,
    }


def interleaved_latency(port: int, tokens: dict[str, str], count: int) -> dict:
    """The same measurement for several users, one request each in turn, so drift hits all alike."""
    times: dict[str, list[float]] = {name: [] for name in tokens}
    for name, token in tokens.items():
        for i in range(10):
            put_redirect_once(port, f"/v1/files/lat/warm-il-{i}.bin", token, 1024)
    for i in range(count):
        for name, token in tokens.items():
            times[name].append(put_redirect_once(port, f"/v1/files/lat/il-{i}.bin", token, 1024))
    return {
        name: {"n": count, "median_ms": statistics.median(t) * 1000, "p95_ms": pct(t, 0.95) * 1000, "max_ms": max(t) * 1000}
        for name, t in times.items()
    }


def write_objects_on_disk(data_dir: Path, user_id: int, count: int, per_dir: int = 1000) -> float:
    """``count`` small files under users/{id}/bulk/ in the embedded store's directory (it serves it as is)."""
    started = time.perf_counter()
    base = data_dir / "objects" / "kgpu" / "users" / str(user_id) / "bulk"
    payload = b"kgpu bench object\n"
    for i in range(count):
        folder = base / f"d{i // per_dir:04d}"
        if i % per_dir == 0:
            folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder / f"f{i:07d}.txt", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.write(fd, payload)
        os.close(fd)
    return time.perf_counter() - started


def visible_objects(s3, user_id: int, count: int, per_dir: int = 1000) -> bool:
    """Does the store list what was written on disk? (First folder and last folder, delimited.)"""
    prefix = f"users/{user_id}/bulk/"
    folders = s3.list_objects_v2(Bucket="kgpu", Prefix=prefix, Delimiter="/", MaxKeys=1000)
    want_folders = -(-count // per_dir)
    if len(folders.get("CommonPrefixes", [])) != min(want_folders, 1000):
        return False
    last = f"{prefix}d{(count - 1) // per_dir:04d}/"
    listed = s3.list_objects_v2(Bucket="kgpu", Prefix=last, MaxKeys=1000).get("KeyCount", 0)
    return listed == count - (count - 1) // per_dir * per_dir


def count_objects(s3, user_id: int) -> tuple[int, float]:
    started = time.perf_counter()
    total = 0
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket="kgpu", Prefix=f"users/{user_id}/"):
        total += page.get("KeyCount", 0)
    return total, time.perf_counter() - started


# ------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    parser = bench_parser(__doc__)
    parser.add_argument("--size-mib", type=int, default=1024, help="size of the big upload (default 1024)")
    parser.add_argument("--objects", type=int, default=100_000, help="objects put in the drive for (d) (default 100000)")
    parser.add_argument("--latency-requests", type=int, default=200, help="PUT 307 requests per latency figure")
    parser.add_argument("--duration", type=float, default=5, help="seconds of each load run in (a)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating load rounds per server in (a)")
    parser.add_argument("--connections", type=int, default=16, help="keep-alive connections in (a)")
    parser.add_argument("--threads", type=int, default=1, help="load generator threads in (a) (wrk -t)")
    parser.add_argument("--loadgen", choices=["auto", "wrk", "python"], default="auto")
    parser.add_argument("--count-objects", action="store_true", help="also time a full listing of the drive in (d)")
    parser.add_argument("--only", default="abcd", help="which parts to run, e.g. 'ad' (default abcd)")
    add_run_options(parser)
    parser.add_argument("--serve-bare-302", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--serve-bare-asgi-302", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_bare_302:
        serve_bare_302(args.serve_bare_302)
        return 0
    if args.serve_bare_asgi_302:
        serve_bare_asgi_302(args.serve_bare_asgi_302)
        return 0

    loadgen = args.loadgen
    if loadgen == "auto":
        loadgen = "wrk" if shutil.which("wrk") else "python"
    if loadgen == "wrk" and not shutil.which("wrk"):
        parser.error("wrk not found (apt-get install -y wrk), use --loadgen python")
    size = args.size_mib * MiB

    arm_time_limit(args.time_limit)
    # The big file, one object of its size, and the small objects.
    tmp, fast, data_dir, log_dir = make_dirs("kgpu-bench-", args.tmp, 2 * size + (1 << 30), args.on_disk)
    procs: list[Proc] = []
    log(f"temporary directory {tmp}, objects and the big file in {fast}")
    results: dict = {"tmp": str(tmp), "fast": str(fast), "config": {k: v for k, v in vars(args).items() if not k.startswith("serve_bare")}, "loadgen": loadgen}
    run_started = time.monotonic()
    results["loadavg_start"] = os.getloadavg()
    try:
        kgpu, admin_token = start_bench_server(procs, data_dir, log_dir, args.src)
        port, base = kgpu.port, kgpu.base
        created = new_user(base, admin_token, "bench@example.org")
        token, user_id = created["token"], created["user"]["id"]
        log(f"user {user_id} created")

        # ---------------------------------------------------------------- (d) at 0 objects, first:
        # the drive must be empty, and the first request also creates the usage row (a one-off listing).
        if "d" in args.only:
            started = time.perf_counter()
            put_redirect_once(port, "/v1/files/lat/first.bin", token, 1024)
            results["d_first_request_ms"] = (time.perf_counter() - started) * 1000
            log("(d) PUT 307 latency at 0 objects")
            results["d_empty"] = redirect_latency(port, token, args.latency_requests, "empty")

        # ---------------------------------------------------------------- (a)
        if "a" in args.only:
            bares = {kind: start_bare(free_port(), log_dir, kind) for kind in BARE_SERVERS}
            procs.extend(bares.values())
            workers_port = free_port()
            kgpu2 = start_kgpu(tmp / "data-2-workers", workers_port, admin_token, log_dir, 2, args.src, {"KGPU_WORKERS": "2"})
            procs.append(kgpu2)
            token2 = new_user(kgpu2.base, admin_token, "bench@example.org")["token"]
            location = check_302(port, "/v1/files/x", token)
            check_302(workers_port, "/v1/files/x", token2)
            for bare in bares.values():
                check_302(bare.port, "/v1/files/x", None)
            results["a_location_example"] = location
            load = load_wrk if loadgen == "wrk" else load_python
            # The same file again and again (the case; its 302 is signed once a second), and a
            # new name each request (each one signed).
            servers = {f"bare_{kind}": (bare, None, "/v1/files/x") for kind, bare in bares.items()} | {
                "kgpu": (kgpu, token, "/v1/files/x"), "kgpu_2_workers": (kgpu2, token2, "/v1/files/x"),
                "kgpu_distinct": (kgpu, token, f"/v1/files/many/f{DISTINCT}.bin"),
            }
            runs: dict[str, list[dict]] = {name: [] for name in servers}
            # a short warm-up of each, then alternate rounds so drift hits all alike
            for proc, auth, path in servers.values():
                load(proc.port, path, auth, 1, args.connections, args.threads)
            for r in range(args.rounds):
                log(f"(a) round {r + 1}/{args.rounds}: bare ASGI 302, bare FastAPI 302, then GET /v1/files/x with 1 and 2 workers, "
                    "and a new name each request")
                for name, (proc, auth, path) in servers.items():
                    runs[name].append(
                        measured_load(load, proc.pid, proc.port, path, auth, args.duration, args.connections, args.threads)
                    )
            for proc in (*bares.values(), kgpu2):
                proc.stop()
                procs.remove(proc)
            rps = {name: statistics.median(r["rps"] for r in rs) for name, rs in runs.items()}
            cpu = {name: statistics.median(r["server_cpu_us_per_request"] for r in rs) for name, rs in runs.items()}
            results["a"] = {
                "runs": runs, "rps": rps, "cpu_us": cpu,
                "ratio": rps["kgpu"] / rps["bare_asgi"], "ratio_fastapi": rps["kgpu"] / rps["bare_fastapi"],
                "ratio_2_workers": rps["kgpu_2_workers"] / rps["bare_asgi"], "workers_gain": rps["kgpu_2_workers"] / rps["kgpu"],
                "cpu_ratio": cpu["bare_asgi"] / cpu["kgpu"], "ratio_distinct": rps["kgpu_distinct"] / rps["bare_asgi"],
            }

        # ---------------------------------------------------------------- (b) (c)
        if "b" in args.only or "c" in args.only:
            big = fast / "big.bin"
            log(f"writing a {args.size_mib} MiB random file")
            source_sha = make_file(big, size)
            uploads: list[Upload] = []
            fmt = ["-w", "\n%{http_code} redirects=%{num_redirects} up=%{size_upload} t=%{time_total}\n"]
            auth = ["-H", f"Authorization: Bearer {token}"]

            def direct(n: int) -> Upload:
                # The size is declared, as a client that knows it does: a mint without one holds all
                # the room left until its object appears (removed here once checked) or it expires.
                url = http_json("POST", f"{base}/v1/files/big/direct-{n}.bin", token,
                                headers={"X-Content-Length": str(size)})["url"]
                return run_curl(
                    f"direct presigned PUT #{n}", ["curl", "-sS", "-f", "-o", "/dev/null", *fmt, "-T", str(big), url],
                    size, kgpu.pid,
                )

            def direct_multipart(n: int) -> Upload:
                # What a client that does not know its length can do at best: a multipart upload
                # straight to the store, in the gateway's parts of a body of unknown length, sent in
                # order on one connection as the gateway sends them, then completed. Its parts are
                # cut and signed (their ETags, the parts' MD5s, known) before the clock starts.
                key = f"users/{user_id}/big/direct-multipart-{n}.bin"
                s3 = store_client(data_dir, store_endpoint(kgpu))
                upload_id = s3.create_multipart_upload(Bucket=STORE_BUCKET, Key=key)["UploadId"]
                lines, parts, files = [], [], []
                with open(big, "rb") as f:
                    while chunk := f.read(UNKNOWN_LENGTH_PART_BYTES):
                        number = len(files) + 1
                        files.append(fast / f"part-{number}")
                        files[-1].write_bytes(chunk)
                        url = s3.generate_presigned_url("upload_part", ExpiresIn=3600, Params={
                            "Bucket": STORE_BUCKET, "Key": key, "UploadId": upload_id, "PartNumber": number})
                        lines += [f'url = "{url}"', f'upload-file = "{files[-1]}"', 'output = "/dev/null"']
                        parts.append(f'<Part><PartNumber>{number}</PartNumber><ETag>"{hashlib.md5(chunk).hexdigest()}"</ETag></Part>')
                config, complete = fast / "parts.curl", fast / "complete.xml"
                config.write_text("\n".join(lines) + "\n")
                complete.write_text(f"<CompleteMultipartUpload>{''.join(parts)}</CompleteMultipartUpload>")
                done_url = s3.generate_presigned_url("complete_multipart_upload", HttpMethod="POST", ExpiresIn=3600,
                                                     Params={"Bucket": STORE_BUCKET, "Key": key, "UploadId": upload_id})
                try:
                    return run_curl(
                        f"direct presigned multipart #{n} ({UNKNOWN_LENGTH_PART_BYTES // MiB} MiB parts)",
                        ["sh", "-c", 'curl -sS -f -K "$1" && curl -sS -f -o /dev/null -X POST --data-binary @"$2" '
                         f'{fmt[0]} "$3" "$4"', "sh", str(config), str(complete), fmt[1], done_url],
                        size, kgpu.pid,
                    )
                finally:
                    for path in (*files, config, complete):
                        path.unlink()

            gateway_steps = []
            if "b" in args.only:
                gateway_steps.append((
                    "redirect-307",
                    lambda: run_curl(
                        "gateway 307 (curl -L -T, Expect: 100-continue)",
                        ["curl", "-sS", "-f", "-L", "-o", "/dev/null", *fmt, *auth, "-H", "Expect: 100-continue",
                         "-T", str(big), f"{base}/v1/files/big/redirect-307.bin"],
                        size, kgpu.pid,
                    ),
                ))
            if "c" in args.only:
                gateway_steps.append((
                    "streamed",
                    lambda: run_curl(
                        "gateway streamed (curl -T file, Expect:)",
                        ["curl", "-sS", "-f", *fmt, *auth, "-H", "Expect:", "-T", str(big),
                         f"{base}/v1/files/big/streamed.bin"],
                        size, kgpu.pid,
                    ),
                ))
                gateway_steps.append((
                    "streamed-chunked",
                    lambda: run_curl(
                        "gateway streamed chunked (cat | curl -T -, Expect:)",
                        ["curl", "-sS", "-f", *fmt, *auth, "-H", "Expect:", "-T", "-",
                         f"{base}/v1/files/big/streamed-chunked.bin"],
                        size, kgpu.pid, stdin_file=big,
                    ),
                ))
            # Every gateway upload sits between two direct ones and is compared with their mean, so that
            # drift (other load on the machine) hits both sides of each ratio alike; the chunked one
            # also between two direct multipart uploads, its own lower bound.
            plan = [("direct-1", lambda: direct(1))]
            for n, step in enumerate(gateway_steps, start=2):
                if step[0] == "streamed-chunked":
                    plan += [("direct-multipart-1", lambda: direct_multipart(1)), step,
                             ("direct-multipart-2", lambda: direct_multipart(2))]
                else:
                    plan.append(step)
                plan.append((f"direct-{n}", lambda n=n: direct(n)))
            by_name: dict[str, Upload] = {}
            for name, step in plan:
                log(f"(b/c) upload: {name}")
                upload = step()
                got_sha, got_size = download_sha256(f"{base}/v1/files/big/{name}.bin", token)
                upload.verified = got_sha == source_sha and got_size == size
                if not upload.verified:
                    raise RuntimeError(f"{name}: downloaded object differs (size {got_size}, sha256 {got_sha})")
                # Free the space as we go. The store keeps each object as a plain file; removing it there
                # avoids DELETE's HEAD, for which rclone serve s3 reads the whole file to compute its MD5.
                (data_dir / "objects" / "kgpu" / "users" / str(user_id) / "big" / f"{name}.bin").unlink()
                uploads.append(upload)
                by_name[name] = upload
                log(f"    {upload.seconds:.2f} s, {upload.mib_s:.0f} MiB/s, server RSS +{upload.server_rss_growth_mib:.1f} MiB, "
                    f"CPU server {upload.server_cpu_s:.2f} s store {upload.store_cpu_s:.2f} s, sha256 ok")
            big.unlink()
            results["uploads"] = {u.label: u.__dict__ | {"mib_s": u.mib_s} for u in uploads}
            directs = [u for u in uploads if u.label.startswith("direct presigned PUT")]
            results["direct_mean_s"] = statistics.mean(u.seconds for u in directs)
            results["upload_ratios"], results["multipart_ratios"] = {}, {}
            names = [name for name, _ in plan]

            def around(i: int, prefix: str) -> float:
                """The mean time of the nearest uploads named ``prefix…`` before and after step ``i``."""
                before = next(n for n in reversed(names[:i]) if n.startswith(prefix))
                after = next(n for n in names[i + 1:] if n.startswith(prefix))
                return statistics.mean([by_name[before].seconds, by_name[after].seconds])

            for i, name in enumerate(names):
                if name.startswith("direct"):
                    continue
                label = by_name[name].label
                results["upload_ratios"][label] = around(i, "direct-") / by_name[name].seconds
                if name == "streamed-chunked":
                    results["multipart_ratios"][label] = around(i, "direct-multipart-") / by_name[name].seconds

        # ---------------------------------------------------------------- (d) at N objects
        if "d" in args.only:
            log(f"(d) writing {args.objects} objects into the store's directory")
            results["d_write_objects_s"] = write_objects_on_disk(data_dir, user_id, args.objects)
            s3 = store_client(data_dir, store_endpoint(kgpu))
            restarted = False
            if not visible_objects(s3, user_id, args.objects):
                # The store caches directory listings: restart so it reads the directory afresh.
                log("(d) the store does not list them yet: restarting kgpu serve on the same data directory")
                kgpu.stop()
                procs.remove(kgpu)
                kgpu = start_kgpu(data_dir, port, admin_token, log_dir, 2, args.src)
                procs.append(kgpu)
                s3 = store_client(data_dir, store_endpoint(kgpu))
                restarted = True
                if not visible_objects(s3, user_id, args.objects):
                    raise RuntimeError("the store does not list the objects written on disk")
            results["d_restarted"] = restarted
            if args.count_objects:
                total, seconds = count_objects(s3, user_id)
                results["d_full_listing"] = {"objects": total, "seconds": seconds}
            log(f"(d) PUT 307 latency at {args.objects} objects")
            results["d_full"] = redirect_latency(port, token, args.latency_requests, "full")
            results["d_ratio_median"] = results["d_full"]["median_ms"] / results["d_empty"]["median_ms"]
            results["d_ratio_p95"] = results["d_full"]["p95_ms"] / results["d_empty"]["p95_ms"]
            # The same comparison made robust to drift: a second user with an empty drive, requests alternated.
            other = new_user(base, admin_token, "bench-empty@example.org")
            put_redirect_once(port, "/v1/files/lat/first.bin", other["token"], 1024)
            log(f"(d) interleaved: user with {args.objects} objects vs a user with an empty drive")
            results["d_interleaved"] = interleaved_latency(
                port, {"full": token, "empty": other["token"]}, args.latency_requests
            )
        results["total_seconds"] = time.monotonic() - run_started
        results["loadavg_end"] = os.getloadavg()
    finally:
        end_run(args, procs, (tmp, fast))

    publish(args, results, report(results, args))
    return 0


def report(results: dict, args) -> list[str]:
    def rounds(a: dict, name: str) -> str:
        return ", ".join(f"{r['rps']:.0f}" for r in a["runs"][name])

    out = ["", "kgpu files benchmark (127.0.0.1, one uvicorn worker each, and kgpu with two in (a))",
           f"data directory (SQLite) {results['tmp']}/data, store objects and the big file in {results['fast']}", ""]
    if "a" in results:
        a = results["a"]
        out.append(f"(a) GET /v1/files/x 302, {results['loadgen']}, {args.connections} connections, "
                   f"{args.rounds} x {args.duration:g} s each, median of rounds")
        labels = {"bare_asgi": "bare ASGI constant 302", "bare_fastapi": "bare FastAPI constant 302",
                  "kgpu": "kgpu GET /v1/files/x", "kgpu_2_workers": "kgpu, 2 workers",
                  "kgpu_distinct": "kgpu, a new name each"}
        for name, label in labels.items():
            out.append(f"    {label:26s}: {a['rps'][name]:9.0f} req/s, server CPU {a['cpu_us'][name]:4.0f} us/request   "
                       f"(rounds: {rounds(a, name)})")
        out.append(f"    kgpu / bare FastAPI: {a['ratio_fastapi']:.2f}; server CPU per request bare ASGI / kgpu "
                   f"{a['cpu_ratio']:.2f} (the throughput ratio on an otherwise idle core)")
        bad = sum(r["non_2xx_3xx"] for rs in a["runs"].values() for r in rs)
        out.append(f"    ratio kgpu / bare ASGI {a['ratio']:.2f} (target >= 0.5: {verdict(a['ratio'] >= 0.5)}); non-2xx/3xx answers: {bad}")
        out.append(f"    a new name each request (each one signed), / bare ASGI: {a['ratio_distinct']:.2f}")
        out.append(f"    2 workers: / bare ASGI (one process) {a['ratio_2_workers']:.2f}, / 1 worker {a['workers_gain']:.2f} "
                   f"(the load generator shares the {os.cpu_count()} cores)")
        out.append("")
    if "uploads" in results:
        out.append(f"(b)(c) {args.size_mib} MiB uploads, each verified by sha256 of a curl -L download")
        for label, u in results["uploads"].items():
            ratio = results["upload_ratios"].get(label)
            extra = f"  ratio {ratio:.2f}" if ratio else ""
            store = f", store RSS peak {u['store_rss_peak_mib']:.0f} MiB" if u["store_rss_peak_mib"] else ""
            out.append(f"    {label:50s} {u['seconds']:6.2f} s {u['mib_s']:6.0f} MiB/s  HTTP {u['http_code']}{extra}")
            out.append(f"    {'':50s} server RSS +{u['server_rss_growth_mib']:.1f} MiB (VmHWM +{u['server_hwm_delta_mib']:.1f}){store}; "
                       f"CPU s: server {u['server_cpu_s']:.2f} ({u['server_cpu_s'] * 1000 / args.size_mib:.2f} ms/MiB), "
                       f"store {u['store_cpu_s']:.2f}")
        out.append(f"    ratio: mean time of the nearest direct PUT before and after each gateway upload / its time "
                   f"(all direct PUTs: mean {results['direct_mean_s']:.2f} s)")
        targets = {"gateway 307": 0.9, "gateway streamed": 0.8}
        for label, ratio in results["upload_ratios"].items():
            target = next(t for k, t in targets.items() if label.startswith(k))
            upload = results["uploads"][label]
            growth, cpu = upload["server_rss_growth_mib"], upload["server_cpu_s"] * 1000 / args.size_mib
            note = (f", server CPU {cpu:.2f} ms/MiB (target <= 2: {verdict(cpu <= 2)}), "
                    f"RSS growth {growth:.1f} MiB (target <= 64: {verdict(growth <= 64)})") if "streamed" in label else ""
            out.append(f"    {label}: ratio {ratio:.2f} (target >= {target}: {verdict(ratio >= target)}){note}")
        for label, ratio in results.get("multipart_ratios", {}).items():
            out.append(f"    {label}: / the same parts sent straight to the store (direct presigned multipart, "
                       f"mean of the two around it) {ratio:.2f}")
        out.append("")
    if "d_full" in results:
        e, f = results["d_empty"], results["d_full"]
        out.append(f"(d) PUT 307 answer time (raw socket: connect, headers with Expect: 100-continue, status+headers read), "
                   f"{e['n']} requests each")
        out.append(f"    first request for the user (creates its usage row): {results['d_first_request_ms']:.1f} ms")
        out.append(f"    0 objects          : median {e['median_ms']:6.2f} ms  p95 {e['p95_ms']:6.2f} ms  max {e['max_ms']:6.2f} ms")
        out.append(f"    {args.objects:>7d} objects    : median {f['median_ms']:6.2f} ms  p95 {f['p95_ms']:6.2f} ms  max {f['max_ms']:6.2f} ms"
                   f"{'  (server restarted after writing them)' if results['d_restarted'] else ''}")
        out.append(f"    ratio median {results['d_ratio_median']:.2f}, p95 {results['d_ratio_p95']:.2f} "
                   f"(target <= 1.5: {verdict(max(results['d_ratio_median'], results['d_ratio_p95']) <= 1.5)})")
        il = results["d_interleaved"]
        out.append(f"    interleaved, same moment: {args.objects} objects median {il['full']['median_ms']:.2f} ms p95 "
                   f"{il['full']['p95_ms']:.2f} ms; second user, empty drive: median {il['empty']['median_ms']:.2f} ms p95 "
                   f"{il['empty']['p95_ms']:.2f} ms; ratio median {il['full']['median_ms'] / il['empty']['median_ms']:.2f}, "
                   f"p95 {il['full']['p95_ms'] / il['empty']['p95_ms']:.2f}")
        out.append(f"    objects written in {results['d_write_objects_s']:.1f} s")
        if "d_full_listing" in results:
            fl = results["d_full_listing"]
            out.append(f"    a full listing of the drive (what a reconcile costs): {fl['objects']} objects in {fl['seconds']:.1f} s")
        out.append("")
    return out


if __name__ == "__main__":
    sys.exit(main())
