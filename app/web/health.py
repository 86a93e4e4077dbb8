"""/healthz, /readyz and /metrics: what probes and Prometheus ask, many times a minute."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from app.web.schemas import ErrorOut, Health
from app.web.security import check_api_access

router = APIRouter(tags=["operations"])


# Probes ask many times a minute: the answer is built once (validating and serialising the
# model per request was most of the route's own cost).
HEALTHY = Health(status="ok").model_dump_json(exclude_none=True).encode()


@router.get("/healthz", response_model=Health)
async def healthz() -> Response:
    """The process is up (the database is not touched)."""
    return Response(HEALTHY, media_type="application/json")


@router.get("/readyz", response_model=Health,
            responses={503: {"description": "database unreachable", "model": ErrorOut}})
async def readyz(request: Request) -> Response:
    """Ready to take callbacks: the database answers, or (PostgreSQL) callbacks are kept in
    the local spool while it is away, which the answer says: `{"status": "spooling",
    "database": "unreachable" | "draining", "spool_depth", "spool_oldest_seconds"}`."""
    spool = getattr(request.app.state.ingestor, "spool_state", None)
    if spool is not None and spool.active:
        return JSONResponse({"status": "spooling",
                             "database": "unreachable" if spool.database_away else "draining",
                             "spool_depth": spool.depth,
                             "spool_oldest_seconds": round(spool.oldest_seconds, 1)})
    await request.app.state.database.ping()
    return JSONResponse({"status": "ready"})


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    """Prometheus text format; behind the API's access rule with DLR_RESTRICT_METRICS."""
    if request.app.state.settings.restrict_metrics:
        check_api_access(request)
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
