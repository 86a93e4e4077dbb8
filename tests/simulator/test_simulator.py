"""The provider simulator: takes what the provider takes, byte for byte, answers as the
document does, and reports SMS and Viber messages the way the provider does.

The replayed requests are written from the provider's published facts (the GET example,
the signature vectors, the Perl/PHP clients' way of encoding a form), not copied from any
vendor code."""

from __future__ import annotations

import asyncio
import http.client
import random
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from urllib.parse import parse_qsl, quote, quote_plus, urlsplit

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse
from typer.testing import CliRunner

from app.cli import cli
from app.core.notifications import interpret
from app.send.answers import parse_bulk_answer, parse_upload_answer
from app.send.signing import sign_send, sign_upload
from app.simulator.provider import DlrEmitter, EmitterSettings, ProviderSimulator

from ..helpers import DLR, free_port, serving_in_thread

BULOK = "Съешь еще этих французских булок"
PHONE_A, PHONE_B = "79031234567", "79165557755"
# ../shared/signature-vectors.md (the vendor's own examples).
SIGN_ONE_PHONE = "29def94e0f987855bbf4407e93b088d7"
SIGN_TWO_PHONES = "f7d36db5c9966c6200de7c8f3dcc890a"
NOW = datetime(2026, 1, 1, tzinfo=UTC)
DOCUMENTED_SMS_STATUSES = {"0", "1", "2", "3", "4", "-1", "-2", "-3", "-11", "-12"}
GIF = b"GIF89a\x01\x00\x01\x00\x80\x00\x00\xff\xff\xff\x00\x00\x00!\xf9\x04\x01\x00\x00\x00\x00" \
    b",\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;"


def vendor_sim(**kwargs: object) -> ProviderSimulator:
    """A simulator for the account of the vendor's examples (user hitfm, key test_key)."""
    return ProviderSimulator(user="hitfm", secret_key="test_key", **kwargs)  # type: ignore[arg-type]


@pytest.fixture
def served() -> Iterator[tuple[ProviderSimulator, str]]:
    sim = vendor_sim(emit_dlrs=False)
    with serving_in_thread(sim.app()) as url:
        yield sim, url


def replay(base_url: str, raw: bytes) -> tuple[int, bytes]:
    """Send exactly these bytes over a fresh connection and read the HTTP answer."""
    u = urlsplit(base_url)
    assert u.hostname and u.port
    with socket.create_connection((u.hostname, u.port), timeout=10) as sock:
        sock.sendall(raw)
        answer = http.client.HTTPResponse(sock)
        answer.begin()  # skips an interim "100 Continue"
        return answer.status, answer.read()


def host_of(url: str) -> bytes:
    return urlsplit(url).netloc.encode()


def multipart(boundary: str, fields: list[tuple[str, bytes]]) -> bytes:
    """A body as curl builds it from a PHP array: one part per field, no per-part type."""
    body = b""
    for name, value in fields:
        body += (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n"
                 .encode() + value + b"\r\n")
    return body + f"--{boundary}--\r\n".encode()


# --- requests as the vendor's clients send them -----------------------------------------------

def test_the_documents_get_example_is_accepted_as_sms(
        served: tuple[ProviderSimulator, str]) -> None:
    sim, url = served
    # Exactly as published (../shared/signature-vectors.md): %20 for spaces, no sending_method.
    query = ("user=hitfm&from=HitFM&phone=79031234567&txt=%D0%A1%D1%8A%D0%B5%D1%88%D1%8C%20%D0%B5"
             "%D1%89%D0%B5%20%D1%8D%D1%82%D0%B8%D1%85%20%D1%84%D1%80%D0%B0%D0%BD%D1%86%D1%83%D0"
             "%B7%D1%81%D0%BA%D0%B8%D1%85%20%D0%B1%D1%83%D0%BB%D0%BE%D0%BA"
             "&sign=29def94e0f987855bbf4407e93b088d7")
    assert query.split("&txt=")[1].split("&")[0] == quote(BULOK)
    raw = (f"GET /?{query} HTTP/1.1\r\n".encode() + b"Host: " + host_of(url) + b"\r\n"
           b"User-Agent: curl/7.88.1\r\nAccept: */*\r\n\r\n")
    status, body = replay(url, raw)
    answer = parse_bulk_answer(body)
    assert (status, answer.code, answer.tech_message, answer.msg_ids) == (200, 0, "OK", {})
    assert sim.requests[-1]["txt"] == [BULOK]
    assert "sending_method" not in sim.requests[-1]  # SMS, the account default


