"""Provider conformance: the project's reading of the provider, in one place.

Every case runs against both sides that speak for the project: the send module's request
builder (`SendRequest`, its form body and the signing functions) and the provider simulator.
Each cites where its rule comes from:

- "API §x" is ../shared/provider-api.txt, the provider's own API document;
- "public docs" is the provider's public documentation (its `doc-bulk` pages), which settles
  what the API document leaves open (issue 14 lists the facts);
- "project" marks a reading the documents leave open, chosen here once for both sides.

The wire bodies for the simulator are built in this file from the documents, not by the send
module, so the two sides are checked against the documents and not against each other. Their
signatures come from `sign_send`, which the published vectors pin (../shared/signature-vectors.md,
test_signature_vectors_on_both_sides and tests/send/test_sender.py): no test here computes a
signature with a formula of its own.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl, urlencode

import httpx
import pytest
from pydantic import ValidationError

from app.config import load_settings
from app.core.notifications import Status, interpret, shown_status_extended
from app.send.answers import CODES, parse_bulk_answer, parse_upload_answer, should_retry
from app.send.media import BadImage, check_image
from app.send.messages import SendRequest
from app.send.signing import sign_send, sign_upload
from app.simulator.provider import EmitterSettings, ProviderSimulator

USER, KEY = "partner", "s3cret"
PHONE, PHONE_2 = "79031234567", "79165557755"
NOW = datetime(2026, 1, 1, tzinfo=UTC)
CODECS = {"CP1251": "cp1251", "UCS-2": "utf-16-be", "UTF-16BE": "utf-16-be"}
GIF = b"GIF89a\x01\x00\x01\x00\x80\x00\x00\xff\xff\xff\x00\x00\x00!\xf9\x04\x01\x00\x00\x00\x00" \
    b",\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;"
BULOK = "Съешь еще этих французских булок"


@dataclass(frozen=True)
class Case:
    name: str
    source: str
    fields: dict[str, Any]
    refused: str | None = None  # the parameter named in "PARAM ERROR (...)"
    base: dict[str, Any] = field(default_factory=lambda: {"phone": [PHONE], "from": "Shop"})

    @property
    def request(self) -> dict[str, Any]:
        return self.base | self.fields


BUTTON = {"button_text": "Buy", "button_link": "https://shop.example/sale"}
IMAGE_ID = "A" * 64

SEND_CASES = [
    Case("text", "API §1.2.1", {"txt": "Hello"}),
    Case("picture", "API §1.2.2", {"image_id": IMAGE_ID}),
    Case("text and button", "API §1.2.3", {"txt": "Sale", **BUTTON}),
    Case("text, picture and button", "API §1.2.4", {"txt": "Sale", "image_id": IMAGE_ID,
                                                     **BUTTON}),
    Case("half a button shows as text", "API §1.1", {"txt": "Sale", "button_text": "Buy"}),
    Case("sms", "API §1.2 sending_method", {"txt": "Hello", "sending_method": "sms"}),
    Case("phones signed in the order sent", "API §1.3; public docs, signature",
         {"txt": BULOK, "phone": [PHONE_2, PHONE]}),
    Case("CP1251 text", "API §1.2.1 charset", {"txt": BULOK, "charset": "CP1251"}),
    Case("UCS-2 text", "API §1.2.1 charset", {"txt": BULOK, "charset": "UCS-2"}),
    Case("unknown charset", "API §1.2.1 charset", {"txt": "x", "charset": "KOI8-R"}, "charset"),
    Case("txt of 2048", "API §1.2.1 txt String(2048)", {"txt": "x" * 2048}),
    Case("txt of 2049", "API §1.2.1 txt String(2048)", {"txt": "x" * 2049}, "txt"),
    Case("from of 11 with spaces", "API §1.2.1 String(11); public docs, from",
         {"txt": "x", "from": "My Shop 123"}),
    Case("from of 12", "API §1.2.1 from String(11)", {"txt": "x", "from": "TwelveLetter"},
         "from"),
    Case("from with a hyphen", "public docs, from: Latin letters, digits, spaces",
         {"txt": "x", "from": "Shop-1"}, "from"),
    Case("from in Cyrillic", "public docs, from: Latin letters, digits, spaces",
         {"txt": "x", "from": "Магазин"}, "from"),
    Case("button_text of 31", "API §1.2.3 String(30)",
         {"txt": "x", "button_text": "b" * 31, "button_link": "l"}, "button_text"),
    Case("button_link of 2049", "API §1.2.3 String(2048)",
         {"txt": "x", "button_text": "b", "button_link": "l" * 2049}, "button_link"),
    Case("image_id of 65", "API §1.2.2 String(64)", {"image_id": "i" * 65}, "image_id"),
    Case("dlr_timeout 60", "API §1.2.1 dlr_timeout", {"txt": "x", "dlr_timeout": 60}),
    Case("dlr_timeout 86400", "API §1.2.1 dlr_timeout", {"txt": "x", "dlr_timeout": 86400}),
    Case("dlr_timeout 59", "API §1.2.1 dlr_timeout", {"txt": "x", "dlr_timeout": 59},
         "dlr_timeout"),
    Case("dlr_timeout 86401", "API §1.2.1 dlr_timeout", {"txt": "x", "dlr_timeout": 86401},
         "dlr_timeout"),
    Case("delay 1", "public docs, delay (minutes)", {"txt": "x", "delay": 1}),
    Case("delay a week", "public docs, delay: at most 10080", {"txt": "x", "delay": 10080}),
    Case("SMS delay a week", "public docs, SMS delay", {"txt": "x", "delay": 10080,
                                                        "sending_method": "sms"}),
    Case("delay over a week", "public docs, delay: at most 10080",
         {"txt": "x", "delay": 10081}, "delay"),
    Case("delay 0", "project: a delay defers by at least a minute", {"txt": "x", "delay": 0},
         "delay"),
    Case("phone with +", "API §1.2.1 phone: digits only, without +",
         {"txt": "x", "phone": ["+79031234567"]}, "phone"),
    Case("the same phone twice", "project: the answer has one msg_id per phone (API §2)",
         {"txt": "x", "phone": [PHONE, PHONE]}, "phone"),
    Case("text and picture without a button", "project: API §1.1 lists no such kind",
         {"txt": "x", "image_id": IMAGE_ID}, "button_text"),
    Case("SMS with a picture", "public docs, SMS: no image parameters",
         {"txt": "x", "image_id": IMAGE_ID, "sending_method": "sms"}, "image_id"),
    Case("SMS without txt", "public docs, SMS: txt required", {"sending_method": "sms"}, "txt"),
    Case("Viber without txt or picture", "API §1.2.1/§1.2.2", {"p_transaction_id": "p"}, "txt"),
    Case("a button without txt", "API §1.2.3: txt is mandatory with a button",
         {"image_id": IMAGE_ID, **BUTTON}, "txt"),
    Case("every optional parameter", "API §1.2.1",
         {"txt": "x", "p_transaction_id": "camp-1", "dlr_timeout": 3600,
          "expiry_txt": "Expired", "charset": "UTF-8", "delay": 30}),
]
ACCEPTED = [c for c in SEND_CASES if c.refused is None]


def ids(cases: list[Case]) -> list[str]:
    return [f"{c.name} [{c.source}]" for c in cases]


def wire_body(request: dict[str, Any], *, sending_method: str | None = "viber",
              user: str = USER, key: str = KEY) -> bytes:
    """A signed form body built from the documents alone (API §1.2, §1.3)."""
    codec = CODECS.get(str(request.get("charset", "")).upper(), "utf-8")
    txt = request["txt"].encode(codec) if "txt" in request else None
    method = request.get("sending_method", sending_method)
    pairs: list[tuple[str, str | bytes]] = [("user", user), ("from", request["from"])]
    if method is not None:
        pairs.append(("sending_method", method))
    pairs += [("phone", p) for p in request["phone"]]
    if txt is not None:
        pairs.append(("txt", txt))
    for name in ("image_id", "button_text", "button_link", "p_transaction_id", "dlr_timeout",
                 "expiry_txt", "charset", "delay"):
        if name in request:
            pairs.append((name, str(request[name])))
    pairs.append(("dlr", "1"))
    # API §1.3: user, from, the phones in order, the text as sent, the key; nothing else.
    pairs.append(("sign", sign_send(user=user, sender=request["from"], phones=request["phone"],
                                    txt=txt, secret_key=key)))
    return urlencode(pairs).encode("ascii")


Sim = tuple[ProviderSimulator, httpx.AsyncClient]


def client_for(sim: ProviderSimulator) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=sim.app()), base_url="http://sim")


@pytest.fixture
async def simulator() -> AsyncIterator[Sim]:
    sim = ProviderSimulator(user=USER, secret_key=KEY, emit_dlrs=False)
    async with client_for(sim) as client:
        yield sim, client


async def post(client: httpx.AsyncClient, body: bytes) -> tuple[int, str, dict[str, str]]:
    r = await client.post("/", content=body,
                          headers={"content-type": "application/x-www-form-urlencoded"})
    answer = parse_bulk_answer(r.content)
    return answer.code, answer.tech_message, answer.msg_ids


def build(request: dict[str, Any]) -> bytes:
    """The send module's request for these fields (ValidationError if it refuses)."""
    return SendRequest.model_validate(request).with_defaults(default_sender=None).form_body(
        user=USER, secret_key=KEY)


