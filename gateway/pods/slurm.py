"""The ``slurm`` pod backend: a rental is a Slurm batch job whose script runs the rental's container.

``start`` submits ``slurm_job.sh`` with ``sbatch`` (``--gres=gpu:N``, ``--cpus-per-task``,
``--mem``, ``--time`` from the rental's duration, ``--nodelist`` = the node the gateway placed
it on). The job is named ``{prefix}-{rental_id}``, as its container is, and its comment says
which backend instance submitted it (``adopt`` finds its own jobs with ``squeue``); the
reference is ``{job id}/{container name}``. The job script starts the container on the
allocated node with only the job's GPUs (``SLURM_JOB_GPUS``) passed in, removes it on
``scancel`` (TERM), and ends when it ends. Secrets never travel on a command line: the pod's
env and its token are in sbatch's environment, exported by name (``--export=KGPU_POD_...``),
and the token becomes ``/run/kgpu/token`` in the container, as on docker.

Everything else reaches the node through ``srun --jobid J --overlap``: a run is one srun of
``docker exec`` with the same POSIX-sh runner as docker (held by this backend for the run's
life, since a step's leftovers die with it), and every read or signal is a short srun of
docker's own scripts (gateway/pods/docker.py): a restarted gateway reads its runs the same way.
Slurm commands run with a clean environment (PATH, SLURM_CONF), so the gateway's secrets never
reach a node; a run's env travels as one variable, decoded inside the pod.

A job Slurm keeps PENDING is a Pending pod (its reason said); RUNNING with its container up is
Running (ready once kgpu-bootstrap reports, for images that run it); a job that ended is Gone.
``inventory()`` reads the nodes, their GPU GRES and their state from ``sinfo``.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

from gateway.inventory import GpuClass, busy_line
from gateway.pods import (
    CONNECT_SCRIPT,
    CPU_SCRIPT,
    NO_INPUT,
    RUNS_DIR,
    TERM_ALL_SCRIPT,
    PodCommand,
    PodError,
    PodSpec,
    PodStartError,
    PodStream,
    ENV_LAUNCH,
    PodStatus,
    RunInput,
    cpu_ticks,
    encode_env,
    login_command,
    run_command,
    safe_run_id,
)
from gateway.pods.bounded import CALL_TIMEOUT_S, MAX_ANSWER, run_bounded
from gateway.pods.docker import CAP_DROP, RUNC_ROOTS, WORKDIR, docker_age_seconds, docker_exec_argv
from gateway.pods.exec_runs import ExecRuns
from gateway.pods.slurm_channel import NODE_SCRIPT, open_direct
from gateway.pods.slots import call_slots
from gateway.pods.mounts import (
    BOOTSTRAP_NAME,
    FLUSH_SCRIPT,
    MAX_FLUSH_REPORT,
    READ_STATUS_SCRIPT,
    STATUS_PATH,
    bootstrap_status,
    flush_report_logged,
)

log = logging.getLogger(__name__)

JOB_SCRIPT = Path(__file__).parent / "slurm_job.sh"
MiB = 1 << 20
# A job's time limit is the rental's duration and this: the gateway returns an expired rental
# (runs TERMed, /files flushed) before Slurm kills the job.
TIME_LIMIT_SLACK_MINUTES = 10
# Job states in which the job (and so its container) may still exist.
LIVE_STATES = {"PENDING", "CONFIGURING", "RUNNING", "SUSPENDED", "COMPLETING", "RESIZING", "REQUEUED"}
# How status() begins its reason when it could not find out (Slurm or the node did not answer).
UNREACHABLE = ("Slurm did not answer", "cannot reach the pod's node")
# Node states (sinfo %T, without its suffix flags) in which a node takes work.
READY_NODE_STATES = {"idle", "mixed", "allocated", "completing", "planned"}
# On the node: the container's state, its labels, and (for a bootstrap image) the mount report.
_NODE_STATUS_SCRIPT = r"""
name="$1"; prefix="$2"
s=$(docker inspect --format "{{.State.Status}} {{index .Config.Labels \"$prefix.bootstrap\"}} {{.State.StartedAt}}" "$name" 2>/dev/null) || { echo missing; exit 0; }
echo "$s"
case "$s" in "running true "*) docker exec "$name" sh -c "$3" kgpu "$4" 2>/dev/null ;; esac
exit 0
"""
_GRES_GPU = re.compile(r"(?:^|,)gpu(?::([A-Za-z0-9_.-]+))?:(\d+)")


def parse_gres(gres: str, default_model: str) -> dict[str, int]:
    """'gpu:h100:4(S:0-1),gpu:2' -> {'h100': 4, default_model: 2}."""
    counts: dict[str, int] = {}
    for model, count in _GRES_GPU.findall(gres or ""):
        key = model or default_model
        counts[key] = counts.get(key, 0) + int(count)
    return counts


# The container's writable layer, and what its own disk (slurm_job.sh, bound at /workspace) holds.
_STORAGE_SCRIPT = r"""
layer=$(docker inspect --size --format "{{.SizeRw}}" "$1") || exit 1
disk=$(docker inspect --format '{{range .Mounts}}{{if eq .Destination "/workspace"}}{{.Source}}{{end}}{{end}}' "$1")
used=0; [ -n "$disk" ] && used=$(df -B1 --output=used "$disk" 2>/dev/null | tail -n 1)
echo $((layer + ${used:-0}))
"""
# srun's own last words on a step whose task did not exit 0 (its --quiet keeps errors).
SRUN_EXIT_REPORT = re.compile(rb"srun: error: \S+: task \d+: (Exited with exit code \d+|Killed|Terminated)\r?\n")
# On the node, in the job: its GPUs' utilization (nothing where the node has no nvidia-smi).
GPU_UTILIZATION_SCRIPT = (
    'command -v nvidia-smi >/dev/null && [ -n "$SLURM_JOB_GPUS" ] || exit 0; '
    'exec nvidia-smi --query-gpu=utilization.gpu --format=csv,noheader,nounits -i "$SLURM_JOB_GPUS"'
)
SRUN_START_S = 15  # what srun may take to reach the node, on top of a call's own deadline
# On the node, with stdio of its own (a direct channel, gateway/pods/slurm_channel.py): CONTAINER
# NAMES ARGV... in the container with the variables NAMES (comma-separated, values in the step's
# environment: TERM, LANG), by runc exec where the step is root (the process docker exec would
# start, with these stdio as its own: no daemon copies the bytes, twice as fast here), else docker exec.
NODE_ENTER_SCRIPT = r"""
n="$1"; names="$2"; shift 2
if [ "$(id -u)" = 0 ] && command -v runc >/dev/null 2>&1 && id=$(docker inspect --format '{{.Id}}' "$n" 2>/dev/null); then
  for root in %(roots)s; do
    [ -f "$root/$id/state.json" ] || continue
    set -- --cwd %(workdir)s "$id" "$@"
    for v in $(echo "$names" | tr , ' '); do set -- --env "$v=$(printenv "$v")" "$@"; done
    exec runc --root "$root" exec "$@"
  done
