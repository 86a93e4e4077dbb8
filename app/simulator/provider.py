"""A stand-in for the provider: bulk send endpoint, media upload, and a DLR emitter.

Run it with `dlr simulate`, or build `ProviderSimulator(...)` in tests. It takes what the
provider takes (GET, or POST with a form-urlencoded or multipart body; `sending_method` left
out means SMS, the account default), checks the signature over the bytes that arrived, and
answers the document's XML with fresh msg_ids (or any code it is told to answer next). For
every accepted message the emitter calls the callback URL as the provider does: SMS gets
numeric-status reports without `type` (no seen, no reply); Viber gets delivery, seen and
reply notifications. Both come at a chosen rate, with duplicates and, unless told otherwise,
out of order, and anything not answered 200, 400 or 404 is re-sent on the provider's schedule.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import secrets
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import parse_qsl
from xml.sax.saxutils import escape, quoteattr

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel
from python_multipart.multipart import Field as FormField
from python_multipart.multipart import File as FormFile
from python_multipart.multipart import FormParser, parse_options_header
from starlette.exceptions import HTTPException

from app.core.notifications import NUMERIC_STATUS_MEANING, STATUS_EXTENDED_MEANING
from app.send.answers import CODES
from app.send.media import MAX_IMAGE_BYTES, BadImage, image_type
from app.send.messages import CHARSETS, MAX_DELAY_MINUTES, SENDER
from app.send.signing import sign_send, sign_upload

log = logging.getLogger(__name__)

Channel = Literal["sms", "viber"]

# The provider stops re-sending on these answers; anything else is tried again for a day.
FINAL_ANSWERS = {200, 400, 404}
# Tries 1-3 every 5 minutes, 4-10 every 15, then every 30 (seconds, before `time_scale`).
RESEND_DELAYS = [300.0] * 3 + [900.0] * 7
RESEND_LATER = 1800.0
RESEND_FOR = 86400.0

# What each channel reports on its way (public documentation): SMS interim codes 1
# (buffered) and 4 (no operator answer yet), then 0 or a failure code; Viber words.
SMS_INTERIM = ("1", "4")
SMS_DELIVERED = "0"
SMS_FAILURES = tuple(NUMERIC_STATUS_MEANING)
VIBER_INTERIM = ("in process", "buffered")  # provider-api.txt says one, the public docs the other
REPLIES = ("Спасибо!", "Stop", "Да 👍", "Когда доставка?")


@dataclass
class EmitterSettings:
    callback_url: str | None = None
    method: Literal["GET", "POST"] = "POST"
    rate: float = 100.0  # notifications per second, 0 for as fast as possible
    duplicate_rate: float = 0.1  # share of notifications sent twice
    # True: a message's notifications are shuffled and sent concurrently. False: each
    # message's notifications arrive one after the other, in the order they happened.
    reorder: bool = True
    undelivered_rate: float = 0.1
    seen_rate: float = 0.6  # share of delivered Viber messages that are seen
    reply_rate: float = 0.1  # share of delivered Viber messages answered (a reply implies seen)
    uppercase_ids: bool = False  # send msg_ids in upper case (a known gateway quirk)
    time_scale: float = 1.0  # multiplies the resend delays and `delay` (tests use a tiny one)
    concurrency: int = 8
    seed: int | None = None


@dataclass
class _Callback:
    params: dict[str, str]
    attempt: int = 0
    first_try: float | None = None  # the provider re-sends for a day from the first try
    # In-order mode: the message's later notifications, queued once this one is done.
    follow: deque[_Callback] | None = None


@dataclass
class Counters:
    notifications: int = 0  # distinct notifications planned
    attempts: int = 0
    acknowledged: int = 0  # answered 200
    final_refusals: int = 0  # answered 400 or 404: the provider gives up on these
    resends: int = 0
    given_up: int = 0


class DlrEmitter:
    """Calls the partner's DLR URL as the provider does."""

    def __init__(self, settings: EmitterSettings,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.settings = settings
        self.rng = random.Random(settings.seed)
        self.counters = Counters()
        self._transport = transport
        self._queue: asyncio.Queue[_Callback] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []
        self._timers: set[asyncio.TimerHandle] = set()
        self._next_slot = 0.0
        self._outstanding = 0  # queued or in flight
        self._http: httpx.AsyncClient | None = None

    async def start(self) -> None:
        self._http = httpx.AsyncClient(timeout=10, transport=self._transport)
        self._tasks = [asyncio.create_task(self._worker())
                       for _ in range(self.settings.concurrency)]

    async def stop(self) -> None:
        for timer in self._timers:
            timer.cancel()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._http:
            await self._http.aclose()

    @property
    def busy(self) -> bool:
        """Something is queued, in flight, waiting for a resend or for a delayed send."""
        return bool(self._outstanding or self._timers)

    def plan(self, msg_id: str, p_transaction_id: str | None, channel: Channel = "viber"
             ) -> list[dict[str, str]]:
        """The notifications one message produces, in the order they happen."""
        mid = msg_id.upper() if self.settings.uppercase_ids else msg_id
        base = {"msg_id": mid} | ({"p_transaction_id": p_transaction_id}
                                  if p_transaction_id else {})
        return self._plan_sms(base) if channel == "sms" else self._plan_viber(base)

    def _plan_sms(self, base: dict[str, str]) -> list[dict[str, str]]:
        # A numeric status and no type; an SMS is never seen or replied to.
        rng = self.rng
        final = (rng.choice(SMS_FAILURES) if rng.random() < self.settings.undelivered_rate
                 else SMS_DELIVERED)
        return [base | {"status": rng.choice(SMS_INTERIM)}, base | {"status": final}]

    def _plan_viber(self, base: dict[str, str]) -> list[dict[str, str]]:
        s, rng = self.settings, self.rng
        notes = [base | {"type": "delivery", "status": rng.choice(VIBER_INTERIM)}]
        if rng.random() < s.undelivered_rate:
            code = rng.choice(sorted(STATUS_EXTENDED_MEANING))
            notes.append(base | {"type": "delivery", "status": "undelivered",
                                 "status_extended": code})
            return notes
        notes.append(base | {"type": "delivery", "status": "delivered"})
        replied = rng.random() < s.reply_rate
        if replied or rng.random() < s.seen_rate:
            notes.append(base | {"type": "seen"})
        if replied:
            notes.append(base | {"type": "reply", "text": rng.choice(REPLIES)})
        return notes

    def enqueue_message(self, msg_id: str, p_transaction_id: str | None,
                        channel: Channel = "viber", *, after: float = 0.0) -> None:
        """Plan one message's notifications and send them, starting `after` seconds from now
        (a send with `delay`)."""
        notes = self.plan(msg_id, p_transaction_id, channel)
        self.counters.notifications += len(notes)
        if self.settings.reorder:
            self.rng.shuffle(notes)
        callbacks: list[_Callback] = []
        for params in notes:
            callbacks.append(_Callback(params))
            if self.rng.random() < self.settings.duplicate_rate:
                callbacks.append(_Callback(dict(params)))
        if not self.settings.reorder:
            # One at a time: the next is queued only when the previous one is done, so
            # neither concurrent workers nor a resend can let a later one overtake it.
            chain = deque(callbacks)
            callbacks = [chain.popleft()]
            callbacks[0].follow = chain
        if after > 0:
            self._later(after, callbacks)
        else:
            for cb in callbacks:
                self._put(cb)

    def _put(self, cb: _Callback) -> None:
        self._outstanding += 1
        self._queue.put_nowait(cb)

    def _later(self, delay: float, callbacks: Iterable[_Callback]) -> None:
        def fire() -> None:
            self._timers.discard(handle)
            for cb in callbacks:
                self._put(cb)

        handle = asyncio.get_running_loop().call_later(delay, fire)
        self._timers.add(handle)

    async def deliver_now(self, params: dict[str, str]) -> int:
        """Send one notification at once and return the HTTP status (for DLR-before-answer)."""
        self.counters.notifications += 1
        return await self._attempt(_Callback(params))

    async def idle(self, timeout: float = 30.0) -> None:
        """Wait until nothing is queued, in flight or scheduled."""
        deadline = time.monotonic() + timeout
        while self.busy:
            if time.monotonic() > deadline:
                raise TimeoutError("DLR emitter still busy")
            await asyncio.sleep(0.02)

    async def _pace(self) -> None:
        if self.settings.rate <= 0:
            return
        # One shared timetable for all workers: each takes the next free slot.
        now = time.monotonic()
        slot = max(self._next_slot, now)
        self._next_slot = slot + 1.0 / self.settings.rate
        if slot > now:
            await asyncio.sleep(slot - now)

    async def _worker(self) -> None:
        while True:
            cb = await self._queue.get()
            try:
                await self._pace()
                await self._attempt(cb)
            except Exception:  # noqa: BLE001 - an emitter bug must not stop the others
                log.exception("DLR emitter failed")
            finally:
                self._outstanding -= 1

    async def _attempt(self, cb: _Callback) -> int:
        assert self._http is not None and self.settings.callback_url
        cb.attempt += 1
        if cb.first_try is None:
            cb.first_try = time.monotonic()
        self.counters.attempts += 1
        try:
            if self.settings.method == "GET":
                r = await self._http.get(self.settings.callback_url, params=cb.params)
            else:
                r = await self._http.post(self.settings.callback_url, data=cb.params)
            status = r.status_code
        except httpx.HTTPError:
            status = 0
        if status == 200:
            self.counters.acknowledged += 1
            self._done(cb)
        elif status in FINAL_ANSWERS:
            self.counters.final_refusals += 1
            self._done(cb)
        else:
            self._schedule_resend(cb)
        return status

    def _done(self, cb: _Callback) -> None:
        """The provider is finished with this notification: release the message's next one."""
        if cb.follow:
            nxt = cb.follow.popleft()
            nxt.follow = cb.follow
            self._put(nxt)

    def _schedule_resend(self, cb: _Callback) -> None:
        scale = self.settings.time_scale
        assert cb.first_try is not None
        if time.monotonic() - cb.first_try > RESEND_FOR * scale:
            self.counters.given_up += 1
            self._done(cb)
            return
        idx = cb.attempt - 1
        delay = (RESEND_DELAYS[idx] if idx < len(RESEND_DELAYS) else RESEND_LATER) * scale
        self.counters.resends += 1
        self._later(delay, [cb])


class Control(BaseModel):
    """Answers to give next, in order: bulk codes (e.g. -4) and upload statuses (e.g. 2)."""

    codes: list[int] = []
    upload_statuses: list[int] = []
    dlr_before_answer: bool | None = None


class Refused(Exception):
    """The send request breaks the document: answer `code` with `tech_message`."""

    def __init__(self, code: int, tech_message: str) -> None:
        super().__init__(tech_message)
        self.code = code
        self.tech_message = tech_message


def param_error(name: str) -> Refused:
    # The document's own example of a refusal: <tech_message>PARAM ERROR (phone)</tech_message>.
    return Refused(-1, f"PARAM ERROR ({name})")


def _urlencoded(raw: bytes) -> list[tuple[str, bytes]]:
    # latin-1 maps every byte to one character, so values come back byte for byte, however
    # they were encoded (UTF-8, CP1251, UTF-16BE) and whichever escaping (%20 or +) was used.
    pairs = parse_qsl(raw.decode("latin-1"), keep_blank_values=True, encoding="latin-1")
    return [(k, v.encode("latin-1")) for k, v in pairs]


def _multipart(body: bytes, boundary: bytes | None) -> list[tuple[str, bytes]]:
    if not boundary:
        raise ValueError("multipart body without a boundary")
    pairs: list[tuple[str, bytes]] = []

    def on_field(f: FormField) -> None:
        pairs.append(((f.field_name or b"").decode("latin-1"), f.value or b""))

    def on_file(f: FormFile) -> None:
        f.file_object.seek(0)
        pairs.append(((f.field_name or b"").decode("latin-1"), f.file_object.read()))

    parser = FormParser("multipart/form-data", on_field, on_file, boundary=boundary)
    parser.write(body)
    parser.finalize()
    return pairs


@dataclass
class SendParams:
    """A send request's parameters as raw bytes: the query string, then the body."""

    values: dict[str, list[bytes]]

    @classmethod
    async def read(cls, request: Request) -> SendParams:
        """ValueError for a body that cannot be read as a form."""
        pairs = _urlencoded(request.scope.get("query_string", b""))
        body = await request.body()
        ctype, options = parse_options_header(request.headers.get("content-type"))
        if ctype == b"multipart/form-data":
            pairs += _multipart(body, options.get(b"boundary"))
        elif body:
            pairs += _urlencoded(body)
        values: dict[str, list[bytes]] = {}
        for name, value in pairs:
            if value:  # "a parameter with a blank value is considered not sent"
                values.setdefault(name, []).append(value)
        return cls(values)

    def one(self, name: str) -> bytes | None:
        return self.values.get(name, [None])[0]

    def all(self, name: str) -> list[bytes]:
        return self.values.get(name, [])

    def text(self, name: str, *, max_length: int, codec: str = "utf-8") -> str | None:
        raw = self.one(name)
        if raw is None:
            return None
        try:
            value = raw.decode(codec)
        except UnicodeDecodeError:
            raise param_error(name) from None
        if len(value) > max_length:
            raise param_error(name)
        return value

    def number(self, name: str, low: int, high: int) -> int | None:
        raw = self.one(name)
        if raw is None:
            return None
        if not raw.isdigit() or not low <= int(raw) <= high:
            raise param_error(name)
        return int(raw)

    def readable(self) -> dict[str, list[str]]:
        """For tests and /_sim/state: txt in its charset, everything else as UTF-8."""
        codec = CHARSETS.get((self.one("charset") or b"").decode("latin-1").upper(), "utf-8")
        return {name: [v.decode(codec if name == "txt" else "utf-8", "replace") for v in vs]
                for name, vs in self.values.items()}


@dataclass(frozen=True)
class Accepted:
    phones: list[str]
    p_transaction_id: str | None
    channel: Channel
    dlr: bool
    delay_minutes: int


@dataclass
class ProviderSimulator:
    user: str
    secret_key: str
    emitter_settings: EmitterSettings = field(default_factory=EmitterSettings)
    emit_dlrs: bool = True
    dlr_before_answer: bool = False  # the delivery DLR races ahead of the send answer
    # Upload signatures: the inner md5 in lower case (the vendor's samples) unless told to
    # expect the document example's upper case. Only one is accepted, as the provider does.
    upload_sign_uppercase: bool = False
    max_image_bytes: int = MAX_IMAGE_BYTES
    codes: deque[int] = field(default_factory=deque)
    upload_statuses: deque[int] = field(default_factory=deque)
    sent: dict[str, tuple[str, str | None]] = field(default_factory=dict)
    channels: dict[str, Channel] = field(default_factory=dict)  # msg_id -> sms or viber
    requests: list[dict[str, list[str]]] = field(default_factory=list)
    images: dict[str, bytes] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.emitter = DlrEmitter(self.emitter_settings)

    def app(self) -> FastAPI:
        @asynccontextmanager
        async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
            await self.emitter.start()
            try:
                yield
            finally:
                await self.emitter.stop()

        app = FastAPI(title="Provider simulator", lifespan=lifespan)
        app.add_api_route("/", self.bulk, methods=["GET", "POST"])
        app.add_api_route("/upload/", self.upload, methods=["POST"])
        app.add_api_route("/_sim/control", self.control, methods=["POST"])
        app.add_api_route("/_sim/state", self.state, methods=["GET"])
        return app

    async def control(self, body: Control) -> dict[str, object]:
        self.codes.extend(body.codes)
        self.upload_statuses.extend(body.upload_statuses)
        if body.dlr_before_answer is not None:
            self.dlr_before_answer = body.dlr_before_answer
        return {"codes": list(self.codes), "upload_statuses": list(self.upload_statuses)}

    async def state(self) -> dict[str, object]:
        return {"sent_messages": len(self.sent), "requests": len(self.requests),
                **self.emitter.counters.__dict__}

    async def bulk(self, request: Request) -> Response:
        try:
            params = await SendParams.read(request)
        except ValueError:
            self.requests.append({})
            return self._answer(-1, "PARAM ERROR (body)")
        self.requests.append(params.readable())
        if self.codes:
            return self._answer(self.codes.popleft())
        try:
            accepted = self.check(params)
        except Refused as exc:
            return self._answer(exc.code, exc.tech_message)
        ids = {p: str(uuid.uuid4()) for p in accepted.phones}
        for phone, msg_id in ids.items():
            self.sent[msg_id] = (phone, accepted.p_transaction_id)
            self.channels[msg_id] = accepted.channel
        if accepted.dlr and self.emit_dlrs and self.emitter.settings.callback_url:
            await self._report(ids.values(), accepted)
        return self._answer(0, "OK", ids if accepted.dlr else {})

    async def _report(self, msg_ids: Iterable[str], sent: Accepted) -> None:
        ptid = {"p_transaction_id": sent.p_transaction_id} if sent.p_transaction_id else {}
        if self.dlr_before_answer and not sent.delay_minutes:
            for msg_id in msg_ids:
                final = ({"status": SMS_DELIVERED} if sent.channel == "sms"
                         else {"type": "delivery", "status": "delivered"})
                await self.emitter.deliver_now({"msg_id": msg_id} | final | ptid)
            return
        after = sent.delay_minutes * 60 * self.emitter.settings.time_scale
        for msg_id in msg_ids:
            self.emitter.enqueue_message(msg_id, sent.p_transaction_id, sent.channel,
                                         after=after)

    def check(self, params: SendParams) -> Accepted:
        """The send request as the provider reads it, or Refused with its answer.

        Order: required parameters, phones, then the signature (-2), then every other limit
        of the document. A refusal names the first offending parameter."""
        for name in ("user", "from", "phone", "sign"):
            if params.one(name) is None:
                raise param_error(name)
        phones = params.all("phone")
        if not all(p.isdigit() for p in phones) or len(set(phones)) != len(phones):
            raise param_error("phone")
        raw_txt = params.one("txt")
        expected = sign_send(user=self.user, sender=params.one("from") or b"", phones=phones,
                             txt=raw_txt, secret_key=self.secret_key)
        if params.one("user") != self.user.encode() or not secrets.compare_digest(
                params.one("sign") or b"", expected.encode()):
            raise Refused(-2, CODES[-2].meaning)

        method = params.one("sending_method") or b"sms"  # the account's default channel
        if method not in (b"sms", b"viber"):
            raise param_error("sending_method")
        sender = params.text("from", max_length=11, codec="latin-1")
        if sender is None or not SENDER.match(sender):
            raise param_error("from")
        charset = (params.one("charset") or b"UTF-8").decode("latin-1").upper()
        if charset not in CHARSETS:
            raise param_error("charset")
        txt = params.text("txt", max_length=2048, codec=CHARSETS[charset])
        params.text("expiry_txt", max_length=2048)
        image_id = params.text("image_id", max_length=64)
        button_text = params.text("button_text", max_length=30)
        button_link = params.text("button_link", max_length=2048)
        dlr = params.number("dlr", 0, 1)
        params.number("dlr_timeout", 60, 86400)
        delay = params.number("delay", 1, MAX_DELAY_MINUTES)

        if method == b"sms":
            if txt is None:
                raise param_error("txt")
            for name, value in (("image_id", image_id), ("button_text", button_text),
                                ("button_link", button_link)):
                if value is not None:
                    raise param_error(name)
        elif txt is None and (image_id is None or button_text or button_link):
            raise param_error("txt")  # nothing to show, or a button without a text
        elif txt is not None and image_id is not None and not (button_text and button_link):
            # The document knows text + picture only with a button.
            raise param_error("button_link" if button_text else "button_text")
        return Accepted(
            phones=[p.decode("ascii") for p in phones],
            p_transaction_id=params.text("p_transaction_id", max_length=255),
            channel="sms" if method == b"sms" else "viber",
            dlr=dlr == 1, delay_minutes=delay or 0)

    @staticmethod
    def _answer(code: int, message: str | None = None, ids: dict[str, str] | None = None
                ) -> Response:
        message = message or CODES.get(code, CODES[-1]).meaning
        lines = ['<?xml version="1.0" encoding="utf-8"?>', "<response>",
                 f"  <code>{code}</code>", f"  <tech_message>{escape(message)}</tech_message>"]
        lines += [f"  <msg_id phone={quoteattr(p)}>{m}</msg_id>" for p, m in (ids or {}).items()]
        lines.append("</response>")
        return Response("\n".join(lines), media_type="application/xml")

    async def upload(self, request: Request) -> Response:
        def refuse(status: int, error: str) -> JSONResponse:
            return JSONResponse({"status": status, "error": error})

        ctype, _ = parse_options_header(request.headers.get("content-type"))
        if ctype != b"multipart/form-data":
            return refuse(1, "The data is not correct: send multipart/form-data")
        if self.upload_statuses:
            status = self.upload_statuses.popleft()
            return refuse(status, f"forced status {status}")
        try:
            async with request.form(max_part_size=1024 * 1024) as form:
                login, sign, image = form.get("login"), form.get("sign"), form.get("image")
                if not isinstance(login, str) or not login:
                    return refuse(1, "The data is not correct (login)")
                if not isinstance(sign, str) or not sign:
                    return refuse(1, "The data is not correct (sign)")
                if image is None or isinstance(image, str):
                    return refuse(1, "The data is not correct (image)")
                data = await image.read()
        except (HTTPException, ValueError):  # a broken multipart body
            return refuse(1, "The data is not correct")
        expected = sign_upload(login=self.user, image=data, secret_key=self.secret_key,
                               uppercase_inner=self.upload_sign_uppercase)
        if login != self.user or not secrets.compare_digest(sign.encode(), expected.encode()):
            return refuse(2, "Invalid sign")
        if len(data) > self.max_image_bytes:
            return refuse(3, "The size of image is too big")
        try:
            image_type(data)
        except BadImage:
            return refuse(4, "Invalid file format")
        image_id = hashlib.sha256(data).hexdigest().upper()  # 64 symbols, as the document says
        self.images[image_id] = data
        return JSONResponse({"status": 0, "image_id": image_id})
