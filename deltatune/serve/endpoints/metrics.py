"""``GET /metrics``: the Prometheus text of this server's registry."""
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ..api import ServerDep, endpoint


@endpoint("GET", "/metrics", label="/metrics", counted=False, summary="Prometheus metrics", response_class=Response)
async def prometheus(server: ServerDep):
    return Response(generate_latest(server.metrics.registry), media_type=CONTENT_TYPE_LATEST)
