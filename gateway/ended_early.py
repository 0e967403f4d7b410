"""An answer the gateway ends short of its Content-Length on purpose: its source failed after the
head went out (a pod's file truncated, the pod gone), and the client must see the body cut, which
over HTTP/1.1 only a closed connection says.

ASGI has no message for "close the connection now", and uvicorn gives an app no handle on its
transport: an exception escaping the app closes the connection but is logged with its traceback
("Exception in ASGI application"); an app that returns with the body incomplete makes uvicorn close
the connection too (httptools_impl.py and h11_impl.py, ``run_asgi``), with one ERROR line that
names nothing ("ASGI callable returned without completing response."). The caller logs its own
line, naming what was cut and why, and returns; :func:`end_early` marks the request so that
uvicorn's line for it is dropped, and only for it: a handler that leaves a body incomplete by
mistake is still logged."""

from __future__ import annotations

import logging
from contextvars import ContextVar

# uvicorn's line; should it ever change, the line comes back (noise, nothing lost)
_UVICORN_LINE = "ASGI callable returned without completing response."

# Set in the request's own task, whose context uvicorn's run_asgi (the same task) logs in once the
# app returns; each request's task starts from a fresh copy, so no other request sees it.
_on_purpose: ContextVar[bool] = ContextVar("kgpu_ended_early", default=False)


class _DropOnPurpose(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.msg == _UVICORN_LINE and _on_purpose.get())


_DROP = _DropOnPurpose()


def end_early() -> None:
    """This request's answer is cut on purpose: once the app returns, uvicorn closes the
    connection without a line about it."""
    _on_purpose.set(True)
    uvicorn_log = logging.getLogger("uvicorn.error")
    if _DROP not in uvicorn_log.filters:  # added once needed: importing this changes no logger
        uvicorn_log.addFilter(_DROP)

