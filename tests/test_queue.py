"""The rental queue: `"queue": true` waits for GPUs (phase Queued, not billed) instead of 409."""

from __future__ import annotations

import json
import time

import pytest
import requests

from tests.conftest import ADMIN_TOKEN, LiveServer, make_settings

GPUS = json.dumps(
    [
        {"node": "node-a", "gpu_model": "h100", "count": 2, "price_per_hour_credits": 500},
        {"node": "node-c", "gpu_model": "a5000", "count": 1, "price_per_hour_credits": 300},
    ]
)


@pytest.fixture(scope="module")
def server(tmp_path_factory, rclone_target):
    server = LiveServer(make_settings(tmp_path_factory.mktemp("queue"), rclone_target, gpu_inventory=GPUS)).start()
    yield server
    server.stop()


def account(server, **fields) -> dict[str, str]:
    reply = requests.post(
        f"{server.base}/v1/admin/users",
        json={"email": f"q{time.monotonic_ns()}@lab.example", **fields},
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
    )
    assert reply.status_code == 201, reply.text
    return {"Authorization": f"Bearer {reply.json()['token']}"}


def rent(server, auth, **body) -> requests.Response:
    return requests.post(f"{server.base}/v1/gpus", json={"name": "q", **body}, headers=auth, timeout=30)


def state(server, auth, gpu_id) -> dict:
    reply = requests.get(f"{server.base}/v1/gpus/{gpu_id}", headers=auth, timeout=30)
    assert reply.status_code == 200, reply.text
    return reply.json()


def give_back(server, auth, gpu_id) -> dict:
    reply = requests.delete(f"{server.base}/v1/gpus/{gpu_id}", headers=auth, timeout=60)
    assert reply.status_code == 200, reply.text
    return reply.json()


def wait_phase(server, auth, gpu_id, phase, seconds=30.0) -> dict:
    deadline = time.monotonic() + seconds
    while (now := state(server, auth, gpu_id))["phase"] != phase:
        assert time.monotonic() < deadline, f"{gpu_id} still {now['phase']} ({now['pending_reason']})"
        time.sleep(0.1)
    return now


def test_a_queued_rental_waits_unbilled_then_starts_when_a_gpu_frees(server):
    alice, bob, carol = account(server), account(server), account(server)
    held = [rent(server, alice, gpu_model="h100", gpu_count=1).json() for _ in range(2)]
    assert [h["phase"] for h in held] == ["Running", "Running"]

    full = rent(server, bob, gpu_model="h100", gpu_count=1)
    assert full.status_code == 409 and full.json()["error_code"] == "no_capacity"
    first = rent(server, bob, gpu_model="h100", gpu_count=1, queue=True)
    assert first.status_code == 201, first.text
    first = first.json()
    assert first["phase"] == "Queued" and first["queue_position"] == 1 and not first["ready"]
    assert first["started_at"] is None and first["credits_charged"] == 0 and first["node"] == ""
    second = rent(server, carol, gpu_model="h100", gpu_count=1, queue=True).json()
    assert second["queue_position"] == 2

    # Nobody jumps the queue: a GPU that frees goes to the first in line, not to a new request.
    runs = requests.post(f"{server.base}/v1/runs", json={"gpu_id": first["gpu_id"], "command": ["true"]}, headers=bob)
    assert runs.status_code == 409 and runs.json()["error_code"] == "gpu_not_running"
    give_back(server, alice, held[0]["gpu_id"])
    started = wait_phase(server, bob, first["gpu_id"], "Running")
    assert started["ready"] and started["node"] == "node-a" and started["queue_position"] is None
    assert started["credits_charged"] > 0  # billing starts when it runs
    assert state(server, carol, second["gpu_id"])["queue_position"] == 1
    late = rent(server, alice, gpu_model="h100", gpu_count=1)
    assert late.status_code == 409 and "queued" in late.json()["message"]

    # Cancelling while queued costs nothing and leaves the queue.
    cancelled = give_back(server, carol, second["gpu_id"])
    assert cancelled["phase"] == "Ended" and cancelled["credits_charged"] == 0 and cancelled["started_at"] is None
    run = requests.post(
        f"{server.base}/v1/runs", json={"gpu_id": first["gpu_id"], "command": ["sh", "-c", "echo queued-and-ran"]},
        headers=bob,
    ).json()
    assert run["stdout"] == "queued-and-ran\n"
    give_back(server, alice, held[1]["gpu_id"])
    give_back(server, bob, first["gpu_id"])