# --- send requests (API §1.2, §1.3; public docs) -----------------------------------------------

@pytest.mark.parametrize("case", SEND_CASES, ids=ids(SEND_CASES))
async def test_simulator_reads_the_request_as_documented(
        simulator: Sim, case: Case) -> None:
    _, client = simulator
    code, tech_message, _ = await post(client, wire_body(case.request))
    if case.refused is None:
        assert (code, tech_message) == (0, "OK")
    else:
        assert (code, tech_message) == (-1, f"PARAM ERROR ({case.refused})")


@pytest.mark.parametrize("case", SEND_CASES, ids=ids(SEND_CASES))
def test_send_module_reads_the_request_as_documented(case: Case) -> None:
    if case.refused is None:
        build(case.request)
        return
    with pytest.raises(ValidationError) as caught:
        build(case.request)
    errors = caught.value.errors()
    locations = {str(part) for error in errors for part in error["loc"]}
    # A field's own limit names the field; a rule across fields is a model-level error whose
    # message names it (image_id as "image", button_text as "button").
    if locations:
        assert case.refused in locations, caught.value
    else:
        named = case.refused.split("_")[0]
        assert any(named in error["msg"] for error in errors), caught.value


@pytest.mark.parametrize("case", ACCEPTED, ids=ids(ACCEPTED))
async def test_what_the_send_module_sends_is_what_the_simulator_reads(
        simulator: Sim, case: Case) -> None:
    sim, client = simulator
    body = build(case.request)
    code, _, msg_ids = await post(client, body)
    assert code == 0 and list(msg_ids) == case.request["phone"]
    sent = dict(parse_qsl(body.decode("ascii"), encoding="latin-1"))
    # The body matches the documents' own construction, signature included.
    expected = dict(parse_qsl(wire_body(case.request).decode("ascii"), encoding="latin-1"))
    assert {k: v for k, v in sent.items() if k != "p_transaction_id"} == \
        {k: v for k, v in expected.items() if k != "p_transaction_id"}
    read = sim.requests[-1]
    assert read["phone"] == case.request["phone"]
    assert read.get("txt") == ([case.request["txt"]] if "txt" in case.request else None)
    channel = case.request.get("sending_method", "viber")
    assert {sim.channels[m] for m in msg_ids.values()} == {channel}


