"""GET /metrics: the server's metrics in Prometheus's text format, for admin tokens (docs/metrics.md)."""

from __future__ import annotations

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from gateway.auth import AdminUser
from gateway.deps import MetricsDep
from gateway.openapi import content

router = APIRouter(tags=["admin"])


@router.get(
    "/metrics",
    summary="Metrics in Prometheus's text format (admins)",
    response_class=Response,
    responses=content(200, "Prometheus text exposition", {"text/plain": {"schema": {"type": "string"}}}),
)
def metrics(_: AdminUser, registry: MetricsDep) -> Response:
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