def test_first_come_first_served_per_model(server):
    """A two-GPU request at the head of the queue is not starved by later one-GPU requests."""
    alice, bob, carol = account(server), account(server), account(server)
    held = [rent(server, alice, gpu_model="h100", gpu_count=1).json() for _ in range(2)]
    big = rent(server, bob, gpu_model="h100", gpu_count=2, queue=True).json()
    small = rent(server, carol, gpu_model="h100", gpu_count=1, queue=True).json()
    other = rent(server, carol, gpu_model="a5000", gpu_count=1).json()  # another model is not held back
    assert other["phase"] == "Running"
    give_back(server, alice, held[0]["gpu_id"])
    time.sleep(1.5)  # the queue has moved by now, as far as it can
    assert state(server, carol, small["gpu_id"])["phase"] == "Queued"
    assert state(server, bob, big["gpu_id"])["phase"] == "Queued"
    give_back(server, alice, held[1]["gpu_id"])
    assert wait_phase(server, bob, big["gpu_id"], "Running")["gpu_count"] == 2
    assert state(server, carol, small["gpu_id"])["queue_position"] == 1
    give_back(server, bob, big["gpu_id"])
    wait_phase(server, carol, small["gpu_id"], "Running")
    give_back(server, carol, small["gpu_id"])
    give_back(server, carol, other["gpu_id"])


def test_what_can_never_fit_is_not_queued_and_queued_gpus_count_against_the_cap(server):
    alice = account(server)
    never = rent(server, alice, gpu_model="a5000", gpu_count=2, queue=True)
    assert never.status_code == 409 and never.json()["error_code"] == "no_capacity"
    blocker_auth = account(server)
    blocker = rent(server, blocker_auth, gpu_model="h100", gpu_count=2).json()
    waiting = [rent(server, alice, gpu_model="h100", gpu_count=2, queue=True).json() for _ in range(2)]
    assert [w["phase"] for w in waiting] == ["Queued", "Queued"]
    capped = rent(server, alice, gpu_model="h100", gpu_count=1, queue=True)  # 4 queued GPUs: the cap
    assert capped.status_code == 409 and capped.json()["error_code"] == "gpu_cap_reached"
    for queued in waiting:
        give_back(server, alice, queued["gpu_id"])
    give_back(server, blocker_auth, blocker["gpu_id"])


def test_a_stranger_cannot_see_or_cancel_a_queued_rental(server):
    owner, stranger = account(server), account(server)
    blocker_auth = account(server)
    blocker = rent(server, blocker_auth, gpu_model="a5000", gpu_count=1).json()
    queued = rent(server, owner, gpu_model="a5000", gpu_count=1, queue=True).json()
    assert queued["phase"] == "Queued"
    for reply in (
        requests.get(f"{server.base}/v1/gpus/{queued['gpu_id']}", headers=stranger),
        requests.delete(f"{server.base}/v1/gpus/{queued['gpu_id']}", headers=stranger),
    ):
        assert reply.status_code == 404 and reply.json()["error_code"] == "gpu_not_found"
    assert state(server, owner, queued["gpu_id"])["phase"] == "Queued"
    mine = requests.get(f"{server.base}/v1/gpus", headers=owner).json()["my_gpus"]
    assert [(g["gpu_id"], g["queue_position"]) for g in mine] == [(queued["gpu_id"], 1)]
    give_back(server, owner, queued["gpu_id"])
    give_back(server, blocker_auth, blocker["gpu_id"])


