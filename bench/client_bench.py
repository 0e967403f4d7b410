#!/usr/bin/env python3
"""Benchmark of ``kgpu cp -r`` against its lower bounds, on 127.0.0.1 only.

Starts its own ``kgpu serve`` (embedded ``rclone serve s3``, SQLite, a temporary data
directory), makes a user through the admin API and logs a client in (a config directory of its
own), writes a tree of ``--files`` (64) random files of ``--file-mib`` (16) MiB, then, for
``--rounds`` (3) rounds, each alternated:

  up    ``kgpu cp -r TREE kgpu:up-N -j J``
        vs  the same files by parallel direct presigned PUTs: one ``curl --parallel --parallel-max J``
            over URLs minted beforehand (untimed), so only the bytes' trip to the store counts
        vs  ``rclone copy TREE :webdav:up-N --transfers J``
  down  ``kgpu cp -r kgpu:src LOCAL -j J``  vs  ``rclone copy :webdav:src LOCAL --transfers J``

and, first, the gateway's CPU to mint URLs for the tree's files: one mint a file against one batch
mint (``POST /v1/files/FOLDER/?mint``), alternated, medians.

rclone runs the way the WebDAV guide says (``--webdav-vendor owncloud``, the Bearer header in its
environment) with the same parallelism (``--transfers J --checkers max(8, J)``), against the same
server. Each upload goes to a fresh folder (deleted after the round), each download into an empty
folder; wall time includes process start-up (what a user waits for). Prints MiB/s per round, the
medians and the ratios: up kgpu/direct PUTs (goal >= 0.8), down kgpu/rclone (goal >= 0.9).
``--src DIR`` runs both the server and the client from another checkout (an A/B: ``git archive``).
"""

from __future__ import annotations

