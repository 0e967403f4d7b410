"""gateway/pods/slots.py: the caps on calls in flight, one suite for both ways of counting them:
in one process's memory (CountedSlots) and as locks on files that every process of a server
shares (LockedSlots). Each test asks ``slots()`` for the server's slots as often as it likes: the
counted kind answers its one instance (one process), the locked kind a new instance on the same
folder each time, as another process of the server would hold them."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from gateway.pods.slots import CallerBusy, CountedSlots, LockedSlots, PodBusy, call_slots


@pytest.fixture(params=["counted", "locked"])
def slots(request, tmp_path):
    """``slots(per_pod, per_caller=None)``: the one server's slots with those caps."""
    one: dict[tuple, CountedSlots] = {}

    def server_slots(per_pod: int, per_caller: int | None = None):
        if request.param == "counted":
            return one.setdefault((per_pod, per_caller), CountedSlots(per_pod, per_caller))
        return LockedSlots(tmp_path / "slots", per_pod, per_caller)

    return server_slots


def test_one_pod_holds_only_a_few_calls(slots):
    with slots(2).hold("a"), slots(2).hold("a"):
        with pytest.raises(PodBusy):
            with slots(2).hold("a"):
                pass
        with slots(2).hold("b"):  # another pod is not held back
            pass
    with slots(2).hold("a"), slots(2).hold("a"):  # given back
        pass


def test_one_caller_holds_only_a_few_calls_across_its_pods(slots):
    """A tenant with many pods: each pod has room, but the caller's cap across them is reached;
    another caller still gets in, and every way a call ends gives its slots back."""
    def hold(ref, caller=None):
        return slots(2, 3).hold(ref, caller)

    with hold("a", "mallory"), hold("a", "mallory"), hold("b", "mallory"):
        with pytest.raises(CallerBusy):
            with hold("c", "mallory"):  # a pod with nothing in flight
                pass
        with pytest.raises(PodBusy):  # the pod's cap is still the pod's, and a refusal takes nothing
            with hold("a", "alice"):
                pass
        with hold("c", "alice"), hold("b", "alice"):  # another caller is not held back
            pass
        with hold("c"):  # nor a call that names no caller (a run's)
            pass
    with pytest.raises(RuntimeError):  # a call that fails gives its slots back
        with hold("a", "mallory"), hold("b", "mallory"), hold("c", "mallory"):
            raise RuntimeError("the pod went away")
    with hold("a", "mallory"), hold("a", "mallory"), hold("b", "mallory"):  # all three again
        with pytest.raises(CallerBusy):
            with hold("b", "mallory"):
                pass
    # Refusals took nothing: mallory's none of c's, alice's none of hers.
    with hold("c", "alice"), hold("c", "alice"), hold("a", "alice"):
        pass


def test_a_caller_refused_keeps_no_slot_of_the_pod(slots):
    """The pod's slot is taken first: the caller's refusal gives it back before it is raised."""
    with slots(1, 1).hold("a", "mallory"):
        for _ in range(3):
            with pytest.raises(CallerBusy):
                with slots(1, 1).hold("b", "mallory"):
                    pass
        with slots(1, 1).hold("b", "alice"):  # b's one slot is free
            pass


def test_racing_holders_never_pass_the_cap_and_give_every_slot_back(slots):
    """Threads (each with the server's slots of its own, as processes would) take and give back
    one pod's slots as fast as they can: never more than the cap at once, none left held."""
    cap, inside, peak = 3, [0], [0]
    counting = threading.Lock()
    start = threading.Barrier(8)

    def churn() -> None:
        start.wait()
        for _ in range(400):
            try:
                with slots(cap).hold("hot"):
                    with counting:
                        inside[0] += 1
                        peak[0] = max(peak[0], inside[0])
                    time.sleep(0.0002)  # held a moment: others try meanwhile
                    with counting:
                        inside[0] -= 1
            except PodBusy:
                pass

    threads = [threading.Thread(target=churn) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert peak[0] <= cap
    with slots(cap).hold("hot"), slots(cap).hold("hot"), slots(cap).hold("hot"):
        with pytest.raises(PodBusy):
            with slots(cap).hold("hot"):
                pass


# ------------------------------------------------------------------ shared by the processes of a server

HOLDER = """
import sys
from gateway.pods.slots import LockedSlots

slots = LockedSlots(sys.argv[1], per_pod=2, per_caller=3)
with slots.hold("a", "mallory"), slots.hold("a", "mallory"), slots.hold("b", "mallory"):
    print("held", flush=True)
    sys.stdin.read()  # until it is killed
"""


def test_the_processes_of_a_server_share_the_caps_and_a_killed_ones_slots_come_back(tmp_path):
    """A worker process holds a pod's every slot and its caller's every slot: this process is
    refused both, though it holds nothing itself; SIGKILLed, the worker leaves no slot held."""
    folder = tmp_path / "slots" / "pod-files"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(folder)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        cwd=Path(__file__).resolve().parent.parent,
    )
    try:
        assert holder.stdout.readline() == b"held\n"
        mine = call_slots("pod-files", 2, 3, shared_in=tmp_path / "slots")
        with pytest.raises(PodBusy):
            with mine.hold("a", "alice"):
                pass
        with pytest.raises(CallerBusy):
            with mine.hold("c", "mallory"):
                pass
        with mine.hold("b", "alice"):  # b has one slot left
            pass
    finally:
        holder.kill()
        holder.wait()
    with mine.hold("a", "mallory"), mine.hold("a", "mallory"), mine.hold("b", "mallory"):
        pass
    assert list(folder.iterdir()) == []  # the dead one's files taken again, and none kept once given back


def test_without_a_folder_the_slots_are_counted_in_this_process(tmp_path):
    assert type(call_slots("pod-calls")) is CountedSlots
    shared = call_slots("pod-calls", shared_in=tmp_path / "slots")
    assert type(shared) is LockedSlots and shared.folder == tmp_path / "slots" / "pod-calls"


def test_the_slots_folder_is_the_servers_alone(tmp_path):
    """Made in the data directory (0711): other users of the host list and open nothing in it."""
    shared = call_slots("pod-calls", shared_in=tmp_path / "slots")
    with shared.hold("a"):
        [held] = shared.folder.iterdir()
        modes = [p.stat().st_mode & 0o777 for p in (tmp_path / "slots", shared.folder, held)]
    assert modes == [0o700, 0o700, 0o600]
