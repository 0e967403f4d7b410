"""docs/gpus-and-runs.md: its examples run as written, and do what they say.

Every ```bash block of the guide is taken in order, joined into one script and
run with ``bash -euo pipefail`` in an empty directory against the live
``rclone-sqlite`` stack (the embedded default's parts: ``rclone serve s3`` and
SQLite, the ``local`` pod backend, and, on a machine without GPUs, only the
CPU-only class). The script's environment has ``KGPU_API_BASE`` and
``KGPU_API_TOKEN`` and no other ``KGPU_*`` variable; ``bash -u`` makes any
other one used on the client side an error (the pod's own variables appear
only inside commands sent to the pod). Afterwards the test checks the effects:
the rentals the examples made have ended, the runs printed what the guide says,
and the files they stored are in the drive.
"""

from __future__ import annotations

import io
import json
import re
import tarfile

import pytest
import requests

from tests.test_docs_examples import DOCS, bash_blocks, run_doc

pytestmark = pytest.mark.parametrize("stack", ["rclone-sqlite"], indirect=True)

DOC = "gpus-and-runs.md"
# The client side uses only the first two; the others appear in commands run in the pod.
POD_VARIABLES = {"KGPU_GPU_ID", "KGPU_RENT_ID"}
CLIENT_VARIABLES = {"KGPU_API_BASE", "KGPU_API_TOKEN"}


def _lines(out: str, *expected: str) -> None:
    for line in expected:
        assert re.search(rf"^{re.escape(line)}\s*$", out, re.M), (line, out[-4000:])


def _rental(stack, user, gpu_id: str) -> dict:
    reply = requests.get(f"{stack.base}/v1/gpus/{gpu_id}", headers=user.auth)
    assert reply.status_code == 200, reply.text
    return reply.json()


def test_docs_in_step_with_the_server(stack):
    """The examples use no other variables; every route of /v1/gpus, /v1/runs and /v1/balance is in a table."""
    used = set()
    for block in bash_blocks(DOC):
        used |= set(re.findall(r"\$\{?(KGPU_[A-Z0-9_]+)", block))
    assert used <= CLIENT_VARIABLES | POD_VARIABLES, used - CLIENT_VARIABLES - POD_VARIABLES
    rows = re.findall(r"^\| (GET|HEAD|PUT|POST|PATCH|DELETE) \| `([^`?]+)", (DOCS / DOC).read_text(), re.M)
    documented = {(method, re.sub(r"\{[^}]*\}", "{}", path)) for method, path in rows}
    for route in stack.server.app.routes:
        path = getattr(route, "path", "")
        if not path.startswith(("/v1/gpus", "/v1/runs", "/v1/balance")):
            continue
        for method in getattr(route, "methods", set()) or set():
            assert (method, re.sub(r"\{[^}]*\}", "{}", path)) in documented, f"{method} {path} is not in {DOC}"