def test_the_send_module_always_names_the_sending_method() -> None:
    # API §1.2.1 makes sending_method mandatory; the product is Viber with SMS fallback.
    pairs = parse_qsl(build({"phone": [PHONE], "from": "Shop", "txt": "x"}).decode())
    assert ("sending_method", "viber") in pairs
    pairs = parse_qsl(build({"phone": [PHONE], "from": "Shop", "txt": "x",
                             "sending_method": "sms"}).decode())
    assert ("sending_method", "sms") in pairs


async def test_the_simulator_reads_a_missing_sending_method_as_sms(
        simulator: Sim) -> None:
    # Public docs: sending_method is optional, SMS is the account default.
    sim, client = simulator
    code, _, msg_ids = await post(client, wire_body({"phone": [PHONE], "from": "Shop", "txt": "x"},
                                              sending_method=None))
    assert code == 0 and sim.channels[msg_ids[PHONE]] == "sms"


# ../shared/signature-vectors.md: the vendor's examples and provider-api.txt §1.3.
VECTORS = [
    ("hitfm", "HitFM", [PHONE], BULOK, "test_key", "29def94e0f987855bbf4407e93b088d7"),
    ("hitfm", "HitFM", [PHONE, PHONE_2], BULOK, "test_key", "f7d36db5c9966c6200de7c8f3dcc890a"),
    ("hitfm", "HitFM", [PHONE], None, "test_key", "10302fcc22e9c3a36a4f064a15695972"),
    ("onvUser", "Sender", ["79041231231"], "hello", "4Ab2ln4FEa32",
     "ac748f3290de34c2bd7aec56f3100e29"),
]


