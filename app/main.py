"""Application factory: routers, error handlers, and the lifespan that owns the engine."""

from __future__ import annotations

import gc
import logging
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import psycopg
from anyio import to_thread
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from psycopg_pool import AsyncConnectionPool, PoolTimeout
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError
from starlette.types import Receive, Scope, Send

from app import api, callbacks, dashboard, send_api
from app.config import Settings, get_settings
from app.db import make_engine
from app.ingest import Ingestor
from app.schemas import Health
from app.security import check_api_access, require_api_access
from app.sender import NotConfigured, Sender

log = logging.getLogger(__name__)
READ_THREADS = 8


class ReceiverApp(FastAPI):
    """FastAPI, with the two hot routes (callbacks, and the single-message lookup) handed to
    their handlers before FastAPI's own routing and middleware."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            if callbacks.is_callback_path(scope["path"]):
                scope["app"] = self
                await callbacks.asgi(scope, receive, send)
                return
            if api.is_message_path(scope):
                scope["app"] = self
                await api.message_asgi(scope, receive, send)
                return
        await super().__call__(scope, receive, send)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # The writer threads hand the GIL back and forth with the event loop once per
        # database call; at the default 5 ms switch interval each hand-off stalls the batch
        # (measured: about 40% lower ingest rate). 0.5 ms keeps hand-offs short.
        sys.setswitchinterval(0.0005)
        # Sync API routes run in anyio's thread pool (40 threads by default); more threads
        # than database connections only queue on the pool and fight over the GIL.
        to_thread.current_default_thread_limiter().total_tokens = READ_THREADS
        engine = make_engine(settings, pool_size=READ_THREADS)
        # SQLite has one writer at a time anyway; PostgreSQL gains from overlapping round trips.
        ingestor = Ingestor(engine, max_batch=settings.batch_max_size,
                            writers=1 if settings.is_sqlite else 2)
        app.state.engine = engine
        reader = engine if settings.is_sqlite else make_engine(
            settings, pool_size=READ_THREADS, reader=True)
        app.state.reader = reader
        app.state.read_pool = None if settings.is_sqlite else AsyncConnectionPool(
            settings.libpq_url, min_size=1, max_size=READ_THREADS, open=False,
            timeout=settings.db_timeout,
            kwargs={"autocommit": True, "options": "-c TimeZone=UTC"})
        if app.state.read_pool is not None:
            await app.state.read_pool.open(wait=False)
        app.state.ingestor = ingestor
        try:
            app.state.sender = Sender.from_settings(settings, engine)
        except NotConfigured:
            app.state.sender = None  # receiving works without a partner account
        ingestor.start()
        # Everything built so far lives as long as the process. Freezing it keeps the
        # collector's full passes from walking it again and again: unfrozen, those passes
        # stalled every request for ~300 ms now and then (p99 of lookups at 64 connections).
        gc.collect()
        gc.freeze()
        try:
            yield
        finally:
            if app.state.sender is not None:
                app.state.sender.close()
            # Uvicorn has stopped accepting and waited for requests in flight; those waiting
            # on a batch are answered before the writer stops.
            await ingestor.close()
            engine.dispose()
            reader.dispose()
            if app.state.read_pool is not None:
                await app.state.read_pool.close()

    app = ReceiverApp(
        title="DLR receiver",
        version="0.1.0",
        description="Receives the provider's delivery, seen and reply notifications, keeps "
        "each message's true status, and sends messages through the provider.",
        lifespan=lifespan,
        **({"docs_url": None, "openapi_url": None} if settings.restrict_docs else {}),
    )
    app.state.settings = settings
    if settings.restrict_docs:
        guarded = [Depends(require_api_access)]

        @app.get("/openapi.json", include_in_schema=False, dependencies=guarded)
        async def openapi_json() -> JSONResponse:
            return JSONResponse(app.openapi())

        @app.get("/docs", include_in_schema=False, dependencies=guarded)
        async def docs() -> Response:
            return get_swagger_ui_html(openapi_url="/openapi.json", title=app.title)
    app.include_router(callbacks.router)
    app.include_router(api.router)
    app.include_router(send_api.router)
    app.include_router(dashboard.router)

    @app.get("/healthz", response_model=Health, tags=["operations"])
    async def healthz() -> Health:
        """The process is up (the database is not touched)."""
        return Health(status="ok")

    @app.get("/readyz", response_model=Health, tags=["operations"],
             responses={503: {"description": "database unreachable"}})
    async def readyz(request: Request) -> Response:
        """The database answers."""
        def ping() -> None:
            with request.app.state.engine.connect() as conn:
                conn.execute(text("SELECT 1"))

        try:
            await run_in_threadpool(ping)
        except SQLAlchemyError as exc:
            log.warning("not ready: %s", str(exc).splitlines()[0])
            return JSONResponse({"detail": "database unreachable"}, status_code=503)
        return JSONResponse({"status": "ready"})

    @app.get("/metrics", tags=["operations"], include_in_schema=False)
    def metrics_endpoint(request: Request) -> Response:
        if settings.restrict_metrics:
            check_api_access(request)
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    @app.exception_handler(psycopg.Error)
    @app.exception_handler(PoolTimeout)
    @app.exception_handler(SQLAlchemyError)
    async def database_error(_request: Request, exc: Exception) -> JSONResponse:
        log.warning("database error: %s", str(exc).splitlines()[0])
        return JSONResponse({"detail": "database unavailable"}, status_code=503)

    @app.exception_handler(Exception)
    async def unexpected(_request: Request, exc: Exception) -> JSONResponse:
        if isinstance(exc, HTTPException):  # pragma: no cover - FastAPI handles these
            raise exc
        log.exception("unhandled error")
        return JSONResponse({"detail": "internal error"}, status_code=500)

    return app
