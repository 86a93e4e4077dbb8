"""The Forwarder: takes due deliveries from the database and sends them.

One loop on the event loop runs "rounds": each round, in the Forwarder's own database
thread, records the outcomes of finished attempts and claims (leases) due deliveries for
the endpoints that have some and room for them, all in one transaction. A round's work
follows the deliveries, not the number of endpoints: a lane whose last claim came back short
is "exhausted" and claims again only when a retry of its own comes due, its circuit
reopens, or one query (`queue.due_endpoints`, on each wake and poll) finds due deliveries
for it; the endpoints themselves are reloaded only when they changed.

Each endpoint has a lane in this process: a small buffer of claimed deliveries, at most
DLR_FORWARD_CONCURRENCY requests in flight, and a circuit breaker. A hanging endpoint fills
only its own lane.

At least once: a delivery leaves `pending` only when a 2xx is recorded (or its schedule is
spent). Whatever this process had claimed when it died comes back when the lease passes.
No attempt twice at once: an attempt starts only while its lease has more than the
timeout left, and is cut off at the timeout.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import Connection, Engine, Table, select
from sqlalchemy.exc import SQLAlchemyError

from app.config import Settings
from app.core.times import utcnow
from app.core.webhook_signing import sign
from app.forward import endpoints, queue
from app.forward.client import ClientError, Target, WebhookClient
from app.forward.queue import DELIVERED, FAILED, PENDING, Claim, Outcome
from app.ops import metrics
from app.store.models import Endpoint as EndpointRow

EP = cast(Table, EndpointRow.__table__)

log = logging.getLogger(__name__)

POLL_SECONDS = 1.0          # look for work others queued (replicas, retries coming due)
RELOAD_SECONDS = 60.0       # endpoints reloaded at least this often (secrets' grace ends)
FLUSH_SECONDS = 0.05        # outcomes wait at most this long to be recorded
METRICS_SECONDS = 5.0       # backlog gauges refreshed this often
BUFFER_ROUNDS = 16          # a lane holds up to this many times its concurrency, claimed
# A lane claims more once its buffer is below half of that: the next claim is made while the
# lane still has work, so a database round's latency never leaves its slots idle.
LEASE_MARGIN = 10.0         # seconds of lease kept spare (clock skew between replicas)
FAILURES_TO_OPEN = 5        # consecutive failures that open an endpoint's circuit
COOLDOWN_FIRST, COOLDOWN_MAX = 2.0, 30.0
BODY_KEPT = 1024
JITTER = 0.2                # each retry delay is stretched or shrunk by up to 20%


@dataclass(frozen=True, slots=True)
class Endpoint:
    """What a lane needs of its endpoint: where, and the keys that sign. `target` is None for
    a URL no request can be made to (stored before the URL rules refused such URLs): its
    attempts fail with `unusable` as their error, and the rest of forwarding goes on."""

    target: Target | None
    keys: tuple[bytes, ...]
    unusable: str | None = None


@dataclass(slots=True)
class Lane:
    """One endpoint's share of this process."""

    endpoint_id: str
    endpoint: Endpoint
    buffer: deque[tuple[Claim, float]] = field(default_factory=deque)  # (claim, deadline)
    in_flight: int = 0
    exhausted: bool = True       # the last claim found less than asked (or none was made
    # yet): claim only when told of work (a discovery, a retry coming due, a reopen)
    failures: int = 0            # consecutive failed attempts
    open_until: float | None = None  # circuit open until (monotonic); None when closed
    cooldown: float = COOLDOWN_FIRST
    probing: bool = False
    gone: bool = False           # answered 410: being disabled

    def circuit_allows(self, now: float) -> int:
        """How many requests the circuit lets out: all when closed, one probe when half
        open, none when open."""
        if self.open_until is None:
            return -1
        if now < self.open_until or self.probing:
            return 0
        return 1


def retry_delay(schedule: Sequence[float], attempts_made: int) -> float | None:
    """Seconds until the next attempt after `attempts_made` failures; None when spent."""
    if attempts_made > len(schedule):
        return None
    return schedule[attempts_made - 1] * random.uniform(1 - JITTER, 1 + JITTER)


# Where the database rounds run: a coroutine function taking (fn, *args), like Ingestor.call.
DbRunner = Callable[..., Awaitable[Any]]