def test_perl_style_sms_post_without_sending_method(
        served: tuple[ProviderSimulator, str]) -> None:
    sim, url = served
    # An LWP form post: spaces as "+", two phones repeated, no sending_method.
    body = (f"user=hitfm&from=HitFM&phone={PHONE_A}&phone={PHONE_B}&txt={quote_plus(BULOK)}"
            f"&dlr=1&p_transaction_id=perl-1&sign={SIGN_TWO_PHONES}").encode()
    raw = (b"POST / HTTP/1.1\r\nTE: deflate,gzip;q=0.3\r\nConnection: TE, close\r\n"
           b"Host: " + host_of(url) + b"\r\nUser-Agent: libwww-perl/6.72\r\n"
           b"Content-Length: " + str(len(body)).encode() + b"\r\n"
           b"Content-Type: application/x-www-form-urlencoded\r\n\r\n" + body)
    status, answer_body = replay(url, raw)
    answer = parse_bulk_answer(answer_body)
    assert (status, answer.code, set(answer.msg_ids)) == (200, 0, {PHONE_A, PHONE_B})
    assert {sim.channels[m] for m in answer.msg_ids.values()} == {"sms"}
    assert sim.sent[answer.msg_ids[PHONE_B]] == (PHONE_B, "perl-1")


@pytest.mark.parametrize("expect_continue", [False, True], ids=["plain", "expect-100"])
def test_php_style_viber_multipart(served: tuple[ProviderSimulator, str],
                                   expect_continue: bool) -> None:
    sim, url = served
    boundary = "------------------------3f8e1d0c2b7a6954"
    fields = [("user", b"hitfm"), ("from", b"HitFM"), ("phone", PHONE_A.encode()),
              ("txt", BULOK.encode()), ("sending_method", b"viber"),
              ("button_text", "Купить".encode()), ("button_link", b"https://shop.example/a?b=1"),
              ("dlr", b"1"), ("p_transaction_id", b"php-7"), ("sign", SIGN_ONE_PHONE.encode())]
    body = multipart(boundary, fields)
    if expect_continue:  # curl asks first for a larger body: pad the link to pass 1 KiB
        fields[6] = ("button_link", b"https://shop.example/?" + b"x" * 1100)
        body = multipart(boundary, fields)
    raw = (b"POST / HTTP/1.1\r\nHost: " + host_of(url) + b"\r\nAccept: */*\r\n"
           b"Content-Length: " + str(len(body)).encode() + b"\r\n"
           + (b"Expect: 100-continue\r\n" if expect_continue else b"")
           + f"Content-Type: multipart/form-data; boundary={boundary}\r\n\r\n".encode() + body)
    status, answer_body = replay(url, raw)
    answer = parse_bulk_answer(answer_body)
    assert (status, answer.code, answer.tech_message) == (200, 0, "OK")
    assert sim.channels[answer.msg_ids[PHONE_A]] == "viber"
    assert sim.requests[-1]["button_text"] == ["Купить"]


