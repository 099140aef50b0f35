"""``GET /health``: liveness (503 when the worker thread stopped)."""
from fastapi.responses import JSONResponse

from ..api import ServerDep, endpoint


@endpoint("GET", "/health", label="/health", counted=False, summary="liveness: the worker thread runs")
async def health(server: ServerDep):
    engine = server.engine
    ok = engine.alive
    return JSONResponse({"status": "ok" if ok else "worker stopped", "model": server.model,
                         "adapters": len(engine.adapters), "queue_depth": engine.queue_depth()},
                        status_code=200 if ok else 503)
