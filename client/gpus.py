"""``kgpu gpus / rent / run / logs / return``: rentals and the runs in them."""

from __future__ import annotations

import http.client
import signal
import sys
import time

from client.api import Api
from client.errors import ApiError, UsageError
from client.output import emit_json, table
from client.session import Session
from client.ssh import own_public_key, remember_minted

READY_POLL_S = 1.0
STOP_WAIT_S = 30.0
RECONNECT_FOR_S = 60.0  # how long a broken output stream is tried again before giving up
RECONNECT_PAUSE_S = 1.0


def gpus(session: Session) -> int:
    answer = session.api.call("GET", "/v1/gpus")
    if session.as_json:
        emit_json(answer)
        return 0
    rows = [["NODE", "MODEL", "BUSY/TOTAL", "CREDITS/H"]]
    rows += [[n["node"], n["gpu_model"], f"{n['gpu_busy']}/{n['gpu_total']}", str(n["price_per_hour_credits"])]
             for n in answer.get("cluster", [])]
    print(table(rows))
    if "credits" in answer:
        print(f"\nbalance: {answer['credits']['balance']} credits")
    mine = answer.get("my_gpus") or []
    if mine:
        print("\nyour rentals:")
        print(table([["GPU", "NAME", "MODEL", "COUNT", "PHASE", "CHARGED"]] + [
            [g["gpu_id"], g["name"], g["gpu_model"], str(g["gpu_count"]), g["phase"], str(g["credits_charged"])]
            for g in mine]))
    return 0


def parse_env(pairs: list[str]) -> dict[str, str] | None:
    env = {}
    for pair in pairs or []:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise UsageError(f"--env takes NAME=VALUE, not {pair!r}")
        env[name] = value
    return env or None


def rent(session: Session, fields: dict, wait: bool, timeout: float) -> int:
    body = {k: v for k, v in fields.items() if v is not None}
    if "ssh_pubkey" not in body and (own := own_public_key()):
        body["ssh_pubkey"] = own  # your own key: the server mints none
    rental = session.api.call("POST", "/v1/gpus", body=body)
    remember_minted(rental)
    if wait:
        rental = _wait_ready(session.api, rental, timeout)
    if session.as_json:
        emit_json(rental)
    else:
        print(f"{rental['gpu_id']}  {rental['phase']}{' (ready)' if rental.get('ready') else ''}  "
              f"{rental['gpu_model']} x {rental['gpu_count']}  {rental['price_per_hour_credits']} credits/hour  "
              f"until {rental['expires_at']}")
    if rental["phase"] in ("Failed", "Ended"):
        raise ApiError(0, "start_failed", f"{rental['gpu_id']} did not start: {rental.get('end_reason')}")
    return 0