def test_cp1251_text_is_checked_as_the_bytes_that_were_signed(
        served: tuple[ProviderSimulator, str]) -> None:
    sim, url = served
    raw_txt = BULOK.encode("cp1251")
    # sign_send is pinned to the published vectors (tests/send/test_sender.py); signed over the
    # CP1251 bytes, it is not the vendor's UTF-8 example.
    sign = sign_send(user="hitfm", sender="HitFM", phones=[PHONE_A], txt=raw_txt,
                     secret_key="test_key")
    assert sign != SIGN_ONE_PHONE
    body = (f"user=hitfm&from=HitFM&phone={PHONE_A}&txt={quote_plus(raw_txt)}&charset=CP1251"
            f"&sending_method=sms&sign={sign}").encode()
    status, answer_body = replay(url, b"POST / HTTP/1.1\r\nHost: " + host_of(url)
                                 + b"\r\nContent-Type: application/x-www-form-urlencoded\r\n"
                                 + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    assert parse_bulk_answer(answer_body).code == 0
    assert sim.requests[-1]["txt"] == [BULOK]


# --- refusals, as the document words them ------------------------------------------------------

def signed(fields: dict[str, str], *, key: str = "test_key") -> dict[str, str]:
    """The fields with the signature of section 1.3, from the send module's `sign_send`
    (pinned to the published vectors in tests/send/test_sender.py; GOOD's is the vendor's own)."""
    sign = sign_send(user=fields["user"], sender=fields.get("from", ""),
                     phones=[fields["phone"]] if "phone" in fields else [],
                     txt=fields.get("txt"), secret_key=key)
    return fields | {"sign": sign}


@pytest.fixture
async def sim_client() -> AsyncIterator[tuple[ProviderSimulator, httpx.AsyncClient]]:
    sim = vendor_sim(emit_dlrs=False)
    transport = httpx.ASGITransport(app=sim.app())
    async with httpx.AsyncClient(transport=transport, base_url="http://sim") as client:
        yield sim, client


# The vendor's GET example's fields (../shared/signature-vectors.md).
GOOD = {"user": "hitfm", "from": "HitFM", "phone": PHONE_A, "txt": BULOK}


def test_the_good_request_is_the_vendors_example() -> None:
    assert signed(GOOD)["sign"] == SIGN_ONE_PHONE


@pytest.mark.parametrize(("fields", "code", "tech_message"), [
    (GOOD | {"sign": SIGN_ONE_PHONE}, 0, "OK"),
    (signed(GOOD | {"sending_method": ""}), 0, "OK"),  # blank counts as not sent: SMS
    ({k: v for k, v in signed(GOOD).items() if k != "from"}, -1, "PARAM ERROR (from)"),
    ({k: v for k, v in signed(GOOD).items() if k != "user"}, -1, "PARAM ERROR (user)"),
    ({k: v for k, v in signed(GOOD).items() if k != "phone"}, -1, "PARAM ERROR (phone)"),
    ({k: v for k, v in signed(GOOD).items() if k != "sign"}, -1, "PARAM ERROR (sign)"),
    (signed(GOOD | {"phone": "+79031234567"}), -1, "PARAM ERROR (phone)"),
    (GOOD | {"sign": "0" * 32}, -2, "Authentication failed"),
    (signed(GOOD) | {"sign": signed(GOOD)["sign"].upper()}, -2, "Authentication failed"),
    (signed(GOOD | {"user": "other"}), -2, "Authentication failed"),
    (signed(GOOD | {"sending_method": "telegram"}), -1, "PARAM ERROR (sending_method)"),
    (signed(GOOD | {"from": "Shop-1"}), -1, "PARAM ERROR (from)"),
    (signed(GOOD | {"delay": "10081"}), -1, "PARAM ERROR (delay)"),
    (signed(GOOD | {"charset": "KOI8-R"}), -1, "PARAM ERROR (charset)"),
])
async def test_answers_follow_the_document(
        sim_client: tuple[ProviderSimulator, httpx.AsyncClient],
        fields: dict[str, str], code: int, tech_message: str) -> None:
    _, client = sim_client
    r = await client.post("/", data=fields)
    answer = parse_bulk_answer(r.content)
    assert (r.status_code, answer.code, answer.tech_message) == (200, code, tech_message)


@pytest.mark.parametrize(("code", "tech_message"), [
    (-3, "Request processing denial"), (-4, "Temporary technical error"),
    (-5, "The balance of SMS-messages is exhausted"), (-6, "Bandwidth limit exceeded")])
async def test_forced_codes_carry_the_documents_meaning(
        sim_client: tuple[ProviderSimulator, httpx.AsyncClient], code: int,
        tech_message: str) -> None:
    _, client = sim_client
    await client.post("/_sim/control", json={"codes": [code]})
    first = parse_bulk_answer((await client.post("/", data=signed(GOOD))).content)
    assert (first.code, first.tech_message) == (code, tech_message)
    assert parse_bulk_answer((await client.post("/", data=signed(GOOD))).content).code == 0


async def test_a_broken_multipart_body_is_a_param_error(
        sim_client: tuple[ProviderSimulator, httpx.AsyncClient]) -> None:
    _, client = sim_client
    r = await client.post("/", content=b"--x\r\nno headers", headers={
        "content-type": "multipart/form-data"})  # and no boundary
    assert parse_bulk_answer(r.content).tech_message == "PARAM ERROR (body)"


# --- the reports: SMS as the provider sends them, Viber words, order ---------------------------

@dataclass
class Receiver:
    """A partner endpoint that records what arrives, answers 503 now and then, and takes a
    random moment for each answer, so that concurrent workers would overtake each other."""

    fail_rate: float = 0.0
    seen: list[dict[str, str]] = field(default_factory=list)
    rng: random.Random = field(default_factory=lambda: random.Random(3))

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        params = dict(parse_qsl(request.content.decode()))
        await asyncio.sleep(self.rng.random() / 200)
        if self.rng.random() < self.fail_rate:
            return httpx.Response(503)
        self.seen.append(params)
        return httpx.Response(200, text="OK")

    def by_message(self) -> dict[str, list[dict[str, str]]]:
        out: dict[str, list[dict[str, str]]] = {}
        for params in self.seen:
            out.setdefault(params["msg_id"], []).append(params)
        return out


async def emit(channel: str, *, messages: int = 40, receiver: Receiver | None = None,
               **settings: object) -> Receiver:
    receiver = receiver or Receiver()
    emitter = DlrEmitter(EmitterSettings(callback_url="http://partner/dlr", rate=0, seed=11,
                                         time_scale=0.0001, **settings),  # type: ignore[arg-type]
                         transport=httpx.MockTransport(receiver))
    await emitter.start()
    try:
        for i in range(messages):
            emitter.enqueue_message(f"m{i}", f"p{i}", channel)  # type: ignore[arg-type]
        await emitter.idle()
    finally:
        await emitter.stop()
    return receiver


async def test_sms_is_reported_with_numeric_statuses_and_no_type() -> None:
    received = await emit("sms", undelivered_rate=0.5, seen_rate=1.0, reply_rate=1.0)
    assert received.seen
    for params in received.seen:
        assert set(params) == {"msg_id", "p_transaction_id", "status"}  # no type, seen, reply
        assert params["status"] in DOCUMENTED_SMS_STATUSES
        assert interpret(params, received_at=NOW).type == "delivery"
    finals = {p["status"] for p in received.seen} - {"1", "2", "3", "4"}
    assert "0" in finals and finals - {"0"}  # delivered ones and failed ones


async def test_viber_is_reported_with_both_in_progress_words() -> None:
    received = await emit("viber", undelivered_rate=0.0, seen_rate=0.0, reply_rate=1.0)
    words = {p["status"] for p in received.seen if p.get("status") not in (None, "delivered")}
    assert words == {"in process", "buffered"}
    for notes in received.by_message().values():
        assert {n["type"] for n in notes} == {"delivery", "seen", "reply"}  # a reply is seen


@pytest.mark.parametrize(("rate", "replies"), [(0.0, 0), (1.0, 40)])
async def test_the_reply_rate_is_a_setting(rate: float, replies: int) -> None:
    received = await emit("viber", undelivered_rate=0.0, seen_rate=0.0, reply_rate=rate,
                          duplicate_rate=0.0)
    assert sum(p.get("type") == "reply" for p in received.seen) == replies


STAGE = {"1": 0, "4": 0, "in process": 0, "buffered": 0}


def stage(params: dict[str, str]) -> int:
    """Where a notification stands in its message's life: interim, final, seen, reply."""
    if params.get("type") == "seen":
        return 2
    if params.get("type") == "reply":
        return 3
    return STAGE.get(params["status"], 1)


@pytest.mark.parametrize("channel", ["sms", "viber"])
async def test_no_reorder_keeps_each_messages_reports_in_order(channel: str) -> None:
    received = await emit(channel, receiver=Receiver(fail_rate=0.3), reorder=False,
                          concurrency=8, duplicate_rate=0.5, undelivered_rate=0.2,
                          seen_rate=0.5, reply_rate=0.5)
    messages = received.by_message()
    assert len(messages) == 40
    for notes in messages.values():
        stages = [stage(n) for n in notes]
        assert stages == sorted(stages), notes


async def test_reorder_does_mix_them() -> None:
    # The other side of the option: the same load shuffled does arrive out of order.
    received = await emit("viber", receiver=Receiver(fail_rate=0.3), reorder=True,
                          undelivered_rate=0.0, seen_rate=1.0, reply_rate=1.0)
    assert any([stage(n) for n in notes] != sorted(stage(n) for n in notes)
               for notes in received.by_message().values())


async def test_a_delayed_send_reports_only_after_its_delay() -> None:
    sim = vendor_sim()
    receiver = Receiver()
    sim.emitter = DlrEmitter(EmitterSettings(callback_url="http://partner/dlr", rate=0,
                                             time_scale=1.0),
                             transport=httpx.MockTransport(receiver))
    await sim.emitter.start()
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=sim.app()),
                                     base_url="http://sim") as client:
            r = await client.post("/", data=signed(GOOD | {"dlr": "1", "delay": "5"}))
        assert parse_bulk_answer(r.content).code == 0
        await asyncio.sleep(0.05)
        # Five minutes away: nothing has gone out, the emitter holds it.
        assert receiver.seen == [] and sim.emitter.busy
    finally:
        await sim.emitter.stop()


