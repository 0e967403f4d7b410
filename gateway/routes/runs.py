"""/v1/runs: run commands in a rented pod, long-poll their end, stream their output."""

from __future__ import annotations

import asyncio
import codecs
import json
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated

from fastapi import APIRouter
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field, ValidationInfo, field_validator, model_validator
from starlette.concurrency import run_in_threadpool

from gateway.auth import ApprovedUser
from gateway.deps import RentalIdQuery, RunsDep, SettingsDep
from gateway.openapi import GPU_ENDED, GPU_NOT_FOUND, POD_DOWN, content, errors, merge
from gateway.pods import RunInput, RunState
from gateway.rentals import check_command, check_env
from gateway.runs import (
    ENDING_SLACK_SECONDS, MAX_STDIN_BYTES, MAX_TIMEOUT_SECONDS, Runs, base64_stdin, run_reply, run_summary,
    text_stdin,
)

router = APIRouter(tags=["runs"])
RUN_ERRORS = errors(
    (404, "gpu_not_found, or run_not_found: no such run on a rental of yours"),
    (409, "gpu_not_running: the rental is not running"),
    GPU_ENDED,
    POD_DOWN,
)


_STDIN_READERS = {"stdin": text_stdin, "stdin_base64": base64_stdin}


class RunRequest(BaseModel):
    gpu_id: str = Field(max_length=100)
    name: str = Field(default="run", max_length=100)
    command: list[str] = Field(min_length=1, description="argv; wrap shell syntax in ['bash', '-c', '...']")
    env: dict[str, str] | None = None
    wait_seconds: float = Field(
        default=10, ge=0, le=60,
        description="how long to wait for the end before answering (phase Running); with timeout_seconds and "
        "no wait_seconds: until the run ends or is ended",
    )
    stdin: str | None = Field(
        default=None, max_length=MAX_STDIN_BYTES,
        description="text piped to the command's stdin (UTF-8, at most 1 MiB); without it, or stdin_base64, stdin is empty",
    )
    stdin_base64: str | None = Field(
        default=None, max_length=4 * ((MAX_STDIN_BYTES + 2) // 3),
        description="bytes piped to the command's stdin, base64 (at most 1 MiB decoded); instead of stdin",
    )
    timeout_seconds: Annotated[int, Field(strict=True, ge=1, le=MAX_TIMEOUT_SECONDS)] | None = Field(
        default=None,
        description="end the run after this many seconds (TERM, then KILL after a grace): its output so far is kept "
        "and timed_out is true; none: the run may go on as long as the rental",
    )

    @model_validator(mode="after")
    def _one_stdin(self):
        if self.stdin is not None and self.stdin_base64 is not None:
            raise ValueError("give stdin or stdin_base64, not both")
        return self

    @field_validator("stdin", "stdin_base64")
    @classmethod
    def _stdin_fits(cls, value, info: ValidationInfo):
        if value is not None:
            _STDIN_READERS[info.field_name](value)
        return value

    def input(self, grace_s: float) -> RunInput:
        data = None  # no stdin: an empty one
        for name, read in _STDIN_READERS.items():  # one at most (_one_stdin)
            if getattr(self, name) is not None:
                data = read(getattr(self, name))
        return RunInput(stdin=data, timeout_s=self.timeout_seconds or 0, grace_s=grace_s)

    def waits(self, grace_s: float) -> float:
        """How long the request waits for the run's end: wait_seconds, or, with a time limit
        and no wait_seconds, until the runner has ended it."""
        if self.timeout_seconds is not None and "wait_seconds" not in self.model_fields_set:
            return self.timeout_seconds + grace_s + ENDING_SLACK_SECONDS
        return self.wait_seconds

    @field_validator("env")
    @classmethod
    def _env(cls, value):
        return check_env(value)

    @field_validator("command")
    @classmethod
    def _command(cls, value):
        return check_command(value)


# Long-polls wait in threads of their own: hundreds of them must not take every thread of the
# pool that serves the other routes (threads start as needed, up to this many).
LONG_POLLS = ThreadPoolExecutor(max_workers=1024, thread_name_prefix="kgpu-long-poll")
FOLLOW_SECONDS = 5.0


async def _wait(runs: Runs, ref: str, run_id: str, seconds: float) -> RunState:
    """The run's state once it ends, or after ``seconds``, waited for on a long-poll thread."""
    return await asyncio.get_running_loop().run_in_executor(LONG_POLLS, runs.wait, ref, run_id, seconds)


@router.post(
    "/v1/runs",
    summary="Start a run; answers when it ends or after wait_seconds (phase Running)",
    responses=merge(
        RUN_ERRORS,
        errors(
            GPU_NOT_FOUND,
            (409, "gpu_not_running, or gpu_not_ready: the pod is still starting"),
        ),
    ),
)
async def start_run(body: RunRequest, principal: ApprovedUser, runs: RunsDep, settings: SettingsDep) -> dict:
    grace = settings.run_kill_grace_seconds
    ref, run_id = await run_in_threadpool(
        runs.start, principal, body.gpu_id, body.command, body.env or {}, body.input(grace)
    )
    state = await _wait(runs, ref, run_id, body.waits(grace))
    return {**run_reply(body.gpu_id, state), "name": body.name}


@router.get(
    "/v1/runs",
    summary="Runs on your rented GPUs (all of them, or ?gpu_id=)",
    responses=errors(GPU_NOT_FOUND, POD_DOWN),
)
def list_runs(principal: ApprovedUser, runs: RunsDep, rental_id: RentalIdQuery = None) -> dict:
    return {"runs": runs.of(principal, rental_id)}


@router.get("/v1/runs/{run_id}", summary="A run's state with stdout/stderr tails", responses=RUN_ERRORS)
def get_run(run_id: str, principal: ApprovedUser, runs: RunsDep, rental_id: RentalIdQuery = None) -> dict:
    rental_id, ref = runs.locate(principal, run_id, rental_id)
    return run_reply(rental_id, runs.state(ref, run_id))


@router.delete(
    "/v1/runs/{run_id}",
    status_code=202,
    summary="SIGTERM the run's process group, SIGKILL after a grace",
    responses=RUN_ERRORS,
)
async def stop_run(
    run_id: str, principal: ApprovedUser, runs: RunsDep, settings: SettingsDep, rental_id: RentalIdQuery = None
) -> dict:
    rental_id, ref = await run_in_threadpool(runs.locate, principal, run_id, rental_id)
    await run_in_threadpool(runs.state, ref, run_id)
    await run_in_threadpool(runs.signal, ref, run_id, "TERM")
    grace = settings.run_kill_grace_seconds

    async def kill_if_still_running() -> None:
        await asyncio.sleep(grace)
        state = await run_in_threadpool(runs.peek, ref, run_id)
        if state is not None and not state.finished:
            await run_in_threadpool(runs.signal, ref, run_id, "KILL")

    asyncio.get_running_loop().create_task(kill_if_still_running())
    state = await _wait(runs, ref, run_id, min(grace, 2))
    return run_reply(rental_id, state)


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
async def stream_run(run_id: str, principal: ApprovedUser, runs: RunsDep, rental_id: RentalIdQuery = None):
    rental_id, ref = await run_in_threadpool(runs.locate, principal, run_id, rental_id)
    await run_in_threadpool(runs.state, ref, run_id)

    async def lines():
        offsets = {"stdout": 0, "stderr": 0}
        decoders = {name: codecs.getincrementaldecoder("utf-8")(errors="replace") for name in offsets}
        loop = asyncio.get_running_loop()
        while True:
            # One wait in the pod for new output or the end (a few seconds at most, so a client
            # that went away frees its thread soon).
            state = await loop.run_in_executor(LONG_POLLS, runs.follow, ref, run_id, dict(offsets), FOLLOW_SECONDS)
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
                summary = run_summary(rental_id, state)
                yield json.dumps({"type": "done", "exit_code": summary["exit_code"]}) + "\n"
                return

    return StreamingResponse(lines(), media_type="application/x-ndjson")
