"""The `dlr` command line. Errors are one clear line on stderr and a non-zero exit."""

from __future__ import annotations

import csv
import sys
import time
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
from fastapi import HTTPException
from rich.console import Console
from rich.table import Table
from sqlalchemy.exc import SQLAlchemyError

from app.config import Settings, SettingsError, load_settings

if TYPE_CHECKING:
    from app.sender import SendRequest

cli = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="Delivery-report receiver for the provider's Viber/SMS bulk API.")
out = Console()
err = Console(stderr=True, soft_wrap=True)
F = TypeVar("F", bound=Callable[..., Any])


class CliError(Exception):
    """A failure to report as one line."""


def one_line_errors(fn: F) -> F:
    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (CliError, SettingsError) as exc:
            err.print(f"[red]error:[/red] {exc}", highlight=False)
        except SQLAlchemyError as exc:
            err.print(f"[red]error:[/red] database: {str(exc).splitlines()[0]}", highlight=False)
        raise typer.Exit(2)

    return wrapper  # type: ignore[return-value]


def settings() -> Settings:
    return load_settings()


def migrate_database(cfg: Settings) -> None:
    from app.db import make_engine
    from app.migrate import upgrade

    engine = make_engine(cfg, pool_size=1)
    try:
        upgrade(engine)
    finally:
        engine.dispose()


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
    log_level: Annotated[str, typer.Option(help="uvicorn log level")] = "info",
    access_log: Annotated[bool, typer.Option(help="Log every request")] = True,
    log_format: Annotated[str, typer.Option(help="text or json (one object a line)")] = "text",
) -> None:
    """Migrate the database, then serve the receiver and the API."""
    import uvicorn

    from app.logs import log_config

    if log_format not in ("text", "json"):
        raise CliError("--log-format must be text or json")

    cfg = settings()
    migrate_database(cfg)
    uvicorn.run(
        "app.main:create_app",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_level=log_level,
        log_config=log_config(log_format, log_level),
        access_log=access_log,
        # X-Forwarded-For is judged by DLR_TRUSTED_PROXIES alone, never by uvicorn's default
        # of trusting loopback, so a local proxy cannot be used to forge an allowed address.
        proxy_headers=False,
        server_header=False,
        http="app.http_protocol:HeaderTimeoutProtocol",
        timeout_graceful_shutdown=30,
        timeout_keep_alive=30,
        h11_max_incomplete_event_size=16 * 1024,
    )


@cli.command()
@one_line_errors
def status(msg_id: Annotated[str, typer.Argument(help="The provider's msg_id")]) -> None:
    """Show a message's current status and its timeline."""
    from app.api import load_message
    from app.db import make_engine

    engine = make_engine(settings(), pool_size=1)
    try:
        with engine.connect() as conn:
            try:
                message = load_message(conn, msg_id)
            except HTTPException as exc:
                raise CliError(str(exc.detail)) from None
    finally:
        engine.dispose()
    head = Table(show_header=False, box=None)
    for name in ("msg_id", "status", "status_extended", "phone", "p_transaction_id",
                 "sent_at", "delivered_at", "seen_at", "updated_at"):
        value = getattr(message, name)
        head.add_row(f"[bold]{name}[/bold]", "-" if value is None else str(value))
    out.print(head)
    events = Table("received_at", "type", "status", "status_extended", "text", title="events")
    for e in message.events:
        events.add_row(e.received_at.isoformat(), e.type, e.status or "",
                       e.status_extended or "", e.text or "")
    out.print(events)


def _request(fields: dict[str, Any], where: str) -> SendRequest:
    from pydantic import ValidationError

    from app.sender import SendRequest

    try:
        return SendRequest.model_validate({k: v for k, v in fields.items() if v is not None})
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first["loc"]) or "message"
        raise CliError(f"{where}{loc}: {first['msg'].removeprefix('Value error, ')}") from None


CSV_FIELDS = ("phone", "txt", "from", "image_id", "button_text", "button_link", "sending_method",
              "p_transaction_id", "dlr_timeout", "expiry_txt", "charset")


