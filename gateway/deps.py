"""What routes take besides the request's own fields: typed access to the application's
services, which gateway/app.py puts on ``app.state`` at start-up (the routes' one way to them;
the drive's HTTP and WebDAV layers, outside FastAPI's routes, still read ``app.state``
themselves), and the path parameters' bounds.

Routes take services as parameters (``rentals: RentalsDep``); helpers that hold a request ask
``services(request).sessions``. The dependencies are ``async`` so FastAPI calls them on the
event loop rather than sending each to a worker thread.
"""

from __future__ import annotations

from typing import Annotated, Any, Callable, Protocol

from fastapi import Depends, Path, Query, Request
from prometheus_client import CollectorRegistry
from sqlalchemy.orm import sessionmaker
from starlette.requests import HTTPConnection

from drive.facts import FactsBook
from drive.service import DriveService
from drive.store import ObjectStore
from drive.usage import UsageBook
from gateway.auth import Authenticator
from gateway.bounds import MAX_ROW_ID
from gateway.pod_files import PodFiles
from gateway.rentals import Rentals
from gateway.runs import Runs
from gateway.settings import Settings
from gateway.signin import AdmissionPolicy, OidcClient
from gateway.transit import TransitObjects
from gateway.web_session import CookieSigner


class Services(Protocol):
    """What ``app.state`` holds once the application has started."""

    settings: Settings
    sessions: sessionmaker
    store: ObjectStore
    usage: UsageBook
    drive: DriveService
    facts: FactsBook
    authenticator: Authenticator
    rentals: Rentals
    runs: Runs
    pod_files: PodFiles
    transit: TransitObjects
    oidc: OidcClient | None  # None: sign-in is not configured here
    admission: AdmissionPolicy
    cookie_signer: CookieSigner
    ssh_published: dict[str, Any] | None  # where the SSH bastion listens; None where KGPU_SSH_PORT=0
    pod_address: str | None  # the address pods reach this host at (the docker bridge's), if any
    metrics: CollectorRegistry  # what GET /metrics answers (gateway/metrics.py)


def services(conn: HTTPConnection) -> Services:
    return conn.app.state


def _depends(read: Callable[[Services], Any]) -> Any:
    async def dependency(request: Request) -> Any:
        return read(services(request))

    return Depends(dependency)


SettingsDep = Annotated[Settings, _depends(lambda s: s.settings)]
SessionsDep = Annotated[sessionmaker, _depends(lambda s: s.sessions)]
StoreDep = Annotated[ObjectStore, _depends(lambda s: s.store)]
AuthenticatorDep = Annotated[Authenticator, _depends(lambda s: s.authenticator)]
RentalsDep = Annotated[Rentals, _depends(lambda s: s.rentals)]
RunsDep = Annotated[Runs, _depends(lambda s: s.runs)]
PodFilesDep = Annotated[PodFiles, _depends(lambda s: s.pod_files)]
TransitDep = Annotated[TransitObjects, _depends(lambda s: s.transit)]
MetricsDep = Annotated[CollectorRegistry, _depends(lambda s: s.metrics)]

# A row id in a path: one that cannot exist is refused before it reaches the database.
RowIdPath = Annotated[int, Path(ge=1, le=MAX_ROW_ID)]
# A rental's id: ``gpu_id`` in the API, ``rental_id`` in the code.
RentalIdPath = Annotated[str, Path(alias="gpu_id")]
RentalIdQuery = Annotated[str | None, Query(alias="gpu_id")]
