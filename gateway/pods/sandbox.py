"""The local backend's sandbox: how a pod is walled off from the host, the server and other pods.

A pod is one long-lived bubblewrap process (the *holder*) that owns the pod's namespaces:
user, pid (its own ``/proc``), mount, ipc, uts and network. It runs under a host uid of its
own (``uid_base`` + a free slot; never the server's), with no capabilities, ``no_new_privs``
and every bound file system ``nosuid``. Runs and the gateway's reads or signals inside the pod
*enter* the holder's namespaces (``nsenter``) as that uid, as ``docker exec`` enters a
container, so the gateway never signals a pid a run wrote: the kill happens inside the pod.

What the pod sees: the host's system directories read-only (``SYSTEM_DIRS``), its own
``/workspace`` and ``/tmp``, empty ``/run`` and ``/var``, ``/shared`` and ``/files`` (the rclone
mounts kgpu-bootstrap made for it on the host), its token at ``/run/kgpu/token`` and the NVIDIA
device nodes. The server's data directory is hidden under an empty tmpfs wherever it lies. Its
network namespace has only a loopback device, on which ``gateway/pods/relay.py`` listens for
the API base and the object store.

Every file the gateway reads back from a pod's disk is opened one path component at a time
with ``O_NOFOLLOW`` (``open_in_pod``): the pod owns those folders and could plant a symlink to
a host file there.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import stat
import subprocess
import time
from pathlib import Path

from gateway.pods import TOKEN_PATH

# Host directories a pod sees read-only; everything else of the host is out of sight.
SYSTEM_DIRS = ("usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32", "etc", "opt", "sys")
SMALL_TMPFS = 64 << 20  # /run and /var in a pod
# The environment bubblewrap itself starts with (it is the pod's pid 1: runs can read it).
HOLDER_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}


class SandboxUnavailable(Exception):
    """The sandbox cannot be built here (the message says what is missing)."""


def check_available(uid_switching: bool) -> None:
    """Raise SandboxUnavailable unless bubblewrap, nsenter and user namespaces work here (and,
    with ``uid_switching``, the server can give a pod a uid of its own: it runs as root)."""
    for tool in ("bwrap", "nsenter", "setpriv", "prlimit"):
        if shutil.which(tool) is None:
            raise SandboxUnavailable(f"{tool} is not installed (Debian: apt-get install bubblewrap util-linux)")
    if uid_switching and os.geteuid() != 0:
        raise SandboxUnavailable(
            "the local backend runs each pod under a uid of its own, which needs the server to run as root"
        )
    probe = subprocess.run(
        ["bwrap", "--unshare-user", "--disable-userns", "--unshare-pid", "--unshare-net", "--ro-bind", "/", "/", "true"],
        capture_output=True, text=True, timeout=30,
    )
    if probe.returncode != 0:
        raise SandboxUnavailable(
            f"bubblewrap (0.8 or newer) cannot build a sandbox here: {probe.stderr.strip()[:300]}"
        )


# Host-wide: every backend on this host (gateway replicas, test stacks) draws from one registry.
UID_REGISTRY = Path("/run/kgpu/pod-uids")


class UidPool:
    """One host uid per live pod, across every gateway on this host: a pod claims its uid by
    creating ``{registry}/{uid}`` (exclusively) with its folder's path in it, and gives it back
    when its folder is gone. A claim whose folder is gone and whose uid runs nothing is stale."""

    def __init__(self, base: int, size: int, registry: Path = UID_REGISTRY):
        self.base, self.size, self.registry = base, size, registry

    @contextlib.contextmanager
    def locked(self):
        self.registry.mkdir(mode=0o700, parents=True, exist_ok=True)
        with open(self.registry / ".lock", "a+") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            yield

    def take(self, pod: Path) -> int:
        with self.locked():
            busy = process_uids()  # a process left of a pod gone wrong keeps its uid
            for uid in range(self.base, self.base + self.size):
                claim = self.registry / str(uid)
                if uid in busy or (claim.exists() and not self._stale(claim)):
                    continue
                claim.write_text(str(pod))
                claim.chmod(0o600)
                return uid
        raise SandboxUnavailable(f"all {self.size} pod uids from {self.base} are in use")

    @staticmethod
    def _stale(claim: Path) -> bool:
        try:
            return not Path(claim.read_text()).exists()
        except OSError:
            return True

    def release(self, uid: int, pod: Path) -> None:
        with self.locked():
            claim = self.registry / str(uid)
            with contextlib.suppress(OSError):
                if claim.read_text() == str(pod):
                    claim.unlink()


def holder_command(
    *,
    workspace: Path,
    pod_tmp: Path,
    token_dir: Path,
    etc_files: dict[str, Path],
    hidden: list[Path],
    mounts: dict[str, tuple[Path, bool]],
    devices: list[str],
    isolate_network: bool,
    info_fd: int,
    shm_bytes: int = SMALL_TMPFS,
) -> list[str]:
    """bubblewrap for a pod's holder: its namespaces, its view of the file system, and
    ``sleep infinity`` (bubblewrap is pid 1 and reaps). ``mounts``: {name: (host path, read-only)};
    ``etc_files``: {path under /etc: the pod's own version} (its hosts, its user's passwd entry)."""
    command = [
        # --disable-userns: no user namespace of its own inside, where it could mount (bubblewrap 0.8).
        "bwrap", "--unshare-user", "--disable-userns", "--unshare-pid", "--unshare-ipc", "--unshare-uts",
        "--unshare-cgroup-try", "--cap-drop", "ALL", "--hostname", "pod",
    ]
    if isolate_network:
        command.append("--unshare-net")
    for entry in SYSTEM_DIRS:
        path = Path("/") / entry
        if path.is_symlink():
            command += ["--symlink", os.readlink(path), str(path)]
        elif path.is_dir():
            command += ["--ro-bind", str(path), str(path)]
    command += [
        # Small tmpfs (they take the host's memory): the pod's disk is /tmp and /workspace.
        # /dev/shm holds at most the rental's memory (bubblewrap's own would take half the host's).
        "--dev", "/dev", "--perms", "1777", "--size", str(shm_bytes), "--tmpfs", "/dev/shm",
        "--proc", "/proc", "--size", str(SMALL_TMPFS), "--tmpfs", "/run",
        "--size", str(SMALL_TMPFS), "--tmpfs", "/var", "--dir", "/var/tmp",
        "--bind", str(pod_tmp), "/tmp", "--bind", str(workspace), "/workspace",
        "--ro-bind", str(token_dir), str(Path(TOKEN_PATH).parent),
    ]
    for target, source in etc_files.items():
        command += ["--ro-bind", str(source), target]
    # --dev makes a minimal /dev: the NVIDIA device nodes must be bound in for CUDA and
    # nvidia-smi. All of them (NVML wants every GPU's node); CUDA_VISIBLE_DEVICES pins the rental's.
    for node in devices:
        command += ["--dev-bind", node, node]
    command += ["--remount-ro", "/dev"]  # a tmpfs of half the host's memory, and not the pod's to fill
    for path in hidden:
        if any(path.is_relative_to(f"/{entry}") for entry in SYSTEM_DIRS):
            command += ["--tmpfs", str(path)]
    for name, (source, readonly) in mounts.items():
        if os.path.ismount(source):
            command += ["--ro-bind" if readonly else "--bind", str(source), f"/{name}"]
    # The root bubblewrap builds is a tmpfs too: read-only once everything is mounted on it.
    return command + ["--remount-ro", "/", "--chdir", "/workspace", "--info-fd", str(info_fd), "--", "sleep", "infinity"]


def limit_processes(pids_limit: int, command: list[str]) -> list[str]:
    """``command`` with RLIMIT_NPROC at ``pids_limit``. A pod's processes all run under its own
    uid, and the kernel counts a user namespace's processes against the limit its creator had
    (ucounts): started so, the holder caps the whole pod, whatever a process inside asks."""
    return ["prlimit", f"--nproc={pids_limit}:{pids_limit}", "--", *command]


def enter_command(holder: int, uid: int | None, pids_limit: int, tty: bool = False) -> list[str]:
    """nsenter into a holder's namespaces, as ``uid`` there (None: the caller's own uid, for a
    server that runs as that single trusted user), with no_new_privs, in a new session (so a
    run's process group is its own, numbered inside the pod), under the pod's process limit.
    ``tty``: the session's controlling terminal is its stdin (an SSH session's pty)."""
    command = limit_processes(pids_limit, ["nsenter", "-t", str(holder), "-U", "-m", "-p", "-i", "-u", "-n", "-r", "-w"])
    command += ["-S", str(uid), "-G", str(uid)] if uid is not None else ["--preserve-credentials"]
    return command + ["--", "setpriv", "--no-new-privs", "setsid", *(["--ctty"] if tty else [])]


def run_as(uid: int, command: list[str]) -> list[str]:
    """A host command as the pod's uid, with no supplementary groups and no capabilities."""
    return ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--inh-caps=-all", *command]