def test_gpus_and_runs_examples(stack, user, tmp_path):
    cluster = requests.get(f"{stack.base}/v1/gpus").json()["cluster"]
    if any(c["gpu_total"] for c in cluster):
        pytest.skip("the guide's examples are written for the CPU-only default (a server without GPUs)")
    variables = {"KGPU_API_BASE": stack.base, "KGPU_API_TOKEN": user.token}
    result, workdir = run_doc(DOC, tmp_path, variables)
    out = result.stdout

    # Credits and the cluster, before anything was rented.
    start = stack.settings.starting_credits
    _lines(out, f"balance {start} of {start} starting credits; $1 = 1500 credits")
    price = stack.settings.cpu_price_per_hour_credits
    _lines(out, f"local cpu 0/0 busy, {price} credits/hour per GPU", "active_total 0 | mine: False")
    _lines(out, f"balance {start} | my_gpus 0")

    # Renting with the defaults gives a CPU-only pod; mistakes are refused.
    demo = json.loads((workdir / "demo.json").read_text())
    assert (demo["name"], demo["gpu_model"], demo["gpu_count"], demo["phase"]) == ("demo", "cpu", 0, "Running")
    assert demo["image"] == stack.settings.default_image and demo["rent_id"] == demo["gpu_id"]
    _lines(out, f"rented {demo['gpu_id']}: cpu x 0, {price} credits/hour")
    assert out.count("HTTP 422") == 2 and "must be DNS-safe" in out and "at most 128Gi" in out
    assert "HTTP 409" in out and '"error_code":"no_capacity"' in out
    state = json.loads((workdir / "state.json").read_text())
    assert state["phase"] == "Running" and state["idle_warning"] is False

    # The pod's environment and what its token may do.
    env = json.loads((workdir / "env-run.json").read_text())["stdout"].splitlines()
    gpu = demo["gpu_id"]
    for line in (
        "CUDA_VISIBLE_DEVICES=",
        f"KGPU_API_BASE={stack.base}",
        "KGPU_API_TOKEN=kgpu_(in-pod token)",
        f"KGPU_GPU_ID={gpu}",
        f"KGPU_RENT_ID={gpu}",
        "NVIDIA_DRIVER_CAPABILITIES=compute,utility",
        "NVIDIA_VISIBLE_DEVICES=void",
    ):
        assert line in env, (line, env)
    assert user.token not in out
    scope = (workdir / "scope.txt").read_text()
    for what, code in (
        ("my drive", 200),
        ("my balance", 200),
        ("this rental", 200),
        ("runs here", 200),
        ("another rental", 404),
        ("rent another GPU", 403),
        ("admin routes", 403),
    ):
        assert re.search(rf"^{what}: +{code}$", scope, re.M), (what, code, scope)
    other = json.loads((workdir / "other.json").read_text())["gpu_id"]
    assert _rental(stack, user, other)["end_reason"] == "returned"

    # Runs: quick, long-polled, streamed, stopped, long output, run state in the pod.
    hello = json.loads((workdir / "hello.json").read_text())
    assert (hello["phase"], hello["exit_code"], hello["stdout"], hello["stderr"]) == (
        "Failed", 3, f"hello from {gpu}\n", "a warning\n"
    )
    assert hello["name"] == "hello" and hello["run_id"].startswith(f"run-{gpu.removeprefix('gpu-')}-")
    steps = json.loads((workdir / "steps.json").read_text())
    assert steps["phase"] == "Running" and steps["exit_code"] is None and steps["completed_at"] is None
    steps_now = json.loads((workdir / "steps-now.json").read_text())
    assert steps_now["phase"] == "Succeeded" and steps_now["stdout"] == "step 1\nstep 2\nstep 3\nstep 4\n"
    assert re.search(r"^Succeeded after [\d.]+ s: step 1 step 2 step 3 step 4\s*$", out, re.M)
    runs = json.loads((workdir / "runs.json").read_text())["runs"]
    assert {steps["run_id"], hello["run_id"]} <= {r["run_id"] for r in runs}
    events = [json.loads(line) for line in (workdir / "chatty.ndjson").read_text().splitlines()]
    assert events[-1] == {"type": "done", "exit_code": 4}
    assert "".join(e["chunk"] for e in events if e["type"] == "stdout") == "one\nthree\n"
    assert "".join(e["chunk"] for e in events if e["type"] == "stderr") == "two\n"
    stopped = json.loads((workdir / "stopped.json").read_text())
    assert (stopped["phase"], stopped["exit_code"]) == ("Failed", 143)
    stubborn = json.loads((workdir / "stubborn-now.json").read_text())
    assert (stubborn["phase"], stubborn["exit_code"]) == ("Failed", 137)
    assert "ignoring TERM" in stubborn["stdout"]
    long = json.loads((workdir / "long.json").read_text())
    assert long["truncated"] == {"stdout": True, "stderr": False}
    assert len(long["stdout"]) == stack.settings.run_output_tail_bytes and long["stdout"].endswith("\n199999\n200000\n")
    _lines(out, "a,1", "b,2", "Failed 143 True 'started\\n'")  # stdin, and a run ended at its time limit
    slow = json.loads((workdir / "slow.json").read_text())
    assert (slow["timed_out"], slow["stdout"]) == (True, "started\n")
    _lines(out, "completed_at", "exit_code", "pid", "runner_pid", "started_at", "stderr", "stdout", "exit code 0")

    # Returned: ended, its runs gone with it, its in-pod token dead.
    returned = json.loads((workdir / "returned.json").read_text())
    assert (returned["phase"], returned["end_reason"]) == ("Ended", "returned")
    assert returned["credits_charged"] >= -(-price // 60)
    assert _rental(stack, user, gpu)["phase"] == "Ended"
    assert "HTTP 410" in out and '"error_code":"gpu_not_running"' in out
    _lines(out, "in-pod token after return: HTTP 401")

    # Workflow A: one command, then returned.
    workflow_a = json.loads((workdir / "workflow-a.json").read_text())
    assert (workflow_a["phase"], workflow_a["stdout"], workflow_a["name"]) == ("Succeeded", "no GPU in this pod\n", "nvidia-smi")
    gpu_a = (workdir / "workflow-a.gpu").read_text().strip()
    assert workflow_a["gpu_id"] == gpu_a
    assert _rental(stack, user, gpu_a)["end_reason"] == "returned"

    # Workflow B: code from the drive, polled to the end, outputs saved to the drive, returned.
    gpu_b = (workdir / "workflow-b.gpu").read_text().strip()
    _lines(out, "Succeeded")
    assert (workdir / "train-stdout.txt").read_text() == "epoch 0 loss 1.01\nepoch 1 loss 0.505\nepoch 2 loss 0.337\ntrained\n"
    ended_b = _rental(stack, user, gpu_b)
    assert (ended_b["phase"], ended_b["end_reason"]) == ("Ended", "returned")
    listing = {f["path"] for f in requests.get(f"{stack.base}/v1/files", headers=user.auth).json()["files"]}
    assert {"train.py", f"runs-out/{gpu_b}-outputs.tgz"} <= listing
    stored = requests.get(f"{stack.base}/v1/files/train.py", headers=user.auth)
    assert stored.content == (workdir / "train.py").read_bytes()
    archive = requests.get(f"{stack.base}/v1/files/runs-out/{gpu_b}-outputs.tgz", headers=user.auth)
    assert archive.status_code == 200
    with tarfile.open(fileobj=io.BytesIO(archive.content), mode="r:gz") as tar:
        metrics = json.load(tar.extractfile("outputs/metrics.json"))
    assert metrics == {"epochs": 3, "final_loss": 0.337}
    assert json.loads((workdir / "restored/outputs/metrics.json").read_text()) == metrics

    # Nothing left running, and every rental was paid for from the ledger.
    mine = requests.get(f"{stack.base}/v1/gpus", headers=user.auth).json()
    assert mine["my_gpus"] == []
    rentals = [gpu, other, gpu_a, gpu_b]
    charged = sum(_rental(stack, user, g)["credits_charged"] for g in rentals)
    assert charged >= len(rentals) * -(-price // 60)
    assert mine["credits"]["balance"] == start - charged
    _lines(out, f"no active rentals; balance {start - charged}")
