"""Application factory: one router for every route, the error handlers, and the lifespan
that starts and stops what the app owns (database, write path, sender)."""

from __future__ import annotations

import itertools
import json
import logging
import sqlite3
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import psycopg
from fastapi import FastAPI, HTTPException, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from psycopg_pool import PoolTimeout
from sqlalchemy.exc import SQLAlchemyError
from starlette.requests import ClientDisconnect

from app.config import Settings, get_settings
from app.forward import routes as forward_routes
from app.forward.dispatcher import Forwarder
from app.ops import process
from app.ops.logs import BufferedStreamHandler
from app.query import campaigns, dashboard, export, messages, rejected, stats
from app.receive import callbacks
from app.send import NotConfigured, Sender
from app.send import routes as send_routes
from app.store.counts import Squasher
from app.store.db import Database
from app.store.ingestor import Ingestor
from app.store.spool import left_over
from app.store.writers import writer_for
from app.web import docs, health
from app.web.api_guard import ApiGuard

log = logging.getLogger(__name__)
# The largest API body is an image upload: the image and its multipart framing.
MULTIPART_OVERHEAD = 64 * 1024


# --- errors a request caused ----------------------------------------------------------------
# A value the database cannot take (a NUL in PostgreSQL text, a lone surrogate, an integer
# beyond 64 bits in SQLite, text PostgreSQL cannot read as the column's type) is the caller's
# mistake: 400 naming it, never 503 "database unavailable", which would invite a retry.
NUL_REFUSED = "a parameter holds a character the database cannot store (NUL)"
SURROGATE_REFUSED = ("a parameter holds a character the database cannot store "
                     "(a lone UTF-16 surrogate)")
NUMBER_REFUSED = "a parameter holds a number too large for the database"
SPOOLING = ("database unavailable: callbacks are being kept in the local spool and will be "
            "stored when it is back; reads answer again then")
_DRIVER_MODULES = ("sqlalchemy.", "psycopg.", "psycopg_pool.", "sqlite3.", "app.store.")


def _raised_by_driver(exc: BaseException) -> bool:
    """Whether `exc` came out of database code (the drivers raise encoding errors unwrapped)."""
    tb = exc.__traceback__
    while tb is not None:
        module = tb.tb_frame.f_globals.get("__name__", "")
        if module.startswith(_DRIVER_MODULES):
            return True
        tb = tb.tb_next
    return False


def _value_refused(exc: BaseException) -> str | None:
    """The detail to answer when `exc` is the database refusing a value, else None."""
    orig = getattr(exc, "orig", None)
    if isinstance(orig, BaseException):
        return _value_refused(orig)
    if isinstance(exc, psycopg.DataError):
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if "NUL (0x00)" in first:
            return NUL_REFUSED
        return f"a parameter holds a value the database cannot take: {first[:200]}"
    if isinstance(exc, sqlite3.DataError | sqlite3.InterfaceError):
        return "a parameter holds a value the database cannot take"
    if isinstance(exc, UnicodeEncodeError) and _raised_by_driver(exc):
        return SURROGATE_REFUSED if "surrogate" in exc.reason else (
            "a parameter holds a character the database cannot store")
    if isinstance(exc, OverflowError) and _raised_by_driver(exc):
        return NUMBER_REFUSED
    return None


# A validation answer lists at most this many errors (500,000 junk values once made a 94 MB
# 422), each with its input only when that is short.
MAX_VALIDATION_ERRORS = 20
MAX_INPUT_CHARS = 200


def _validation_response(exc: RequestValidationError) -> Response:
    """FastAPI's 422 `{"detail": [{"loc", "msg", "type", ...}]}`, kept short; non-ASCII is
    escaped, so an input holding a lone surrogate cannot break the answer."""
    errors = exc.errors()
    detail: list[dict[str, Any]] = []
    for error in itertools.islice(errors, MAX_VALIDATION_ERRORS):
        item = {"loc": list(error.get("loc", ())), "msg": str(error.get("msg", "")),
                "type": str(error.get("type", ""))}
        if "input" in error:
            try:
                shown = json.dumps(jsonable_encoder(error["input"]))
            except (TypeError, ValueError):
                shown = ""
            if shown and len(shown) <= MAX_INPUT_CHARS:
                item["input"] = json.loads(shown)
        detail.append(item)
    more = len(errors) - len(detail)
    if more > 0:
        detail.append({"loc": [], "msg": f"and {more} more errors not shown",
                       "type": "too_many_errors"})
    body = json.dumps({"detail": detail}, ensure_ascii=True, separators=(",", ":"))
    return Response(body, status_code=422, media_type="application/json")


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    async with AsyncExitStack() as stack:
        # Pushed first, so run last; the lines logged after it are written at once.
        stack.callback(BufferedStreamHandler.write_through_all)
        database = Database(settings)
        tuned: bool = app.state.tune_process
        if tuned:
            process.tune(database.engine.dialect.name)
        await database.open()
        stack.push_async_callback(database.close)
        ingestor = Ingestor(writer_for(database, forwarding=True),
                            max_batch=settings.batch_max_size,
                            spools=settings.spool_file is not None)
        ingestor.spool_state = left_over(settings.spool_file)
        ingestor.start()
        # Closed after the forwarder, whose last round may run on the Ingestor's thread, and
        # before the database: uvicorn has stopped accepting and waited for requests in
        # flight; those waiting on a batch are answered before the writer stops.
        stack.push_async_callback(ingestor.close)
        forwarder = Forwarder(database.engine, settings,
                              run_db=ingestor.call if settings.is_sqlite else None)
        await forwarder.start()
        stack.push_async_callback(forwarder.close)
        ingestor.on_commit = forwarder.wake  # new deliveries: the forwarder sends them now
        # The counts' delta rows folded every few seconds (on SQLite between the batches).
        squasher = Squasher(database.engine,
                            ingestor.call if settings.is_sqlite else database.in_thread)
        squasher.start()
        stack.push_async_callback(squasher.close)
        try:
            sender: Sender | None = Sender.from_settings(settings, ingestor)
        except NotConfigured:
            sender = None  # receiving works without a partner account
        if sender is not None:
            stack.push_async_callback(sender.aclose)
        app.state.database = database
        app.state.forwarder = forwarder
        app.state.ingestor = ingestor
        app.state.squasher = squasher
        app.state.sender = sender
        if tuned:
            process.freeze_startup_objects()
        yield


