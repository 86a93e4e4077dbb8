"""REST routes of forwarding: endpoints, deliveries, replay and retry."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime
from typing import Annotated, Any, Literal, TypeVar

from fastapi import HTTPException, Path, Query, Request, Response, status
from pydantic import AfterValidator
from sqlalchemy import Connection

from app.core.targets import RefusedAddress, refuse_if_blocked
from app.core.times import iso, utcnow
from app.core.webhook_signing import mask
from app.forward import deliveries, endpoints
from app.forward.dispatcher import send_once
from app.forward.schemas import (
    AttemptOut,
    DeliveryOut,
    DeliveryPage,
    EndpointIn,
    EndpointList,
    EndpointOut,
    EndpointPatch,
    EndpointStatsOut,
    EndpointTestOut,
    LastErrorOut,
    ReplayIn,
    ReplayOut,
    storable,
)
from app.store.db import Database
from app.store.outbox import new_webhook_id
from app.web.paging import Cursor, decode_cursor
from app.web.routing import api_router
from app.web.schemas import invalid

router = api_router(tags=["forwarding"])
# A row id: any larger number cannot name a delivery (and overflows the column's type).
DeliveryId = Annotated[int, Path(ge=1, le=2**63 - 1)]
# A filter the database can take (no NUL, no lone surrogate): refused with the reason.
Filter = Annotated[str, AfterValidator(storable)]
T = TypeVar("T")
Responses = dict[int | str, dict[str, Any]]
NOT_FOUND: Responses = {404: {"description": "no such endpoint or delivery"}}
CONFLICT: Responses = {409: {"description": "not possible in the endpoint's current state"}}


async def _in_transaction(request: Request, fn: Callable[[Connection], T]) -> T:
    """Run `fn` in one transaction on the app's write engine, in one of the app's read
    threads (these admin calls share their limit)."""
    database: Database = request.app.state.database

    def run() -> T:
        with database.engine.begin() as conn:
            return fn(conn)

    try:
        return await database.in_thread(run)
    except endpoints.NotFound as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from None
    except endpoints.Conflict as exc:
        raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from None


def _wake(request: Request) -> None:
    forwarder = getattr(request.app.state, "forwarder", None)
    if forwarder is not None:
        forwarder.wake()


def _circuits(request: Request) -> dict[str, datetime]:
    """The endpoints whose circuit is open in this process's forwarder, and until when."""
    forwarder = getattr(request.app.state, "forwarder", None)
    return forwarder.circuits() if forwarder is not None else {}


def _known_id(endpoint_id: str) -> str:
    """An id no endpoint can have (a NUL, a lone surrogate, over the column's length) is
    simply not found, rather than refused by the database."""
    if len(endpoint_id) > 40 or "\x00" in endpoint_id or not _encodes(endpoint_id):
        raise HTTPException(status.HTTP_404_NOT_FOUND, "no such endpoint")
    return endpoint_id


