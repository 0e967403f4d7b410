"""The ``docker`` pod backend: a rental is a container from the rental's image.

An image whose entrypoint is ``kgpu-bootstrap`` (the kgpu-pytorch image) runs it: it mounts
``/shared`` and ``/files`` and reports to ``/tmp/kgpu/mounts/status``; the pod is ready once
that report is there (gateway/pods/mounts.py). Any other image runs ``sleep infinity``
(entrypoint overridden) and is ready when started. Both run under docker's ``--init`` so
orphans are reaped. Before a pod is removed its runs get SIGTERM, then ``kgpu-flush``
uploads what ``/files`` still holds and unmounts (bounded by ``flush_timeout_s``). It is named
``{prefix}-{rental_id}`` and labelled ``{prefix}.rental_id`` and
``{prefix}.managed=true`` so a restarted gateway finds it again (``adopt``); the
container name is the backend's reference.

Runs are ``docker exec`` sessions of the POSIX-sh runner (``runner.sh``), each its
own session and process group (runc makes every exec a session leader), keeping
their state in the container under ``/tmp/kgpu/runs/{run_id}/``. Every read
(``run_state``, ``read_output``, ``run_ids``) or signal is one exec of a small sh
script: 50–90 ms here (2 cores). Needs docker-init on the host (Debian's docker.io has it).

Limits: CPU (``nano_cpus``), memory (``mem_limit``, swap off), ``pids_limit``, GPUs
by ``device_requests`` (only when the rental has GPUs).

Isolation (docs/pod-isolation.md, tests/test_pod_hostile_docker.py): never ``--privileged``;
``no-new-privileges``; ``NET_RAW``, ``MKNOD`` and ``AUDIT_WRITE`` dropped. The in-pod rclone
mounts need ``/dev/fuse`` and ``CAP_SYS_ADMIN``, which on the host's own user namespace is
root on the host (cgroup-v1 ``release_agent``, remounting ``/proc/sys``). So a pod gets them
only when the daemon remaps user namespaces (``userns-remap``: ``name=userns`` in ``docker
info``'s security options, asked at every start): its root is then an unprivileged host uid
(``dockremap``'s subuid range) and its capabilities count only in its own namespaces. On a
daemon without it pods get neither, their mounts fail, and the rental's ``mounts`` say why.
``apparmor=unconfined`` is added only where AppArmor runs (its docker-default profile refuses
every ``mount``) and only for user-namespaced pods.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import shutil
import signal
import socket
import tarfile
from datetime import datetime, timezone
from pathlib import Path

import docker
import requests
from docker.errors import APIError, DockerException, ImageNotFound, NotFound
from docker.types import DeviceRequest, Mount

from gateway.pods import (
    NO_INPUT,
    RUNS_DIR,
    TERM_ALL_SCRIPT,
    TOKEN_PATH,
    PodCommand,
    PodError,
    PodSpec,
    PodStartError,
    PodStatus,
    STDIN_ENV_LAUNCH,
    STDIN_ENV_THEN_INPUT,
    encode_env,
    RunInput,
    login_command,
    run_command,
    safe_run_id,
)
from gateway.inventory import gpus_busy
from gateway.pods.bounded import CALL_TIMEOUT_S, MAX_ANSWER, read_docker_stream, run_bounded
from gateway.pods.exec_runs import ExecRuns
from gateway.pods.disk import disk_used, make_disk, release_disk
from gateway.pods.relay import connect_in_namespace
from gateway.pods.tree import remove_tree
from gateway.pods.slots import call_slots
from gateway.pods.mounts import (
    FLUSH_SCRIPT,
    MAX_FLUSH_REPORT,
    MAX_VALUE,
    READ_STATUS_SCRIPT,
    STATUS_PATH,
    bootstrap_status,
    flush_report_logged,
    runs_bootstrap,
)

log = logging.getLogger(__name__)

# What the SDK raises: its own errors, and requests' when the daemon cannot be reached.
_DOCKER_ERRORS = (DockerException, requests.RequestException)

WORKDIR = "/workspace"
# Capabilities a pod does not need, dropped from docker's default set: raw sockets (spoofing
# on the bridge other pods share), device nodes, the audit log.
CAP_DROP = ["NET_RAW", "MKNOD", "AUDIT_WRITE"]
# Why a pod got no /dev/fuse (the value of its ``{prefix}.fuse`` label), said in its failed mounts.
NO_FUSE = {
    "no-userns": "this docker daemon does not remap user namespaces (userns-remap), so pods get no "
    "/dev/fuse and cannot mount: the operator sets it up (docs/pod-isolation.md)",
    "host-network": "pods on the host's network (KGPU_DOCKER_NETWORK=host) cannot be user-namespaced "
    "(docker refuses), so they get no /dev/fuse and cannot mount: use a bridge network (docs/pod-isolation.md)",
}
ICC_OPTION = "com.docker.network.bridge.enable_icc"
POD_TO_POD = (
    "the docker network {network!r} lets pods reach each other (inter-container communication is on): "
    "start dockerd with --icc=false, or set the pods' network to one made with "
    "-o com.docker.network.bridge.enable_icc=false (docs/pod-isolation.md)"
)
FUSE_MODE = "/dev/fuse on the docker host must be mode 0666 for user-namespaced pods (docs/pod-isolation.md)"
# Connections to the daemon kept open: each long-poll holds one for its wait (gateway/routes/runs.py).
DOCKER_CONNECTIONS = 256
# Where dockerd keeps its containers' runc state (``{root}/{container id}/state.json``): its
# default exec root, and containerd's where docker runs through a containerd of its own.
RUNC_ROOTS = ("/run/docker/runtime-runc/moby", "/run/containerd/runc/moby")
# runc's own words when it could not exec at all (the container stopped or went meanwhile).
RUNC_FAILED = re.compile(rb"(container does not exist|cannot exec in a stopped container|container not running|exec failed)")

def _token_archive(token: str) -> bytes:
    """A tar of ``run/kgpu/token`` (mode 0400, root's: the pod's root, not the host's)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        folder = tarfile.TarInfo(TOKEN_PATH.rsplit("/", 1)[0].lstrip("/"))
        folder.type, folder.mode = tarfile.DIRTYPE, 0o755
        archive.addfile(folder)
        data = token.encode()
        entry = tarfile.TarInfo(TOKEN_PATH.lstrip("/"))
        entry.size, entry.mode = len(data), 0o400
        archive.addfile(entry, io.BytesIO(data))
    return buffer.getvalue()


def docker_age_seconds(docker_time: str | None) -> float:
    """Seconds since a docker timestamp ("2026-11-26T23:47:03.123456789Z"); 0 if unreadable."""
    try:
        moment = datetime.fromisoformat(docker_time[:19]).replace(tzinfo=timezone.utc)
    except (TypeError, ValueError):
        return 0.0
    return (datetime.now(timezone.utc) - moment).total_seconds()


class DockerPodBackend(ExecRuns):
    name = "docker"
    refusal = None  # start() asks the daemon each time whether it can isolate a pod

    def __init__(
        self,
        client: docker.DockerClient | None = None,
        network: str | None = None,
        labels_prefix: str = "kgpu",
        *,
        pull: bool = True,
        pids_limit: int = 4096,
        init: bool = True,
        destroy_grace_s: int = 5,
        flush_timeout_s: int = 60,
        bootstrap_timeout_s: int = 180,
        disk_dir: Path | None = None,
        slots_dir: Path | None = None,
    ):
        """``pull=False``: a missing image fails at once instead of trying a registry.
        ``disk_dir``: where each pod's own disk is made (gateway/pods/disk.py), when the daemon
        runs on this host and the gateway as root; else a pod's disk use is watched. ``slots_dir``:
        where the processes of one server share each pod's cap on calls in flight
        (gateway/pods/slots.py)."""
        # The flush before removal is one blocking exec: the API timeout must outlast it.
        self.client = client if client is not None else docker.from_env(
            timeout=flush_timeout_s + 60, max_pool_size=DOCKER_CONNECTIONS
        )
        self.api = self.client.api
        self.network = network
        self.prefix = labels_prefix
        self.pull = pull
        self.pids_limit = pids_limit
        self.init = init
        self.destroy_grace_s = destroy_grace_s
        self.flush_timeout_s = flush_timeout_s
        self.bootstrap_timeout_s = bootstrap_timeout_s
        self.disk_dir = disk_dir if disk_dir is not None and os.geteuid() == 0 and self._local_daemon() else None
        # runc reaches the containers of a daemon on this host, for a gateway that is root: its path, else None.
        self._runc = shutil.which("runc") if self._local_daemon() and os.geteuid() == 0 else None
        self.calls = call_slots("pod-calls", shared_in=slots_dir)
        self.call_timeout_s = CALL_TIMEOUT_S  # a call that does not wait on purpose
        self._instance: str | None = None
        self._container_ids: dict[str, str] = {}  # ref -> the container's id, for runc
        super().__init__()

    @property
    def instance(self) -> str:
        """``docker:{daemon id}``: the pods this daemon runs (another host's daemon has another id)."""
        if self._instance is None:
            try:
                self._instance = f"docker:{self.client.info()['ID']}"
            except (*_DOCKER_ERRORS, KeyError) as exc:
                raise PodError(f"docker did not say who it is: {exc}") from exc
        return self._instance

    # --- labels and names -------------------------------------------------------

    def _label(self, name: str) -> str:
        """One of the labels this gateway puts on its containers: ``rental_id``, ``managed``,
        ``bootstrap`` (whether it runs the bootstrap), ``fuse`` (how it mounts the drive)."""
        return f"{self.prefix}.{name}"

    def container_name(self, rental_id: str) -> str:
        return f"{self.prefix}-{rental_id}"

    # --- pods ---------------------------------------------------------------------

    def _ensure_image(self, image: str):
        try:
            return self.client.images.get(image)
        except ImageNotFound:
            if not self.pull:
                raise PodStartError(f"image {image!r} is not on this docker host (pulling is off)") from None
        except _DOCKER_ERRORS as exc:
            raise PodStartError(f"docker could not look up image {image!r}: {exc}") from exc
        try:
            log.info("pulling image %s", image)
            return self.client.images.pull(image)
        except _DOCKER_ERRORS as exc:
            detail = getattr(exc, "explanation", None) or str(exc)
            raise PodStartError(f"could not pull image {image!r}: {detail}") from exc

    def daemon_security(self) -> tuple[bool, bool]:
        """(the daemon remaps user namespaces, AppArmor runs), from ``docker info``."""
        try:
            options = self.client.info().get("SecurityOptions") or []
        except _DOCKER_ERRORS as exc:
            raise PodStartError(f"docker did not answer: {exc}") from exc
        names = {part.partition("=")[2] for option in options for part in option.split(",") if part.startswith("name=")}
        return "userns" in names, "apparmor" in names

    def network_isolates_pods(self) -> bool:
        """Whether pods on this backend's network cannot reach each other: a bridge network with
        inter-container communication off (``dockerd --icc=false`` for the default bridge, or a
        network made with ``-o com.docker.network.bridge.enable_icc=false``). The host network is
        the operator's explicit choice (docs/pod-isolation.md)."""
        if self.network == "host":
            return True
        try:
            found = self.api.inspect_network(self.network or "bridge")
        except _DOCKER_ERRORS as exc:
            raise PodStartError(f"docker did not describe the network {self.network or 'bridge'!r}: {exc}") from exc
        if found.get("Driver") != "bridge":
            return True  # overlay, macvlan…: the operator's own design
        return (found.get("Options") or {}).get(ICC_OPTION) == "false"

    def start(self, spec: PodSpec) -> str:
        name = self.container_name(spec.rental_id)
        if not self.network_isolates_pods():
            raise PodStartError(POD_TO_POD.format(network=self.network or "bridge"))
        image = self._ensure_image(spec.image)
        # Asked at every start (one call, ~10 ms): a daemon restarted without userns-remap
        # must not get a single pod with CAP_SYS_ADMIN on the host's user namespace.
        userns, apparmor = self.daemon_security()
        host_network = self.network == "host"
        fuse = "true" if userns and not host_network else "host-network" if userns else "no-userns"
        if fuse != "true":
            log.warning("rental %s: %s", spec.rental_id, NO_FUSE[fuse])
        bootstrap = runs_bootstrap(((image.attrs or {}).get("Config") or {}).get("Entrypoint"))
        # Inside the container the granted GPUs are numbered from 0; NVIDIA_VISIBLE_DEVICES
        # names the host's devices (what the NVIDIA runtime reads), "void" for none, so an
        # image with NVIDIA_VISIBLE_DEVICES=all in its ENV gets no GPU on a CPU-only rental.
        host_ids = [str(i) for i in spec.gpu_indices]
        # The token is not in the container's configuration (docker inspect shows that): the pod
        # gets it once, as a file (TOKEN_PATH), which runs and kgpu-bootstrap read.
        token = spec.env.get("KGPU_API_TOKEN")
        env = {
            **{key: value for key, value in spec.env.items() if key != "KGPU_API_TOKEN"},
            "CUDA_VISIBLE_DEVICES": ",".join(str(i) for i in range(len(host_ids))),
            "NVIDIA_VISIBLE_DEVICES": ",".join(host_ids) or "void",
            "NVIDIA_DRIVER_CAPABILITIES": "compute,utility",
        }
        kwargs = dict(
            name=name,
            hostname=spec.rental_id[:63],
            init=self.init,
            labels={
                self._label("rental_id"): spec.rental_id,
                self._label("managed"): "true",
                self._label("bootstrap"): "true" if bootstrap else "false",
                self._label("fuse"): fuse,
            },
            environment=env,
            working_dir=WORKDIR,
            nano_cpus=int(spec.cpu * 1e9),
            mem_limit=spec.memory_bytes,
            memswap_limit=spec.memory_bytes,  # no swap beyond the memory limit
            shm_size=max(64 << 20, spec.memory_bytes // 2),  # DataLoader workers need /dev/shm; counts as memory
            pids_limit=self.pids_limit,
            cap_drop=list(CAP_DROP),
            security_opt=["no-new-privileges"],
        )
        if fuse == "true":  # root in the pod is an unprivileged host uid: SYS_ADMIN counts in its namespaces only
            kwargs.update(devices=["/dev/fuse:/dev/fuse:rwm"], cap_add=["SYS_ADMIN"])
            if apparmor:  # docker-default refuses every mount(2), FUSE's too
                kwargs["security_opt"].append("apparmor=unconfined")
        elif host_network and userns:
            kwargs["userns_mode"] = "host"  # docker refuses the host's network in a remapped namespace
        # /workspace and /tmp on a disk of the pod's own (ENOSPC past ephemeral_storage_gib);
        # the rest of the writable layer, which docker cannot cap on overlay2 over ext4, is
        # watched by the reaper (storage_bytes), as all of it is where no disk can be made.
        disk = make_disk(self.disk_dir / name, spec.ephemeral_storage_gib, self._pod_root_uid()) if self.disk_dir else None
        if disk is not None:
            kwargs["mounts"] = [Mount(f"/{folder}", str(disk / folder), type="bind") for folder in ("workspace", "tmp")]
        if not bootstrap:
            kwargs.update(entrypoint=["sleep", "infinity"], command=[])
        if spec.gpu_indices:
            kwargs["device_requests"] = [DeviceRequest(device_ids=host_ids, capabilities=[["gpu"]])]
        if self.network:
            kwargs["network"] = self.network
        try:
            container = self.client.containers.create(spec.image, **kwargs)
            if token and not container.put_archive("/", _token_archive(token)):
                raise PodStartError("docker would not take the pod's token file")
            container.start()
        except APIError as exc:
            if exc.status_code == 409:  # the name is taken: a start retried after a crash?
                return self._reuse(name, spec.rental_id)
            self._remove_quietly(name)
            raise PodStartError(f"docker could not start {spec.image!r}: {exc.explanation or exc}") from exc
        except (*_DOCKER_ERRORS, PodStartError) as exc:
            self._remove_quietly(name)
            raise PodStartError(f"docker could not start {spec.image!r}: {exc}") from exc
        log.info("started container %s (%s) for rental %s", name, container.short_id, spec.rental_id)
        return name

    def _reuse(self, name: str, rental_id: str) -> str:
        try:
            container = self.client.containers.get(name)
        except _DOCKER_ERRORS as exc:
            raise PodStartError(f"container name {name} is taken and cannot be inspected: {exc}") from exc
        if container.labels.get(self._label("rental_id")) != rental_id:
            raise PodStartError(f"container name {name} is taken by a container this gateway does not manage")
        if container.status != "running":
            try:
                container.start()
            except _DOCKER_ERRORS as exc:
                raise PodStartError(f"existing container {name} would not start: {exc}") from exc
        return name

    def _remove_quietly(self, name: str) -> None:
        try:
            self.api.remove_container(name, force=True)
        except _DOCKER_ERRORS:
            pass
        self._release_disk(name)

    def _release_disk(self, name: str) -> None:
        if self.disk_dir is not None:
            release_disk(self.disk_dir / name)
            with contextlib.suppress(OSError):
                remove_tree(self.disk_dir / name)

    def _local_daemon(self) -> bool:
        """Whether the daemon runs on this host (its containers' mounts are this host's)."""
        return self.api.base_url.startswith("http+docker://localhost")

    def _pod_root_uid(self) -> int:
        """The host uid root in a pod is: the remapped range's first (its data root is named
        ``{uid}.{gid}`` under userns-remap), else 0."""
        try:
            root = Path(self.client.info().get("DockerRootDir") or "").name
        except _DOCKER_ERRORS:
            return 0
        uid, dot, _ = root.partition(".")
        return int(uid) if dot and uid.isdigit() else 0

    def status(self, ref: str) -> PodStatus:
        try:
            info = self.api.inspect_container(ref)
        except NotFound:
            return PodStatus("Gone", False, "container is gone")
        except _DOCKER_ERRORS as exc:
            return PodStatus("Pending", False, f"docker did not answer: {exc}")
        state = info.get("State") or {}
        status = state.get("Status")
        if status == "running" and not state.get("Paused"):
            labels = (info.get("Config") or {}).get("Labels") or {}
            if labels.get(self._label("bootstrap")) != "true":
                return PodStatus("Running", True)
            return self._bootstrap_status(ref, state.get("StartedAt"), labels.get(self._label("fuse")))
        if status in ("created", "restarting", "paused") or state.get("Paused"):
            return PodStatus("Pending", False, f"container is {status}")
        if status == "removing":
            return PodStatus("Gone", False, "container is being removed")
        reason = f"container {status}, exit code {state.get('ExitCode')}"
        if state.get("OOMKilled"):
            reason += " (out of memory)"
        if state.get("Error"):
            reason += f": {state['Error']}"
        return PodStatus("Failed", False, reason)

    def _bootstrap_status(self, ref: str, started_at: str | None, fuse: str | None = None) -> PodStatus:
        try:
            text = self._exec(ref, READ_STATUS_SCRIPT, STATUS_PATH).decode(errors="replace")
        except PodError as exc:
            return PodStatus("Running", False, f"cannot read the mount status: {exc}")
        status = bootstrap_status(text, docker_age_seconds(started_at), self.bootstrap_timeout_s)
        for mount in (status.mounts or {}).values():  # the pod's words, then the operator's reason
            error = mount.get("error") or ""
            if mount.get("status") != "failed":
                continue
            if fuse in NO_FUSE:
                mount["error"] = f"{NO_FUSE[fuse]}; {error}"[:MAX_VALUE]
            elif "/dev/fuse" in error and "ermission denied" in error:
                mount["error"] = f"{error[: MAX_VALUE - len(FUSE_MODE) - 2]}; {FUSE_MODE}"
        return status

    def storage_bytes(self, ref: str) -> int | None:
        """The writable layer's size: docker cannot cap it on overlay2 (``--storage-opt size``
        is refused there), so the reaper watches it instead."""
        try:
            found = self.api.containers(all=True, size=True, filters={"name": ref})
        except _DOCKER_ERRORS:
            return None
        exact = [c for c in found if f"/{ref}" in c.get("Names", [])]  # the filter matches substrings
        if not exact:
            return None
        layer = exact[0].get("SizeRw") or 0  # docker omits a zero SizeRw
        return layer + ((disk_used(self.disk_dir / ref) or 0) if self.disk_dir else 0)

    def adopt(self) -> dict[str, str]:
        try:
            found = self.api.containers(all=True, filters={"label": [self._label("managed") + "=true"]})
        except _DOCKER_ERRORS as exc:
            raise PodError(f"docker could not list containers: {exc}") from exc
        pods = {}
        for item in found:
            rental_id = (item.get("Labels") or {}).get(self._label("rental_id"))
            names = [n.lstrip("/") for n in item.get("Names") or []]
            if rental_id and names:
                pods[rental_id] = names[0]
        return pods

    def destroy(self, ref: str) -> str | None:
        lost = None
        try:
            self._exec(ref, TERM_ALL_SCRIPT, str(self.destroy_grace_s), RUNS_DIR, timeout=self.destroy_grace_s + CALL_TIMEOUT_S)
            lost = self._flush(ref)
        except PodError:
            pass  # not running or gone: removing it is all that is left
        try:
            self.api.remove_container(ref, force=True)
        except NotFound:
            pass
        except APIError as exc:
            if exc.status_code == 409 and "already in progress" in str(exc.explanation):
                return lost
            raise PodError(f"docker could not remove {ref}: {exc.explanation or exc}") from exc
        except _DOCKER_ERRORS as exc:
            raise PodError(f"docker could not remove {ref}: {exc}") from exc
        self._release_disk(ref)
        return lost

    def _flush(self, ref: str) -> str | None:
        """Run kgpu-flush in the pod: None when every write reached the drive, else its report."""
        try:
            output = self._exec(
                ref, 'sh -c "$1" kgpu-flush "$2"; echo "kgpu-flush-exit=$?"', FLUSH_SCRIPT, str(self.flush_timeout_s),
                timeout=self.flush_timeout_s + 30, stderr=True,
            ).decode(errors="replace").strip()
        except PodError as exc:
            return f"kgpu-flush did not finish: {exc}"
        output, _, code_text = output.rpartition("kgpu-flush-exit=")
        code = int(code_text) if code_text.strip().isdigit() else None
        output = output.strip()
        output = output[-MAX_FLUSH_REPORT:]  # the pod's own words: bounded
        if output:
            log.info("flush of %s: %s", ref, flush_report_logged(output))
        return None if code == 0 else (output or f"kgpu-flush exited with {code}")

    # --- exec helpers ---------------------------------------------------------------

    def _exec_create(self, ref: str, cmd: list[str], **kwargs) -> str:
        try:
            return self.api.exec_create(ref, cmd, **kwargs)["Id"]
        except NotFound:
            raise PodError(f"no pod {ref}") from None
        except APIError as exc:
            raise PodError(f"cannot exec in {ref}: {exc.explanation or exc}") from exc
        except _DOCKER_ERRORS as exc:
            raise PodError(f"cannot exec in {ref}: {exc}") from exc

    def _exec(
        self, ref: str, script: str, *args: str, timeout: float | None = None, limit: int = MAX_ANSWER,
        stderr: bool = False,
    ) -> bytes:
        """Run ``sh -c script kgpu args...`` in the pod; its stdout (and stderr, when asked),
        within ``timeout`` seconds and ``limit`` bytes, and among the pod's few calls at once
        (gateway/pods/bounded.py). An exec past its bounds is killed.

        Where the daemon is this host's, by ``runc exec`` (the process docker exec would start),
        a child of the gateway: the daemon never execs into a pod, so a pod that stops every
        process it can see (runc's own init among them) wedges nothing but the call, which is
        killed at its deadline. Through the daemon, such a pod held docker's every call about its
        container (inspect, remove) for good."""
        timeout = timeout or self.call_timeout_s
        with self.calls.hold(ref):
            runc = self._runc_exec(ref, ["sh", "-c", ("exec 2>&1; " if stderr else "") + script, "kgpu", *args])
            if runc is not None:
                answer = run_bounded(runc, timeout=timeout, limit=limit, env={"PATH": os.defpath})
                if answer.returncode != 0 and not answer.stdout and RUNC_FAILED.search(answer.stderr):
                    raise PodError(f"cannot exec in {ref}: {answer.stderr.decode(errors='replace').strip()[-300:]}")
                return answer.stdout
            exec_id = self._exec_create(ref, ["sh", "-c", script, "kgpu", *args], stdout=True, stderr=stderr)
            try:
                attached = self.api.exec_start(exec_id, socket=True)
            except _DOCKER_ERRORS as exc:
                raise PodError(f"exec in {ref} failed: {exc}") from exc
            sock = getattr(attached, "_sock", attached)  # the unix socket under docker-py's SocketIO
            try:
                return read_docker_stream(sock, timeout=timeout, limit=limit, streams=(1, 2) if stderr else (1,))
            except PodError:
                self._kill_exec(exec_id)
                raise
            finally:
                with contextlib.suppress(OSError):
                    attached.close()
                with contextlib.suppress(OSError):
                    sock.close()

    def _kill_exec(self, exec_id: str) -> None:
        """Kill an exec that overran its bounds (its process is on this host when the daemon is)."""
        if not self._local_daemon():
            return  # a remote daemon's process: it ends with its pod
        with contextlib.suppress(*_DOCKER_ERRORS, ProcessLookupError, PermissionError):
            pid = int(self.api.exec_inspect(exec_id).get("Pid") or 0)
            if pid > 1:
                os.kill(pid, signal.SIGKILL)

    # --- runs ---------------------------------------------------------------------------

    def start_run(
        self, ref: str, run_id: str, argv: list[str], env: dict[str, str], given: RunInput = NO_INPUT
    ) -> None:
        run_dir = f"{RUNS_DIR}/{safe_run_id(run_id)}"
        launch = STDIN_ENV_LAUNCH if given.stdin is None else STDIN_ENV_THEN_INPUT
        runc = self._runc_exec(ref, ["sh", "-c", launch, "kgpu-env", *run_command(run_dir, argv, given=given)])
        if runc is not None:
            # Its env is stdin's first line, never on a command line; the run's own stdin, if any,
            # follows it (the launcher reads only that line). runc's stdout and stderr are the
            # run's own: /dev/null (never a host file of ours: the run could reopen it).
            stdin = (encode_env(env) + "\n").encode() + (given.stdin or b"")
            self.start_held_runner(ref, run_id, runc, {"PATH": os.defpath}, stdin, name="runc")
            return
        exec_id = self._exec_create(
            ref,
            run_command(run_dir, argv, given=given),
            stdin=given.stdin is not None,
            stdout=False,
            stderr=False,
            environment=dict(env),
            workdir=WORKDIR,
        )
        try:
            if given.stdin is None:
                self.api.exec_start(exec_id, detach=True)
            else:
                self._feed(exec_id, given.stdin)
        except (*_DOCKER_ERRORS, OSError) as exc:
            raise PodError(f"could not start the runner in {ref}: {exc}") from exc
        self.await_runner(ref, run_dir, lambda: self._runner_exit(exec_id))

    def _feed(self, exec_id: str, data: bytes) -> None:
        """Start an exec with ``data`` as its whole stdin: written, then the end of input (the
        runner keeps it in its run folder before the command starts; the exec runs on alone)."""
        attached = self.api.exec_start(exec_id, socket=True)
        sock = getattr(attached, "_sock", attached)
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        finally:
            with contextlib.suppress(OSError):
                attached.close()
            with contextlib.suppress(OSError):
                sock.close()

    def _runner_exit(self, exec_id: str) -> str | None:
        try:
            info = self.api.exec_inspect(exec_id)
        except _DOCKER_ERRORS:
            return None
        if info.get("Running") is False:
            return f"the runner exited with {info.get('ExitCode')} before starting the command"
        return None

    def cpu_seconds(self, ref: str) -> float | None:
        """The container's CPU usage as the daemon counts it (its cgroup): no call into the pod."""
        try:
            stats = self.api.stats(ref, stream=False, one_shot=True)
        except NotFound:
            raise PodError(f"no pod {ref}") from None
        except _DOCKER_ERRORS as exc:
            raise PodError(f"cannot read {ref}'s CPU use: {exc}") from exc
        usage = ((stats or {}).get("cpu_stats") or {}).get("cpu_usage", {}).get("total_usage")
        return usage / 1e9 if usage is not None else None

    def gpus_busy(self, ref: str, gpus: list[int]) -> bool:
        return self._local_daemon() and gpus_busy(gpus)  # the GPUs of this host, where the daemon runs

    def inventory(self) -> None:
        return None  # the configured inventory

    @property
    def enters_directly(self) -> bool:
        """runc reaches the containers of a daemon on this host, for a gateway that is root."""
        return self._runc is not None

    # --- SSH sessions and forwards (gateway/ssh) ----------------------------------------

    def enter(self, ref: str, args: list[str], tty: bool, env: dict[str, str]) -> PodCommand:
        """``runc exec`` where the daemon is this host's (as ``_exec``), with its stdio the
        gateway's own pipes, so no daemon carries the session's bytes; else the docker CLI's
        ``exec``. Both carry a terminal's size and resizes."""
        runc = self._runc_exec(ref, login_command(args), tty=tty, env=env)
        if runc is not None:
            return PodCommand(["setsid", "--ctty", *runc] if tty else runc, {"PATH": os.defpath, **env})
        argv = docker_exec_argv(ref, login_command(args), tty, env)
        return PodCommand(["setsid", "--ctty", *argv] if tty else argv, {**docker_cli_env(), **env})

    def _runc_exec(
        self, ref: str, argv: list[str], *, tty: bool = False, detach: bool = False, env: dict[str, str] | None = None,
    ) -> list[str] | None:
        """The ``runc exec`` argv for ``argv`` in ``ref``: the process docker exec would start
        (the container's user, capabilities, seccomp and AppArmor profiles, cgroups and their
        limits, no-new-privileges), in /workspace. None where runc cannot reach the container:
        a daemon on another host, or a gateway that is not root."""
        runc = self._runc
        if runc is None:
            return None
        container_id = self._container_ids.get(ref)
        root = next((r for r in RUNC_ROOTS if container_id and Path(r, container_id, "state.json").is_file()), None)
        if root is None:
            try:
                container_id = self.api.inspect_container(ref)["Id"]
            except NotFound:
                raise PodError(f"no pod {ref}") from None
            except (*_DOCKER_ERRORS, KeyError) as exc:
                raise PodError(f"cannot inspect {ref}: {exc}") from exc
            root = next((r for r in RUNC_ROOTS if Path(r, container_id, "state.json").is_file()), None)
            if root is None:
                raise PodError(f"pod {ref} is not running")
            self._container_ids[ref] = container_id
        named = [flag for name in sorted(env or {}) for flag in ("--env", f"{name}={env[name]}")]  # TERM, LANG: no secret
        return [runc, "--root", root, "exec", *(["-t"] if tty else []), *(["-d"] if detach else []), "--cwd", WORKDIR,
                *named, container_id, *argv]

    def stream(self, ref: str, args: list[str], env: dict[str, str]) -> None:
        return None  # enter's stdio are runc's or the docker CLI's, as fast as the daemon is

    def connect(self, ref: str, host: str, port: int, timeout: float) -> socket.socket:
        """From inside the container's network namespace, entered on this host (as root)."""
        if not self._local_daemon() or os.geteuid() != 0:
            raise PodError("forwards into docker pods need the docker daemon on the gateway's host and the gateway as root")
        pid = self._container_pid(ref)
        netns = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY)
        try:
            if self._container_pid(ref) != pid:  # the container went (and its pid was reused) meanwhile
                raise PodError(f"pod {ref} is not running")
            return connect_in_namespace(netns, host, port, timeout)
        finally:
            os.close(netns)

    def _container_pid(self, ref: str) -> int:
        try:
            state = self.api.inspect_container(ref).get("State") or {}
        except NotFound:
            raise PodError(f"no pod {ref}") from None
        except _DOCKER_ERRORS as exc:
            raise PodError(f"cannot inspect {ref}: {exc}") from exc
        if not state.get("Running") or not state.get("Pid"):
            raise PodError(f"pod {ref} is not running")
        return int(state["Pid"])

    def __repr__(self) -> str:  # pragma: no cover - debugging aid
        return f"DockerPodBackend(prefix={self.prefix!r}, network={self.network!r}, pull={self.pull})"


def docker_exec_argv(container: str, argv: list[str], tty: bool, env: dict[str, str]) -> list[str]:
    """The docker CLI's ``exec`` of ``argv`` with ``env`` named (its values travel in the CLI's
    own environment, never on its command line)."""
    if shutil.which("docker") is None:
        raise PodError("the docker CLI is not installed on the gateway's host (Debian: apt-get install docker.io)")
    named = [flag for name in sorted(env) for flag in ("-e", name)]
    return ["docker", "exec", "-i", *(["-t"] if tty else []), "-w", WORKDIR, *named, container, *argv]


def docker_cli_env() -> dict[str, str]:
    """What the docker CLI needs of the gateway's environment: where the daemon is, nothing else."""
    return {k: v for k, v in os.environ.items() if k == "PATH" or k.startswith("DOCKER_")}


__all__ = ["DockerPodBackend"]