def _csv_requests(path: Path, defaults: dict[str, Any], campaign: str) -> list[SendRequest]:
    """Every row as a one-phone request, all checked before anything is sent."""
    with path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        if not reader.fieldnames or "phone" not in reader.fieldnames:
            raise CliError(f"{path}: the first line must name the columns, with at least 'phone'")
        unknown = set(reader.fieldnames) - set(CSV_FIELDS)
        if unknown:
            raise CliError(f"{path}: unknown column {sorted(unknown)[0]!r}; "
                           f"known: {', '.join(CSV_FIELDS)}")
        requests = []
        for row_no, row in enumerate(reader, start=2):
            fields = defaults | {k: v for k, v in row.items() if v not in (None, "")}
            fields["phone"] = [fields["phone"]]
            # A stable id per row is what makes a re-run skip rows already accepted.
            fields.setdefault("p_transaction_id", f"{campaign}-{row_no - 1}")
            requests.append(_request(fields, f"{path}:{row_no}: "))
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
    csv_file: Annotated[Path | None, typer.Option(
        "--csv", exists=True, dir_okay=False,
        help="Send one message per row (columns: phone, txt, and any option above)")] = None,
    rate: Annotated[float, typer.Option(help="CSV: messages per second (provider default 10)")
                    ] = 10.0,
    campaign: Annotated[str | None, typer.Option(
        help="CSV: prefix of generated p_transaction_ids (default: the file name)")] = None,
    retry_unknown: Annotated[bool, typer.Option(
        help="CSV: also re-send rows whose earlier outcome is unknown")] = False,
) -> None:
    """Send one message, or a whole CSV at a rate limit (a re-run skips accepted rows)."""
    from app.db import make_engine
    from app.sender import Sender

    cfg = settings()
    fields: dict[str, Any] = {
        "txt": txt, "from": sender, "image_id": image_id, "button_text": button_text,
        "button_link": button_link, "sending_method": "sms" if sms else None,
        "p_transaction_id": p_transaction_id, "dlr_timeout": dlr_timeout,
        "expiry_txt": expiry_txt, "charset": charset,
    }
    if csv_file is None:
        if not phone:
            raise CliError("give --phone (repeatable) or --csv FILE")
        requests = [_request(fields | {"phone": phone}, "")]
    else:
        if phone or p_transaction_id:
            raise CliError("--phone and --p-transaction-id do not go with --csv")
        defaults = {k: v for k, v in fields.items() if v is not None}
        requests = _csv_requests(csv_file, defaults, campaign or csv_file.stem)
    if rate <= 0:
        raise CliError("--rate must be above 0")
    try:
        requests = [r.with_defaults(default_sender=cfg.bulk_from) for r in requests]
    except ValueError as exc:
        raise CliError(str(exc)) from None

    migrate_database(cfg)
    engine = make_engine(cfg, pool_size=1)
    try:
        from app.sender import NotConfigured

        try:
            client = Sender.from_settings(cfg, engine)
        except NotConfigured as exc:
            raise CliError(str(exc)) from None
        try:
            if csv_file is None:
                result = client.send(requests[0])
                _report(result)
                if result.outcome != "accepted":
                    raise typer.Exit(1)
                return
            _send_csv(client, engine, requests, rate, retry_unknown)
        finally:
            client.close()
    finally:
        engine.dispose()


def _report(result: Any) -> None:
    if result.outcome == "accepted":
        out.print(f"accepted p_transaction_id={result.p_transaction_id}")
        for p, m in result.msg_ids.items():
            out.print(f"  {p} {m}")
    else:
        err.print(f"[red]{result.outcome}:[/red] code={result.code} {result.tech_message or ''}",
                  highlight=False)


def _send_csv(client: Any, engine: Any, requests: list[SendRequest], rate: float,
              retry_unknown: bool) -> None:
    from rich.progress import Progress
    from sqlalchemy import select

    from app.models import Send

    skip_outcomes = ["accepted"] if retry_unknown else ["accepted", "unknown"]
    with engine.connect() as conn:
        done = set(conn.scalars(select(Send.p_transaction_id).where(
            Send.outcome.in_(skip_outcomes))))
    todo = [r for r in requests if r.p_transaction_id not in done]
    counts = {"accepted": 0, "refused": 0, "unknown": 0, "failed": 0}
    interval = 1.0 / rate
    next_at = time.monotonic()
    with Progress(console=err, transient=False) as progress:
        task = progress.add_task("sending", total=len(todo))
        for req in todo:
            delay = next_at - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            next_at = max(next_at + interval, time.monotonic())
            counts[client.send(req).outcome] += 1
            progress.advance(task)
    out.print(f"{len(requests)} rows: {len(requests) - len(todo)} skipped (already sent), "
              + ", ".join(f"{v} {k}" for k, v in counts.items()))
    if counts["refused"] or counts["unknown"] or counts["failed"]:
        raise typer.Exit(1)