@dataclass(slots=True)
class Plan:
    """What one round is to do (made on the event loop, run in the database thread)."""

    outcomes: list[Outcome]
    wants: dict[str, int] = field(default_factory=dict)   # lanes that claim anyway
    rooms: dict[str, int] = field(default_factory=dict)   # exhausted lanes' room, if found
    known: frozenset[str] = frozenset()                     # lanes this process has
    discover: bool = False        # ask which endpoints have due deliveries
    refresh: bool = False         # reload the endpoints if they changed; expire
    reload: bool = False          # reload the endpoints whether or not they changed
    version: tuple[Any, ...] | None = None  # the endpoints as last loaded
    gauges: bool = False
    disable: dict[str, str] = field(default_factory=dict)
    recovered: set[str] = field(default_factory=set)
    open_ids: list[str] = field(default_factory=list)


class Forwarder:
    def __init__(self, engine: Engine, settings: Settings, run_db: DbRunner | None = None
                 ) -> None:
        """`run_db`: where the database rounds run; by default the Forwarder's own thread
        (the API's reads keep theirs, ingest its writer). On SQLite the lifespan passes the
        ingest writer's `Ingestor.call`: one file has one writer at a time."""
        self.engine = engine
        self.settings = settings
        self.schedule = list(settings.forward_retry_schedule)
        self.timeout = settings.forward_timeout
        self.concurrency = settings.forward_concurrency
        self._run_db = run_db
        self._executor = None if run_db is not None else ThreadPoolExecutor(
            1, thread_name_prefix="dlr-forward")
        self._lanes: dict[str, Lane] = {}
        self._outcomes: list[Outcome] = []
        self._disable: dict[str, str] = {}
        self._recovered: set[str] = set()
        self._sends: set[asyncio.Task[None]] = set()
        self._wake: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._task: asyncio.Task[None] | None = None
        self._client: WebhookClient | None = None
        self._closing = False
        self._next_refresh = 0.0
        self._next_metrics = 0.0
        self._next_reload = 0.0
        self._version: tuple[Any, ...] | None = None
        self._discover = True
        self._synced = False
        self._gauged: set[str] = set()

    # --- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._wake = asyncio.Event()
        self._client = WebhookClient()
        try:
            await self._db(self._sync_settings)
        except SQLAlchemyError as exc:  # the loop tries again; serving goes on
            log.warning("forwarding: could not sync DLR_FORWARD_URL yet: %s",
                        str(exc).splitlines()[0])
        self._task = asyncio.create_task(self._run(), name="dlr-forwarder")

    async def close(self) -> None:
        """Stop claiming, give requests in flight up to the timeout to finish, hand back
        what was claimed but not sent, record every outcome. A request still running at the
        end is cancelled and its lease left to expire: it may have arrived, so it is sent
        again only once no one can still be sending it."""
        self._closing = True
        if self._task is not None:
            # Let a round in progress finish (cancelling it would leave its claims leased
            # until the lease runs out); the loop then stops before starting another.
            if self._wake is not None:
                self._wake.set()
            try:
                await asyncio.wait_for(asyncio.shield(self._task), self.settings.db_timeout + 5)
            except TimeoutError:
                self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._sends:
            await asyncio.wait(self._sends, timeout=min(self.timeout, 10.0))
            for task in self._sends:
                task.cancel()
            await asyncio.gather(*self._sends, return_exceptions=True)
        for lane in self._lanes.values():
            self._release(lane)
        if self._outcomes:
            try:
                await self._db(self._round, Plan(self._take_outcomes(), disable=self._disable,
                                                 recovered=self._recovered))
            except SQLAlchemyError as exc:
                log.warning("forwarding: outcomes not recorded at shutdown (they will be "
                            "sent again): %s", str(exc).splitlines()[0])
        if self._client is not None:
            await self._client.aclose()
        if self._executor is not None:
            self._executor.shutdown(wait=True)

    def wake(self) -> None:
        """New deliveries were committed: claim them now rather than at the next poll."""
        if self._loop is None or self._wake is None:
            return
        if threading.get_ident() != self._loop_thread:
            self._loop.call_soon_threadsafe(self.wake)
            return
        # Which lanes the new deliveries are for is asked by the next round (one query),
        # not found by claiming for every lane.
        self._discover = True
        self._wake.set()

    def circuits(self) -> dict[str, datetime]:
        """Endpoints whose circuit is open in this process, with when it lets the next
        attempt through (now, when half open)."""
        now, wall = time.monotonic(), utcnow()
        return {i: wall + timedelta(seconds=max(0.0, lane.open_until - now))
                for i, lane in self._lanes.items()
                if lane.open_until is not None and math.isfinite(lane.open_until)}

    # --- the loop ------------------------------------------------------------------------

    async def _db(self, fn: Any, *args: Any) -> Any:
        if self._run_db is not None:
            return await self._run_db(fn, *args)
        assert self._loop is not None
        return await self._loop.run_in_executor(self._executor, fn, *args)

    def _take_outcomes(self) -> list[Outcome]:
        taken, self._outcomes = self._outcomes, []
        return taken

    async def _run(self) -> None:
        assert self._wake is not None
        failures = 0
        while not self._closing:
            now = time.monotonic()
            refresh = now >= self._next_refresh
            discover, self._discover = self._discover or refresh, False
            plan = Plan(self._take_outcomes(), refresh=refresh, discover=discover,
                        reload=refresh and now >= self._next_reload, version=self._version,
                        gauges=now >= self._next_metrics)
            plan.disable, self._disable = self._disable, {}
            plan.recovered, self._recovered = self._recovered, set()
            self._plan_claims(plan, now)
            outcomes, disable, recovered = plan.outcomes, plan.disable, plan.recovered
            try:
                if refresh or discover or plan.wants or outcomes or disable or recovered:
                    result = await self._db(self._round, plan)
                    self._apply(result, now)
                    if refresh:
                        self._next_refresh = now + POLL_SECONDS
                failures = 0
            except SQLAlchemyError as exc:
                self._discover = self._discover or discover
                self._keep(outcomes, disable, recovered)
                failures += 1
                log.warning("forwarding: database round failed (%s); retrying",
                            str(exc).splitlines()[0])
                await asyncio.sleep(min(5.0, 0.2 * 2 ** failures))
                continue
            except Exception:  # noqa: BLE001 - the loop must outlive any surprise
                self._discover = self._discover or discover
                self._keep(outcomes, disable, recovered)
                log.exception("forwarding: round failed")
                await asyncio.sleep(1.0)
                continue
            timeout = FLUSH_SECONDS if self._outcomes else max(
                0.0, self._next_refresh - time.monotonic())
            try:
                await asyncio.wait_for(self._wake.wait(), timeout)
            except TimeoutError:
                pass
            self._wake.clear()

    def _keep(self, outcomes: list[Outcome], disable: dict[str, str],
              recovered: set[str]) -> None:
        """A round failed: what it was to write goes into the next one."""
        self._outcomes[:0] = outcomes
        self._disable = disable | self._disable
        self._recovered |= recovered

    def _room(self, lane: Lane, now: float) -> int:
        """How many deliveries the lane would claim now (0: none)."""
        allowed = lane.circuit_allows(now)
        if allowed == 0:
            return 0
        if allowed == 1:  # half open: one probe, nothing buffered behind it
            return 1 if not lane.buffer and lane.in_flight == 0 else 0
        if len(lane.buffer) < self.concurrency * BUFFER_ROUNDS // 2:
            return max(0, self.concurrency * BUFFER_ROUNDS - len(lane.buffer) - lane.in_flight)
        return 0

    def _plan_claims(self, plan: Plan, now: float) -> None:
        """Which lanes claim in this round: those not exhausted, and (when the round asks
        which endpoints have due deliveries) the exhausted ones it finds, with their room."""
        for lane in self._lanes.values():
            if lane.exhausted and not plan.discover:
                continue
            room = self._room(lane, now)
            if room > 0:
                (plan.rooms if lane.exhausted else plan.wants)[lane.endpoint_id] = room
        if plan.discover:
            plan.known = frozenset(self._lanes)
        plan.open_ids = [i for i, lane in self._lanes.items() if lane.open_until is not None]

    def _lease_for(self, count: int) -> float:
        """Seconds a claim of `count` deliveries is leased: long enough for all of them to
        go through this lane's slots at the timeout, plus the margin."""
        return self.timeout * (math.ceil(count / self.concurrency) + 1) + LEASE_MARGIN

    # --- database work (in the Forwarder's thread) ---------------------------------------

    def _sync_settings(self) -> None:
        with self.engine.begin() as conn:
            endpoints.sync_settings(conn, self.settings)
        self._synced = True

    def _round(self, plan: Plan) -> dict[str, Any]:
        if not self._synced:
            self._sync_settings()
        result: dict[str, Any] = {"claims": {}, "started": time.monotonic()}
        now = utcnow()
        with self.engine.connect() as conn, _relaxed_sync(conn), conn.begin():
            queue.record(conn, plan.outcomes)
            for endpoint_id, reason in plan.disable.items():
                queue.disable(conn, endpoint_id, reason, now)
            queue.pull_forward(conn, plan.recovered, now)
            targets: dict[str, Endpoint] | None = None
            if plan.refresh:
                version = queue.endpoints_version(conn)
                if plan.reload or version != plan.version:
                    targets = result["targets"] = self._targets(conn, now)
                    result["version"] = version
                span = timedelta(seconds=sum(self.schedule))
                queue.expire(conn, plan.open_ids, now - span, now)
            wants = dict(plan.wants)
            if plan.discover:
                for endpoint_id in queue.due_endpoints(conn, now):
                    if endpoint_id in wants:
                        continue
                    if endpoint_id in plan.rooms:
                        wants[endpoint_id] = plan.rooms[endpoint_id]
                    elif targets is not None and endpoint_id not in plan.known \
                            and endpoint_id in targets:  # a lane this round sets up
                        wants[endpoint_id] = self.concurrency * BUFFER_ROUNDS
            for endpoint_id, count in wants.items():
                if targets is not None and endpoint_id not in targets:
                    continue  # deleted, disabled or paused: its lane goes
                lease = timedelta(seconds=self._lease_for(count))
                result["claims"][endpoint_id] = (
                    count, queue.claim(conn, endpoint_id, count, now, lease),
                    lease.total_seconds())
            if plan.gauges:
                result["backlog"] = queue.backlog(conn, now)
        return result

    def _targets(self, conn: Any, now: datetime) -> dict[str, Endpoint]:
        targets = {}
        for r in conn.execute(select(EP).where(EP.c.enabled, EP.c.paused_at.is_(None))):
            keys = tuple(endpoints.signing_keys(r, now))
            try:
                targets[r.id] = Endpoint(Target.parse(r.url), keys)
            except ValueError as exc:  # one endpoint's URL must not stop the others
                targets[r.id] = Endpoint(None, keys, str(exc))
        return targets

    # --- applying a round (on the event loop) --------------------------------------------

    def _apply(self, result: dict[str, Any], now: float) -> None:
        targets: dict[str, Endpoint] | None = result.get("targets")
        if targets is not None:
            self._version = result["version"]
            self._next_reload = now + RELOAD_SECONDS
            for endpoint_id in list(self._lanes):
                if endpoint_id not in targets:  # deleted, disabled or paused
                    self._release(self._lanes.pop(endpoint_id))
            for endpoint_id, target in targets.items():
                lane = self._lanes.get(endpoint_id)
                if lane is None:  # exhausted until a claim or a discovery finds work
                    self._lanes[endpoint_id] = Lane(endpoint_id, target)
                else:  # a new URL or secret: what it sends from now on goes there
                    lane.endpoint = target
        if "backlog" in result:
            self._next_metrics = now + METRICS_SECONDS
            self._gauges(result["backlog"])
        started: float = result["started"]
        for endpoint_id, (asked, claims, lease) in result["claims"].items():
            lane = self._lanes.get(endpoint_id)
            if lane is None:  # gone meanwhile: hand the claims back
                self._outcomes.extend(_released(c) for c in claims)
                continue
            if lane.circuit_allows(time.monotonic()) == 0:
                # The circuit opened while this claim was made: hand it back at once rather
                # than hold it until the lease runs out.
                self._outcomes.extend(_released(c) for c in claims)
                continue
            lane.exhausted = len(claims) < asked
            deadline = started + lease - LEASE_MARGIN
            lane.buffer.extend((c, deadline) for c in claims)
            self._pump(lane)

    def _gauges(self, backlog: dict[str, queue.Backlog]) -> None:
        wall = utcnow()
        oldest = min((b.oldest_created_at for b in backlog.values()
                      if b.oldest_created_at is not None), default=None)
        metrics.FORWARD_OLDEST_PENDING.set(
            (wall - oldest).total_seconds() if oldest is not None else 0.0)
        shown = {*backlog, *self._lanes}
        for endpoint_id in self._gauged - shown:  # removed endpoints leave no stale series
            metrics.FORWARD_BACKLOG.remove(endpoint_id)
        for endpoint_id in shown:
            b = backlog.get(endpoint_id)
            metrics.FORWARD_BACKLOG.labels(endpoint=endpoint_id).set(b.due if b else 0)
        self._gauged = shown

    def _release(self, lane: Lane) -> None:
        while lane.buffer:
            claim, _ = lane.buffer.popleft()
            self._outcomes.append(_released(claim))

    def _pump(self, lane: Lane) -> None:
        """Start as many buffered deliveries as the lane's slots and circuit allow."""
        now = time.monotonic()
        while lane.buffer and lane.in_flight < self.concurrency and not self._closing:
            allowed = lane.circuit_allows(now)
            if allowed == 0:
                break
            claim, deadline = lane.buffer.popleft()
            if now + self.timeout > deadline:
                # Too little lease left to finish inside it: another replica may take the
                # delivery once the lease passes, so it must not be started here.
                self._outcomes.append(_released(claim))
                continue
            if allowed == 1:
                lane.probing = True
            lane.in_flight += 1
            task = asyncio.create_task(self._attempt(lane, claim))
            self._sends.add(task)
            task.add_done_callback(self._sends.discard)
        if (len(lane.buffer) < self.concurrency * BUFFER_ROUNDS // 2 and not lane.exhausted
                and self._wake):
            self._wake.set()

    # --- one attempt ---------------------------------------------------------------------

    async def _attempt(self, lane: Lane, claim: Claim) -> None:
        assert self._client is not None
        attempted_at = utcnow()
        headers = signed_headers(lane.endpoint.keys, claim.webhook_id, claim.payload)
        code: int | None = None
        response: str | None = None
        started = time.perf_counter()
        target = lane.endpoint.target
        try:
            if target is None:
                raise ClientError(lane.endpoint.unusable or "no request can be made")
            async with asyncio.timeout(self.timeout):
                code, kept = await self._client.post(target, claim.payload, headers,
                                                     keep=BODY_KEPT)
            response = kept.decode("utf-8", "replace")
        except TimeoutError:
            response = f"timeout: no complete answer within {self.timeout:g} s"
        except asyncio.CancelledError:
            lane.in_flight -= 1
            raise
        except Exception as exc:  # noqa: BLE001 - OSError, ClientError, or anything else:
            # every attempt ends with a recorded outcome, or its slot and lease would leak.
            response = (f"{type(exc).__name__}: {exc}" if str(exc)
                        else type(exc).__name__)[:BODY_KEPT]
        latency = time.perf_counter() - started
        ok = code is not None and 200 <= code < 300
        self._outcomes.append(self._outcome(lane, claim, attempted_at, code, ok,
                                            latency, response))
        metrics.FORWARD_ATTEMPT_SECONDS.labels(endpoint=lane.endpoint_id).observe(latency)
        lane.in_flight -= 1
        self._circuit(lane, ok)
        if self._lanes.get(lane.endpoint_id) is lane:
            self._pump(lane)

    def _outcome(self, lane: Lane, claim: Claim, attempted_at: datetime, code: int | None,
                 ok: bool, latency: float, response: str | None) -> Outcome:
        made = claim.attempts + 1
        error = None if ok else (f"HTTP {code}" if code is not None else "no answer") + (
            f": {response[:200]}" if response else "")
        next_at: datetime | None = None
        if ok:
            status, label = DELIVERED, "delivered"
        elif code == 410:
            status, label = FAILED, "gone"
            reason = f"disabled: the endpoint answered 410 Gone at {attempted_at.isoformat()}"
            self._disable[lane.endpoint_id] = reason
            lane.gone = True
            lane.open_until = math.inf  # nothing more starts; the next refresh drops the lane
            self._release(lane)
            log.warning("forwarding: endpoint %s answered 410 Gone; disabled", lane.endpoint_id)
        else:
            delay = None if lane.gone else retry_delay(self.schedule, made)
            if delay is None:
                status, label = FAILED, "failed"
            else:
                status, label = PENDING, "retry"
                next_at = attempted_at + timedelta(seconds=delay)
                if self._loop is not None:
                    # Claimed when due, not at the next poll (a bit late: the outcome is
                    # recorded by the next round, within FLUSH_SECONDS).
                    self._loop.call_later(delay + 2 * FLUSH_SECONDS, self._reopen,
                                          lane.endpoint_id)
        metrics.FORWARD_DELIVERIES.labels(endpoint=lane.endpoint_id, outcome=label).inc()
        return Outcome(claim.delivery_id, lane.endpoint_id, claim.token, status,
                       next_attempt_at=next_at, attempted_at=attempted_at, status_code=code,
                       ok=ok, latency_ms=round(latency * 1000, 3), response=response,
                       error=error)

    def _circuit(self, lane: Lane, ok: bool) -> None:
        was_probe, lane.probing = lane.probing, False
        if lane.gone:
            return
        if ok:
            if lane.open_until is not None:
                log.info("forwarding: endpoint %s answers again; circuit closed",
                         lane.endpoint_id)
                self._recovered.add(lane.endpoint_id)
                lane.exhausted = False
            lane.failures, lane.open_until, lane.cooldown = 0, None, COOLDOWN_FIRST
            return
        lane.failures += 1
        if was_probe or (lane.open_until is None and lane.failures >= FAILURES_TO_OPEN):
            if was_probe:
                lane.cooldown = min(COOLDOWN_MAX, lane.cooldown * 2)
            else:
                log.warning("forwarding: endpoint %s failed %d times in a row; circuit open",
                            lane.endpoint_id, lane.failures)
            lane.open_until = time.monotonic() + lane.cooldown
            self._release(lane)  # the buffered ones wait in the database, not here
            if self._loop is not None:
                self._loop.call_later(lane.cooldown, self._reopen, lane.endpoint_id)

    def _reopen(self, endpoint_id: str) -> None:
        lane = self._lanes.get(endpoint_id)
        if lane is not None:
            lane.exhausted = False
            if self._wake is not None:
                self._wake.set()