# --- uploads: strict signature, 10 MB ----------------------------------------------------------

def upload_sign(data: bytes, *, upper: bool, login: str = "hitfm") -> str:
    # sign_upload is pinned to the API document's example in tests/send/test_sender.py.
    return sign_upload(login=login, image=data, secret_key="test_key", uppercase_inner=upper)


async def upload(sim: ProviderSimulator, data: bytes, sign: str, *,
                 login: str = "hitfm") -> tuple[int, str | None]:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=sim.app()),
                                 base_url="http://sim") as client:
        r = await client.post("/upload/", data={"login": login, "sign": sign},
                              files={"image": ("a.gif", data, "image/gif")})
    answer = parse_upload_answer(r.content)
    return answer.status, answer.image_id or answer.error


@pytest.mark.parametrize(("sim_upper", "sign_upper", "status"), [
    (False, False, 0), (False, True, 2), (True, True, 0), (True, False, 2)])
async def test_upload_signature_is_checked_strictly(sim_upper: bool, sign_upper: bool,
                                                     status: int) -> None:
    sim = vendor_sim(upload_sign_uppercase=sim_upper)
    got, detail = await upload(sim, GIF, upload_sign(GIF, upper=sign_upper))
    assert got == status, detail
    assert (len(sim.images) == 1) is (status == 0)