def _wait_ready(api: Api, rental: dict, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    position = None
    while not rental.get("ready") and rental["phase"] in ("Queued", "Pending", "Running"):
        if rental["phase"] == "Queued" and rental.get("queue_position") != position:
            position = rental.get("queue_position")
            print(f"{rental['gpu_id']} queued, position {position}", file=sys.stderr, flush=True)
        if time.monotonic() > deadline:
            raise ApiError(0, "not_ready", f"{rental['gpu_id']} not ready after {timeout:.0f} s "
                           f"({rental.get('pending_reason') or rental['phase']}); it is still rented")
        time.sleep(READY_POLL_S)
        rental = api.call("GET", f"/v1/gpus/{rental['gpu_id']}")
    return rental


def give_back(session: Session, gpu_id: str) -> int:
    rental = session.api.call("DELETE", f"/v1/gpus/{gpu_id}")
    if session.as_json:
        emit_json(rental)
    else:
        print(f"{gpu_id} {rental['phase']} ({rental.get('end_reason')}), {rental['credits_charged']} credits charged")
    return 0


# ---------------------------------------------------------------- runs


def run(session: Session, gpu_id: str, command: list[str], name: str | None, env: dict | None) -> int:
    """Start a run and stream its output; the run's exit code is ours. Ctrl-C: stop it, or detach."""
    if not command:
        raise UsageError("nothing to run: kgpu run GPU -- COMMAND [ARGS…]")
    body = {"gpu_id": gpu_id, "command": command, "wait_seconds": 0, **({"name": name} if name else {}),
            **({"env": env} if env else {})}
    started = session.api.call("POST", "/v1/runs", body=body)
    run_id = started["run_id"]
    if not session.as_json:
        print(f"kgpu: {run_id} started on {gpu_id} (Ctrl-C to stop or detach)", file=sys.stderr)
    previous = signal.signal(signal.SIGTERM, _terminated)
    try:
        exit_code = _follow(session, gpu_id, run_id)
    except KeyboardInterrupt as exc:
        return _interrupted(session, gpu_id, run_id, ask=not isinstance(exc, Terminated))
    finally:
        signal.signal(signal.SIGTERM, previous)
    if session.as_json:
        emit_json({"run_id": run_id, "gpu_id": gpu_id, "exit_code": exit_code})
    return exit_code


def _follow(session: Session, gpu_id: str, run_id: str) -> int:
    """Print the run's output as it comes (to our stdout and stderr, or as NDJSON); its exit code.

    The stream replays the output from the start: when it breaks off (a gateway restarting; the
    run goes on in its pod), it is opened again and what was already shown is skipped.
    """
    shown = {"stdout": 0, "stderr": 0}  # characters already printed, per stream
    give_up_at = None
    while True:
        replayed = {"stdout": 0, "stderr": 0}
        try:
            for event in session.api.lines(f"/v1/runs/{run_id}/stream", params={"gpu_id": gpu_id}):
                kind = event.get("type")
                if kind == "done":
                    return int(event["exit_code"])
                if kind not in replayed:
                    continue
                chunk, offset = event["chunk"], replayed[kind]
                replayed[kind] += len(chunk)
                new = chunk[max(0, shown[kind] - offset):]
                if new:
                    _show(session.as_json, kind, new)
                    shown[kind] += len(new)
                    give_up_at = None
        except ApiError as exc:
            if exc.status not in (0, 502, 503, 504):
                raise
        except (OSError, http.client.HTTPException, ValueError):
            pass
        give_up_at = give_up_at or time.monotonic() + RECONNECT_FOR_S
        if time.monotonic() > give_up_at:
            raise ApiError(0, "stream_lost", f"lost the output stream of {run_id} for {RECONNECT_FOR_S:.0f} s; "
                           f"follow it with kgpu logs {gpu_id} {run_id} --follow")
        time.sleep(RECONNECT_PAUSE_S)


def _show(as_json: bool, kind: str, text: str) -> None:
    if as_json:
        emit_json({"type": kind, "chunk": text})
        sys.stdout.flush()
        return
    out = sys.stdout if kind == "stdout" else sys.stderr
    out.write(text)
    out.flush()


class Terminated(KeyboardInterrupt):
    """SIGTERM while following a run: stop it, as Ctrl-C does without a terminal."""


def _terminated(signum, frame):
    raise Terminated()


def _interrupted(session: Session, gpu_id: str, run_id: str, ask: bool) -> int:
    """Ctrl-C: with a terminal, ask; without one (a script, an agent), stop the run."""
    stop = True
    if ask and sys.stdin.isatty() and not session.as_json:
        # The question goes to stderr: stdout carries the run's own output.
        sys.stderr.write(f"\nkgpu: stop {run_id}? [S]top / [d]etach (it keeps running): ")
        sys.stderr.flush()
        try:
            answer = sys.stdin.readline().strip().lower()
        except KeyboardInterrupt:
            answer = "s"
        stop = not answer.startswith("d")
    if not stop:
        print(f"kgpu: detached; follow it with: kgpu logs {gpu_id} {run_id} --follow", file=sys.stderr)
        return 0
    state = session.api.call("DELETE", f"/v1/runs/{run_id}", params={"gpu_id": gpu_id})
    deadline = time.monotonic() + STOP_WAIT_S
    while state.get("phase") == "Running" and time.monotonic() < deadline:
        time.sleep(0.5)
        state = session.api.call("GET", f"/v1/runs/{run_id}", params={"gpu_id": gpu_id})
    code = state.get("exit_code")
    if session.as_json:
        emit_json({"run_id": run_id, "gpu_id": gpu_id, "exit_code": code, "stopped": True})
    else:
        print(f"\nkgpu: stopped {run_id} ({state.get('phase')}, exit code {code})", file=sys.stderr)
    return int(code) if code is not None else 130


def logs(session: Session, gpu_id: str, run_id: str, follow: bool) -> int:
    """A run's output: all of it from the stream once it has ended (or with --follow); else its tails."""
    state = session.api.call("GET", f"/v1/runs/{run_id}", params={"gpu_id": gpu_id})
    if follow or state["phase"] != "Running":
        try:
            exit_code = _follow(session, gpu_id, run_id)
        except KeyboardInterrupt:
            return 130
        if session.as_json:
            emit_json({"run_id": run_id, "gpu_id": gpu_id, "exit_code": exit_code})
        return 0
    if session.as_json:
        emit_json(state)
    else:
        sys.stdout.write(state.get("stdout", ""))
        sys.stderr.write(state.get("stderr", ""))
        print(f"kgpu: {run_id} is still running (kgpu logs {gpu_id} {run_id} --follow)", file=sys.stderr)
    return 0
