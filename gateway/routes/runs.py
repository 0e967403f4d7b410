"""/v1/runs: run commands in a rented pod, long-poll their end, stream their output."""

from __future__ import annotations

import asyncio
import codecs
import json
from concurrent.futures import ThreadPoolExecutor

from fastapi import APIRouter, Query, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field, field_validator
from starlette.concurrency import run_in_threadpool

from gateway import runs
from gateway.auth import ApprovedUser, Principal
from gateway.errors import ApiError
from gateway.openapi import content, errors, merge
from gateway.pods import RunState
from gateway.rentals import Rentals, check_command, check_env

router = APIRouter(tags=["runs"])
POD_DOWN = (503, "pod_unavailable: the pod backend did not answer; retry after Retry-After")
RUN_ERRORS = errors(
    (404, "gpu_not_found, or run_not_found: no such run on a rental of yours"),
    (409, "gpu_not_running: the rental is not running"),
    (410, "gpu_not_running: the rental has ended"),
    POD_DOWN,
)


class RunRequest(BaseModel):
    gpu_id: str = Field(max_length=100)
    name: str = Field(default="run", max_length=100)
    command: list[str] = Field(min_length=1, description="argv; wrap shell syntax in ['bash', '-c', '...']")
    env: dict[str, str] | None = None
    wait_seconds: float = Field(default=10, ge=0, le=60)

    @field_validator("env")
    @classmethod
    def _env(cls, value):
        return check_env(value)

    @field_validator("command")
    @classmethod
    def _command(cls, value):
        return check_command(value)


def _rentals(request: Request) -> Rentals:
    return request.app.state.rentals


def _pod(request: Request, principal: Principal, gpu_id: str, *, must_be_ready: bool = False) -> str:
    rentals = _rentals(request)
    with request.app.state.sessions() as session:
        rental = rentals.get(session, principal, gpu_id)
        if rental.phase not in ("Pending", "Running") or not rental.pod_ref:
            raise ApiError(410 if rental.ended_at else 409, "gpu_not_running", f"{gpu_id} is {rental.phase}")
        if must_be_ready and not rental.ready:
            raise ApiError(409, "gpu_not_ready", f"{gpu_id} is not ready yet ({rental.pending_reason})")
        return rental.pod_ref


def _locate(request: Request, principal: Principal, run_id: str, gpu_id: str | None) -> tuple[str, str]:
    """(gpu_id, pod ref) of a run: the hint, else the rental written in the run id."""
    gpu_id = gpu_id or runs.rental_of(run_id)
    if gpu_id is None or not runs.is_run_id(run_id):
        raise ApiError(404, "run_not_found", f"no run {run_id}")
    return gpu_id, _pod(request, principal, gpu_id)


def _state(request: Request, ref: str, run_id: str) -> RunState:
    tail = request.app.state.settings.run_output_tail_bytes
    state = _rentals(request).backend.run_state(ref, run_id, tail)
    if state is None:
        raise ApiError(404, "run_not_found", f"no run {run_id}")
    return state


# Long-polls wait in threads of their own: hundreds of them must not take every thread of the
# pool that serves the other routes (threads start as needed, up to this many).
LONG_POLLS = ThreadPoolExecutor(max_workers=1024, thread_name_prefix="kgpu-long-poll")
FOLLOW_SECONDS = 5.0


async def _wait(request: Request, ref: str, run_id: str, seconds: float) -> RunState:
    """The run's state once it ends, or after ``seconds``: one wait inside the pod."""
    backend = _rentals(request).backend
    tail = request.app.state.settings.run_output_tail_bytes
    state = await asyncio.get_running_loop().run_in_executor(
        LONG_POLLS, backend.wait_run, ref, run_id, seconds, tail
    )
    if state is None:
        raise ApiError(404, "run_not_found", f"no run {run_id}")
    return state


@router.post(
    "/v1/runs",
    summary="Start a run; answers when it ends or after wait_seconds (phase Running)",
    responses=merge(
        RUN_ERRORS,
        errors(
            (404, "gpu_not_found: no rental of yours with this id"),
            (409, "gpu_not_running, or gpu_not_ready: the pod is still starting"),
        ),
    ),
)
async def start_run(body: RunRequest, request: Request, principal: ApprovedUser) -> dict:
    ref = await run_in_threadpool(_pod, request, principal, body.gpu_id, must_be_ready=True)
    run_id = runs.new_run_id(body.gpu_id)
    rentals = _rentals(request)
    await run_in_threadpool(rentals.backend.start_run, ref, run_id, body.command, body.env or {})
    await run_in_threadpool(rentals.touch, body.gpu_id)
    state = await _wait(request, ref, run_id, body.wait_seconds)
    return {**runs.run_reply(body.gpu_id, state), "name": body.name}


