"""A stand-in for the provider: bulk send endpoint, media upload, and a DLR emitter.

Run it with `dlr simulate`, or build `ProviderSimulator(...)` in tests. The send endpoint
checks the signature and answers the document's XML with fresh msg_ids (or any code it is
told to answer next); for every accepted message the emitter calls the callback URL with
delivery, seen and reply notifications at a chosen rate, with duplicates and out-of-order
arrival, re-sending anything not answered 200, 400 or 404 as the provider does.
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
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import parse_qsl
from xml.sax.saxutils import escape

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel

from app.notifications import STATUS_EXTENDED_MEANING
from app.sender.answers import CODES
from app.sender.media import BadImage, image_type
from app.sender.signing import sign_send, sign_upload

log = logging.getLogger(__name__)

# The provider stops re-sending on these answers; anything else is tried again for a day.
FINAL_ANSWERS = {200, 400, 404}
# Tries 1-3 every 5 minutes, 4-10 every 15, then every 30 (seconds, before `time_scale`).
RESEND_DELAYS = [300.0] * 3 + [900.0] * 7
RESEND_LATER = 1800.0
RESEND_FOR = 86400.0


@dataclass
class EmitterSettings:
    callback_url: str | None = None
    method: Literal["GET", "POST"] = "POST"
    rate: float = 100.0  # notifications per second, 0 for as fast as possible
    duplicate_rate: float = 0.1  # share of notifications sent twice
    reorder: bool = True  # a message's notifications may arrive in any order
    undelivered_rate: float = 0.1
    seen_rate: float = 0.6
    reply_rate: float = 0.1
    uppercase_ids: bool = False  # send msg_ids in upper case (a known gateway quirk)
    time_scale: float = 1.0  # multiplies the resend delays (tests use a tiny one)
    concurrency: int = 8
    seed: int | None = None


@dataclass
class _Callback:
    params: dict[str, str]
    attempt: int = 0
    first_try: float = field(default_factory=time.monotonic)


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

    def __init__(self, settings: EmitterSettings) -> None:
        self.settings = settings
        self.rng = random.Random(settings.seed)
        self.counters = Counters()
        self._queue: asyncio.Queue[_Callback] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []
        self._timers: set[asyncio.TimerHandle] = set()
        self._next_slot = 0.0
        self._outstanding = 0  # queued or in flight
        self._http: httpx.AsyncClient | None = None

    async def start(self) -> None:
        self._http = httpx.AsyncClient(timeout=10)
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

    def plan(self, msg_id: str, p_transaction_id: str | None) -> list[dict[str, str]]:
        """The notifications one message produces, in the order they happen."""
        s, rng = self.settings, self.rng
        mid = msg_id.upper() if s.uppercase_ids else msg_id
        base = {"msg_id": mid} | ({"p_transaction_id": p_transaction_id}
                                  if p_transaction_id else {})
        notes = [base | {"type": "delivery", "status": "in process"}]
        if rng.random() < s.undelivered_rate:
            code = rng.choice(sorted(STATUS_EXTENDED_MEANING))
            notes.append(base | {"type": "delivery", "status": "undelivered",
                                 "status_extended": code})
            return notes
        notes.append(base | {"type": "delivery", "status": "delivered"})
        if rng.random() < s.seen_rate:
            notes.append(base | {"type": "seen"})
            if rng.random() < s.reply_rate:
                notes.append(base | {"type": "reply", "text": rng.choice(
                    ["Спасибо!", "Stop", "Да 👍", "Когда доставка?"])})
        return notes

    def enqueue_message(self, msg_id: str, p_transaction_id: str | None) -> None:
        notes = self.plan(msg_id, p_transaction_id)
        self.counters.notifications += len(notes)
        if self.settings.reorder:
            self.rng.shuffle(notes)
        for params in notes:
            self._put(_Callback(params))
            if self.rng.random() < self.settings.duplicate_rate:
                self._put(_Callback(dict(params)))

    def _put(self, cb: _Callback) -> None:
        self._outstanding += 1
        self._queue.put_nowait(cb)

    async def deliver_now(self, params: dict[str, str]) -> int:
        """Send one notification at once and return the HTTP status (for DLR-before-answer)."""
        self.counters.notifications += 1
        cb = _Callback(params)
        return await self._attempt(cb)

    async def idle(self, timeout: float = 30.0) -> None:
        """Wait until nothing is queued, in flight or scheduled for a resend."""
        deadline = time.monotonic() + timeout
        while self._outstanding or self._timers:
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
        elif status in FINAL_ANSWERS:
            self.counters.final_refusals += 1
        else:
            self._schedule_resend(cb)
        return status

    def _schedule_resend(self, cb: _Callback) -> None:
        scale = self.settings.time_scale
        if time.monotonic() - cb.first_try > RESEND_FOR * scale:
            self.counters.given_up += 1
            return
        idx = cb.attempt - 1
        delay = (RESEND_DELAYS[idx] if idx < len(RESEND_DELAYS) else RESEND_LATER) * scale
        self.counters.resends += 1
        loop = asyncio.get_running_loop()

        def fire() -> None:
            self._timers.discard(handle)
            self._put(cb)

        handle = loop.call_later(delay, fire)
        self._timers.add(handle)


class Control(BaseModel):
    """Answers to give next, in order: bulk codes (e.g. -4) and upload statuses (e.g. 2)."""

    codes: list[int] = []
    upload_statuses: list[int] = []
    dlr_before_answer: bool | None = None


@dataclass
class ProviderSimulator:
    user: str
    secret_key: str
    emitter_settings: EmitterSettings = field(default_factory=EmitterSettings)
    emit_dlrs: bool = True
    dlr_before_answer: bool = False  # the delivery DLR races ahead of the send answer
    codes: deque[int] = field(default_factory=deque)
    upload_statuses: deque[int] = field(default_factory=deque)
    sent: dict[str, tuple[str, str | None]] = field(default_factory=dict)
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
        raw = request.scope.get("query_string", b"") + b"&" + await request.body()
        # latin-1 keeps every byte, so the text is checked exactly as it was signed.
        pairs = parse_qsl(raw.decode("latin-1"), keep_blank_values=True, encoding="latin-1")
        form: dict[str, list[str]] = {}
        for k, v in pairs:
            form.setdefault(k, []).append(v)
        self.requests.append(form)

        def one(name: str) -> str | None:
            return form.get(name, [None])[0]

        if self.codes:
            return self._answer(self.codes.popleft())
        phones = form.get("phone", [])
        for name in ("user", "from", "sign", "sending_method"):
            if not one(name):
                return self._answer(-1, f"PARAM ERROR ({name})")
        if not phones or not all(p.isdigit() for p in phones):
            return self._answer(-1, "PARAM ERROR (phone)")
        txt = one("txt")
        expected = sign_send(
            user=self.user, sender=one("from").encode("latin-1").decode(),  # type: ignore[union-attr]
            phones=phones, txt=txt.encode("latin-1") if txt is not None else None,
            secret_key=self.secret_key)
        if one("user") != self.user or not secrets.compare_digest(one("sign") or "", expected):
            return self._answer(-2, "AUTH ERROR")
        if txt is None and not one("image_id"):
            return self._answer(-1, "PARAM ERROR (txt)")
        ptid = one("p_transaction_id")
        ids = {p: str(uuid.uuid4()) for p in phones}
        for phone, msg_id in ids.items():
            self.sent[msg_id] = (phone, ptid)
        want_dlr = one("dlr") == "1"
        if want_dlr and self.emit_dlrs and self.emitter.settings.callback_url:
            if self.dlr_before_answer:
                for msg_id in ids.values():
                    await self.emitter.deliver_now(
                        {"type": "delivery", "msg_id": msg_id, "status": "delivered"}
                        | ({"p_transaction_id": ptid} if ptid else {}))
            else:
                for msg_id in ids.values():
                    self.emitter.enqueue_message(msg_id, ptid)
        return self._answer(0, "OK", ids if want_dlr else {})

    @staticmethod
    def _answer(code: int, message: str | None = None, ids: dict[str, str] | None = None
                ) -> Response:
        message = message or CODES.get(code, CODES[-1]).meaning
        lines = ['<?xml version="1.0" encoding="utf-8"?>', "<response>",
                 f"  <code>{code}</code>", f"  <tech_message>{escape(message)}</tech_message>"]
        lines += [f'  <msg_id phone="{p}">{m}</msg_id>' for p, m in (ids or {}).items()]
        lines.append("</response>")
        return Response("\n".join(lines), media_type="application/xml")

    async def upload(self, request: Request) -> Response:
        async with request.form() as form:
            if self.upload_statuses:
                status = self.upload_statuses.popleft()
                return JSONResponse({"status": status, "error": f"forced status {status}"})
            login, sign, image = form.get("login"), form.get("sign"), form.get("image")
            if not isinstance(login, str) or not isinstance(sign, str) or image is None \
                    or isinstance(image, str):
                return JSONResponse({"status": 1, "error": "The data is not correct"})
            data = await image.read()
        valid = {sign_upload(login=self.user, image=data, secret_key=self.secret_key,
                             uppercase_inner=upper) for upper in (False, True)}
        if login != self.user or sign not in valid:
            return JSONResponse({"status": 2, "error": "Invalid sign"})
        if len(data) > 20 * 1024 * 1024:
            return JSONResponse({"status": 3, "error": "The size of image is too big"})
        try:
            image_type(data)
        except BadImage:
            return JSONResponse({"status": 4, "error": "Invalid file format"})
        image_id = hashlib.sha256(data).hexdigest().upper()  # 64 symbols, as the document says
        self.images[image_id] = data
        return JSONResponse({"status": 0, "image_id": image_id})