def signed_headers(keys: Sequence[bytes], webhook_id: str, payload: bytes
                   ) -> list[tuple[bytes, bytes]]:
    """A request's headers per Standard Webhooks, signed with every key (new and previous)."""
    timestamp = int(time.time())
    return [
        (b"content-type", b"application/json"),
        (b"webhook-id", webhook_id.encode()),
        (b"webhook-timestamp", str(timestamp).encode()),
        (b"webhook-signature", sign(keys, webhook_id, timestamp, payload).encode()),
    ]


@dataclass(frozen=True, slots=True)
class Sent:
    """What one request outside the queue (a test event) came to."""

    status_code: int | None
    ok: bool
    latency_ms: float
    error: str | None
    response: str | None


async def send_once(url: str, keys: Sequence[bytes], webhook_id: str, payload: bytes,
                    timeout: float) -> Sent:
    """POST one signed payload now, on a client of its own, and say what came of it."""
    client = WebhookClient()
    code: int | None = None
    response: str | None = None
    error: str | None = None
    started = time.perf_counter()
    try:
        target = Target.parse(url)
        async with asyncio.timeout(timeout):
            code, kept = await client.post(target, payload,
                                           signed_headers(keys, webhook_id, payload),
                                           keep=BODY_KEPT)
        response = kept.decode("utf-8", "replace")
    except TimeoutError:
        error = f"timeout: no complete answer within {timeout:g} s"
    except Exception as exc:  # noqa: BLE001 - OSError, ClientError, a URL no request fits
        error = (f"{type(exc).__name__}: {exc}" if str(exc)
                 else type(exc).__name__)[:BODY_KEPT]
    finally:
        await client.aclose()
    ok = code is not None and 200 <= code < 300
    if code is not None and not ok:
        error = f"HTTP {code}" + (f": {response[:200]}" if response else "")
    return Sent(code, ok, round((time.perf_counter() - started) * 1000, 3), error, response)


@contextmanager
def _relaxed_sync(conn: Connection) -> Iterator[None]:
    """On SQLite, the forwarder's own commits skip the fsync (WAL with synchronous=NORMAL:
    safe against a process crash, not a power cut). What they write is a lease or an
    attempt's outcome; lost in a power cut, it only means an event is sent again, which
    at-least-once allows. Each fsync would hold the one write lock that ingest needs."""
    if conn.dialect.name != "sqlite":
        yield
        return
    conn.exec_driver_sql("PRAGMA synchronous=NORMAL")
    conn.commit()  # ends the implicit transaction the pragma began
    try:
        yield
    finally:
        conn.exec_driver_sql("PRAGMA synchronous=FULL")  # the pooled connection as it was
        conn.commit()


def _released(claim: Claim) -> Outcome:
    return Outcome(claim.delivery_id, claim.endpoint_id, claim.token, PENDING)