def open_in_pod(base: Path, *parts: str, directory: bool = False) -> int | None:
    """An fd for ``base/parts...`` opened without following any symlink below ``base``
    (None when missing, a symlink, or not a regular file / directory)."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
    try:
        fd = os.open(base, flags | os.O_DIRECTORY)
    except OSError:
        return None
    try:
        for index, part in enumerate(parts):
            if not part or part in (".", "..") or "/" in part:
                raise OSError("bad path part")
            last = index == len(parts) - 1
            child = os.open(part, flags | (os.O_DIRECTORY if directory or not last else 0), dir_fd=fd)
            os.close(fd)
            fd = child
        mode = os.fstat(fd).st_mode
        if not (stat.S_ISDIR(mode) if directory else stat.S_ISREG(mode)):
            raise OSError("not the expected kind of file")
        return fd
    except OSError:
        os.close(fd)
        return None


def process_start(pid: int) -> str | None:
    """A process's start time (field 22 of /proc/PID/stat): with the pid, it names one process."""
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _live_processes():
    """(host pid, real uid) of every live (not zombie) process."""
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/status") as handle:
                fields = dict(line.split(":", 1) for line in handle if ":" in line)
            if fields["State"].split()[0] not in ("Z", "X"):
                yield int(entry.name), int(fields["Uid"].split()[0])
        except (OSError, ValueError, KeyError, IndexError):
            continue