fi
set -- -w %(workdir)s "$n" "$@"
for v in $(echo "$names" | tr , ' '); do set -- -e "$v" "$@"; done
exec docker exec -i "$@"
""" % {"roots": " ".join(RUNC_ROOTS), "workdir": WORKDIR}


class SlurmPodBackend(ExecRuns):
    name = "slurm"
    refusal = None
    enters_directly = False  # srun … docker exec: the node's dockerd starts them

    def __init__(
        self,
        *,
        conf: str = "",
        partition: str = "",
        prefix: str = "kgpu",
        gpu_device_dir: str = "/dev",
        nvidia_runtime: bool = False,
        gpu_model: str = "gpu",
        gpu_price_per_hour_credits: int = 500,
        network: str = "",
        pull: bool = True,
        pids_limit: int = 4096,
        destroy_grace_s: int = 5,
        flush_timeout_s: int = 60,
        bootstrap_timeout_s: int = 180,
        command_timeout_s: float = 90,  # a long-poll's srun waits up to 60 s
        start_wait_s: float = 60,
        direct_channel: bool = True,
        gateway_address: str = "",
        slots_dir: Path | None = None,  # where one server's processes share each pod's cap on calls
    ):
        self.conf = conf
        self.partition = partition
        self.prefix = prefix
        self.gpu_device_dir = gpu_device_dir
        self.nvidia_runtime = nvidia_runtime
        self.gpu_model = gpu_model
        self.gpu_price = gpu_price_per_hour_credits
        self.network = network
        self.pull = pull
        self.pids_limit = pids_limit
        self.destroy_grace_s = destroy_grace_s
        self.flush_timeout_s = flush_timeout_s
        self.bootstrap_timeout_s = bootstrap_timeout_s
        self.command_timeout_s = command_timeout_s
        self.calls = call_slots("pod-calls", shared_in=slots_dir)
        self.call_timeout_s = CALL_TIMEOUT_S  # a call into the pod that does not wait on purpose
        self.start_wait_s = start_wait_s
        self.direct_channel = direct_channel  # transfers on a connection of their own (stream)
        # This host's address on the cluster's network: the direct channel listens only there.
        self.gateway_address = gateway_address
        if direct_channel and not gateway_address:
            log.warning("KGPU_SLURM_GATEWAY_ADDRESS is not set: the direct channel's one-time listeners bind "
                        "every address of this host, not only the cluster's network (docs/slurm.md)")
        self._up: set[str] = set()  # pods whose container was seen running
        self._instance: str | None = None
        self._inventory: tuple[float, list[GpuClass]] | None = None
        super().__init__()

    # --- Slurm commands -----------------------------------------------------------------

    def _env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        """What Slurm commands run with: no gateway secret, nothing a step would carry to a node."""
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8"}
        conf = self.conf or os.environ.get("SLURM_CONF", "")
        if conf:
            env["SLURM_CONF"] = conf
        return {**env, **(extra or {})}

    def _slurm(self, argv: list[str], *, env: dict[str, str] | None = None, timeout: float | None = None) -> str:
        try:
            done = subprocess.run(
                argv, env=self._env(env), stdin=subprocess.DEVNULL, capture_output=True,
                timeout=timeout or self.command_timeout_s,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise PodError(f"{argv[0]} failed: {exc}") from exc
        if done.returncode != 0:
            detail = done.stderr.decode(errors="replace").strip()[-500:]
            raise PodError(f"{argv[0]} exited with {done.returncode}: {detail}")
        return done.stdout.decode(errors="replace")

    @property
    def instance(self) -> str:
        """``slurm:{ClusterName}``: every gateway on this cluster sees every job of it."""
        if self._instance is None:
            config = self._slurm(["scontrol", "show", "config"])
            match = re.search(r"^ClusterName\s*=\s*(\S+)", config, re.M)
            if not match:
                raise PodError("scontrol did not say the cluster's name")
            self._instance = f"slurm:{match.group(1)}"
        return self._instance

    def _job(self, job_id: str) -> dict[str, str] | None:
        """The job's state, reason, node and comment from squeue, or None once Slurm has forgotten it."""
        try:
            done = subprocess.run(
                ["squeue", "-h", "-t", "all", f"--jobs={job_id}", "-o", "%T|%r|%N|%k"], env=self._env(),
                stdin=subprocess.DEVNULL, capture_output=True, timeout=self.command_timeout_s,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise PodError(f"squeue failed: {exc}") from exc
        text = done.stdout.decode(errors="replace").strip()
        if done.returncode != 0:
            if "Invalid job id" in done.stderr.decode(errors="replace"):
                return None
            raise PodError(f"squeue exited with {done.returncode}: {done.stderr.decode(errors='replace')[-300:]}")
        if not text:
            return None
        state, reason, node, comment = (text.splitlines()[0].split("|", 3) + ["", "", ""])[:4]
        return {"state": state, "reason": reason, "node": node, "comment": comment}

    @staticmethod
    def _split(ref: str) -> tuple[str, str]:
        job_id, _, name = ref.partition("/")
        if not job_id.isdigit() or not name:
            raise PodError(f"not a slurm pod reference: {ref!r}")
        return job_id, name

    @staticmethod
    def _srun(job_id: str, argv: list[str], unbuffered: bool = False) -> list[str]:
        return ["srun", f"--jobid={job_id}", "--overlap", "--quiet", "--ntasks=1", "--nodes=1",
                *(["--unbuffered"] if unbuffered else []), *argv]

    def _node(self, ref: str, script: str, *args: str, timeout: float | None = None, limit: int = MAX_ANSWER) -> bytes:
        """Run ``sh -c script kgpu args...`` on the pod's node, in its job: its stdout, within
        ``timeout`` seconds and ``limit`` bytes, among the pod's few calls at once
        (gateway/pods/bounded.py)."""
        job_id, _ = self._split(ref)
        with self.calls.hold(ref):
            try:
                done = run_bounded(
                    self._srun(job_id, ["sh", "-c", script, "kgpu", *args]), env=self._env(),
                    timeout=timeout or self.command_timeout_s, limit=limit,
                )
            except PodError as exc:
                raise PodError(f"srun in job {job_id} failed: {exc}") from exc
        if done.returncode != 0:
            raise PodError(f"srun in job {job_id} exited with {done.returncode}: "
                           f"{done.stderr.decode(errors='replace').strip()[-300:]}")
        return done.stdout

    def _is_up(self, ref: str, *, patient: bool = False) -> bool:
        """Whether the pod's container runs (False while Slurm queues the job or the node starts
        it); PodError once the job has ended, or when Slurm or the node does not answer (unless
        ``patient``: then that is "not yet")."""
        if ref in self._up:
            return True
        status = self.status(ref)
        if status.phase in ("Gone", "Failed"):
            raise PodError(f"the pod is not running: {status.reason}")
        if not patient and (status.reason or "").startswith(UNREACHABLE):  # not known to be starting
            raise PodError(status.reason)
        if status.phase == "Running":
            self._up.add(ref)
        return status.phase == "Running"

    def _wait_up(self, ref: str) -> None:
        """Wait (bounded) until the pod's container runs: a start returns once sbatch has taken
        the job, and a run needs the container."""
        deadline = time.monotonic() + self.start_wait_s
        while not self._is_up(ref, patient=True):
            if time.monotonic() > deadline:
                raise PodError(f"the pod's container did not start within {self.start_wait_s:g} s")
            time.sleep(0.1)

    def _exec(
        self, ref: str, script: str, *args: str, timeout: float | None = None, limit: int = MAX_ANSWER,
    ) -> bytes:
        """Run ``sh -c script kgpu args...`` in the pod's container; its stdout, within ``timeout``
        seconds (and srun's start) and ``limit`` bytes. Nothing while the container has not
        started: a pod Slurm still queues has no runs, files or output."""
        _, name = self._split(ref)
        if not self._is_up(ref):
            return b""
        return self._node(
            ref, 'n="$1"; shift; exec docker exec "$n" "$@"', name, "sh", "-c", script, "kgpu", *args,
            timeout=(timeout or self.call_timeout_s) + SRUN_START_S, limit=limit,
        )

    # --- pods -----------------------------------------------------------------------------

    def container_name(self, rental_id: str) -> str:
        return f"{self.prefix}-{rental_id}"

    def _comment(self, rental_id: str) -> str:
        return f"kgpu-instance={self.instance} rental={rental_id}"

    def start(self, spec: PodSpec) -> str:
        name = self.container_name(spec.rental_id)
        env = {key: value for key, value in spec.env.items() if key != "KGPU_API_TOKEN"}
        bad = [key for key, value in env.items() if "\n" in value or "\r" in value]
        if bad:
            raise PodStartError(f"the slurm backend cannot pass env values with line breaks ({', '.join(bad)})")
        try:
            comment = self._comment(spec.rental_id)
            existing = self._slurm(["squeue", "-h", f"--name={name}", "-o", "%i|%k"]).splitlines()
        except PodError as exc:
            raise PodStartError(str(exc)) from exc
        for line in existing:  # a start retried after a crash: the job is already there
            job_id, _, job_comment = line.partition("|")
            if job_comment.split(" ")[0] == comment.split(" ")[0]:
                return f"{job_id}/{name}"
        job_env = {
            "KGPU_POD_IMAGE": spec.image,
            "KGPU_POD_RENTAL": spec.rental_id,
            "KGPU_POD_PREFIX": self.prefix,
            "KGPU_POD_COMMENT": comment,
            "KGPU_POD_ENV": base64.b64encode("".join(f"{k}={v}\n" for k, v in env.items()).encode()).decode(),
            "KGPU_POD_TOKEN": spec.env.get("KGPU_API_TOKEN", ""),
            "KGPU_POD_CPUS": f"{spec.cpu:g}",
            "KGPU_POD_MEMORY": str(spec.memory_bytes),
            "KGPU_POD_SHM": str(max(64 << 20, spec.memory_bytes // 2)),
            "KGPU_POD_PIDS_LIMIT": str(self.pids_limit),
            "KGPU_POD_DISK_GIB": str(spec.ephemeral_storage_gib),
            "KGPU_POD_GPU_DEVICE_DIR": self.gpu_device_dir,
            "KGPU_POD_NVIDIA": "1" if self.nvidia_runtime else "0",
            "KGPU_POD_NETWORK": self.network,
            "KGPU_POD_PULL": "1" if self.pull else "0",
            "KGPU_POD_BOOTSTRAP_NAME": BOOTSTRAP_NAME,
            "KGPU_POD_CAP_DROP": ",".join(CAP_DROP),
        }
        argv = [
            "sbatch", "--parsable", f"--job-name={name}", f"--comment={comment}",
            f"--cpus-per-task={max(1, math.ceil(spec.cpu))}", f"--mem={max(1, math.ceil(spec.memory_bytes / MiB))}M",
            "--nodes=1", "--ntasks=1", "--no-requeue", "--chdir=/", "--output=/dev/null",
            f"--export={','.join(job_env)}",
        ]
        if spec.gpu_indices:
            argv.append(f"--gres=gpu:{len(spec.gpu_indices)}")
        if spec.duration_hours:  # with room for the gateway's own expiry, which flushes /files first
            argv.append(f"--time={math.ceil(spec.duration_hours * 60) + TIME_LIMIT_SLACK_MINUTES}")
        if spec.node:
            argv.append(f"--nodelist={spec.node}")
        if self.partition:
            argv.append(f"--partition={self.partition}")
        argv.append(str(JOB_SCRIPT))
        try:
            job_id = self._slurm(argv, env=job_env).strip().split(";")[0]
        except PodError as exc:
            raise PodStartError(f"sbatch refused the pod: {exc}") from exc
        if not job_id.isdigit():
            raise PodStartError(f"sbatch said {job_id!r}, not a job id")
        log.info("submitted job %s (%s) for rental %s", job_id, name, spec.rental_id)
        return f"{job_id}/{name}"

    def status(self, ref: str) -> PodStatus:
        job_id, name = self._split(ref)
        try:
            job = self._job(job_id)
        except PodError as exc:
            return PodStatus("Pending", False, f"{UNREACHABLE[0]}: {exc}")
        if job is None:
            return PodStatus("Gone", False, f"job {job_id} is gone")
        state = job["state"]
        error = job["comment"].partition(" error=")[2]
        if state in ("PENDING", "CONFIGURING", "REQUEUED", "RESIZING"):
            return PodStatus("Pending", False, f"job {job_id} is {state.lower()} in Slurm ({job['reason']})")
        if state == "SUSPENDED":
            return PodStatus("Pending", False, f"job {job_id} is suspended by Slurm")
        if state != "RUNNING":
            reason = f"job {job_id} is {state.lower()}" + (f": {error}" if error else "")
            return PodStatus("Failed" if error else "Gone", False, reason)
        try:
            out = self._node(ref, _NODE_STATUS_SCRIPT, name, self.prefix, READ_STATUS_SCRIPT, STATUS_PATH)
        except PodError as exc:
            return PodStatus("Pending", False, f"{UNREACHABLE[1]}: {exc}")
        head, _, report = out.decode(errors="replace").partition("\n")
        parts = head.split()
        if not parts or parts[0] == "missing":
            return PodStatus("Pending", False, f"job {job_id} is starting its container on {job['node']}")
        if parts[0] != "running":
            return PodStatus("Pending", False, f"container is {parts[0]}")
        if len(parts) < 2 or parts[1] != "true":
            return PodStatus("Running", True)
        return bootstrap_status(report, docker_age_seconds(parts[2] if len(parts) > 2 else None), self.bootstrap_timeout_s)

    def storage_bytes(self, ref: str) -> int | None:
        _, name = self._split(ref)
        try:
            if not self._is_up(ref):
                return 0  # nothing written before the container starts
            out = self._node(ref, _STORAGE_SCRIPT, name)
        except PodError:
            return None
        text = out.decode(errors="replace").strip()
        return int(text) if text.isdigit() else None

    def adopt(self) -> dict[str, str]:
        out = self._slurm(["squeue", "-h", "-t", "PD,CF,R,S", "-o", "%i|%j|%k"])
        tag = self._comment("").split()[0]
        pods = {}
        for line in out.splitlines():
            job_id, _, rest = line.partition("|")
            name, _, comment = rest.partition("|")
            if name.startswith(f"{self.prefix}-gpu-") and comment.split(" ")[0] == tag:
                pods[name[len(self.prefix) + 1:]] = f"{job_id}/{name}"
        return pods

    def destroy(self, ref: str) -> str | None:
        job_id, _ = self._split(ref)
        lost = None
        job = self._job(job_id)
        if job is not None and job["state"] == "RUNNING":
            try:
                if self._is_up(ref):
                    self._exec(ref, TERM_ALL_SCRIPT, str(self.destroy_grace_s), RUNS_DIR)
                    lost = self._flush(ref)
            except PodError:
                pass  # no container (yet, or any more): cancelling is all that is left
        if job is not None and job["state"] in LIVE_STATES:
            try:
                self._slurm(["scancel", job_id])
            except PodError:  # it may have ended by itself meanwhile
                if (job := self._job(job_id)) is not None and job["state"] in LIVE_STATES:
                    raise
            # The job ends once its script has removed the container (its TERM trap).
            deadline = time.monotonic() + 120
            while (job := self._job(job_id)) is not None and job["state"] in LIVE_STATES:
                if time.monotonic() > deadline:
                    raise PodError(f"job {job_id} did not end within 120 s of scancel")
                time.sleep(0.1)
        self._up.discard(ref)
        self.kill_held(ref)
        return lost

    def _flush(self, ref: str) -> str | None:
        """kgpu-flush in the pod: None when every write reached the drive, else its report."""
        _, name = self._split(ref)
        script = 'n="$1"; shift; docker exec "$n" "$@"; echo "kgpu-flush-exit=$?"'
        out = self._node(ref, script, name, "sh", "-c", FLUSH_SCRIPT, "kgpu-flush", str(self.flush_timeout_s),
                         timeout=self.flush_timeout_s + 30).decode(errors="replace")
        report, _, code = out.rpartition("kgpu-flush-exit=")
        report = report.strip()[-MAX_FLUSH_REPORT:]
        if report:
            log.info("flush of %s: %s", ref, flush_report_logged(report))
        return None if code.strip() == "0" else (report or f"kgpu-flush exited with {code.strip()}")

    # --- runs ---------------------------------------------------------------------------------

    def start_run(
        self, ref: str, run_id: str, argv: list[str], env: dict[str, str], given: RunInput = NO_INPUT
    ) -> None:
        job_id, name = self._split(ref)
        run_dir = f"{RUNS_DIR}/{safe_run_id(run_id)}"
        self._wait_up(ref)
        command = self._srun(job_id, [
            "docker", "exec", *(["-i"] if given.stdin is not None else []), "-e", "KGPU_RUN_ENV", "-w", WORKDIR, name,
            "sh", "-c", ENV_LAUNCH, "kgpu-env", *run_command(run_dir, argv, given=given),
        ])
        # The step lives as long as the run; its stderr is srun's own (the run writes to files).
        self.start_held_runner(ref, run_id, command, self._env({"KGPU_RUN_ENV": encode_env(env)}), given.stdin,
                               name="the run's srun", keep_stderr=True)

    def cpu_seconds(self, ref: str) -> float | None:
        """The container's processes' CPU time, read in the pod's /proc (one short srun)."""
        stat = self._exec(ref, CPU_SCRIPT)
        return cpu_ticks(stat) / os.sysconf("SC_CLK_TCK") if stat else None

    def gpus_busy(self, ref: str, gpus: list[int]) -> bool:
        """The node's nvidia-smi for the job's GPUs (SLURM_JOB_GPUS), in one short srun."""
        out = self._node(ref, GPU_UTILIZATION_SCRIPT)
        return any(busy_line(line) for line in out.decode(errors="replace").splitlines())

    # --- SSH sessions and forwards (gateway/ssh) ----------------------------------------

    def enter(self, ref: str, args: list[str], tty: bool, env: dict[str, str]) -> PodCommand:
        """An srun step (``--pty`` with a terminal) of ``docker exec`` into the job's container;
        ``env`` travels in srun's environment to the node, named on docker's command line."""
        job_id, name = self._split(ref)
        self._wait_up(ref)
        # --unbuffered: srun holds a task's output back until a newline otherwise (scp's acks have none)
        step = self._srun(job_id, docker_exec_argv(name, login_command(args), tty, env), unbuffered=True)
        if tty:
            step = ["setsid", "--ctty", step[0], "--pty", *step[1:]]
        return PodCommand(step, self._env(env), own_stderr=SRUN_EXIT_REPORT)

    def stream(self, ref: str, args: list[str], env: dict[str, str]) -> PodStream | None:
        """An srun step that connects back to the gateway from the node and enters the container
        (NODE_ENTER_SCRIPT) with that connection as its stdin and stdout
        (gateway/pods/slurm_channel.py): srun's stdio carry 12-15 MiB/s at best. None with
        ``direct_channel`` off, or when the rendezvous failed (logged): then ``enter``."""
        if not self.direct_channel:
            return None
        job_id, name = self._split(ref)
        self._wait_up(ref)
        inner = ["sh", "-c", NODE_ENTER_SCRIPT, "kgpu", name, ",".join(sorted(env)), *login_command(args)]
        stream = open_direct(
            lambda address, port: self._srun(job_id, ["bash", "-c", NODE_SCRIPT, "kgpu", address, str(port), *inner]),
            self._env(env), f"slurm pod {ref}", self.gateway_address,
        )
        if stream is not None:
            stream.own_stderr = SRUN_EXIT_REPORT
        return stream

    def connect(self, ref: str, host: str, port: int, timeout: float) -> socket.socket:
        """An srun step of ``docker exec -i`` running CONNECT_SCRIPT in the container: the
        connection is made from inside the pod's network; its stdio is one end of a socket pair,
        the other is returned once the pod said it connected."""
        job_id, name = self._split(ref)
        self._wait_up(ref)
        ours, theirs = socket.socketpair()
        try:
            step = subprocess.Popen(
                self._srun(job_id, docker_exec_argv(name, ["perl", "-e", CONNECT_SCRIPT, host, str(port)], False, {}),
                           unbuffered=True),
                env=self._env(), stdin=theirs, stdout=theirs, stderr=subprocess.DEVNULL, start_new_session=True,
            )
        except OSError as exc:
            ours.close()
            raise PodError(f"could not start srun: {exc}") from exc
        finally:
            theirs.close()
        threading.Thread(target=step.wait, daemon=True).start()
        ours.settimeout(timeout + SRUN_START_S)
        status = b""
        try:
            while not status.endswith(b"\n") and len(status) < 300:
                chunk = ours.recv(1)  # one byte at a time: what follows the line is the connection's
                if not chunk:
                    break
                status += chunk
        except OSError:
            pass
        if status != b"ok\n":
            ours.close()
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(step.pid, signal.SIGKILL)
            why = status.decode(errors="replace").strip().removeprefix("fail ") or "no answer (is perl in the image?)"
            raise ConnectionRefusedError(111, why)
        ours.settimeout(None)
        return ours

    # --- inventory ---------------------------------------------------------------------------

    def inventory(self) -> list[GpuClass] | None:
        """Each node of the partition with its GPU GRES per model and whether it takes work
        (from sinfo, read at most every 2 s; the last answer while Slurm does not answer)."""
        now = time.monotonic()
        if self._inventory is not None and now - self._inventory[0] < 2:
            return self._inventory[1]
        argv = ["sinfo", "-N", "-h", "-o", "%N|%G|%T"] + ([f"--partition={self.partition}"] if self.partition else [])
        try:
            out = self._slurm(argv)
        except PodError as exc:
            log.warning("sinfo failed: %s", exc)
            return self._inventory[1] if self._inventory else []
        classes: dict[tuple[str, str], GpuClass] = {}
        for line in out.splitlines():
            parts = line.split("|")
            if len(parts) != 3:
                continue
            node, gres, state = parts
            ready = state.rstrip("*~#!%$@^-+").lower() in READY_NODE_STATES and not state.endswith("*")
            for model, count in parse_gres(gres, self.gpu_model).items():
                classes[(node, model)] = GpuClass(
                    node=node, gpu_model=model, count=count, price_per_hour_credits=self.gpu_price, ready=ready
                )
        found = sorted(classes.values(), key=lambda c: (c.gpu_model, c.node))
        self._inventory = (now, found)
        return found

    def __repr__(self) -> str:  # pragma: no cover - debugging aid
        return f"SlurmPodBackend(prefix={self.prefix!r}, partition={self.partition!r})"


def slurm_available() -> bool:
    """Whether the Slurm client commands are on this host."""
    return all(shutil.which(tool) for tool in ("sbatch", "srun", "squeue", "scontrol", "scancel", "sinfo"))


__all__ = ["SlurmPodBackend", "slurm_available"]