def test_kgpu_rent_queue_waits_its_turn(server, tmp_path):
    """`kgpu rent --queue`: says its place in the queue, and answers once the rental is ready."""
    from tests.test_client import Kgpu

    holder, waiter = account(server), account(server)
    held = rent(server, holder, gpu_model="a5000", gpu_count=1).json()
    kgpu = Kgpu(tmp_path)
    login = kgpu("login", "--base-url", server.base, stdin=waiter["Authorization"].split()[1] + "\n")
    assert login.returncode == 0, login.stderr
    waiting = kgpu.popen("rent", "--model", "a5000", "--gpus", "1", "--cpu", "1", "--memory", "1Gi", "--queue", "--json")
    try:
        assert "queued, position 1" in waiting.stderr.readline()
        assert waiting.poll() is None  # still waiting its turn
        give_back(server, holder, held["gpu_id"])
        out, err = waiting.communicate(timeout=120)
    finally:
        if waiting.poll() is None:
            waiting.kill()
    assert waiting.returncode == 0, err
    rental = json.loads(out)
    assert rental["phase"] == "Running" and rental["ready"] and rental["node"] == "node-c"
    give_back(server, waiter, rental["gpu_id"])


def test_a_model_that_leaves_the_inventory_holds_back_only_its_own_queue(server):
    """Nodes go (a drained Slurm partition): the reaper's tick and the other models' queues go on."""
    rentals = server.app.state.rentals
    alice, bob = account(server), account(server)
    a5000 = rent(server, alice, gpu_model="a5000", gpu_count=1).json()
    waiting_a5000 = rent(server, bob, gpu_model="a5000", gpu_count=1, queue=True).json()
    held = [rent(server, alice, gpu_model="h100", gpu_count=1).json() for _ in range(2)]
    waiting_h100 = rent(server, bob, gpu_model="h100", gpu_count=1, queue=True).json()
    original = rentals.placement.configured
    rentals.placement.configured = [c for c in original if c.gpu_model != "a5000"]
    try:
        give_back(server, alice, held[0]["gpu_id"])
        rentals.tick()  # must not fail on the queued a5000 rental
        assert wait_phase(server, bob, waiting_h100["gpu_id"], "Running")["node"] == "node-a"
        assert state(server, bob, waiting_a5000["gpu_id"])["phase"] == "Queued"
    finally:
        rentals.placement.configured = original
    for auth, gpu in ((alice, a5000), (alice, held[1]), (bob, waiting_h100), (bob, waiting_a5000)):
        give_back(server, auth, gpu["gpu_id"])


def test_a_cpu_only_rental_never_waits_behind_a_gpu_queue(server):
    """Issue 19 (16): a queued rental (which costs nothing) blocked even gpu_count 0 rentals for
    everyone: "409 no node has 0 free h100 GPUs … 2 rentals are queued"."""
    alice, bob, carol = account(server), account(server), account(server)
    held = [rent(server, alice, gpu_model="h100", gpu_count=1).json() for _ in range(2)]
    queued = rent(server, bob, gpu_model="h100", gpu_count=1, queue=True).json()
    try:
        assert queued["phase"] == "Queued"
        cpu_only = rent(server, carol, gpu_model="h100", gpu_count=0)
        assert cpu_only.status_code == 201, cpu_only.text
        assert cpu_only.json()["phase"] in ("Pending", "Running") and cpu_only.json()["gpu_count"] == 0
        give_back(server, carol, cpu_only.json()["gpu_id"])
        assert state(server, bob, queued["gpu_id"])["phase"] == "Queued"  # the GPU queue is as it was
    finally:
        give_back(server, bob, queued["gpu_id"])
        for rental in held:
            give_back(server, alice, rental["gpu_id"])