@router.get(
    "/v1/runs",
    summary="Runs on your rented GPUs (all of them, or ?gpu_id=)",
    responses=errors((404, "gpu_not_found: no rental of yours with this id"), POD_DOWN),
)
def list_runs(request: Request, principal: ApprovedUser, gpu_id: str | None = None) -> dict:
    rentals = _rentals(request)
    with request.app.state.sessions() as session:
        if gpu_id:
            targets = [rentals.get(session, principal, gpu_id)]
        else:
            targets = rentals.active_of(session, principal)
        pods = [(r.id, r.pod_ref) for r in targets if r.pod_ref and r.phase in ("Pending", "Running")]
    found = []
    for rental_id, ref in pods:
        for run_id in rentals.backend.run_ids(ref):
            state = rentals.backend.run_state(ref, run_id, 0)
            if state is not None:
                found.append(runs.run_summary(rental_id, state))
    found.sort(key=lambda run: (run["started_at"] or "", run["run_id"]))
    return {"runs": found}


@router.get("/v1/runs/{run_id}", summary="A run's state with stdout/stderr tails", responses=RUN_ERRORS)
def get_run(run_id: str, request: Request, principal: ApprovedUser, gpu_id: str | None = None) -> dict:
    gpu_id, ref = _locate(request, principal, run_id, gpu_id)
    return runs.run_reply(gpu_id, _state(request, ref, run_id))


@router.delete(
    "/v1/runs/{run_id}",
    status_code=202,
    summary="SIGTERM the run's process group, SIGKILL after a grace",
    responses=RUN_ERRORS,
)
async def stop_run(run_id: str, request: Request, principal: ApprovedUser, gpu_id: str | None = None) -> dict:
    gpu_id, ref = await run_in_threadpool(_locate, request, principal, run_id, gpu_id)
    backend = _rentals(request).backend
    await run_in_threadpool(_state, request, ref, run_id)
    await run_in_threadpool(backend.signal_run, ref, run_id, "TERM")
    grace = request.app.state.settings.run_kill_grace_seconds

    async def kill_if_still_running() -> None:
        await asyncio.sleep(grace)
        state = await run_in_threadpool(backend.run_state, ref, run_id, 0)
        if state is not None and not state.finished:
            await run_in_threadpool(backend.signal_run, ref, run_id, "KILL")

    asyncio.get_running_loop().create_task(kill_if_still_running())
    state = await _wait(request, ref, run_id, min(grace, 2))
    return runs.run_reply(gpu_id, state)


@router.get(
    "/v1/runs/{run_id}/stream",
    summary="NDJSON: stdout/stderr chunks live, then done with the exit code",
    response_class=StreamingResponse,
    responses=merge(
        content(
            200,
            "One JSON object a line: {type: stdout|stderr, chunk}, then {type: done, exit_code}",
            {"application/x-ndjson": {"schema": {"type": "string"}}},
        ),
        RUN_ERRORS,
    ),
)
async def stream_run(run_id: str, request: Request, principal: ApprovedUser, gpu_id: str | None = Query(None)):
    gpu_id, ref = await run_in_threadpool(_locate, request, principal, run_id, gpu_id)
    await run_in_threadpool(_state, request, ref, run_id)
    backend = _rentals(request).backend

    async def lines():
        offsets = {"stdout": 0, "stderr": 0}
        decoders = {name: codecs.getincrementaldecoder("utf-8")(errors="replace") for name in offsets}
        loop = asyncio.get_running_loop()
        while True:
            # One wait in the pod for new output or the end (a few seconds at most, so a client
            # that went away frees its thread soon).
            state = await loop.run_in_executor(
                LONG_POLLS, backend.follow_run, ref, run_id, dict(offsets), FOLLOW_SECONDS
            )
            if state is None:
                yield json.dumps({"type": "done", "exit_code": None}) + "\n"
                return
            for name, data in (("stdout", state.stdout), ("stderr", state.stderr)):
                if data:
                    offsets[name] += len(data)
                    text = decoders[name].decode(data)
                    if text:
                        yield json.dumps({"type": name, "chunk": text}) + "\n"
            if state.finished and not state.stdout and not state.stderr:  # all of it read
                summary = runs.run_summary(gpu_id, state)
                yield json.dumps({"type": "done", "exit_code": summary["exit_code"]}) + "\n"
                return

    return StreamingResponse(lines(), media_type="application/x-ndjson")