@pytest.mark.parametrize(("user", "sender", "phones", "txt", "key", "sign"), VECTORS)
async def test_signature_vectors_on_both_sides(user: str, sender: str, phones: list[str],
                                         txt: str | None, key: str, sign: str) -> None:
    # API §1.3: md5(user + from + phones + txt + secret_key); without txt, txt is left out.
    fields: dict[str, Any] = {"phone": phones, "from": sender}
    fields |= {"txt": txt} if txt is not None else {"image_id": IMAGE_ID}
    body = SendRequest.model_validate(fields).with_defaults(default_sender=None).form_body(
        user=user, secret_key=key)
    assert dict(parse_qsl(body.decode()))["sign"] == sign
    sim = ProviderSimulator(user=user, secret_key=key, emit_dlrs=False)
    async with client_for(sim) as client:
        assert (await post(client, body))[0] == 0
        wrong_case = body.replace(sign.encode(), sign.upper().encode())
        assert (await post(client, wrong_case))[:2] == (-2, CODES[-2].meaning)


# ../shared/signature-vectors.md: the vendor's GET example, exactly as published.
VENDOR_EXAMPLE = (
    "user=hitfm&from=HitFM&phone=79031234567&txt=%D0%A1%D1%8A%D0%B5%D1%88%D1%8C%20%D0%B5%D1%89"
    "%D0%B5%20%D1%8D%D1%82%D0%B8%D1%85%20%D1%84%D1%80%D0%B0%D0%BD%D1%86%D1%83%D0%B7%D1%81%D0%BA"
    "%D0%B8%D1%85%20%D0%B1%D1%83%D0%BB%D0%BE%D0%BA&sign=29def94e0f987855bbf4407e93b088d7")


async def test_the_vendors_published_example_on_both_sides() -> None:
    published = parse_qsl(VENDOR_EXAMPLE)
    assert dict(published)["txt"] == BULOK
    body = SendRequest.model_validate({"phone": [PHONE], "from": "HitFM", "txt": BULOK}
                                      ).with_defaults(default_sender=None).form_body(
        user="hitfm", secret_key="test_key")
    # The send module's body carries the example's parameters, in its order, sign included
    # (it adds sending_method, dlr and a p_transaction_id, which are not signed).
    names = {name for name, _ in published}
    assert [pair for pair in parse_qsl(body.decode()) if pair[0] in names] == published
    sim = ProviderSimulator(user="hitfm", secret_key="test_key", emit_dlrs=False)
    async with client_for(sim) as client:
        code, tech_message, _ = await post(client, VENDOR_EXAMPLE.encode())
    assert (code, tech_message) == (0, "OK")
    assert sim.requests[-1]["txt"] == [BULOK]


