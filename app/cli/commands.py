"""The `dlr` command line. Errors are one clear line on stderr and a non-zero exit."""

from __future__ import annotations

import asyncio
import csv
import errno
import io
import socket
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from fastapi import HTTPException
from rich import box
from rich.markup import escape
from rich.table import Table

from app.config import Settings

if TYPE_CHECKING:
    from rich.progress import Progress, TaskID

    from app.send import SendRequest, SendResult

from app.cli.common import (
    CliError,
    LogFormat,
    LogLevel,
    cli,
    err,
    migrate_database,
    one_line_errors,
    out,
    require_database,
    settings,
)


@cli.command()
@one_line_errors
def migrate() -> None:
    """Bring the database schema up to date."""
    migrate_database(settings())
    out.print("database is up to date")


@cli.command()
@one_line_errors
def serve(
    host: Annotated[str, typer.Option(help="Address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on")] = 8000,
    workers: Annotated[int, typer.Option(min=1, help="Worker processes")] = 1,
    log_level: Annotated[LogLevel, typer.Option(help="uvicorn log level")] = LogLevel.info,
    access_log: Annotated[bool, typer.Option(help="Log every request")] = True,
    log_format: Annotated[LogFormat, typer.Option(help="text or json (one object a line)")
                          ] = LogFormat.text,
) -> None:
    """Migrate the database, then serve the receiver and the API."""
    import uvicorn

    from app.ops.logs import log_config

    cfg = settings()
    # A busy port is one error line before anything else is done, not uvicorn's lines after
    # "startup complete" and exit 3. The probe is closed again: uvicorn binds the port itself
    # (with --workers it must own the socket); the window between the two is a few ms.
    _listen(host, port, "another dlr serve?").close()
    migrate_database(cfg)
    uvicorn.run(
        "app.main:create_served_app",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_level=log_level.value,
        log_config=log_config(log_format.value, log_level.value),
        access_log=access_log,
        # X-Forwarded-For is judged by DLR_TRUSTED_PROXIES alone, never by uvicorn's default
        # of trusting loopback, so a local proxy cannot be used to forge an allowed address.
        proxy_headers=False,
        server_header=False,
        http="app.ops.http_protocol:HeaderTimeoutProtocol",
        timeout_graceful_shutdown=30,
        timeout_keep_alive=30,
        h11_max_incomplete_event_size=16 * 1024,
    )


def _listen(host: str, port: int, who: str) -> socket.socket:
    """A socket bound to host:port (as uvicorn binds: SO_REUSEADDR), or a one-line CliError
    saying why not: a port already in use (by `who`, perhaps), no permission, no such host."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError:
            sock.close()
            raise
    except OSError as exc:
        reason = (f"the port is already in use ({who}); choose another with --port"
                  if getattr(exc, "errno", None) == errno.EADDRINUSE else exc.strerror or exc)
        raise CliError(f"cannot listen on {host}:{port}: {reason}") from None
    return sock


@cli.command()
@one_line_errors
def status(msg_id: Annotated[str, typer.Argument(help="The provider's msg_id")]) -> None:
    """Show a message's current status and its timeline."""
    from app.query.messages import load_message
    from app.store.db import make_engine

    cfg = settings()
    require_database(cfg)
    engine = make_engine(cfg, pool_size=1)
    try:
        with engine.connect() as conn:
            try:
                message = load_message(conn, msg_id)
            except HTTPException as exc:
                raise CliError(str(exc.detail)) from None
    finally:
        engine.dispose()
    out.print(_status_head(message))
    out.print(_timeline(message.events))


# Tables fit 80 columns: ids, codes and times never break (no_wrap), free text folds.
def _when(value: datetime) -> str:
    """A stored time in UTC, to the millisecond: `2024-05-01 12:00:00.123Z`."""
    return value.astimezone(UTC).isoformat(sep=" ", timespec="milliseconds").replace(
        "+00:00", "Z")


def _status_head(message: Any) -> Table:
    head = Table(show_header=False, box=None, pad_edge=False)
    head.add_column(style="bold", no_wrap=True)
    head.add_column(overflow="fold")
    for name in ("msg_id", "status", "status_extended", "phone", "p_transaction_id",
                 "campaign", "sent_at", "delivered_at", "seen_at", "updated_at"):
        if not hasattr(message, name):
            continue
        value = getattr(message, name)
        shown = ("-" if value is None else _when(value) if isinstance(value, datetime)
                 else str(value))
        head.add_row(name, escape(shown))
    return head