async def test_upload_refusals_follow_section_3_1() -> None:
    sim = vendor_sim()
    big = GIF + b"\x00" * (10 * 1024 * 1024)
    assert (await upload(sim, big, upload_sign(big, upper=False)))[0] == 3
    pdf = b"%PDF-1.4 not an image"
    assert (await upload(sim, pdf, upload_sign(pdf, upper=False)))[0] == 4
    assert (await upload(sim, GIF, upload_sign(GIF, upper=False), login="x"))[0] == 2
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=sim.app()),
                                 base_url="http://sim") as client:
        r = await client.post("/upload/", data={"login": "hitfm", "sign": "s"})
        assert parse_upload_answer(r.content).status == 1
    assert sim.images == {}


# --- dlr simulate --------------------------------------------------------------------------

def test_a_busy_port_is_one_error_line_and_no_banner() -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        result = CliRunner().invoke(cli, ["simulate", "--port", str(port)])
    assert result.exit_code == 2
    assert "provider simulator on" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f"127.0.0.1:{port}" in lines[0] and "in use" in lines[0]


@pytest.mark.slow
def test_dlr_simulate_with_a_reply_rate_of_one_sends_a_reply() -> None:
    """The README's loop: `dlr simulate --reply-rate 1 ...` and every delivered message is
    answered."""
    got: list[dict[str, str]] = []
    partner = FastAPI()

    @partner.post("/dlr")
    async def dlr(request: Request) -> PlainTextResponse:
        got.append(dict(parse_qsl((await request.body()).decode())))
        return PlainTextResponse("OK")

    port = free_port()
    with serving_in_thread(partner) as partner_url:
        proc = subprocess.Popen(
            [DLR, "simulate", "--port", str(port), "--user", "hitfm", "--secret", "test_key",
             "--callback-url", f"{partner_url}/dlr", "--reply-rate", "1",
             "--undelivered-rate", "0"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            url = f"http://127.0.0.1:{port}/"
            deadline = time.monotonic() + 30
            while True:
                try:
                    r = httpx.post(url, data=signed(GOOD | {"sending_method": "viber",
                                                            "dlr": "1"}))
                    break
                except httpx.ConnectError:
                    assert proc.poll() is None and time.monotonic() < deadline
                    time.sleep(0.1)
            assert parse_bulk_answer(r.content).code == 0
            while not any(n.get("type") == "reply" for n in got):
                assert time.monotonic() < deadline, got
                time.sleep(0.05)
        finally:
            proc.terminate()
            _, stderr = proc.communicate(timeout=30)
    assert b"provider simulator on" in stderr