# --- answers (API §1.4, §2) ----------------------------------------------------------------------

@pytest.mark.parametrize("code", sorted(CODES))
async def test_answer_codes_read_back_with_the_documents_meaning(
        simulator: Sim, code: int) -> None:
    _, client = simulator
    if code:
        await client.post("/_sim/control", json={"codes": [code]})
    got, tech_message, _ = await post(client, build({"phone": [PHONE], "from": "Shop", "txt": "x"}))
    assert got == code
    assert tech_message == ("OK" if code == 0 else CODES[code].meaning)
    # API §1.4.1 "Request repeat": yes for -2, -4, -6.
    assert should_retry(code) is (code in (-2, -4, -6))


async def test_one_msg_id_per_phone_when_dlr_is_asked_for(
        simulator: Sim) -> None:
    # API §2: with dlr=1 the answer carries a msg_id per phone.
    _, client = simulator
    body = build({"phone": [PHONE, PHONE_2], "from": "Shop", "txt": "x"})
    _, _, msg_ids = await post(client, body)
    assert set(msg_ids) == {PHONE, PHONE_2} and len(set(msg_ids.values())) == 2


# --- uploads (API §3, §3.1; public docs: 10 MB, the samples hash in lower case) ---------------

async def upload(sim: ProviderSimulator, data: bytes, sign: str) -> int:
    async with client_for(sim) as client:
        r = await client.post("/upload/", data={"login": USER, "sign": sign},
                        files={"image": ("a.gif", data, "image/gif")})
    return parse_upload_answer(r.content).status


async def test_upload_signature_as_the_settings_default_signs_it() -> None:
    # A wrong default for DLR_UPLOAD_SIGN_UPPERCASE fails here: the provider takes lower case
    # (the vendor's samples hash the file with PHP's md5_file). The formula itself is pinned to
    # the API document's example in tests/send/test_sender.py.
    upper = load_settings(_env_file=None).upload_sign_uppercase
    assert upper is False
    sim = ProviderSimulator(user=USER, secret_key=KEY)
    sign = sign_upload(login=USER, image=GIF, secret_key=KEY, uppercase_inner=upper)
    assert await upload(sim, GIF, sign) == 0
    other = sign_upload(login=USER, image=GIF, secret_key=KEY, uppercase_inner=not upper)
    assert other != sign and await upload(sim, GIF, other) == 2


@pytest.mark.parametrize("simulator_upper", [False, True])
async def test_upload_signature_case_is_one_or_the_other(simulator_upper: bool) -> None:
    sim = ProviderSimulator(user=USER, secret_key=KEY, upload_sign_uppercase=simulator_upper)
    for upper in (False, True):
        sign = sign_upload(login=USER, image=GIF, secret_key=KEY, uppercase_inner=upper)
        assert await upload(sim, GIF, sign) == (0 if upper is simulator_upper else 2)


async def test_upload_size_limit_is_10_mb_on_both_sides() -> None:
    limit = load_settings(_env_file=None).upload_max_bytes
    assert limit == 10 * 1024 * 1024
    fits, too_big = GIF.ljust(limit, b"\x00"), GIF.ljust(limit + 1, b"\x00")
    check_image(fits, max_bytes=limit)
    with pytest.raises(BadImage, match="limit"):
        check_image(too_big, max_bytes=limit)
    sim = ProviderSimulator(user=USER, secret_key=KEY)
    for data, status in ((fits, 0), (too_big, 3)):
        sign = sign_upload(login=USER, image=data, secret_key=KEY)
        assert await upload(sim, data, sign) == status


async def test_upload_formats_on_both_sides() -> None:
    # API §3: JPG, PNG, GIF; anything else is status 4.
    pdf = b"%PDF-1.7"
    with pytest.raises(BadImage):
        check_image(pdf, max_bytes=1000)
    sim = ProviderSimulator(user=USER, secret_key=KEY)
    assert await upload(sim, pdf, sign_upload(login=USER, image=pdf, secret_key=KEY)) == 4


