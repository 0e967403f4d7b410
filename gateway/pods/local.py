"""The ``local`` pod backend: a rental is a sandbox on this host (gateway/pods/sandbox.py).

A pod is ``{data_dir}/pods/{rental_id}/`` (root-owned, mode 0711) holding:

- ``pod.json`` (0600, the gateway's record: uid, image, environment without the token,
  the holder's and relay's pids), never seen by the pod;
- ``workspace/`` and ``tmp/`` (the pod's ``/workspace`` and ``/tmp``, owned by the pod's uid;
  the runner keeps run state under ``/tmp/kgpu/runs/``);
- ``secret/token`` (the in-pod token, readable by the pod's uid only, bound read-only at
  ``/run/kgpu/token``; the gateway keeps only its hash in the database);
- with mounts on, ``mnt/shared`` and ``mnt/files`` (the rclone mounts kgpu-bootstrap makes on the
  host as the server's user, owned by and open to the pod's uid alone, bound at /shared and
  /files) and ``state/`` (the bootstrap's status, logs, caches and remote-control sockets, out of
  the pod's sight).

Modes, chosen once at start-up (``mode``):

- ``isolated`` (the server runs as root): each pod has a uid of its own and its own network
  namespace, reaching only the API base and the object store through ``relay.py``;
- ``same-user`` (``trusted_single_user`` and the server is not root): the same sandbox under the
  server's own uid, sharing the host's network; for one trusted user on a workstation;
- ``none`` (``trusted_single_user`` and no bubblewrap): runs are plain processes of the server's
  user.

Without root or bubblewrap, and without ``trusted_single_user``, the backend refuses to rent
and says why. GPUs are pinned with ``CUDA_VISIBLE_DEVICES``/``NVIDIA_VISIBLE_DEVICES``. Pods and
their runs are sessions of their own, so they outlive a gateway killed with SIGKILL.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import json
import logging
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import replace
from pathlib import Path
from urllib.parse import urlsplit

from bootstrap import script_path
from drive.rclone import rclone_binary
from gateway.pods import (
    READ_CHUNK,
    NO_INPUT,
    RUNS_DIR,
    SIGNAL_SCRIPT,
    TERM_ALL_SCRIPT,
    TOKEN_PATH,
    WAIT_TICKS_PER_SECOND,
    PodCommand,
    PodError,
    PodSpec,
    PodStartError,
    PodStatus,
    RunInput,
    RunState,
    cpu_ticks,
    login_command,
    run_command,
    run_float,
    run_int,
    safe_run_id,
)
from gateway.inventory import gpus_busy
from gateway.pods.bounded import CALL_TIMEOUT_S, run_bounded
from gateway.pods.disk import bind, disk_used, make_disk, release_disk
from gateway.pods.mounts import MAX_FLUSH_REPORT, bootstrap_status
from gateway.pods.relay import connect_in_namespace
from gateway.pods.slots import call_slots
from gateway.pods.tree import TreeTooLarge, disk_usage, remove_tree
from gateway.pods.sandbox import (
    HOLDER_ENV,
    SMALL_TMPFS,
    SandboxUnavailable,
    UidPool,
    check_available,
    enter_command,
    holder_command,
    kill_entries,
    kill_uid,
    limit_processes,
    open_in_pod,
    process_start,
    processes_of,
    run_as,
)

log = logging.getLogger(__name__)

MOUNT_DIR = "mnt"  # {pod}/mnt/shared and {pod}/mnt/files: the pod's rclone mounts, bound at /shared and /files
POD_MOUNTS = {"shared": True, "files": False}  # name: read-only


def nvidia_device_nodes() -> list[str]:
    return sorted(glob.glob("/dev/nvidia*"))


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except (FileNotFoundError, NotADirectoryError):
        return None


def _endpoint(url: str) -> tuple[str, int] | None:
    """(IP address, port) of an http(s) URL, its name resolved here; None when it has no host."""
    parts = urlsplit(url)
    if not parts.hostname:
        return None
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        address = socket.getaddrinfo(parts.hostname, port, type=socket.SOCK_STREAM)[0][4][0]
    except OSError:
        return None
    return address, port


class LocalPodBackend:
    name = "local"

    def __init__(
        self,
        root: Path,
        hidden: list[Path] | None = None,
        *,
        mounts: bool = False,
        reachable: list[str] = (),
        trusted_single_user: bool = False,
        uid_base: int = 900_000,
        uid_count: int = 65_536,
        flush_timeout_s: int = 60,
        bootstrap_timeout_s: int = 180,
        pids_limit: int = 4096,
        slots_dir: Path | None = None,
    ):
        """``hidden``: paths a pod must not see (the data directory by default). ``mounts``: run
        kgpu-bootstrap for each pod, its mounts bound at /shared and /files (needs FUSE and
        fusermount3 here). ``reachable``: URLs pods may reach besides their KGPU_API_BASE (the
        object store's). ``uid_base``/``uid_count``: the host uids pods get (isolated mode).
        ``pids_limit``: the most processes one pod may have. ``slots_dir``: where the processes of
        one server share each pod's cap on calls in flight (gateway/pods/slots.py)."""
        self.pids_limit = pids_limit
        self.calls = call_slots("pod-calls", shared_in=slots_dir)
        self.call_timeout_s = CALL_TIMEOUT_S  # a call into the pod that does not wait on purpose
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.hidden = [p.resolve() for p in (hidden if hidden is not None else [self.root.parent])]
        self.reachable = list(reachable)
        self.uids = UidPool(uid_base, uid_count)
        self.flush_timeout_s = flush_timeout_s
        self.bootstrap_timeout_s = bootstrap_timeout_s
        self.refusal: str | None = None
        self.mode = self._choose_mode(trusted_single_user)
        if self.mode == "isolated":
            self.root.chmod(0o711)  # pods' uids pass through to their own folders, and list nothing
            closed = [str(p) for p in self.root.parents if not os.stat(p).st_mode & 0o001]
            if closed:
                self.refusal = (
                    f"the pods folder {self.root} must be reachable by the pods' uids, and {closed[0]} is not "
                    f"(chmod o+x {closed[0]}: others can pass through it, not list it)"
                )
        self.mounts = bool(
            mounts and self.mode != "none" and os.path.exists("/dev/fuse") and shutil.which("fusermount3")
        )
        self._locks: dict[str, threading.Lock] = {}
        self.instance = self._instance()
        if self.refusal:
            log.error("local pods cannot be rented: %s", self.refusal)
        elif self.mode != "isolated":
            log.warning("local pods run in %r mode: NO isolation between tenants (KGPU_LOCAL_TRUSTED_SINGLE_USER)", self.mode)

    def _instance(self) -> str:
        """``local:{id}``, the id made once and kept in the pods folder (another gateway's folder,
        on this host or another, has another)."""
        path = self.root / ".instance"
        try:
            return path.read_text().strip()
        except FileNotFoundError:
            staged = self.root / f".instance.{os.getpid()}"
            staged.write_text(f"local:{uuid.uuid4().hex[:16]}")
            with contextlib.suppress(FileExistsError):  # another process made it first: theirs holds
                os.link(staged, path)
            staged.unlink()
            return path.read_text().strip()

    def _choose_mode(self, trusted: bool) -> str:
        root = os.geteuid() == 0
        try:
            check_available(uid_switching=root or not trusted)
            return "isolated" if root else "same-user"
        except SandboxUnavailable as exc:
            if trusted:  # no bubblewrap, or one that cannot build a sandbox here
                return "none"
            self.refusal = (
                f"the local pod backend cannot isolate pods here: {exc}. Set "
                "KGPU_LOCAL_TRUSTED_SINGLE_USER=true only where one trusted person uses this server"
            )
            return "refused"

    # --- paths and records -----------------------------------------------------------

    def _pod(self, ref: str) -> Path:
        pod = self.root / ref
        if "/" in ref or ref in ("", ".", "..") or not (pod / "pod.json").exists():
            raise PodError(f"no pod {ref}")
        return pod

    def _record(self, pod: Path) -> dict:
        try:
            return json.loads((pod / "pod.json").read_text())
        except FileNotFoundError:
            raise PodError(f"no pod {pod.name}") from None

    def _write_record(self, pod: Path, record: dict) -> None:
        staged = pod / "pod.json.tmp"
        staged.write_text(json.dumps(record))
        staged.chmod(0o600)
        staged.replace(pod / "pod.json")  # whole or absent: status() and adopt() read it any time

    def _inner(self, pod: Path, path: str) -> str:
        """A path inside the pod as the pod's processes name it."""
        if self.mode != "none":
            return path
        if path.startswith("/tmp/"):
            return str(pod / "tmp" / path[len("/tmp/"):])
        if path == TOKEN_PATH:
            return str(pod / "secret" / "token")
        return path

    def _owned_dir(self, path: Path, uid: int | None, mode: int = 0o700) -> None:
        path.mkdir(parents=True, exist_ok=True)
        if uid is not None:
            os.chown(path, uid, uid)
        path.chmod(mode)

    # --- pods ---------------------------------------------------------------------------

    def start(self, spec: PodSpec) -> str:
        if self.refusal:
            log.warning("a rental was refused: %s", self.refusal)
            raise PodStartError(self.refusal)
        pod = self.root / spec.rental_id
        if (pod / "pod.json").exists():
            return spec.rental_id  # a start retried after a crash
        pod.mkdir(mode=0o711, parents=True, exist_ok=True)
        pod.chmod(0o711)
        uid = self.uids.take(pod) if self.mode == "isolated" else None
        for name in ("workspace", "tmp"):
            self._owned_dir(pod / name, uid)
        if self.mode == "isolated":
            self._make_disk(pod, uid, spec.ephemeral_storage_gib)
        self._owned_dir(pod / "state", None)
        for name in ("secret", MOUNT_DIR, *(f"{MOUNT_DIR}/{m}" for m in POD_MOUNTS)):
            self._owned_dir(pod / name, None, 0o711)
        token = spec.env.get("KGPU_API_TOKEN", "")
        token_file = pod / "secret" / "token"
        token_file.write_text(token)
        if uid is not None:
            os.chown(token_file, uid, uid)
        token_file.chmod(0o400)
        visible = ",".join(str(i) for i in spec.gpu_indices)
        env = {
            **{k: v for k, v in spec.env.items() if k != "KGPU_API_TOKEN"},
            "CUDA_VISIBLE_DEVICES": visible,
            "NVIDIA_VISIBLE_DEVICES": visible or "void",
            "NVIDIA_DRIVER_CAPABILITIES": "compute,utility",
        }
        record = {
            "rental_id": spec.rental_id, "image": spec.image, "env": env, "uid": uid, "created_at": time.time(),
            "memory_bytes": spec.memory_bytes,
        }
        if self.mode == "isolated":
            record["endpoints"] = self._write_hosts(pod, [spec.env.get("KGPU_API_BASE", ""), *self.reachable])
            self._write_accounts(pod, uid)
        if self.mounts and token:
            record["bootstrap_pid"] = self._start_bootstrap(pod, uid, spec.env)
            record["bootstrap_start"] = process_start(record["bootstrap_pid"])
        self._write_record(pod, record)
        return spec.rental_id

    def _make_disk(self, pod: Path, uid: int, gib: int) -> None:
        """The pod's own disk (gateway/pods/disk.py), its folders bound at the pod's /workspace
        and /tmp folders. Where this host cannot make one, the reaper watches its disk use instead."""
        disk = make_disk(pod, gib, uid)
        if disk is None:
            return
        try:
            for name in ("workspace", "tmp"):
                (disk / name).chmod(0o700)
                bind(disk / name, pod / name)
        except (OSError, subprocess.SubprocessError) as exc:
            log.warning("pod %s: could not bind its disk (%s); its disk use is watched instead", pod.name, exc)
            self._release_disk(pod)

    @staticmethod
    def _release_disk(pod: Path) -> None:
        release_disk(pod, also_unmount=(pod / "workspace", pod / "tmp"))

    def _write_hosts(self, pod: Path, urls: list[str]) -> list[str]:
        """The pod's /etc/hosts (the host's, plus the names of the endpoints it may reach, which
        it cannot resolve itself) and the ``address:port`` list its relay serves."""
        lines = [_read(Path("/etc/hosts")) or "127.0.0.1 localhost"]
        endpoints = []
        for url in urls:
            found = _endpoint(url) if url else None
            if found is None:
                continue
            address, port = found
            endpoints.append(f"[{address}]:{port}" if ":" in address else f"{address}:{port}")
            name = urlsplit(url).hostname
            if name and name != address:
                lines.append(f"{address} {name}")
        (pod / "hosts").write_text("\n".join(lines) + "\n")
        (pod / "hosts").chmod(0o644)
        return sorted(set(endpoints))

    def _write_accounts(self, pod: Path, uid: int) -> None:
        """The pod's /etc/passwd and /etc/group: the host's, plus its own uid as user ``kgpu``
        (scp, sftp-server and ssh-keygen look their user up and stop without one)."""
        for name, line in (("passwd", f"kgpu:x:{uid}:{uid}:kgpu pod:/workspace:/bin/sh"), ("group", f"kgpu:x:{uid}:")):
            host = (_read(Path("/etc") / name) or "").splitlines()
            (pod / name).write_text("\n".join([entry for entry in host if not entry.startswith("kgpu:")] + [line]) + "\n")
            (pod / name).chmod(0o644)

    def _etc_files(self, pod: Path) -> dict[str, Path]:
        if self.mode != "isolated":
            return {}
        return {f"/etc/{name}": pod / name for name in ("hosts", "passwd", "group") if (pod / name).exists()}

    def _mount_env(self, pod: Path) -> dict[str, str]:
        return {
            "PATH": f"{Path(rclone_binary()).parent}{os.pathsep}{HOLDER_ENV['PATH']}",
            "HOME": str(pod / "state"),
            # Out of the pod's sight: the mounts' remote-control socket drives a host rclone.
            "KGPU_STATE_DIR": str(pod / "state"),
            "KGPU_MOUNT_ROOT": str(pod / MOUNT_DIR),
        }

    def _as_pod_user(self, uid: int | None, command: list[str]) -> list[str]:
        return run_as(uid, command) if uid is not None else command

    def _start_bootstrap(self, pod: Path, uid: int | None, pod_env: dict[str, str]) -> int:
        """kgpu-bootstrap on the host, in its own session (it outlives a restarted gateway, as the
        pod does). It runs as the server's user: fusermount3 needs a user name, which the pods'
        uids lack. Its mounts show the pod's uid as their owner, are open to that uid alone
        (``allow_other`` with the kernel's permission checks, mode 0700/0600), and are out of
        reach of every other uid. Its token is in its environment only."""
        env = {**self._mount_env(pod), "KGPU_API_BASE": pod_env["KGPU_API_BASE"], "KGPU_API_TOKEN": pod_env["KGPU_API_TOKEN"]}
        if uid is not None:
            env.update(RCLONE_ALLOW_OTHER="true", RCLONE_DEFAULT_PERMISSIONS="true", RCLONE_UMASK="077",
                       RCLONE_UID=str(uid), RCLONE_GID=str(uid))
        with open(pod / "bootstrap.out", "wb") as out:
            process = subprocess.Popen(
                ["bash", str(script_path("kgpu-bootstrap"))],
                cwd=pod / "state", env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        threading.Thread(target=process.wait, daemon=True).start()
        return process.pid

    def _holder(self, pod: Path) -> dict:
        """The pod's record with a live holder (started at the first run: the mounts are made by then)."""
        lock = self._locks.setdefault(pod.name, threading.Lock())
        with lock, open(pod / "holder.lock", "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            record = self._record(pod)
            if self.mode == "none" or self._holder_alive(record):
                return record
            if record.get("holder_pid"):
                raise PodError("the pod's sandbox has exited")
            uid = record.get("uid")
            info_read, info_write = os.pipe()
            command = holder_command(
                workspace=pod / "workspace",
                pod_tmp=pod / "tmp",
                token_dir=pod / "secret",
                etc_files=self._etc_files(pod),
                hidden=self.hidden,
                mounts={name: (pod / MOUNT_DIR / name, ro) for name, ro in POD_MOUNTS.items()},
                devices=nvidia_device_nodes(),
                shm_bytes=record.get("memory_bytes") or SMALL_TMPFS,
                isolate_network=self.mode == "isolated",
                info_fd=info_write,
            )
            with open(pod / "holder.log", "ab") as log:
                process = subprocess.Popen(
                    limit_processes(self.pids_limit, self._as_pod_user(uid, command)), env=HOLDER_ENV,
                    stdin=subprocess.DEVNULL, stdout=log, stderr=log, pass_fds=(info_write,), start_new_session=True,
                )
            os.close(info_write)
            threading.Thread(target=process.wait, daemon=True).start()
            holder = _read_holder_pid(info_read)
            if holder is None or not _wait_set_up(holder):
                raise PodError(f"the pod's sandbox did not start: {(_read(pod / 'holder.log') or '')[-500:]}")
            record.update(holder_pid=holder, holder_start=process_start(holder),
                          bwrap_pid=process.pid, bwrap_start=process_start(process.pid))
            if self.mode == "isolated":
                record["relay_pid"] = self._start_relay(pod, record)
                record["relay_start"] = process_start(record["relay_pid"])
            self._write_record(pod, record)
            return record

    def _holder_alive(self, record: dict) -> bool:
        holder = record.get("holder_pid")
        return bool(holder) and process_start(holder) == record.get("holder_start")

    def _start_relay(self, pod: Path, record: dict) -> int:
        """The pod's way to the API base and the store (gateway/pods/relay.py); waits until it listens."""
        command = [sys.executable, "-m", "gateway.pods.relay", str(record["holder_pid"]), str(record["holder_start"]),
                   str(record["uid"]), *record.get("endpoints", [])]
        with open(pod / "relay.log", "ab") as log:
            process = subprocess.Popen(
                command, stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True,
                env={"PATH": HOLDER_ENV["PATH"], "PYTHONPATH": os.pathsep.join(sys.path)},
            )
        line = process.stdout.readline()
        process.stdout.close()
        threading.Thread(target=process.wait, daemon=True).start()
        if line.strip() != b"listening":
            raise PodError(f"the pod's network relay did not start: {(_read(pod / 'relay.log') or '')[-500:]}")
        return process.pid

    def _enter(self, pod: Path, record: dict, tty: bool = False) -> list[str]:
        if self.mode == "none":  # the callers start it in a session of its own
            return ["setsid", "--ctty"] if tty else []
        return enter_command(record["holder_pid"], record.get("uid"), self.pids_limit, tty)

    def _process_env(self, pod: Path, record: dict, env: dict[str, str]) -> dict[str, str]:
        """The environment of a process entering the pod: the pod's own, then ``env``."""
        inside = self.mode != "none"
        return {
            "PATH": HOLDER_ENV["PATH"] if inside else os.environ.get("PATH", HOLDER_ENV["PATH"]),
            "HOME": "/workspace" if inside else str(pod / "workspace"),
            "LANG": "C.UTF-8",
            **record["env"],
            **env,
        }

    def cpu_seconds(self, ref: str) -> float | None:
        """Every process of the pod's uid, read in the host's /proc (the pod cannot fake it)."""
        uid = self._record(self._pod(ref)).get("uid")
        if uid is None:
            return None  # a trusted pod shares the server's uid: its processes are not told apart
        lines = []
        for pid in processes_of(uid):
            with contextlib.suppress(OSError):
                lines.append(Path(f"/proc/{pid}/stat").read_text())
        return cpu_ticks("\n".join(lines)) / os.sysconf("SC_CLK_TCK")

    def gpus_busy(self, ref: str, gpus: list[int]) -> bool:
        return gpus_busy(gpus)  # this host's GPUs

    def inventory(self) -> None:
        return None  # the configured inventory

    enters_directly = True  # nsenter, a child of the gateway

    # --- SSH sessions and forwards (gateway/ssh) ----------------------------------------

    def enter(self, ref: str, args: list[str], tty: bool, env: dict[str, str]) -> PodCommand:
        pod = self._pod(ref)
        record = self._holder(pod)
        argv = [*self._enter(pod, record, tty), *login_command(args, self._inner(pod, TOKEN_PATH))]
        return PodCommand(argv, self._process_env(pod, record, env), str(pod / "workspace"))

    def stream(self, ref: str, args: list[str], env: dict[str, str]) -> None:
        return None  # enter's stdio are the gateway's own pipes already

    def connect(self, ref: str, host: str, port: int, timeout: float) -> socket.socket:
        pod = self._pod(ref)
        record = self._holder(pod)
        if self.mode != "isolated":  # the pod shares this host's network: what it reaches, we do
            return socket.create_connection((host, port), timeout=timeout)
        netns = os.open(f"/proc/{record['holder_pid']}/ns/net", os.O_RDONLY)
        try:
            if not self._holder_alive(record):  # its pid since given to another process
                raise PodError("the pod's sandbox has exited")
            return connect_in_namespace(netns, host, port, timeout)
        finally:
            os.close(netns)

    def _exec(self, pod: Path, record: dict, script: str, *args: str, timeout: float | None = None) -> bytes:
        """``sh -c script`` inside the pod as the pod's user (the host's sh: the pod's system
        folders are the host's, read-only); its stdout, within ``timeout`` seconds and
        MAX_ANSWER bytes, among the pod's few calls at once. The pod can stop or slow it (it
        runs as the pod's uid): past its deadline it is killed (gateway/pods/bounded.py)."""
        with self.calls.hold(pod.name):
            return run_bounded(
                [*self._enter(pod, record), "sh", "-c", script, "kgpu", *args],
                env=HOLDER_ENV, timeout=timeout or self.call_timeout_s, cwd=pod / "workspace",
            ).stdout

    def status(self, ref: str) -> PodStatus:
        pod = self.root / ref
        try:
            record = json.loads((pod / "pod.json").read_text())
        except FileNotFoundError:
            return PodStatus("Gone", False, "pod directory is gone")
        except ValueError:
            return PodStatus("Pending", False, "the pod is being created")
        if record.get("holder_pid") and not self._holder_alive(record):
            return PodStatus("Failed", False, "the pod's sandbox has exited")
        if not record.get("bootstrap_pid"):
            return PodStatus("Running", True)
        text = _read(pod / "state" / "mounts" / "status") or ""
        live = [f"/{p.name}" for p in (pod / MOUNT_DIR).glob("*") if os.path.ismount(p)]
        report = f"{text}\nlive={','.join(live)}\n"
        return bootstrap_status(report, time.time() - record["created_at"], self.bootstrap_timeout_s)

    def adopt(self) -> dict[str, str]:
        return {p.name: p.name for p in self.root.iterdir() if (p / "pod.json").exists()}

    def destroy(self, ref: str) -> str | None:
        pod = self.root / ref
        if not pod.exists():
            return None
        try:
            record = self._record(pod)
        except (PodError, ValueError):
            record = {}
        if self.mode == "none" or self._holder_alive(record):
            with contextlib.suppress(PodError):
                self._exec(pod, record, TERM_ALL_SCRIPT, "5", self._inner(pod, RUNS_DIR), timeout=5 + self.call_timeout_s)
        lost = self._flush(pod, record) if (pod / MOUNT_DIR).exists() and record.get("bootstrap_pid") else None
        self._stop_processes(record)
        mounted = [p for p in (pod / MOUNT_DIR).glob("*") if os.path.ismount(p)]
        for path in mounted:  # kgpu-flush could not unmount it: detach it lazily
            subprocess.run(["fusermount3", "-uz", str(path)], capture_output=True)
        if any(os.path.ismount(p) for p in mounted):
            # Deleting through a live mount would delete the user's drive: leave the pod's folder.
            return (lost or "") + f" (the mounts under {pod / MOUNT_DIR} are stuck; the pod folder was kept)"
        self._release_disk(pod)
        remove_tree(pod)
        self._locks.pop(ref, None)
        if record.get("uid") is not None and not pod.exists():
            self.uids.release(record["uid"], pod)
        return lost

    def _stop_processes(self, record: dict) -> None:
        """Every process of the pod: its sandbox (pid 1 takes the pod's processes with it), its
        bootstrap (its rclone mounts end with kgpu-flush), its relay, and in isolated mode
        anything else of its uid."""
        if record.get("holder_pid"):
            kill_entries(record["holder_pid"])
        if self._holder_alive(record):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(record["holder_pid"], signal.SIGKILL)
        for name in ("bootstrap", "relay", "bwrap"):
            pid = record.get(f"{name}_pid")
            started = process_start(pid) if pid else None
            # The same pid *and* start time: a pid the kernel has since given to another process is not ours.
            if started is not None and started == record.get(f"{name}_start"):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pid, signal.SIGKILL)
        if record.get("uid") is not None:
            kill_uid(record["uid"])
        if self.mode == "none":
            runs = Path(self._inner(self.root / record.get("rental_id", "-"), RUNS_DIR))
            for runner in runs.glob("*/runner_pid"):  # trusted mode: host pids, written by the runs
                with contextlib.suppress(ValueError, ProcessLookupError, PermissionError, OSError):
                    os.killpg(int(runner.read_text()), signal.SIGKILL)

    def _flush(self, pod: Path, record: dict) -> str | None:
        """kgpu-flush for the pod's mounts (as in a container), as the bootstrap that made them."""
        try:
            done = subprocess.run(
                ["sh", str(script_path("kgpu-flush")), str(self.flush_timeout_s)],
                env=self._mount_env(pod), capture_output=True, text=True, timeout=self.flush_timeout_s + 30,
                cwd=pod / "state",
            )
            report, code = (done.stdout + done.stderr).strip()[-MAX_FLUSH_REPORT:], done.returncode
        except subprocess.TimeoutExpired:
            report, code = "kgpu-flush did not finish", 1
        return None if code == 0 else report

    # --- runs ---------------------------------------------------------------------------------

    def _run_file(self, pod: Path, run_id: str, name: str) -> int | None:
        return open_in_pod(pod / "tmp", "kgpu", "runs", safe_run_id(run_id), name)

    def _has_run_file(self, pod: Path, run_id: str, name: str) -> bool:
        fd = self._run_file(pod, run_id, name)
        if fd is not None:
            os.close(fd)
        return fd is not None

    def _read_run_file(self, pod: Path, run_id: str, name: str, limit: int = 64) -> str | None:
        fd = self._run_file(pod, run_id, name)
        if fd is None:
            return None
        with os.fdopen(fd, "rb") as handle:
            return handle.read(limit).decode(errors="replace").strip()

    def _alive(self, pod: Path, record: dict, pid_text: str | None) -> bool:
        """Whether a pid the pod wrote names a live process *of the pod* (read in the pod's /proc)."""
        if not pid_text or not pid_text.isdigit():
            return False
        if self.mode == "none":
            stat_path = f"/proc/{int(pid_text)}/stat"
        elif self._holder_alive(record):
            stat_path = f"/proc/{record['holder_pid']}/root/proc/{int(pid_text)}/stat"
        else:
            return False
        try:
            state = Path(stat_path).read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            return False
        return state not in ("Z", "X")

    def start_run(
        self, ref: str, run_id: str, argv: list[str], env: dict[str, str], given: RunInput = NO_INPUT
    ) -> None:
        pod = self._pod(ref)
        record = self._holder(pod)
        run_dir = self._inner(pod, f"{RUNS_DIR}/{safe_run_id(run_id)}")
        process_env = self._process_env(pod, record, env)
        command = [*self._enter(pod, record), *run_command(run_dir, argv, self._inner(pod, TOKEN_PATH), given)]
        process = subprocess.Popen(
            command, cwd=pod / "workspace", env=process_env,
            stdin=subprocess.DEVNULL if given.stdin is None else subprocess.PIPE,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
        if given.stdin is not None:
            with contextlib.suppress(OSError):  # a runner that died first: said below
                with process.stdin:
                    process.stdin.write(given.stdin)
        threading.Thread(target=process.wait, daemon=True).start()  # reap it; the run itself needs no parent
        deadline = time.monotonic() + 30
        while not self._has_run_file(pod, run_id, "pid"):
            if process.poll() is not None and not self._has_run_file(pod, run_id, "pid"):
                raise PodError(f"the runner exited with {process.returncode} before starting the command")
            if time.monotonic() > deadline:
                raise PodError("the runner did not start within 30 s")
            time.sleep(0.005)

    def run_state(self, ref: str, run_id: str, tail_bytes: int) -> RunState | None:
        pod = self._pod(ref)
        folder = open_in_pod(pod / "tmp", "kgpu", "runs", safe_run_id(run_id), directory=True)
        if folder is None:
            return None
        os.close(folder)
        record = self._record(pod)
        # Whether the runner lives is asked before its files are read: it writes the exit code
        # and then ends, so a runner seen gone has left its exit code for the read that follows.
        runner_pid = self._read_run_file(pod, run_id, "runner_pid")
        alive = self._alive(pod, record, runner_pid)
        fields = {name: self._read_run_file(pod, run_id, name) for name in ("pid", "started_at", "completed_at", "exit_code")}
        streams = {}
        for stream in ("stdout", "stderr"):
            fd = self._run_file(pod, run_id, stream)
            if fd is None:
                streams[stream] = (b"", False)
                continue
            with os.fdopen(fd, "rb") as handle:
                size = handle.seek(0, os.SEEK_END)
                handle.seek(max(0, size - tail_bytes))
                streams[stream] = (handle.read(tail_bytes), size > tail_bytes)
        return RunState(
            run_id=run_id,
            pid=run_int(fields["pid"]),
            started_at=run_float(fields["started_at"]),
            completed_at=run_float(fields["completed_at"]),
            exit_code=run_int(fields["exit_code"]),
            alive=alive,
            stdout=streams["stdout"][0],
            stderr=streams["stderr"][0],
            stdout_truncated=streams["stdout"][1],
            stderr_truncated=streams["stderr"][1],
            timed_out=self._has_run_file(pod, run_id, "timed_out"),
        )

    # A run's files are read here without a call into the pod: a long-poll asks every 50 ms.

    def wait_run(self, ref: str, run_id: str, seconds: float, tail_bytes: int) -> RunState | None:
        deadline = time.monotonic() + seconds
        while True:
            state = self.run_state(ref, run_id, 0)
            if state is None or state.finished or time.monotonic() >= deadline:
                return self.run_state(ref, run_id, tail_bytes)
            time.sleep(1 / WAIT_TICKS_PER_SECOND)

    def follow_run(self, ref: str, run_id: str, offsets: dict[str, int], seconds: float) -> RunState | None:
        deadline = time.monotonic() + seconds
        while True:
            state = self.run_state(ref, run_id, 0)  # first: once it has ended, its output is whole
            if state is None:
                return None
            new = {name: self.read_output(ref, run_id, name, offsets.get(name, 0)) for name in ("stdout", "stderr")}
            if state.finished or any(new.values()) or time.monotonic() >= deadline:
                return replace(state, stdout=new["stdout"], stderr=new["stderr"])
            time.sleep(1 / WAIT_TICKS_PER_SECOND)

    def run_ids(self, ref: str) -> list[str]:
        fd = open_in_pod(self._pod(ref) / "tmp", "kgpu", "runs", directory=True)
        if fd is None:
            return []
        try:
            with os.scandir(fd) as entries:
                return sorted(entry.name for entry in entries if entry.is_dir(follow_symlinks=False))
        finally:
            os.close(fd)

    def read_output(self, ref: str, run_id: str, stream: str, offset: int) -> bytes:
        if stream not in ("stdout", "stderr"):
            raise PodError(f"no stream {stream!r}")
        fd = self._run_file(self._pod(ref), run_id, stream)
        if fd is None:
            return b""
        with os.fdopen(fd, "rb") as handle:
            handle.seek(max(0, offset))
            return handle.read(READ_CHUNK)

    def signal_run(self, ref: str, run_id: str, signal_name: str) -> None:
        if signal_name not in ("TERM", "KILL"):
            raise PodError(f"unsupported signal {signal_name!r}")
        pod = self._pod(ref)
        record = self._record(pod)
        if self.mode != "none" and not self._holder_alive(record):
            return
        self._exec(pod, record, SIGNAL_SCRIPT, self._inner(pod, f"{RUNS_DIR}/{safe_run_id(run_id)}"), signal_name)

    def storage_bytes(self, ref: str) -> int | None:
        pod = self.root / ref
        used = disk_used(pod)  # a disk of its own: full is full, never more
        if used is not None:
            return used
        try:
            return disk_usage(pod, skip_top=frozenset({MOUNT_DIR}))  # the drives are not its disk
        except TreeTooLarge as exc:
            raise PodError(str(exc)) from exc


def _read_holder_pid(fd: int, timeout: float = 30) -> int | None:
    """The host pid of the sandbox's pid 1, from bubblewrap's --info-fd JSON (None if it failed)."""
    text = b""
    deadline = time.monotonic() + timeout
    poller = select.poll()  # not select(): a busy gateway has fds above 1024
    poller.register(fd, select.POLLIN)
    with os.fdopen(fd, "rb", buffering=0) as info:
        while time.monotonic() < deadline:
            ready = poller.poll(max(0.0, deadline - time.monotonic()) * 1000)
            chunk = info.read(4096) if ready else b""
            if not chunk:
                break
            text += chunk
            with contextlib.suppress(ValueError, KeyError):
                return int(json.loads(text)["child-pid"])
    return None


def _wait_set_up(holder: int, timeout: float = 30) -> bool:
    """Whether the sandbox finished building itself: bubblewrap writes its info before it has
    mounted the pod's file system, and starts the pod's ``sleep`` (its first child) after."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            children = Path(f"/proc/{holder}/task/{holder}/children").read_text().split()
            if children and Path(f"/proc/{children[0]}/comm").read_text().strip() == "sleep":
                return True
        except OSError:
            return False  # the sandbox died
        time.sleep(0.002)
    return False
