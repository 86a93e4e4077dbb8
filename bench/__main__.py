"""Ingest and lookup benchmark: `make bench` (or `python -m bench --help`).

In one run, per backend: start `dlr serve`, measure its own /healthz with wrk as the
baseline, drive /dlr with a campaign's callback mix over 64 connections, check that exactly
what was acknowledged is stored, then seed 1M messages / 3M events and measure lookups.
Every figure is reported as a ratio to the baseline measured in the same run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import httpx
import psycopg
import typer
from rich.console import Console
from rich.table import Table
from sqlalchemy import text

from app.config import load_settings
from app.store.db import make_engine
from app.store.migrate import upgrade
from bench.cpu import Snapshot, cell, per_request, used
from bench.dashboard import dashboard_round
from bench.dashboard import markdown_rows as dashboard_rows
from bench.forwarding import forwarding_round, markdown_rows
from bench.seed import seed
from bench.spool import markdown_rows as spool_rows
from bench.spool import spool_round

HERE = Path(__file__).resolve().parent
DLR = str(Path(sys.executable).with_name("dlr"))
PG_ADMIN = os.environ.get("BENCH_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/postgres")
console = Console()
SETTLE_SECONDS = 1.0


@dataclass
class Wrk:
    rps: float
    p50_ms: float
    p99_ms: float
    non_200: int
    requests: int
    duration_s: float
    quantiles_us: list[int]
    extra: dict[str, Any] = field(default_factory=dict)
    cpu: dict[str, float] = field(default_factory=dict)  # bench/cpu.py's `used`

    @property
    def cpu_per_request(self) -> dict[str, float]:
        return per_request(self.cpu, self.requests)


def wrk(url: str, script: str, seconds: int, connections: int, env: dict[str, str]) -> Wrk:
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency",
           "-s", str(HERE / script), url]
    before = Snapshot.take()
    out = subprocess.run(cmd, capture_output=True, text=True, check=True,
                         env=os.environ | env).stdout
    cpu = used(before, Snapshot.take())
    line = next(x for x in out.splitlines() if x.startswith("WRK_JSON "))
    data = json.loads(line.removeprefix("WRK_JSON "))
    non_200 = (data["status_errors"] + data["connect_errors"] + data["read_errors"]
               + data["write_errors"] + data["timeouts"])
    return Wrk(rps=data["requests"] / (data["duration_us"] / 1e6),
               p50_ms=data["p50_us"] / 1000, p99_ms=data["p99_us"] / 1000,
               non_200=non_200, requests=data["requests"],
               duration_s=data["duration_us"] / 1e6, quantiles_us=data["quantiles_us"],
               extra={k: v for k, v in data.items() if k in ("distinct_sent", "resends_sent")},
               cpu=cpu)


def merge(runs: list[Wrk]) -> Wrk:
    """Several runs as one: summed counts, and percentiles of the pooled latencies (each run's
    1,000 quantiles weighted by its number of requests)."""
    points = sorted((q, r.requests / len(r.quantiles_us)) for r in runs for q in r.quantiles_us)
    total = sum(weight for _, weight in points)

    def percentile(p: float) -> float:
        seen = 0.0
        for value, weight in points:
            seen += weight
            if seen >= total * p / 100:
                return value / 1000
        return points[-1][0] / 1000

    requests = sum(r.requests for r in runs)
    duration = sum(r.duration_s for r in runs)
    extra: dict[str, Any] = {}
    cpu: dict[str, float] = {}
    for r in runs:
        for k, v in r.extra.items():
            extra[k] = extra.get(k, 0) + v
        for k, seconds in r.cpu.items():
            cpu[k] = cpu.get(k, 0.0) + seconds
    return Wrk(rps=requests / duration, p50_ms=percentile(50), p99_ms=percentile(99),
               non_200=sum(r.non_200 for r in runs), requests=requests, duration_s=duration,
               quantiles_us=[], extra=extra, cpu=cpu)


def bracketed(url: str, loads: dict[str, tuple[str, str, dict[str, str]]], seconds: int,
              connections: int) -> dict[str, Wrk]:
    """The baseline for half of `seconds`, each named load (path, wrk script, environment) for
    `seconds`, then the baseline's other half: a change in the machine's speed during the
    round (other tenants, CPU frequency) weighs on the baseline as on the loads.

    Each load is one continuous run: the start of every wrk run at 64 connections costs some
    requests ~150 ms (p99 of /healthz 130-190 ms in 2 s runs, 19-21 ms in 10 s runs; 64 new
    connections from another client see no such stall), so cutting a load into short runs
    would put that start into the load's p99.
    """
    half = max(1, seconds // 2)
    runs = {"baseline": [wrk(url + "/healthz", "plain.lua", half, connections, {})]}
    for name, (path, script, env) in loads.items():
        # Requests wrk abandoned at its deadline (a slow page can take 300 ms) finish
        # before the next run starts, rather than inside it.
        time.sleep(SETTLE_SECONDS)
        runs[name] = [wrk(url + path, script, seconds, connections, env)]
    time.sleep(SETTLE_SECONDS)
    runs["baseline"].append(wrk(url + "/healthz", "plain.lua", half, connections, {}))
    return {name: merge(results) for name, results in runs.items()}


class Server:
    """`dlr serve` in a subprocess, with its memory readable from /proc."""

    def __init__(self, database_url: str, port: int, workers: int,
                 command: list[str] | None = None, log: Path | None = None,
                 ready: str = "/readyz", env: dict[str, str] | None = None) -> None:
        """`command` replaces the quiet `dlr serve` (the logging round's servers); `log`
        takes the server's output (a pipe nobody reads would block a chatty server); `env`
        adds settings."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("DLR_")} | (env or {})
        env["DLR_DATABASE_URL"] = database_url
        self.url = f"http://127.0.0.1:{port}"
        self.log = log.open("wb") if log is not None else None
        self.proc = subprocess.Popen(
            command or [DLR, "serve", "--port", str(port), "--workers", str(workers),
                        "--no-access-log", "--log-level", "warning"],
            env=env, stdout=subprocess.DEVNULL, cwd=HERE.parent,
            stderr=self.log if self.log is not None else subprocess.PIPE)
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{self.url}{ready}", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                out = self.proc.stderr.read() if self.proc.stderr else b"(see its log)"
                raise RuntimeError(f"server did not start: {out!r}")
            time.sleep(0.2)

    def worker_pids(self) -> list[int]:
        kids = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        children = [int(p) for p in kids.read_text().split()] if kids.exists() else []
        # With --workers N uvicorn's parent only supervises; the children serve.
        return children or [self.proc.pid]

    def memory_mb(self) -> dict[str, float]:
        """Peak (VmHWM) and current (VmRSS) of the largest worker, in MB."""
        peak = rss = 0.0
        for pid in self.worker_pids():
            status = Path(f"/proc/{pid}/status").read_text()
            values = {k: int(re.search(rf"{k}:\s+(\d+)", status).group(1)) / 1024  # type: ignore[union-attr]
                      for k in ("VmHWM", "VmRSS")}
            peak, rss = max(peak, values["VmHWM"]), max(rss, values["VmRSS"])
        return {"peak_mb": round(peak, 1), "rss_mb": round(rss, 1)}

    def metric(self, name: str, **labels: str) -> float:
        body = httpx.get(f"{self.url}/metrics").text
        total = 0.0
        for line in body.splitlines():
            if line.startswith((name + "{", name + " ")) and all(
                    f'{k}="{v}"' in line for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
            if self.log is not None:
                self.log.close()
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Database:
    def __init__(self, backend: str, workdir: Path, admin: str = PG_ADMIN) -> None:
        self.backend = backend
        self.admin = admin
        if backend == "sqlite":
            self.url = f"sqlite:///{workdir / 'bench.db'}"
            self.name = None
        else:
            self.name = f"dlr_bench_{uuid.uuid4().hex[:8]}"
            with psycopg.connect(admin, autocommit=True) as conn:
                conn.execute(f'CREATE DATABASE "{self.name}"')
            self.url = admin.rsplit("/", 1)[0] + f"/{self.name}"
        self.engine = make_engine(load_settings(database_url=self.url, _env_file=None),
                                  pool_size=1)
        upgrade(self.engine)

    def exactness(self, pattern: str) -> dict[str, int]:
        with self.engine.connect() as conn:
            row = conn.execute(text("""
                SELECT count(*),
                       count(DISTINCT msg_key || '|' || type || '|' || coalesce(status, '')
                             || '|' || coalesce(status_extended, '') || '|'
                             || coalesce(text, ''))
                FROM events WHERE msg_key LIKE :p
            """), {"p": f"{pattern}%"}).one()
        return {"stored": int(row[0]), "distinct_stored": int(row[1])}

    def reset(self) -> None:
        """Empty the tables (the next round seeds its own data)."""
        with self.engine.begin() as conn:
            for table in ("delivery_attempts", "deliveries", "outbound_events", "events",
                          "messages", "rejected", "sends", "message_counts", "code_counts",
                          "campaign_counts"):
                conn.exec_driver_sql(f"DELETE FROM {table}")

    def drop(self) -> None:
        self.engine.dispose()
        if self.name:
            with psycopg.connect(self.admin, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')


def spooling_server(database_url: str, env: dict[str, str]) -> Server:
    return Server(database_url, free_port(), 1, env=env)


def ingest_round(server: Server, db: Database, seconds: int, connections: int,
                 exact_metrics: bool) -> dict[str, Any]:
    prefix = f"b{uuid.uuid4().hex[:6]}"
    new_before = server.metric("dlr_callbacks_total", outcome="new") if exact_metrics else 0
    runs = bracketed(server.url, {"mix": ("/dlr", "mix.lua", {"BENCH_PREFIX": prefix})},
                     seconds, connections)
    baseline, mix = runs["baseline"], runs["mix"]
    stored = db.exactness(f"{prefix}-")
    sent = mix.extra["distinct_sent"]
    checks = {
        "no_duplicates": stored["stored"] == stored["distinct_stored"],
        # Only requests still in flight when wrk stopped (at most one per connection) may be
        # missing: the provider would re-send those.
        "none_lost": sent - connections <= stored["stored"] <= sent,
    }
    if exact_metrics:
        acked_new = server.metric("dlr_callbacks_total", outcome="new") - new_before
        checks["acknowledged_all_stored"] = acked_new == stored["stored"]
    return {
        "baseline_rps": round(baseline.rps), "baseline_p99_ms": baseline.p99_ms,
        "ingest_rps": round(mix.rps), "ratio": round(mix.rps / baseline.rps, 2),
        "p50_ms": mix.p50_ms, "p99_ms": mix.p99_ms, "non_200": mix.non_200 + baseline.non_200,
        "distinct_sent": sent, "resends_sent": mix.extra["resends_sent"],
        "stored": stored["stored"], "checks": checks, "exact": all(checks.values()),
        "memory": server.memory_mb(), "cpu": mix.cpu_per_request,
        "baseline_cpu": baseline.cpu_per_request,
    }


def logging_round(db: Database, seconds: int, connections: int, workdir: Path) -> dict[str, Any]:
    """/healthz of `dlr serve` with its default logging (an access line per request, to a
    file) against a bare FastAPI route on the same uvicorn without an access log, taken in
    turn (bare, ours, bare) so the machine's drift weighs on both."""
    port, bare_port = free_port(), free_port()
    ours = Server(db.url, port, 1, command=[DLR, "serve", "--port", str(port)],
                  log=workdir / "serve.log")
    bare = Server(db.url, bare_port, 1, ready="/healthz", log=workdir / "bare.log", command=[
        sys.executable, "-m", "uvicorn", "bench.bare:app", "--port", str(bare_port),
        "--no-access-log", "--log-level", "warning"])
    try:
        half = max(1, seconds // 2)
        bare_runs = [wrk(bare.url + "/healthz", "plain.lua", half, connections, {})]
        time.sleep(SETTLE_SECONDS)
        logged = wrk(ours.url + "/healthz", "plain.lua", seconds, connections, {})
        time.sleep(SETTLE_SECONDS)
        bare_runs.append(wrk(bare.url + "/healthz", "plain.lua", half, connections, {}))
    finally:
        ours.stop()
        bare.stop()
    baseline = merge(bare_runs)
    lines = sum(1 for line in (workdir / "serve.log").open("rb") if b"uvicorn.access" in line)
    return {"bare_rps": round(baseline.rps), "bare_p99_ms": baseline.p99_ms,
            "rps": round(logged.rps), "ratio": round(logged.rps / baseline.rps, 2),
            "p50_ms": logged.p50_ms, "p99_ms": logged.p99_ms, "non_200": logged.non_200,
            "access_lines": lines, "requests": logged.requests, "cpu": logged.cpu_per_request,
            "bare_cpu": baseline.cpu_per_request}


def lookup_round(server: Server, messages: int, seconds: int, connections: int,
                 workdir: Path) -> dict[str, Any]:
    import random

    rng = random.Random(1)
    by_id = workdir / "by_id.txt"
    by_id.write_text("".join(f"/api/v1/messages/seed-{rng.randint(1, messages)}\n"
                             for _ in range(5000)))
    by_ptid = workdir / "by_ptid.txt"
    by_ptid.write_text("".join(
        f"/api/v1/messages?p_transaction_id=camp-{rng.randint(0, 9999)}&limit=50\n"
        for _ in range(5000)))
    runs = bracketed(server.url, {
        "by_id": ("/", "plain.lua", {"BENCH_PATHS": str(by_id)}),
        "by_ptid_page": ("/", "plain.lua", {"BENCH_PATHS": str(by_ptid)}),
    }, seconds, connections)
    baseline = runs["baseline"]
    return {
        "connections": connections, "messages": messages,
        "baseline_rps": round(baseline.rps), "baseline_p99_ms": baseline.p99_ms,
        "baseline_cpu": baseline.cpu_per_request,
        **{name: {"rps": round(r.rps), "ratio": round(r.rps / baseline.rps, 2),
                  "p50_ms": r.p50_ms, "p99_ms": r.p99_ms, "non_200": r.non_200,
                  "cpu": r.cpu_per_request}
           for name, r in runs.items() if name != "baseline"},
        "memory": server.memory_mb(),
    }


def run(
    backends: Annotated[str, typer.Option(help="Comma-separated: sqlite,postgresql")
                        ] = "sqlite,postgresql",
    seconds: Annotated[int, typer.Option(help="Length of each load's run (the baseline's is "
                                              "split before and after)")] = 10,
    connections: Annotated[int, typer.Option()] = 64,
    lookup_connections: Annotated[str, typer.Option(
        help="Comma-separated connection counts for the lookups: the burst's 64, where the "
             "rate is the point, and an API client's few, where the latency is")] = "64,8",
    seed_messages: Annotated[int, typer.Option(help="Messages to seed for lookups (0: skip)")
                             ] = 1_000_000,
    rounds: Annotated[int, typer.Option(help="Ingest rounds on one server (memory growth)")
                      ] = 2,
    ingest: Annotated[bool, typer.Option(help="Run the ingest part (--no-ingest: lookups only)")
                      ] = True,
    access_log: Annotated[bool, typer.Option(
        help="Measure /healthz with the default access log against a bare FastAPI route")
                          ] = True,
    forwarding: Annotated[bool, typer.Option(
        help="Measure forwarding: ingest with an endpoint, latency, drain after an outage")
                          ] = True,
    outage_seconds: Annotated[int, typer.Option(
        help="How long the forwarding sink is down, and PostgreSQL in the spool round")
                              ] = 60,
    spool: Annotated[bool, typer.Option(
        help="PostgreSQL away for --outage-seconds under ~1,000 callbacks/s: the spool")
                     ] = True,
    dashboard: Annotated[bool, typer.Option(
        help="Time the dashboard's reads on a bulk sender's day at two sizes")] = True,
    dashboard_sizes: Annotated[str, typer.Option(
        help="backend=small,large messages within 24 h for the dashboard's reads")
                               ] = "sqlite=200000,1000000;postgresql=200000,5000000",
    out: Annotated[Path, typer.Option(help="Where to write the JSON results")
                   ] = HERE / "results" / "latest.json",
) -> None:
    """Run the benchmark and print ratios to the same server's /healthz."""
    if shutil.which("wrk") is None:
        raise typer.BadParameter("wrk is not installed (Debian package `wrk`)")
    results: dict[str, Any] = {"connections": connections, "seconds": seconds,
                               "cpus": os.cpu_count(), "backends": {}}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        for backend in backends.split(","):
            db = Database(backend, workdir)
            res: dict[str, Any] = {}
            try:
                if access_log and "logging" not in results:
                    console.print("[bold]access log[/bold]: /healthz against a bare route")
                    results["logging"] = logging_round(db, seconds, connections, workdir)
                worker_counts = ([1, 2] if backend == "postgresql" else [1]) if ingest else []
                for workers in worker_counts:
                    console.print(f"[bold]{backend}[/bold]: ingest, {workers} worker(s)")
                    server = Server(db.url, free_port(), workers)
                    try:
                        res[f"ingest_{workers}w"] = [
                            ingest_round(server, db, seconds, connections,
                                         exact_metrics=workers == 1)
                            for _ in range(rounds if workers == 1 else 1)
                        ]
                    finally:
                        server.stop()
                if forwarding:
                    console.print(f"[bold]{backend}[/bold]: forwarding")
                    res["forwarding"] = forwarding_round(
                        db, Server, bracketed, free_port, seconds, connections, workdir,
                        outage=outage_seconds)
                if spool and backend == "postgresql":
                    console.print(f"[bold]{backend}[/bold]: the database away under load")
                    res["spool"] = spool_round(
                        lambda admin: Database("postgresql", workdir, admin), spooling_server, wrk,
                        workdir, outage_seconds, console)
                if dashboard:
                    console.print(f"[bold]{backend}[/bold]: the dashboard's reads on a day")
                    sizes = dict(part.split("=") for part in dashboard_sizes.split(";"))
                    res["dashboard"] = dashboard_round(
                        db, lambda url=db.url: Server(url, free_port(), 1),
                        [int(n) for n in sizes[backend].split(",")], console, DLR, HERE)
                    db.reset()
                if seed_messages:
                    console.print(f"[bold]{backend}[/bold]: seeding {seed_messages:,} messages")
                    started = time.monotonic()
                    seed(db.engine, seed_messages)
                    res["seed_seconds"] = round(time.monotonic() - started)
                    server = Server(db.url, free_port(), 1)
                    try:
                        res["lookups"] = [
                            lookup_round(server, seed_messages, seconds, int(n),
                                         workdir)
                            for n in lookup_connections.split(",")]
                    finally:
                        server.stop()
            finally:
                db.drop()
            results["backends"][backend] = res
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    out.with_suffix(".md").write_text(markdown(results))
    report(results)
    console.print(f"results: {out} (and {out.with_suffix('.md').name}, the README's table)")


def markdown(results: dict[str, Any]) -> str:
    """The results as the README's table."""
    lines = ["| backend | run | /healthz req/s (its p99) | req/s | ratio | p50 / p99 ms | non-200 "
             "| exact | peak RSS MB | CPU µs per request; idle cores |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    lg = results.get("logging")
    if lg:
        lines.append(
            f"| – | /healthz with the default access log ({lg['access_lines']:,} lines written), "
            f"baseline: a bare FastAPI route on uvicorn, no access log | {lg['bare_rps']:,} "
            f"({lg['bare_p99_ms']:.0f} ms) | {lg['rps']:,} | **{lg['ratio']:.2f}** | "
            f"{lg['p50_ms']:.1f} / {lg['p99_ms']:.1f} | {lg['non_200']} | – | – | "
            f"{cell(lg['cpu'])} (bare route: {cell(lg['bare_cpu'])}) |")
    for backend, res in results["backends"].items():
        lines.extend(markdown_rows(backend, res))
        for key, rounds in res.items():
            if not key.startswith("ingest_"):
                continue
            for i, r in enumerate(rounds, 1):
                exact = (f"yes ({r['stored']:,} stored of {r['distinct_sent']:,} distinct sent, "
                         f"{r['resends_sent']:,} resends)" if r["exact"] else f"NO {r['checks']}")
                lines.append(
                    f"| {backend} | callback mix, {key.removeprefix('ingest_')[:-1]} worker(s), "
                    f"round {i} | {r['baseline_rps']:,} ({r['baseline_p99_ms']:.0f} ms) | "
                    f"{r['ingest_rps']:,} | "
                    f"**{r['ratio']:.2f}** | {r['p50_ms']:.1f} / {r['p99_ms']:.1f} | "
                    f"{r['non_200']} | {exact} | {r['memory']['peak_mb']} | "
                    f"{cell(r['cpu'], r['baseline_cpu'])} |")
        for lk in res.get("lookups", []):
            for name, label in (("by_id", "GET /api/v1/messages/{msg_id}"),
                                ("by_ptid_page", "a 50-row page of ?p_transaction_id=")):
                r = lk[name]
                lines.append(
                    f"| {backend} | {label}, {lk['messages']:,} messages / {3 * lk['messages']:,} "
                    f"events, {lk['connections']} "
                    f"connections | {lk['baseline_rps']:,} ({lk['baseline_p99_ms']:.0f} ms) | "
                    f"{r['rps']:,} | **{r['ratio']:.2f}** | {r['p50_ms']:.1f} / "
                    f"{r['p99_ms']:.1f} | {r['non_200']} | – | {lk['memory']['peak_mb']} | "
                    f"{cell(r['cpu'], lk['baseline_cpu'])} |")
    for backend, res in results["backends"].items():
        if "spool" in res:
            lines += ["", *spool_rows(res["spool"])]
        if "dashboard" in res:
            lines += ["", *dashboard_rows(backend, res["dashboard"])]
    return "\n".join(lines) + "\n"


def report(results: dict[str, Any]) -> None:
    table = Table(title=f"{results['connections']} connections, {results['seconds']} s runs, "
                        f"{results['cpus']} CPUs; ratios to the same server's /healthz, "
                        "measured before and after")
    for col in ("backend", "run", "req/s", "ratio", "p50 ms", "p99 ms", "non-200", "exact",
                "peak MB"):
        table.add_column(col)
    lg = results.get("logging")
    if lg:
        table.add_row("-", "healthz, access log / bare route", str(lg["rps"]), str(lg["ratio"]),
                      f"{lg['p50_ms']:.1f}", f"{lg['p99_ms']:.1f}", str(lg["non_200"]), "-", "-")
    for backend, res in results["backends"].items():
        for key, rounds in res.items():
            if not key.startswith("ingest_"):
                continue
            for i, r in enumerate(rounds, 1):
                table.add_row(backend, f"{key} #{i}", str(r["ingest_rps"]), str(r["ratio"]),
                              f"{r['p50_ms']:.1f}", f"{r['p99_ms']:.1f}", str(r["non_200"]),
                              "yes" if r["exact"] else f"NO {r['checks']}",
                              str(r["memory"]["peak_mb"]))
        for lk in res.get("lookups", []):
            for name in ("by_id", "by_ptid_page"):
                r = lk[name]
                table.add_row(backend, f"lookup {name} @{lk['connections']}", str(r["rps"]),
                              str(r["ratio"]),
                              f"{r['p50_ms']:.1f}", f"{r['p99_ms']:.1f}", str(r["non_200"]),
                              "-", str(lk["memory"]["peak_mb"]))
    console.print(table)


if __name__ == "__main__":
    typer.run(run)