# --- delivery reports (API §2; public docs, SMS status codes) ---------------------------------

REPORTS = [
    ("API §2.1", {"type": "delivery", "status": "delivered"}, Status.DELIVERED, None),
    ("API §2.1", {"type": "delivery", "status": "in process"}, Status.IN_PROCESS, None),
    ("public docs, Viber: buffered", {"type": "delivery", "status": "buffered"},
     Status.IN_PROCESS, None),
    ("API §2.1.1", {"type": "delivery", "status": "undelivered",
                    "status_extended": "VIBER_EXPIRED"}, Status.UNDELIVERED, "VIBER_EXPIRED"),
    ("API §2.2", {"type": "seen"}, None, None),
    ("API §2.3", {"type": "reply", "text": "Спасибо"}, None, None),
    ("public docs, SMS 0 delivered", {"status": "0"}, Status.DELIVERED, None),
    ("public docs, SMS 1 buffered", {"status": "1"}, Status.IN_PROCESS, None),
    ("public docs (older), SMS 2 absent", {"status": "2"}, Status.IN_PROCESS, None),
    ("public docs (older), SMS 3 preparing", {"status": "3"}, Status.IN_PROCESS, None),
    ("public docs, SMS 4", {"status": "4"}, Status.IN_PROCESS, None),
    ("public docs, SMS -1 not delivered", {"status": "-1"}, Status.UNDELIVERED, "SMS_-1"),
    ("public docs, SMS -2 expired", {"status": "-2"}, Status.UNDELIVERED, "SMS_-2"),
    ("public docs, SMS -3 rejected", {"status": "-3"}, Status.UNDELIVERED, "SMS_-3"),
    ("public docs, SMS -11", {"status": "-11"}, Status.UNDELIVERED, "SMS_-11"),
    ("public docs, SMS -12", {"status": "-12"}, Status.UNDELIVERED, "SMS_-12"),
]


@pytest.mark.parametrize(("source", "fields", "status", "extended"), REPORTS,
                         ids=[f"{r[0]}: {r[1]}" for r in REPORTS])
def test_the_receiver_reads_every_documented_report(
        source: str, fields: dict[str, str], status: Status | None, extended: str | None
) -> None:
    n = interpret({"msg_id": "m1", "p_transaction_id": "p1"} | fields, received_at=NOW)
    assert (n.status, n.status_extended, n.unknown_status_extended) == (status, extended, False)
    # A Viber message's fallback report shows no "SMS" label (stored as the contract names it).
    assert "SMS" not in (shown_status_extended(n.status_extended, "text") or "")


@pytest.mark.parametrize("channel", ["sms", "viber"])
def test_the_simulator_reports_only_what_the_documents_describe(channel: str) -> None:
    sim = ProviderSimulator(user=USER, secret_key=KEY, emitter_settings=EmitterSettings(
        seed=5, undelivered_rate=0.3, seen_rate=0.5, reply_rate=0.3))
    documented = [{k: v for k, v in fields.items() if k not in ("text", "status_extended")}
                  for _, fields, *_ in REPORTS]
    shapes: list[tuple[tuple[str, str], ...]] = []
    for i in range(200):
        for note in sim.emitter.plan(f"m{i}", "p", channel):  # type: ignore[arg-type]
            shape = {k: v for k, v in note.items()
                     if k not in ("msg_id", "p_transaction_id", "text", "status_extended")}
            if channel == "sms":  # public docs: msg_id, p_transaction_id, numeric status
                assert set(note) == {"msg_id", "p_transaction_id", "status"}
            assert shape in documented, note
            n = interpret(note, received_at=NOW)
            assert not n.unknown_status_extended
            shapes.append(tuple(sorted(shape.items())))
    # Every message was reported, in more than one documented shape (interim, final, failed).
    assert len(shapes) >= 200 and len(set(shapes)) >= 3, set(shapes)