def _timeline(events: list[Any]) -> Table:
    table = Table(title="events", box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True,
                  title_justify="left")
    table.add_column("received_at", no_wrap=True)
    table.add_column("type", no_wrap=True)
    table.add_column("status", no_wrap=True)  # and status_extended below it
    table.add_column("text", overflow="fold")
    for e in events:
        state = "\n".join(v for v in (e.status, e.status_extended) if v)
        table.add_row(_when(e.received_at), e.type, escape(state), escape(e.text or ""))
    return table


def _request(fields: dict[str, Any], where: str) -> SendRequest:
    from pydantic import ValidationError

    from app.send import SendRequest

    try:
        return SendRequest.model_validate({k: v for k, v in fields.items() if v is not None})
    except ValidationError as exc:
        problems = [f"{'.'.join(str(p) for p in e['loc']) or 'message'}: "
                    f"{e['msg'].removeprefix('Value error, ')}" for e in exc.errors()]
        raise CliError(where + "; ".join(problems)) from None


CSV_FIELDS = ("phone", "txt", "from", "image_id", "button_text", "button_link", "sending_method",
              "p_transaction_id", "dlr_timeout", "expiry_txt", "charset", "delay")


DELIMITER_NAMES = {",": "','", ";": "';'", "\t": "tabs"}


def _csv_delimiter(header: str) -> str:
    """Excel writes ';' in many locales (or tabs); column names hold no separator, so the
    header line alone tells which one the file uses."""
    try:
        return csv.Sniffer().sniff(header, delimiters="".join(DELIMITER_NAMES)).delimiter
    except csv.Error:
        return ","  # one column: nothing to tell