import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402  (this folder's shared bench code)

MiB = harness.MiB


def make_tree(root: Path, files: int, file_mib: int) -> int:
    root.mkdir(parents=True)
    block = os.urandom(MiB)
    for i in range(files):
        sub = root / f"shard-{i % 4}"
        sub.mkdir(exist_ok=True)
        with open(sub / f"part-{i:03d}.bin", "wb") as f:
            for j in range(file_mib):
                f.write(block[j:] + block[:j] + i.to_bytes(4, "big"))  # every file different
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def timed(command: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    done = subprocess.run(command, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{command[:3]} exited {done.returncode}: {done.stderr[-2000:]}")
    return elapsed


def direct_puts(tree: Path, base: str, token: str, folder: str, transfers: int, work: Path) -> float:
    """Seconds for one curl to PUT every file of ``tree`` to presigned URLs minted beforehand."""
    lines = []
    for path in sorted(p for p in tree.rglob("*") if p.is_file()):
        route = f"{base}/v1/files/{folder}/{path.relative_to(tree).as_posix()}"
        grant = harness.http_json("POST", route, token, headers={"X-Content-Length": str(path.stat().st_size)})
        lines += [f'url = "{grant["url"]}"', f'upload-file = "{path}"', 'output = "/dev/null"']
    config = work / "direct.curl"
    config.write_text("\n".join(lines) + "\n")
    # --retry: rclone serve s3 now and then answers one of many PUTs at once 500; kgpu cp sends it again too.
    command = ["curl", "-fsS", "--no-progress-meter", "--retry", "3", "--retry-delay", "0", "--parallel",
               "--parallel-max", str(transfers), "-K", str(config)]
    return timed(command, dict(os.environ))


def mint_cpu(server: harness.Proc, base: str, token: str, tree: Path, rounds: int) -> dict[str, float]:
    """The gateway's CPU seconds to mint URLs for every file of ``tree``: one mint a file (what
    kgpu cp did before batch mints) against one batch mint (``?mint``), alternated, medians."""
    paths = sorted(p.relative_to(tree).as_posix() for p in tree.rglob("*") if p.is_file())
    size = (tree / paths[0]).stat().st_size
    spent: dict[str, list[float]] = {"single": [], "batch": []}
    for n in range(rounds):
        for kind in ("single", "batch") if n % 2 == 0 else ("batch", "single"):
            before = harness.server_cpu_seconds(server.pid)
            if kind == "single":
                for path in paths:
                    harness.http_json("POST", f"{base}/v1/files/mint-{kind}-{n}/{path}", token,
                                      headers={"X-Content-Length": str(size), "X-OC-Mtime": "1700000000"})
            else:
                files = [{"path": path, "size": size, "mtime": 1700000000} for path in paths]
                minted = harness.http_json("POST", f"{base}/v1/files/mint-{kind}-{n}/?mint", token, {"files": files})
                assert minted["minted"] == len(paths), minted
            spent[kind].append(harness.server_cpu_seconds(server.pid) - before)
    return {kind: statistics.median(values) for kind, values in spent.items()}


def main(argv: list[str] | None = None) -> int:
    parser = harness.bench_parser(__doc__)
    parser.add_argument("--files", type=int, default=64)
    parser.add_argument("--file-mib", type=int, default=16)
    parser.add_argument("--transfers", "-j", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument("--src", help="run the server and the client from this source tree (first on PYTHONPATH)")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="kgpu-client-bench-"))
    admin_token = "bench-" + secrets.token_hex(8)
    server = None
    try:
        port = harness.free_port()
        server = harness.start_kgpu(work / "data", port, admin_token, work, 0, args.src)
        base = server.base
        token = harness.new_user(base, admin_token, "bench-client@example.org")["token"]
        tree = work / "tree"
        total = make_tree(tree, args.files, args.file_mib)
        harness.log(f"tree: {args.files} files x {args.file_mib} MiB = {total / MiB:.0f} MiB; -j {args.transfers}")

        clean = {k: v for k, v in os.environ.items() if not k.startswith(("KGPU_", "RCLONE_"))}
        kgpu_env = {**clean, "XDG_CONFIG_HOME": str(work / "config"), "XDG_STATE_HOME": str(work / "state")}
        if args.src:  # the client of that checkout too
            kgpu_env["PYTHONPATH"] = str(Path(args.src).resolve())
        kgpu = str(harness.VENV_BIN / "kgpu")
        login = subprocess.run([kgpu, "login", "--base-url", base], input=token + "\n", env=kgpu_env,
                               capture_output=True, text=True)
        if login.returncode != 0:
            raise RuntimeError(f"kgpu login: {login.stderr}")
        rclone_env = {**clean, "RCLONE_WEBDAV_HEADERS": f"Authorization,Bearer {token}"}
        rclone = [harness.rclone_binary(), "--config", os.devnull]
        dav = ["--webdav-url", f"{base}/v1/files/", "--webdav-vendor", "owncloud"]
        parallel = ["--transfers", str(args.transfers), "--checkers", str(max(8, args.transfers))]
        j = ["-j", str(args.transfers)]

        # Another user's drive: the URLs minted here stay out (held) until they expire.
        minter = harness.new_user(base, admin_token, "bench-minter@example.org")["token"]
        mints = mint_cpu(server, base, minter, tree, args.rounds)

        # The source of the downloads, uploaded once.
        timed([kgpu, "cp", "-r", str(tree), "kgpu:src", *j], kgpu_env)

        kinds = ("up kgpu", "up direct", "up rclone", "down kgpu", "down rclone")
        results: dict[str, list[float]] = {k: [] for k in kinds}
        for n in range(args.rounds):
            order = ("kgpu", "rclone") if n % 2 == 0 else ("rclone", "kgpu")
            ups = ("kgpu", "direct", "rclone") if n % 2 == 0 else ("rclone", "direct", "kgpu")
            for who in ups:
                folder = f"up-{who}-{n}"
                if who == "kgpu":
                    seconds = timed([kgpu, "cp", "-r", str(tree), f"kgpu:{folder}", *j], kgpu_env)
                elif who == "direct":
                    seconds = direct_puts(tree, base, token, folder, args.transfers, work)
                else:
                    seconds = timed([*rclone, "copy", str(tree), f":webdav:{folder}", *dav, *parallel], rclone_env)
                results[f"up {who}"].append(total / MiB / seconds)
                timed([kgpu, "rm", "-r", f"kgpu:{folder}"], kgpu_env)
            for who in order:
                target = work / f"down-{who}-{n}"
                if who == "kgpu":
                    seconds = timed([kgpu, "cp", "-r", "kgpu:src", str(target), *j], kgpu_env)
                else:
                    seconds = timed([*rclone, "copy", ":webdav:src", str(target), *dav, *parallel], rclone_env)
                results[f"down {who}"].append(total / MiB / seconds)
                shutil.rmtree(target)
            harness.log("round %d: " % n + ", ".join(f"{k} {v[-1]:.0f} MiB/s" for k, v in results.items()))

        print(f"\nkgpu cp -r vs its lower bounds: {args.files} x {args.file_mib} MiB ({total / MiB:.0f} MiB), "
              f"-j {args.transfers}, {args.rounds} rounds, medians; load average {open('/proc/loadavg').read().strip()}")
        print(f"  mints  gateway CPU for {args.files} URLs: one mint a file {mints['single'] * 1000:.0f} ms, "
              f"one batch mint {mints['batch'] * 1000:.0f} ms")
        median = {k: statistics.median(v) for k, v in results.items()}
        for direction, bound, goal in (("up", "direct", 0.8), ("up", "rclone", None), ("down", "rclone", 0.9)):
            mine, theirs = median[f"{direction} kgpu"], median[f"{direction} {bound}"]
            verdict = "" if goal is None else f" (goal >= {goal}: {'ok' if mine / theirs >= goal else 'BELOW GOAL'})"
            label = "direct presigned PUTs" if bound == "direct" else "rclone copy"
            print(f"  {direction:4}  kgpu {mine:7.1f} MiB/s   {label} {theirs:7.1f} MiB/s   ratio {mine / theirs:.2f}{verdict}")
        return 0
    finally:
        if server is not None:
            server.stop()
        if args.keep:
            harness.log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
