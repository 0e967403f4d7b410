"""The ``local`` pod backend: a rental is a directory on this host and its runs are processes.

A pod is ``{data_dir}/pods/{rental_id}/`` holding ``workspace/`` (the working
directory of every run) and ``tmp/`` (the pod's /tmp, where the runner keeps run
state under kgpu/runs/); with mounts on, also ``mnt/shared`` and ``mnt/files`` (the
rclone mounts kgpu-bootstrap makes, bound at /shared and /files in the sandbox) and
``state/`` (the bootstrap's status, logs and caches, out of the runs' sight).
Where bubblewrap is installed every run is sandboxed:
it sees ``/workspace`` and ``/tmp`` of its own pod, the host read-only, and not
the gateway's data directory. GPUs are pinned with ``CUDA_VISIBLE_DEVICES``/
``NVIDIA_VISIBLE_DEVICES``. Runs start in their own session, so they outlive a
gateway killed with SIGKILL.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

from bootstrap import script_path
from drive.store.embedded import rclone_binary
from gateway.pods import RUNNER, RUNS_DIR, PodError, PodSpec, PodStatus, RunState
from gateway.pods.mounts import MAX_FLUSH_REPORT, bootstrap_status

MOUNT_DIR = "mnt"  # {pod}/mnt/shared and {pod}/mnt/files: the pod's rclone mounts, bound at /shared and /files
POD_MOUNTS = {"shared": True, "files": False}  # name: read-only

_SIGNALS = {"TERM": signal.SIGTERM, "KILL": signal.SIGKILL}


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except (FileNotFoundError, NotADirectoryError):
        return None


def _alive(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):  # gone, or exiting while we read (ProcessLookupError)
        return False
    return state not in ("Z", "X")


def read_tail(path: Path, limit: int) -> tuple[bytes, bool]:
    try:
        with open(path, "rb") as handle:
            size = handle.seek(0, os.SEEK_END)
            handle.seek(max(0, size - limit))
            return handle.read(), size > limit
    except FileNotFoundError:
        return b"", False


def nvidia_device_nodes() -> list[str]:
    return sorted(glob.glob("/dev/nvidia*"))


def sandbox_command(workspace: Path, pod_tmp: Path, hidden: list[Path], mounts: Path | None = None) -> list[str]:
    """bubblewrap around a run: the host read-only, the pod's own /tmp and /workspace
    writable, the pod's rclone mounts (under ``mounts``) at /shared and /files, and the
    gateway's data directory (database, store, other pods) out of sight.
    The network stays shared: runs reach KGPU_API_BASE. No pid namespace: the gateway
    signals runs by their host pids."""
    command = ["bwrap"]
    for entry in sorted(os.listdir("/")):
        path = Path("/") / entry
        if entry in ("tmp", "proc", "dev", "workspace"):
            continue
        if path.is_symlink():
            command += ["--symlink", os.readlink(path), str(path)]
        elif path.is_dir():
            command += ["--ro-bind", str(path), str(path)]
    command += ["--dev", "/dev", "--proc", "/proc", "--bind", str(pod_tmp), "/tmp", "--bind", str(workspace), "/workspace"]
    # --dev makes a minimal /dev: the NVIDIA device nodes must be bound in for CUDA and
    # nvidia-smi. All of them (NVML wants every GPU's node); CUDA_VISIBLE_DEVICES pins the rental's.
    for node in nvidia_device_nodes():
        command += ["--dev-bind", node, node]
    for path in hidden:
        if not path.is_relative_to("/tmp"):
            command += ["--tmpfs", str(path)]
    for name, readonly in POD_MOUNTS.items():
        if mounts is not None and os.path.ismount(mounts / name):
            command += ["--ro-bind" if readonly else "--bind", str(mounts / name), f"/{name}"]
    return command + ["--chdir", "/workspace", "--"]


class LocalPodBackend:
    name = "local"

    def __init__(
        self,
        root: Path,
        sandbox: bool | None = None,
        hidden: list[Path] | None = None,
        *,
        mounts: bool = False,
        flush_timeout_s: int = 60,
        bootstrap_timeout_s: int = 180,
    ):
        """``sandbox``: run inside bubblewrap (None: when ``bwrap`` is installed). ``hidden``:
        paths a sandboxed run must not see (the data directory by default). ``mounts``: run
        kgpu-bootstrap for each pod, its mounts bound at /shared and /files in the sandbox
        (only with the sandbox, FUSE and fusermount3 here)."""
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.sandbox = shutil.which("bwrap") is not None if sandbox is None else sandbox
        self.hidden = [p.resolve() for p in (hidden if hidden is not None else [self.root.parent])]
        self.mounts = bool(mounts and self.sandbox and os.path.exists("/dev/fuse") and shutil.which("fusermount3"))
        self.flush_timeout_s = flush_timeout_s
        self.bootstrap_timeout_s = bootstrap_timeout_s

    def _pod(self, ref: str) -> Path:
        pod = self.root / ref
        if not (pod / "pod.json").exists():
            raise PodError(f"no pod {ref}")
        return pod

    def _runs(self, ref: str) -> Path:
        return self._pod(ref) / RUNS_DIR.lstrip("/")

    def start(self, spec: PodSpec) -> str:
        pod = self.root / spec.rental_id
        (pod / "workspace").mkdir(parents=True, exist_ok=True)
        (pod / RUNS_DIR.lstrip("/")).mkdir(parents=True, exist_ok=True)
        visible = ",".join(str(i) for i in spec.gpu_indices)
        env = {
            **spec.env,
            "CUDA_VISIBLE_DEVICES": visible,
            "NVIDIA_VISIBLE_DEVICES": visible or "void",
            "NVIDIA_DRIVER_CAPABILITIES": "compute,utility",
        }
        record = {"rental_id": spec.rental_id, "image": spec.image, "env": env, "created_at": time.time()}
        if self.mounts and "KGPU_API_TOKEN" in spec.env:
            record["bootstrap_pid"] = self._start_bootstrap(pod, spec.env)
        staged = pod / "pod.json.tmp"
        staged.write_text(json.dumps(record))
        staged.replace(pod / "pod.json")  # whole or absent: status() and adopt() read it any time
        return spec.rental_id

    def _mount_env(self, pod: Path) -> dict[str, str]:
        return {
            "PATH": f"{Path(rclone_binary()).parent}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}",
            "HOME": str(pod / "tmp"),
            # Not under the pod's /tmp: the mounts' remote-control socket would let a run drive a
            # host rclone (outside the sandbox). The state stays where runs cannot see it.
            "KGPU_STATE_DIR": str(pod / "state"),
            "KGPU_MOUNT_ROOT": str(pod / MOUNT_DIR),
        }

    def _start_bootstrap(self, pod: Path, pod_env: dict[str, str]) -> int:
        """kgpu-bootstrap in its own session (it outlives a restarted gateway, as runs do)."""
        env = {**self._mount_env(pod), "KGPU_API_BASE": pod_env["KGPU_API_BASE"], "KGPU_API_TOKEN": pod_env["KGPU_API_TOKEN"]}
        with open(pod / "bootstrap.out", "wb") as out:
            process = subprocess.Popen(
                ["bash", str(script_path("kgpu-bootstrap"))],
                cwd=pod, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )
        threading.Thread(target=process.wait, daemon=True).start()
        return process.pid

    def status(self, ref: str) -> PodStatus:
        pod = self.root / ref
        try:
            record = json.loads((pod / "pod.json").read_text())
        except FileNotFoundError:
            return PodStatus("Gone", False, "pod directory is gone")
        except ValueError:
            return PodStatus("Pending", False, "the pod is being created")
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
        runs = pod / RUNS_DIR.lstrip("/")
        ids = [d.name for d in runs.iterdir()] if runs.exists() else []
        for run_id in ids:
            self.signal_run(ref, run_id, "TERM")
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(self._running(ref, r) for r in ids):
            time.sleep(0.05)
        for run_id in ids:
            self.signal_run(ref, run_id, "KILL")
        lost = self._flush(pod) if (pod / MOUNT_DIR).exists() else None
        mounted = [p for p in (pod / MOUNT_DIR).glob("*") if os.path.ismount(p)]
        for path in mounted:  # kgpu-flush could not unmount it: detach it lazily
            subprocess.run(["fusermount3", "-uz", str(path)], capture_output=True)
        if any(os.path.ismount(p) for p in mounted):
            # Deleting through a live mount would delete the user's drive: leave the pod's folder.
            return (lost or "") + f" (the mounts under {pod / MOUNT_DIR} are stuck; the pod folder was kept)"
        shutil.rmtree(pod, ignore_errors=True)
        return lost

    def _flush(self, pod: Path) -> str | None:
        """kgpu-flush for the pod's mounts (as in a container), then its bootstrap is stopped."""
        try:
            done = subprocess.run(
                ["sh", str(script_path("kgpu-flush")), str(self.flush_timeout_s)],
                env=self._mount_env(pod), capture_output=True, text=True, timeout=self.flush_timeout_s + 30,
            )
            report, code = (done.stdout + done.stderr).strip()[-MAX_FLUSH_REPORT:], done.returncode
        except subprocess.TimeoutExpired:
            report, code = "kgpu-flush did not finish", 1
        try:
            pid = json.loads((pod / "pod.json").read_text()).get("bootstrap_pid")
        except (FileNotFoundError, ValueError):
            pid = None
        if pid and _alive(pid):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)  # its own session: bash and its sleep
        return None if code == 0 else report

    def _running(self, ref: str, run_id: str) -> bool:
        pid = _read(self._runs(ref) / run_id / "runner_pid")
        return _alive(int(pid)) if pid else False

    def start_run(self, ref: str, run_id: str, argv: list[str], env: dict[str, str]) -> None:
        pod = self._pod(ref)
        record = json.loads((pod / "pod.json").read_text())
        run_dir = self._runs(ref) / run_id
        workspace = pod / "workspace"
        if self.sandbox:
            prefix = sandbox_command(workspace, pod / "tmp", self.hidden, pod / MOUNT_DIR)
            inner_run_dir, home = f"{RUNS_DIR}/{run_id}", "/workspace"
        else:
            prefix, inner_run_dir, home = [], str(run_dir), str(workspace)
        process_env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": home,
            "LANG": "C.UTF-8",
            **record["env"],
            **env,
        }
        process = subprocess.Popen(
            [*prefix, "sh", "-c", RUNNER, "kgpu-run", inner_run_dir, *argv],
            cwd=workspace,
            env=process_env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        threading.Thread(target=process.wait, daemon=True).start()  # reap it; the run itself needs no parent
        deadline = time.monotonic() + 30
        while not (run_dir / "pid").exists():
            if process.poll() is not None and not (run_dir / "pid").exists():
                raise PodError(f"the runner exited with {process.returncode} before starting the command")
            if time.monotonic() > deadline:
                raise PodError("the runner did not start within 30 s")
            time.sleep(0.005)

    def run_state(self, ref: str, run_id: str, tail_bytes: int) -> RunState | None:
        run_dir = self._runs(ref) / run_id
        if not run_dir.is_dir():
            return None
        pid = _read(run_dir / "pid")
        exit_code = _read(run_dir / "exit_code")
        started = _read(run_dir / "started_at")
        completed = _read(run_dir / "completed_at")
        stdout, stdout_cut = read_tail(run_dir / "stdout", tail_bytes)
        stderr, stderr_cut = read_tail(run_dir / "stderr", tail_bytes)
        runner = _read(run_dir / "runner_pid")
        return RunState(
            run_id=run_id,
            pid=int(pid) if pid else None,
            started_at=float(started) if started else None,
            completed_at=float(completed) if completed else None,
            exit_code=int(exit_code) if exit_code else None,
            alive=_alive(int(runner)) if runner else False,
            stdout=stdout,
            stderr=stderr,
            stdout_truncated=stdout_cut,
            stderr_truncated=stderr_cut,
        )

    def run_ids(self, ref: str) -> list[str]:
        runs = self._runs(ref)
        return sorted(d.name for d in runs.iterdir() if d.is_dir())

    def read_output(self, ref: str, run_id: str, stream: str, offset: int) -> bytes:
        try:
            with open(self._runs(ref) / run_id / stream, "rb") as handle:
                handle.seek(offset)
                return handle.read(1 << 20)
        except FileNotFoundError:
            return b""

    def signal_run(self, ref: str, run_id: str, signal_name: str) -> None:
        runner = _read(self._runs(ref) / run_id / "runner_pid")
        if not runner or not _alive(int(runner)):
            return
        try:
            os.killpg(os.getpgid(int(runner)), _SIGNALS[signal_name])
        except ProcessLookupError:
            pass

    def storage_bytes(self, ref: str) -> int | None:
        pod = self.root / ref
        if not pod.exists():
            return None
        total = 0
        for folder, dirs, names in os.walk(pod):
            if Path(folder) == pod and MOUNT_DIR in dirs:
                dirs.remove(MOUNT_DIR)  # the drives, not the pod's disk
            for name in names:
                try:
                    total += os.lstat(os.path.join(folder, name)).st_blocks * 512
                except FileNotFoundError:
                    pass
        return total