def _csv_requests(path: Path, defaults: dict[str, Any], campaign: str) -> list[SendRequest]:
    """Every row as a one-phone request, all checked before anything is sent; every bad row
    is reported (with its line number), not just the first."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            text = fh.read()
    except UnicodeDecodeError as exc:
        raise CliError(f"{path}: not UTF-8 text (byte {exc.start}); save it as CSV UTF-8"
                       ) from None
    delimiter = _csv_delimiter(text.partition("\n")[0])
    separated = f"separated by {DELIMITER_NAMES[delimiter]}"
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        names = [n.strip().lower() for n in reader.fieldnames or []]
        reader.fieldnames = names
        if "phone" not in names:
            raise CliError(f"{path}: line 1 must name the columns ({separated}: "
                           f"{', '.join(map(repr, names)) or 'nothing'}) with at least 'phone'")
        unknown = [n for n in names if n not in CSV_FIELDS]
        if unknown:
            raise CliError(f"{path}: line 1: unknown column {', '.join(map(repr, unknown))} "
                           f"({separated}); known: {', '.join(CSV_FIELDS)}")
        requests, problems = [], []
        for row_no, row in enumerate(reader, start=1):
            where = f"{path}:{reader.line_num}: "
            if None in row:
                problems.append(f"{where}{len(names) + len(row[None])} fields ({separated}), "
                                f"line 1 names {len(names)}")
                continue
            fields = defaults | {k: v for k, v in row.items() if v not in (None, "")}
            if "phone" in fields:
                fields["phone"] = [fields["phone"]]
            # A stable id per row is what makes a re-run skip rows already accepted.
            fields.setdefault("p_transaction_id", f"{campaign}-{row_no}")
            try:
                requests.append(_request(fields, where))
            except CliError as exc:
                problems.append(str(exc))
    except csv.Error as exc:
        raise CliError(f"{path}:{reader.line_num}: {exc}") from None
    if problems:
        for problem in problems:
            err.print(f"[red]error:[/red] {escape(problem)}", highlight=False)
        raise CliError(f"{path}: {len(problems)} bad of {len(problems) + len(requests)} "
                       "rows; nothing was sent")
    if not requests:
        raise CliError(f"{path}: no rows after line 1")
    return requests


@cli.command()
@one_line_errors
def send(
    phone: Annotated[list[str] | None, typer.Option(help="Recipient, digits only (repeatable)")
                     ] = None,
    txt: Annotated[str | None, typer.Option(help="Message text")] = None,
    sender: Annotated[str | None, typer.Option("--from", help="Sender name (default DLR_BULK_FROM)")
                      ] = None,
    image_id: Annotated[str | None, typer.Option(help="image_id from `dlr upload`")] = None,
    button_text: Annotated[str | None, typer.Option(help="Button caption")] = None,
    button_link: Annotated[str | None, typer.Option(help="Button URL")] = None,
    sms: Annotated[bool, typer.Option("--sms", help="sending_method=sms")] = False,
    p_transaction_id: Annotated[str | None, typer.Option(help="Your id for the request")] = None,
    dlr_timeout: Annotated[int | None, typer.Option(help="Seconds, 60..86400")] = None,
    expiry_txt: Annotated[str | None, typer.Option(help="Text shown after dlr_timeout")] = None,
    charset: Annotated[str | None, typer.Option(help="UTF-8, UTF-16BE, UCS-2 or CP1251")] = None,
    delay: Annotated[int | None, typer.Option(
        help="Defer the send by this many minutes, 1..10080 (a week)")] = None,
    csv_file: Annotated[Path | None, typer.Option(
        "--csv", exists=True, dir_okay=False,
        help="Send one message per row (columns: phone, txt, and any option above)")] = None,
    rate: Annotated[float, typer.Option(help="CSV: messages per second (provider default 10)")
                    ] = 10.0,
    campaign: Annotated[str | None, typer.Option(
        help="Campaign label of the message, or of every CSV row; with --csv also the prefix "
             "of generated p_transaction_ids (default for both: the file name)")] = None,
    retry_unknown: Annotated[bool, typer.Option(
        help="CSV: also re-send rows whose earlier outcome is unknown")] = False,
) -> None:
    """Send one message, or a whole CSV at a rate limit (a re-run skips accepted rows)."""

    cfg = settings()
    fields: dict[str, Any] = {
        "txt": txt, "from": sender, "image_id": image_id, "button_text": button_text,
        "button_link": button_link, "sending_method": "sms" if sms else None,
        "p_transaction_id": p_transaction_id, "dlr_timeout": dlr_timeout,
        "expiry_txt": expiry_txt, "charset": charset, "delay": delay,
    }
    if csv_file is None:
        if not phone:
            raise CliError("give --phone (repeatable) or --csv FILE")
        requests = [_request(fields | {"phone": phone, "campaign": campaign}, "")]
    else:
        # Name only what was given: each row has its own phone and p_transaction_id.
        clashing = [name for name, value in (("--phone", phone),
                                             ("--p-transaction-id", p_transaction_id)) if value]
        if clashing:
            raise CliError(f"{' and '.join(clashing)} cannot be combined with --csv "
                           "(each row gives its own)")
        label = campaign or csv_file.stem[:64]
        defaults = {k: v for k, v in fields.items() if v is not None} | {"campaign": label}
        requests = _csv_requests(csv_file, defaults, label)
    if rate <= 0:
        raise CliError("--rate must be above 0")
    try:
        requests = [r.with_defaults(default_sender=cfg.bulk_from) for r in requests]
    except ValueError as exc:
        raise CliError(str(exc)) from None

    # Sends are recorded: never into a database created here by accident (wrong directory).
    require_database(cfg)
    migrate_database(cfg)
    if cfg.bulk_user is None or cfg.bulk_secret_key is None:
        raise CliError("set DLR_BULK_USER and DLR_BULK_SECRET_KEY to send")
    if csv_file is None:
        result = asyncio.run(_send_one(cfg, requests[0]))
        _report(result)
        if result.outcome != "accepted":
            raise typer.Exit(1)
        return
    _send_csv(cfg, requests, rate, retry_unknown)


async def _send_one(cfg: Settings, request: SendRequest) -> SendResult:
    from app.send import standalone_sender

    async with standalone_sender(cfg) as client:
        return await client.send(request)


def _report(result: Any) -> None:
    if result.outcome == "accepted":
        out.print(f"accepted p_transaction_id={result.p_transaction_id}")
        for p, m in result.msg_ids.items():
            out.print(f"  {p} {m}")
    else:
        err.print(f"[red]{result.outcome}:[/red] code={result.code} {result.tech_message or ''}",
                  highlight=False)


def _send_csv(cfg: Settings, requests: list[SendRequest], rate: float,
              retry_unknown: bool) -> None:
    from rich.progress import Progress
    from sqlalchemy import select

    from app.send import standalone_sender
    from app.store.db import make_engine
    from app.store.models import Send

    skip_outcomes = ["accepted"] if retry_unknown else ["accepted", "unknown"]
    engine = make_engine(cfg, pool_size=1)
    try:
        with engine.connect() as conn:
            done = set(conn.scalars(select(Send.p_transaction_id).where(
                Send.outcome.in_(skip_outcomes))))
    finally:
        engine.dispose()
    todo = [r for r in requests if r.p_transaction_id not in done]
    counts = {"accepted": 0, "refused": 0, "unknown": 0, "failed": 0}
    if requests and not todo:
        err.print(f"all {len(requests)} rows already sent", highlight=False)

    async def run(progress: Progress, task: TaskID) -> None:
        interval = 1.0 / rate
        next_at = time.monotonic()
        async with standalone_sender(cfg) as client:
            for req in todo:
                delay = next_at - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                next_at = max(next_at + interval, time.monotonic())
                counts[(await client.send(req)).outcome] += 1
                progress.advance(task)

    with Progress(console=err, transient=False) as progress:
        # Skipped rows count as done, so a resumed run starts where the last one stopped.
        task = progress.add_task("sending", total=len(requests),
                                 completed=len(requests) - len(todo))
        asyncio.run(run(progress, task))
    out.print(f"{len(requests)} rows: {len(requests) - len(todo)} skipped (already sent), "
              + ", ".join(f"{v} {k}" for k, v in counts.items()))
    if counts["refused"] or counts["unknown"] or counts["failed"]:
        raise typer.Exit(1)


@cli.command()
@one_line_errors
def upload(file: Annotated[Path, typer.Argument(exists=True, dir_okay=False,
                                                help="JPG, PNG or GIF")]) -> None:
    """Upload an image to the provider and print its image_id."""
    from app.send import BadImage, MalformedAnswer, UploadRefused, standalone_sender

    cfg = settings()
    if cfg.bulk_user is None or cfg.bulk_secret_key is None:
        raise CliError("set DLR_BULK_USER and DLR_BULK_SECRET_KEY to upload")

    async def run() -> str:
        async with standalone_sender(cfg) as client:
            return await client.upload(file.read_bytes(), file.name)

    try:
        out.print(asyncio.run(run()))
    except (BadImage, UploadRefused, MalformedAnswer) as exc:
        raise CliError(f"{file}: {exc}") from None


@cli.command()
@one_line_errors
def simulate(
    host: Annotated[str, typer.Option()] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535)] = 9000,
    user: Annotated[str, typer.Option(help="Partner login it accepts")] = "demo",
    secret: Annotated[str, typer.Option(help="Secret key it checks signatures with")
                      ] = "demo-secret",
    callback_url: Annotated[str | None, typer.Option(
        help="Where to send DLRs, e.g. http://127.0.0.1:8000/dlr")] = None,
    method: Annotated[str, typer.Option(help="GET or POST")] = "POST",
    rate: Annotated[float, typer.Option(min=0, help="DLRs per second (0: unlimited)")] = 100.0,
    duplicates: Annotated[float, typer.Option(min=0, max=1, help="Share of DLRs sent twice")
                          ] = 0.1,
    reorder: Annotated[bool, typer.Option(
        help="Shuffle each message's DLRs (--no-reorder: each message's arrive in order)")
                       ] = True,
    undelivered_rate: Annotated[float, typer.Option(
        min=0, max=1, help="Share of messages not delivered")] = 0.1,
    seen_rate: Annotated[float, typer.Option(
        min=0, max=1, help="Share of delivered Viber messages seen")] = 0.6,
    reply_rate: Annotated[float, typer.Option(
        min=0, max=1, help="Share of delivered Viber messages replied to (1: every one)")
                          ] = 0.1,
    uppercase_ids: Annotated[bool, typer.Option(help="Send msg_ids upper-cased in DLRs")
                             ] = False,
    dlr_before_answer: Annotated[bool, typer.Option(
        help="Deliver the first DLR before answering the send request")] = False,
    upload_sign_uppercase: Annotated[bool, typer.Option(
        help="Accept only upload signatures with the inner md5 in upper case")] = False,
    time_scale: Annotated[float, typer.Option(
        min=0, help="Multiply the provider's resend delays (5/15/30 min) and `delay` by this")
                          ] = 1.0,
    seed: Annotated[int | None, typer.Option(help="Random seed")] = None,
) -> None:
    """Run the provider simulator: send API on /, upload on /upload/, DLRs to --callback-url."""
    import uvicorn

    from app.simulator.provider import EmitterSettings, ProviderSimulator

    if method.upper() not in ("GET", "POST"):
        raise CliError("--method must be GET or POST")
    sim = ProviderSimulator(
        user=user, secret_key=secret, dlr_before_answer=dlr_before_answer,
        upload_sign_uppercase=upload_sign_uppercase,
        emitter_settings=EmitterSettings(
            callback_url=callback_url, method=method.upper(),  # type: ignore[arg-type]
            rate=rate, duplicate_rate=duplicates, reorder=reorder,
            undelivered_rate=undelivered_rate, seen_rate=seen_rate, reply_rate=reply_rate,
            uppercase_ids=uppercase_ids, time_scale=time_scale, seed=seed),
    )
    # Bind before saying anything: a busy port is one error line, not a banner and a traceback.
    sock = _listen(host, port, "another simulator?")
    err.print(f"provider simulator on http://{host}:{sock.getsockname()[1]}/ (user {user!r}); "
              f"DLRs to {callback_url or 'nowhere (no --callback-url)'}", highlight=False)
    server = uvicorn.Server(uvicorn.Config(sim.app(), log_level="warning"))
    with sock:
        server.run(sockets=[sock])


@cli.command()
@one_line_errors
def purge(
    older_than: Annotated[str, typer.Option(
        help="Delete what is older than this: a number and a unit, min, h, d, w, mo (30 days) "
             "or y (365 days), e.g. 90d, 6mo, 12h, 30min; 'm' alone is refused as ambiguous")],
    batch: Annotated[int, typer.Option(min=1, help=(
        "Rows per transaction at most (on SQLite fewer, paced so callbacks keep their turn)"))
    ] = 5000,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="Only count what would be deleted, per table")] = False,
    yes: Annotated[bool, typer.Option(
        "--yes", "-y", help="Delete without asking (needed when not run from a terminal)")
    ] = False,
) -> None:
    """Delete events, messages, rejected callbacks, send records and finished forwarding
    deliveries older than an age (--dry-run counts exactly what a run would delete)."""
    from datetime import timedelta

    from app.core.times import utcnow
    from app.store.db import make_engine
    from app.store.retention import count_older, parse_age
    from app.store.retention import purge as purge_rows

    try:
        age = parse_age(older_than)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    if age == timedelta(0) and not (yes or dry_run):
        raise CliError(f"--older-than {older_than} deletes everything; add --yes if you mean it")
    cutoff = utcnow() - age
    cfg = settings()
    require_database(cfg)
    engine = make_engine(cfg, pool_size=1)
    try:
        counts = count_older(engine, before=cutoff)
        listed = ", ".join(f"{n:,} {t}" for t, n in counts.items())
        if dry_run:
            out.print(f"would delete before {cutoff.isoformat()}: {listed}", soft_wrap=True)
            return
        if not any(counts.values()):
            out.print(f"nothing older than {cutoff.isoformat()}", soft_wrap=True)
            return
        if not yes:
            if not _interactive():
                raise CliError(f"would delete {listed} (before {cutoff.isoformat()}); "
                               "add --yes to delete, or --dry-run to only count")
            if not typer.confirm(f"delete {listed} (before {cutoff.isoformat()})?",
                                 err=True):
                err.print("nothing deleted")
                raise typer.Exit(1)
        with err.status("purging") as status:
            deleted = purge_rows(engine, before=cutoff, batch=batch,
                                 progress=lambda t, n: status.update(f"{t}: {n:,} deleted"))
    finally:
        engine.dispose()
    out.print(f"deleted before {cutoff.isoformat()}: "
              + ", ".join(f"{n:,} {t}" for t, n in deleted.items()), soft_wrap=True)


@cli.command()
@one_line_errors
def recount() -> None:
    """Take the dashboard's counts afresh from every stored row: after rows were written
    around the service (a repair in SQL, an import), which SQLite's counts do not see. One
    transaction; on SQLite callbacks wait for it (seconds per million messages)."""
    from sqlalchemy import func, select

    from app.store.counts import recount as recount_rows
    from app.store.db import make_engine
    from app.store.models import Message

    cfg = settings()
    require_database(cfg)
    engine = make_engine(cfg, pool_size=1)
    try:
        with err.status("counting"), engine.begin() as conn:
            recount_rows(conn)
            messages = conn.scalar(select(func.count()).select_from(Message)) or 0
    finally:
        engine.dispose()
    out.print(f"counted {messages:,} messages afresh")


def _interactive() -> bool:
    """Whether a person can answer a prompt (cron and scripts cannot: they need --yes)."""
    return sys.stdin.isatty()