def _encodes(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


async def _refuse_blocked(url: str) -> None:
    """422 when the URL's host resolves to a refused (cloud metadata) address now."""
    try:
        await refuse_if_blocked(url)
    except RefusedAddress as exc:
        raise invalid(("body", "url"), str(exc)) from None


def _stats_out(s: endpoints.Stats) -> EndpointStatsOut:
    last = s.last_error
    return EndpointStatsOut(
        pending=s.pending, backlog=s.backlog, oldest_pending_at=s.oldest_pending_at,
        success_rate=s.success_rate, attempts_considered=s.attempts_considered,
        last_error=LastErrorOut(at=last.at, status_code=last.status_code,
                                response=last.response) if last else None)


def _delivery_out(item: deliveries.Listed, circuits: dict[str, datetime]) -> DeliveryOut:
    d = item.delivery
    pending = d.status == "pending"
    opens = circuits.get(d.endpoint_id) if pending else None
    next_at = d.next_attempt_at if pending else None
    if opens is not None and next_at is not None:
        next_at = max(next_at, opens)  # not a time already past: when the circuit lets it
    return DeliveryOut(
        id=d.id, endpoint_id=d.endpoint_id, status=d.status, webhook_id=d.webhook_id,
        event_type=d.event_type, msg_id=item.msg_id, sequence=d.sequence,
        occurred_at=d.occurred_at, created_at=d.created_at, next_attempt_at=next_at,
        circuit_open=opens is not None,
        endpoint_paused=pending and d.endpoint_paused_at is not None,
        finished_at=d.finished_at, attempt_count=d.attempts,
        last_status_code=d.last_status_code, last_error=d.last_error,
        attempts=[AttemptOut(attempted_at=a.attempted_at, status_code=a.status_code, ok=a.ok,
                             latency_ms=a.latency_ms, response=a.response)
                  for a in item.attempts])


@router.post("/endpoints", status_code=status.HTTP_201_CREATED, response_model=EndpointOut)
async def create_endpoint(body: EndpointIn, request: Request) -> EndpointOut:
    """Add an endpoint. The answer holds its signing secret in full, this once."""
    await _refuse_blocked(body.url)
    row = await _in_transaction(request, lambda conn: endpoints.create(
        conn, url=body.url, events=body.events, prefix=body.p_transaction_id_prefix,
        description=body.description))
    _wake(request)
    return EndpointOut.of(row, secret=row.secret)


@router.get("/endpoints", response_model=EndpointList)
async def list_endpoints(request: Request) -> EndpointList:
    """Every endpoint (secrets masked), with its backlog, success rate and last error."""
    def load(conn: Connection) -> tuple[list[Any], dict[str, endpoints.Stats]]:
        rows = endpoints.list_all(conn)
        return rows, endpoints.stats(conn, rows)

    rows, stats = await _in_transaction(request, load)
    circuits = _circuits(request)
    return EndpointList(items=[EndpointOut.of(r, secret=mask(r.secret),
                                              stats=_stats_out(stats[r.id]),
                                              circuit_open_until=circuits.get(r.id))
                               for r in rows])


@router.get("/endpoints/{endpoint_id}", response_model=EndpointOut, responses=NOT_FOUND)
async def get_endpoint(endpoint_id: str, request: Request) -> EndpointOut:
    _known_id(endpoint_id)

    def load(conn: Connection) -> tuple[Any, endpoints.Stats]:
        row = endpoints.get(conn, endpoint_id)
        return row, endpoints.stats(conn, [row])[row.id]

    row, stats = await _in_transaction(request, load)
    return EndpointOut.of(row, secret=mask(row.secret), stats=_stats_out(stats),
                          circuit_open_until=_circuits(request).get(row.id))


@router.patch("/endpoints/{endpoint_id}", response_model=EndpointOut,
              responses={**NOT_FOUND, **CONFLICT})
async def change_endpoint(endpoint_id: str, body: EndpointPatch,
                          request: Request) -> EndpointOut:
    """Change an endpoint in place: its secret, deliveries and their webhook-ids stay;
    pending deliveries go to the new URL. `enabled: false` pauses it (its deliveries wait,
    none fails, new events are queued for it); `enabled: true` resumes it. The endpoint of
    DLR_FORWARD_URL takes no new URL (409) but may be paused."""
    _known_id(endpoint_id)
    if body.url is not None:
        await _refuse_blocked(body.url)
    row = await _in_transaction(request, lambda conn: endpoints.change(
        conn, endpoint_id, body.changes()))
    _wake(request)
    return EndpointOut.of(row, secret=mask(row.secret),
                          circuit_open_until=_circuits(request).get(row.id))


@router.post("/endpoints/{endpoint_id}/test", response_model=EndpointTestOut,
             responses=NOT_FOUND)
async def test_endpoint(endpoint_id: str, request: Request) -> EndpointTestOut:
    """Send one signed `endpoint.test` event now (paused or disabled endpoints too) and
    answer with what came of it. It is not stored as a delivery and not retried."""
    _known_id(endpoint_id)
    row = await _in_transaction(request, lambda conn: endpoints.get(conn, endpoint_id))
    now = utcnow()
    webhook_id = new_webhook_id()
    payload = json.dumps({"type": "endpoint.test", "timestamp": iso(now),
                          "data": {"endpoint_id": row.id}}, separators=(",", ":")).encode()
    sent = await send_once(row.url, endpoints.signing_keys(row, now), webhook_id, payload,
                           request.app.state.settings.forward_timeout)
    return EndpointTestOut(endpoint_id=row.id, webhook_id=webhook_id, ok=sent.ok,
                           status_code=sent.status_code, latency_ms=sent.latency_ms,
                           error=sent.error, response=sent.response)


@router.delete("/endpoints/{endpoint_id}", status_code=status.HTTP_204_NO_CONTENT,
               responses={**NOT_FOUND, **CONFLICT})
async def delete_endpoint(endpoint_id: str, request: Request) -> Response:
    """Remove an endpoint and its deliveries (pending ones are not sent)."""
    _known_id(endpoint_id)
    await _in_transaction(request, lambda conn: endpoints.remove(conn, endpoint_id))
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post("/endpoints/{endpoint_id}/rotate-secret", response_model=EndpointOut,
             responses={**NOT_FOUND, **CONFLICT})
async def rotate_secret(endpoint_id: str, request: Request) -> EndpointOut:
    """A new secret, shown in full here; the old one keeps signing beside it for 24 h (the
    latest three rotated-out secrets at most)."""
    _known_id(endpoint_id)
    row = await _in_transaction(request, lambda conn: endpoints.rotate(conn, endpoint_id))
    return EndpointOut.of(row, secret=row.secret)


@router.post("/endpoints/{endpoint_id}/enable", response_model=EndpointOut,
             responses=NOT_FOUND)
async def enable_endpoint(endpoint_id: str, request: Request) -> EndpointOut:
    """Enable an endpoint again (one that answered 410 Gone is disabled); resumes a paused
    one too."""
    _known_id(endpoint_id)
    row = await _in_transaction(request, lambda conn: endpoints.enable(conn, endpoint_id))
    _wake(request)
    return EndpointOut.of(row, secret=mask(row.secret))


@router.post("/endpoints/{endpoint_id}/replay", response_model=ReplayOut,
             status_code=status.HTTP_202_ACCEPTED, responses={**NOT_FOUND, **CONFLICT})
async def replay(endpoint_id: str, body: ReplayIn, request: Request) -> ReplayOut:
    """Send every stored event of [since, until) that the endpoint takes again, each with its
    original webhook-id (consumers that dedupe on it see a replay as a repeat), whether or
    not the endpoint was enabled when it happened."""
    _known_id(endpoint_id)
    until = body.until or utcnow()
    queued = await _in_transaction(request, lambda conn: endpoints.replay(
        conn, endpoint_id, since=body.since, until=until))
    _wake(request)
    return ReplayOut(endpoint_id=endpoint_id, since=body.since, until=until, queued=queued)


@router.get("/deliveries", response_model=DeliveryPage)
async def list_deliveries(
    request: Request,
    endpoint_id: Filter | None = None,
    status_: Annotated[Literal["pending", "delivered", "failed"] | None,
                       Query(alias="status")] = None,
    msg_id: Filter | None = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: Cursor = None,
) -> DeliveryPage:
    """Deliveries, newest first, each with its attempts."""
    before = decode_cursor(cursor)
    items, next_id = await _in_transaction(request, lambda conn: deliveries.page(
        conn, endpoint_id=endpoint_id, status=status_, msg_id=msg_id, limit=limit,
        before=before))
    circuits = _circuits(request)
    return DeliveryPage(items=[_delivery_out(i, circuits) for i in items],
                        next_cursor=str(next_id) if next_id is not None else None)


@router.get("/deliveries/{delivery_id}", response_model=DeliveryOut, responses=NOT_FOUND)
async def get_delivery(delivery_id: DeliveryId, request: Request) -> DeliveryOut:
    return _delivery_out(await _in_transaction(
        request, lambda conn: deliveries.one(conn, delivery_id)), _circuits(request))


@router.post("/deliveries/{delivery_id}/retry", response_model=DeliveryOut,
             status_code=status.HTTP_202_ACCEPTED, responses={**NOT_FOUND, **CONFLICT})
async def retry_delivery(delivery_id: DeliveryId, request: Request) -> DeliveryOut:
    """Attempt the delivery again now (whatever its status), with the same webhook-id."""
    item = await _in_transaction(request, lambda conn: deliveries.retry(conn, delivery_id))
    _wake(request)
    return _delivery_out(item, _circuits(request))