def create_app(settings: Settings | None = None, *, tune_process: bool = False) -> FastAPI:
    """The application. `tune_process`: tune the interpreter it runs in for serving
    (app/ops/process.py), as `dlr serve` does; an app built by a library user or a test leaves
    its process as it found it."""
    settings = settings or get_settings()
    app = FastAPI(
        title="DLR receiver",
        version="0.1.0",
        description="Receives the provider's delivery, seen and reply notifications, keeps "
        "each message's true status, and sends messages through the provider.",
        lifespan=lifespan,
        docs_url=None,  # app.web.docs serves them, from local assets
        openapi_url=None,
        # FastAPI's own OpenTelemetry hooks: this service exports Prometheus metrics, and the
        # per-request check whether a tracer is configured cost every request (profiled).
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    app.state.settings = settings
    app.state.tune_process = tune_process
    app.state.campaign_regex = settings.campaign_regex  # compiled once, for every callback
    app.add_middleware(ApiGuard, read_timeout=settings.api_read_timeout,
                       max_body=settings.upload_max_bytes + MULTIPART_OVERHEAD)
    # The most frequent routes first, in the app's own route list: the router tries them in
    # order, and FastAPI walks each included router route by route (profiled: /healthz behind
    # the five other routers cost 88 us of CPU in the app, a bare route 34 us). The two hot
    # routes' DirectRoutes apply their dependencies (the access rule, with its overrides)
    # themselves, and the probes have none, so none of them needs an included router's view.
    # The export's path would otherwise be read as a msg_id by the lookup's.
    app.router.routes.extend([*callbacks.router.routes, *health.router.routes,
                              *export.router.routes, *messages.lookup_router.routes])
    for router in (messages.router, stats.router, campaigns.router, rejected.router,
                   send_routes.router,
                   forward_routes.router, dashboard.router):
        app.include_router(router)
    docs.install(app, settings)

    @app.exception_handler(psycopg.Error)
    @app.exception_handler(sqlite3.Error)
    @app.exception_handler(PoolTimeout)
    @app.exception_handler(SQLAlchemyError)
    async def database_error(request: Request, exc: Exception) -> JSONResponse:
        refused = _value_refused(exc)
        if refused is not None and not request.url.path.startswith("/dlr"):
            # The caller's value, not the database, is at fault: retrying cannot help.
            log.info("refused a value the database cannot take: %s", refused)
            return JSONResponse({"detail": refused}, status_code=400)
        log.warning("database error: %s", str(exc).splitlines()[0] if str(exc) else exc)
        spool = getattr(getattr(request.app.state, "ingestor", None), "spool_state", None)
        detail = (SPOOLING if spool is not None and spool.active else "database unavailable")
        return JSONResponse({"detail": detail}, status_code=503, headers={"Retry-After": "5"})

    @app.exception_handler(UnicodeEncodeError)
    @app.exception_handler(OverflowError)
    async def value_not_encodable(request: Request, exc: Exception) -> Response:
        # The drivers raise these, unwrapped, for a lone surrogate (both) or an integer
        # beyond 64 bits (SQLite); raised anywhere else they are a bug like any other.
        refused = _value_refused(exc)
        if refused is None or request.url.path.startswith("/dlr"):
            return await unexpected(request, exc)
        log.info("refused a value the database cannot take: %s", refused)
        return JSONResponse({"detail": refused}, status_code=400)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        return _validation_response(exc)

    @app.exception_handler(ClientDisconnect)
    async def client_gone(request: Request, _exc: Exception) -> Response:
        # Anyone can disconnect mid-body; that is no error of ours and must not flood the
        # error log. Nobody reads this answer.
        log.info("client disconnected before its request was read: %s %s",
                 request.method, request.url.path)
        return Response(status_code=400)

    @app.exception_handler(Exception)
    async def unexpected(_request: Request, exc: Exception) -> Response:
        if isinstance(exc, HTTPException):  # pragma: no cover - FastAPI handles these
            raise exc
        log.exception("unhandled error")
        return JSONResponse({"detail": "internal error"}, status_code=500)

    return app


def create_served_app() -> FastAPI:
    """The app `dlr serve` runs (uvicorn's factory, in every worker process): the interpreter
    tuned for serving."""
    return create_app(tune_process=True)