@cli.command()
@one_line_errors
def upload(file: Annotated[Path, typer.Argument(exists=True, dir_okay=False,
                                                help="JPG, PNG or GIF")]) -> None:
    """Upload an image to the provider and print its image_id."""
    from app.db import make_engine
    from app.sender import BadImage, MalformedAnswer, NotConfigured, Sender, UploadRefused

    cfg = settings()
    engine = make_engine(cfg, pool_size=1)
    try:
        client = Sender.from_settings(cfg, engine)
    except NotConfigured as exc:
        raise CliError(str(exc)) from None
    try:
        out.print(client.upload(file.read_bytes(), file.name))
    except (BadImage, UploadRefused, MalformedAnswer) as exc:
        raise CliError(f"{file}: {exc}") from None
    finally:
        client.close()
        engine.dispose()


@cli.command()
@one_line_errors
def simulate(
    host: Annotated[str, typer.Option()] = "127.0.0.1",
    port: Annotated[int, typer.Option()] = 9000,
    user: Annotated[str, typer.Option(help="Partner login it accepts")] = "demo",
    secret: Annotated[str, typer.Option(help="Secret key it checks signatures with")
                      ] = "demo-secret",
    callback_url: Annotated[str | None, typer.Option(
        help="Where to send DLRs, e.g. http://127.0.0.1:8000/dlr")] = None,
    method: Annotated[str, typer.Option(help="GET or POST")] = "POST",
    rate: Annotated[float, typer.Option(help="DLRs per second (0: unlimited)")] = 100.0,
    duplicates: Annotated[float, typer.Option(help="Share of DLRs sent twice")] = 0.1,
    reorder: Annotated[bool, typer.Option(help="Shuffle each message's DLRs")] = True,
    uppercase_ids: Annotated[bool, typer.Option(help="Send msg_ids upper-cased in DLRs")
                             ] = False,
    dlr_before_answer: Annotated[bool, typer.Option(
        help="Deliver the first DLR before answering the send request")] = False,
    time_scale: Annotated[float, typer.Option(
        help="Multiply the provider's resend delays (5/15/30 min) by this")] = 1.0,
    seed: Annotated[int | None, typer.Option(help="Random seed")] = None,
) -> None:
    """Run the provider simulator: send API on /, upload on /upload/, DLRs to --callback-url."""
    import uvicorn

    from app.simulator import EmitterSettings, ProviderSimulator

    if method.upper() not in ("GET", "POST"):
        raise CliError("--method must be GET or POST")
    sim = ProviderSimulator(
        user=user, secret_key=secret, dlr_before_answer=dlr_before_answer,
        emitter_settings=EmitterSettings(
            callback_url=callback_url, method=method.upper(),  # type: ignore[arg-type]
            rate=rate, duplicate_rate=duplicates, reorder=reorder,
            uppercase_ids=uppercase_ids, time_scale=time_scale, seed=seed),
    )
    err.print(f"provider simulator on http://{host}:{port}/ (user {user!r}); DLRs to "
              f"{callback_url or 'nowhere (no --callback-url)'}", highlight=False)
    uvicorn.run(sim.app(), host=host, port=port, log_level="warning")


@cli.command()
@one_line_errors
def purge(
    older_than: Annotated[str, typer.Option(help="Age to keep, e.g. 90d, 12h, 30m")],
    batch: Annotated[int, typer.Option(min=1, help="Rows per transaction")] = 5000,
) -> None:
    """Delete events, messages, rejected callbacks and send records older than an age."""
    from app.db import make_engine, utcnow
    from app.retention import parse_age
    from app.retention import purge as purge_rows

    try:
        cutoff = utcnow() - parse_age(older_than)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    engine = make_engine(settings(), pool_size=1)
    try:
        with err.status("purging") as status:
            deleted = purge_rows(engine, before=cutoff, batch=batch,
                                 progress=lambda t, n: status.update(f"{t}: {n:,} deleted"))
    finally:
        engine.dispose()
    out.print(f"deleted before {cutoff.isoformat()}: "
              + ", ".join(f"{n:,} {t}" for t, n in deleted.items()))


def main() -> None:
    cli(prog_name="dlr")


if __name__ == "__main__":
    sys.exit(main())