def process_uids() -> set[int]:
    return {uid for _, uid in _live_processes()}


def processes_of(uid: int) -> list[int]:
    """Host pids of every live process whose real uid is ``uid``."""
    return [pid for pid, owner in _live_processes() if owner == uid]


def kill_entries(holder: int) -> None:
    """SIGKILL the gateway's own ``nsenter`` processes still entering a holder. With a pid
    namespace nsenter forks, waits for its child and stops itself whenever the child stops: a
    pod that stops its runner stops that root nsenter too, and a stopped parent never reaps the
    child, so the pod's namespace (and its disk) could never go (issue 19, item 8)."""
    target = [b"nsenter", b"-t", str(holder).encode()]
    for pid, owner in _live_processes():
        if owner != os.geteuid():
            continue
        with contextlib.suppress(OSError):
            with open(f"/proc/{pid}/cmdline", "rb") as handle:
                argv = handle.read(4096).split(b"\0")
            if [Path(argv[0].decode(errors="replace")).name.encode(), *argv[1:3]] == target:
                os.kill(pid, signal.SIGKILL)


def kill_uid(uid: int) -> None:
    """SIGKILL every host process of a pod's uid (its runs, bootstrap, rclone and relay), until none is left."""
    for _ in range(50):
        pids = processes_of(uid)
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.02)
