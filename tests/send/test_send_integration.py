"""The send module against the provider simulator over real HTTP, with the receiver taking the
simulator's DLRs: the whole lifecycle, every answer code, uploads, and CSV campaigns."""

from __future__ import annotations

import asyncio
import base64
import logging
import struct
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from sqlalchemy import Engine, select
from typer.testing import CliRunner

from app.cli import cli
from app.config import Settings
from app.main import create_app
from app.send import SendRequest, SendResult, standalone_sender
from app.simulator.provider import EmitterSettings, ProviderSimulator
from app.store.models import Send

from ..helpers import count, events, free_port, make_settings, serving_in_thread

USER, SECRET = "partner", "s3cret-key"
# Every test runs the simulator and the receiver on real ports, most with DLRs flowing
# between them (0.6 s to 1.4 s each, 45 s for the module; the 1,000-row campaign 7-8 s).
pytestmark = pytest.mark.slow


@dataclass
class Stack:
    sim: ProviderSimulator
    sim_url: str
    api: httpx.Client
    settings: Settings

    def wait_for_dlrs(self) -> None:
        deadline = time.monotonic() + 30
        while True:
            counters = self.sim.emitter.counters
            busy = self.sim.emitter._outstanding or self.sim.emitter._timers
            if not busy and counters.attempts > 0:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"DLRs still pending: {counters}")
            time.sleep(0.05)


def stack_for(settings: Settings, **emitter: object) -> Iterator[Stack]:
    sim = ProviderSimulator(user=USER, secret_key=SECRET)
    receiver_port = free_port()
    sim.emitter.settings = EmitterSettings(
        callback_url=f"http://127.0.0.1:{receiver_port}/dlr", rate=0, seed=7,
        time_scale=0.0001, **emitter)  # type: ignore[arg-type]
    with serving_in_thread(sim.app()) as sim_url:
        app_settings = make_settings(
            database_url=settings.database_url, bulk_url=f"{sim_url}/",
            media_url=f"{sim_url}/upload/", bulk_user=USER, bulk_secret_key=SECRET,
            bulk_from="Shop", send_backoff=0.01, send_timeout=2)
        with serving_in_thread(create_app(app_settings), port=receiver_port) as url, \
                httpx.Client(base_url=url, timeout=10) as api:
            yield Stack(sim, sim_url, api, app_settings)


@pytest.fixture
def stack(settings: Settings, engine: Engine) -> Iterator[Stack]:
    yield from stack_for(settings, undelivered_rate=0.0, seen_rate=1.0, reply_rate=1.0,
                         duplicate_rate=0.5, reorder=True)


def test_full_lifecycle_through_the_simulator(stack: Stack, engine: Engine) -> None:
    r = stack.api.post("/api/v1/messages", json={
        "phone": ["79031234567", "79165557755"], "txt": "Скидка 20% сегодня",
        "button_text": "Купить", "button_link": "https://shop.example/sale"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["code"] == 0 and set(body["msg_ids"]) == {"79031234567", "79165557755"}
    stack.wait_for_dlrs()
    for phone, msg_id in body["msg_ids"].items():
        m = stack.api.get(f"/api/v1/messages/{msg_id}").json()
        assert (m["status"], m["phone"], m["p_transaction_id"], m["kind"]) == (
            "seen", phone, body["p_transaction_id"], "text_button")
        assert m["sent_at"] and m["delivered_at"] and m["seen_at"]
        assert sorted(e["type"] for e in m["events"]) == ["delivery", "delivery", "reply", "seen"]
        assert len(m["replies"]) == 1
    counters = stack.sim.emitter.counters
    assert counters.acknowledged == counters.attempts > counters.notifications  # duplicates
    assert events(engine) == counters.notifications == 8


def test_a_send_through_the_api_carries_its_campaign(stack: Stack) -> None:
    r = stack.api.post("/api/v1/messages", json={"phone": ["79031234567", "79165557755"],
                                                 "txt": "hi", "campaign": "black-friday"})
    assert r.status_code == 200, r.text
    stack.wait_for_dlrs()
    for msg_id in r.json()["msg_ids"].values():
        assert stack.api.get(f"/api/v1/messages/{msg_id}").json()["campaign"] == "black-friday"
    funnel = stack.api.get("/api/v1/stats", params={"campaign": "black-friday"}).json()["funnel"]
    assert funnel == {"sent": 2, "delivered": 2, "seen": 2, "replied": 2}
    too_long = stack.api.post("/api/v1/messages", json={"phone": ["79031234567"], "txt": "hi",
                                                        "campaign": "x" * 65})
    assert too_long.status_code == 422


def test_dlr_before_the_send_answer_meets_its_message(stack: Stack) -> None:
    stack.sim.dlr_before_answer = True
    r = stack.api.post("/api/v1/messages", json={"phone": ["79031234567"], "txt": "hi",
                                                 "p_transaction_id": "race-1"})
    assert r.status_code == 200
    [msg_id] = r.json()["msg_ids"].values()
    m = stack.api.get(f"/api/v1/messages/{msg_id}").json()
    assert (m["status"], m["phone"], m["p_transaction_id"]) == ("delivered", "79031234567",
                                                                "race-1")
    assert m["sent_at"] is not None


@pytest.mark.parametrize("code", [-1, -3, -5])
def test_final_codes_are_not_retried(stack: Stack, engine: Engine, code: int) -> None:
    stack.api.post(f"{stack.sim_url}/_sim/control", json={"codes": [code]})
    r = stack.api.post("/api/v1/messages", json={"phone": ["79031234567"], "txt": "hi"})
    assert r.status_code == 502
    assert r.json()["code"] == code and r.json()["tech_message"]
    assert len(stack.sim.requests) == 1
    with engine.connect() as conn:
        row = conn.execute(select(Send.outcome, Send.code, Send.attempts)).one()
    assert tuple(row) == ("refused", code, 1)


@pytest.mark.parametrize("code", [-2, -4, -6])
def test_repeatable_codes_are_retried(stack: Stack, code: int,
                                      caplog: pytest.LogCaptureFixture) -> None:
    stack.api.post(f"{stack.sim_url}/_sim/control", json={"codes": [code, code]})
    with caplog.at_level(logging.WARNING, logger="app.send.client"):
        r = stack.api.post("/api/v1/messages", json={"phone": ["79031234567"], "txt": "hi"})
    assert r.status_code == 200 and r.json()["code"] == 0
    assert len(stack.sim.requests) == 3
    # A send that waits between retries says so, with how long (not silent for seconds).
    waits = [rec.getMessage() for rec in caplog.records if "retrying in" in rec.getMessage()]
    assert len(waits) == 2 and all(f"code {code}" in w for w in waits)


def test_retries_are_bounded(stack: Stack) -> None:
    stack.api.post(f"{stack.sim_url}/_sim/control", json={"codes": [-4] * 10})
    r = stack.api.post("/api/v1/messages", json={"phone": ["79031234567"], "txt": "hi"})
    assert (r.status_code, r.json()["code"]) == (502, -4)
    assert len(stack.sim.requests) == 1 + stack.settings.send_max_retries


def test_wrong_secret_is_an_authentication_failure(settings: Settings, engine: Engine) -> None:
    gen = stack_for(settings)
    s = next(gen)
    try:
        s.sim.secret_key = "another"
        r = s.api.post("/api/v1/messages", json={"phone": ["79031234567"], "txt": "hi"})
        assert (r.status_code, r.json()["code"]) == (502, -2)
    finally:
        gen.close()


def test_input_over_the_limits_sends_nothing(stack: Stack) -> None:
    for body in ({"phone": ["+7903"], "txt": "hi"}, {"phone": ["79031234567"], "txt": "x" * 3000},
                 {"phone": ["79031234567"], "txt": "hi", "from": "FarTooLongName"},
                 {"phone": ["79031234567"], "txt": "hi", "dlr_timeout": 5}):
        r = stack.api.post("/api/v1/messages", json=body)
        assert r.status_code == 422, body
        assert "detail" in r.json()
    assert stack.sim.requests == []


def send_one(settings: Settings, **overrides: object) -> SendResult:
    """Send one text through the Python API with the given provider settings."""
    cfg = make_settings(database_url=settings.database_url, bulk_user=USER,
                        bulk_secret_key=SECRET, bulk_from="Shop", send_backoff=0.01,
                        **overrides)

    async def send() -> SendResult:
        async with standalone_sender(cfg) as sender:
            return await sender.send(SendRequest(phone=["79031234567"], txt="hi"))

    return asyncio.run(send())


def test_timeout_after_sending_is_unknown_and_not_resent(
    settings: Settings, engine: Engine, silent_provider: str
) -> None:
    result = send_one(settings, bulk_url=silent_provider, send_timeout=0.5)
    assert (result.outcome, result.attempts, result.msg_ids) == ("unknown", 1, {})
    with engine.connect() as conn:
        assert conn.scalar(select(Send.outcome)) == "unknown"


def test_unreachable_provider_is_retried_then_failed(settings: Settings, engine: Engine) -> None:
    result = send_one(settings, bulk_url=f"http://127.0.0.1:{free_port()}/")
    assert (result.outcome, result.attempts) == ("failed", 1 + settings.send_max_retries)


def png_1x1() -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(
            ">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\x00\xff\x00\x00")) + chunk(b"IEND", b""))


GIF_1X1 = base64.b64decode("R0lGODlhAQABAIAAAP///wAAACH5BAEAAAAALAAAAAABAAEAAAICRAEAOw==")
JPEG_1X1 = base64.b64decode(
    "/9j/4AAQSkZJRgABAQEASABIAAD/2wBDAP//////////////////////////////////////////////////////"
    "////////////////////////////////wgALCAABAAEBAREA/8QAFBABAAAAAAAAAAAAAAAAAAAAAP/aAAgBAQAB"
    "PxA=")


@pytest.mark.parametrize(("name", "data"), [("a.png", png_1x1()), ("b.gif", GIF_1X1),
                                            ("c.jpg", JPEG_1X1)], ids=["png", "gif", "jpg"])
def test_upload_real_images(stack: Stack, name: str, data: bytes) -> None:
    r = stack.api.post("/api/v1/images", files={"image": (name, data)})
    assert r.status_code == 200, r.text
    image_id = r.json()["image_id"]
    assert len(image_id) == 64 and stack.sim.images[image_id] == data
    # The image_id then sends as a picture message.
    sent = stack.api.post("/api/v1/messages", json={"phone": ["79031234567"],
                                                    "image_id": image_id})
    assert sent.status_code == 200, sent.text
    assert stack.sim.requests[-1]["image_id"] == [image_id]
    assert "txt" not in stack.sim.requests[-1]
    [msg_id] = sent.json()["msg_ids"].values()
    assert stack.api.get(f"/api/v1/messages/{msg_id}").json()["kind"] == "picture"


def test_upload_refusals(stack: Stack) -> None:
    r = stack.api.post("/api/v1/images", files={"image": ("looks.png", b"just text, no image")})
    assert r.status_code == 422 and "content" in r.json()["detail"][0]["msg"]
    stack.api.post(f"{stack.sim_url}/_sim/control", json={"upload_statuses": [3]})
    r = stack.api.post("/api/v1/images", files={"image": ("a.gif", GIF_1X1)})
    assert r.status_code == 502 and r.json()["code"] == 3
    assert "too big" in r.json()["detail"]
    assert stack.sim.images == {}


def test_csv_campaign_of_1000_rows_is_resumable(
    settings: Settings, engine: Engine, tmp_path: Path
) -> None:
    gen = stack_for(settings)
    s = next(gen)
    try:
        s.sim.emit_dlrs = False
        csv_file = tmp_path / "spring.csv"
        csv_file.write_text("phone,txt\n" + "".join(
            f"79{i:09d},Привет {i}\n" for i in range(1000)), encoding="utf-8")
        env = {"DLR_DATABASE_URL": settings.database_url, "DLR_BULK_URL": s.sim_url + "/",
               "DLR_BULK_USER": USER, "DLR_BULK_SECRET_KEY": SECRET, "DLR_BULK_FROM": "Shop"}
        runner = CliRunner()
        first = runner.invoke(cli, ["send", "--csv", str(csv_file), "--rate", "100000"], env=env)
        assert first.exit_code == 0, first.output
        assert "1000 accepted" in first.stdout
        assert len(s.sim.sent) == 1000
        rows = s.api.get("/api/v1/messages",
                         params={"p_transaction_id": "spring-1000"}).json()["items"]
        assert rows[0]["phone"] == "79000000999" and rows[0]["status"] == "accepted"
        # Every row carries the campaign's label (the file's name, with no --campaign), and
        # the campaign can be followed as one.
        assert rows[0]["campaign"] == "spring"
        campaign = s.api.get("/api/v1/stats", params={"campaign": "spring"}).json()
        assert campaign["total"] == 1000 and campaign["by_status"]["accepted"] == 1000
        listed = s.api.get("/api/v1/campaigns").json()["items"]
        assert [(c["campaign"], c["messages"]) for c in listed] == [("spring", 1000)]
        again = runner.invoke(cli, ["send", "--csv", str(csv_file), "--rate", "100000"], env=env)
        assert again.exit_code == 0, again.output
        assert "1000 skipped" in again.stdout
        assert len(s.sim.requests) == 1000  # nothing new went out
    finally:
        gen.close()
    from app.store.models import Message
    assert count(engine, Message) == 1000


def test_cli_send_and_upload_one(settings: Settings, engine: Engine, tmp_path: Path) -> None:
    gen = stack_for(settings)
    s = next(gen)
    try:
        env = {"DLR_DATABASE_URL": settings.database_url, "DLR_BULK_URL": s.sim_url + "/",
               "DLR_MEDIA_URL": s.sim_url + "/upload/", "DLR_BULK_USER": USER,
               "DLR_BULK_SECRET_KEY": SECRET}
        runner = CliRunner()
        image = tmp_path / "banner.gif"
        image.write_bytes(GIF_1X1)
        up = runner.invoke(cli, ["upload", str(image)], env=env)
        assert up.exit_code == 0, up.output
        image_id = up.stdout.strip()
        assert image_id in s.sim.images
        sent = runner.invoke(cli, ["send", "--phone", "79031234567", "--from", "Shop",
                                   "--image-id", image_id, "--campaign", "banner-week"],
                             env=env)
        assert sent.exit_code == 0, sent.output
        assert "accepted" in sent.stdout
        msg_id = sent.stdout.split()[-1]
        assert s.api.get(f"/api/v1/messages/{msg_id}").json()["campaign"] == "banner-week"
        assert "campaign" not in s.sim.requests[-1]  # a label of ours, not the provider's
        assert s.sim.requests[-1]["image_id"] == [image_id]
        assert s.sim.requests[-1]["from"] == ["Shop"]
        not_image = tmp_path / "notes.png"
        not_image.write_text("hello")
        bad = runner.invoke(cli, ["upload", str(not_image)], env=env)
        assert bad.exit_code == 2 and "not a JPG, PNG or GIF" in bad.stderr
        missing = runner.invoke(cli, ["send", "--phone", "79031234567", "--txt", "hi"],
                                env=env)  # no --from and no DLR_BULK_FROM
        assert missing.exit_code == 2 and "from is required" in missing.stderr
    finally:
        gen.close()


# --- issue 14: the provider's language end to end ----------------------------------------------

def test_sms_is_reported_as_the_provider_does(stack: Stack) -> None:
    # The stack asks for seen and reply on everything; an SMS still gets neither.
    r = stack.api.post("/api/v1/messages", json={"phone": ["79031234567"], "txt": "hi",
                                                 "sending_method": "sms"})
    assert r.status_code == 200, r.text
    [msg_id] = r.json()["msg_ids"].values()
    stack.wait_for_dlrs()
    m = stack.api.get(f"/api/v1/messages/{msg_id}").json()
    assert (m["status"], m["kind"], m["seen_at"], m["replies"]) == ("delivered", "sms", None, [])
    assert {(e["type"], e["status"]) for e in m["events"]} == {
        ("delivery", "in_process"), ("delivery", "delivered")}


def test_a_numeric_report_for_a_viber_message_is_not_called_sms(stack: Stack) -> None:
    stack.sim.emit_dlrs = False
    r = stack.api.post("/api/v1/messages", json={"phone": ["79031234567"], "txt": "hi"})
    [msg_id] = r.json()["msg_ids"].values()
    # The SMS fallback's report: numeric status, no type.
    assert stack.api.post("/dlr", data={"msg_id": msg_id, "status": "-2"}).status_code == 200
    m = stack.api.get(f"/api/v1/messages/{msg_id}")
    assert (m.json()["status"], m.json()["status_extended"], m.json()["kind"]) == (
        "undelivered", "STATUS_-2", "text")
    assert "SMS" not in m.text
    stats = stack.api.get("/api/v1/stats")
    assert "STATUS_-2" in stats.text and "SMS" not in stats.text


def test_delay_reaches_the_provider(settings: Settings, engine: Engine) -> None:
    gen = stack_for(settings, undelivered_rate=0.0, seen_rate=0.0, reply_rate=0.0)
    s = next(gen)
    try:
        r = s.api.post("/api/v1/messages", json={"phone": ["79031234567"], "txt": "later",
                                                 "delay": 5})
        assert r.status_code == 200, r.text
        assert s.sim.requests[-1]["delay"] == ["5"]
        s.wait_for_dlrs()  # five (scaled) minutes later
        [msg_id] = r.json()["msg_ids"].values()
        assert s.api.get(f"/api/v1/messages/{msg_id}").json()["status"] == "delivered"
        assert s.api.post("/api/v1/messages", json={
            "phone": ["79031234567"], "txt": "x", "delay": 10081}).status_code == 422
        env = {"DLR_DATABASE_URL": settings.database_url, "DLR_BULK_URL": s.sim_url + "/",
               "DLR_BULK_USER": USER, "DLR_BULK_SECRET_KEY": SECRET, "DLR_BULK_FROM": "Shop"}
        sent = CliRunner().invoke(cli, ["send", "--phone", "79031234567", "--txt", "hi",
                                        "--delay", "7"], env=env)
        assert sent.exit_code == 0, sent.output
        assert s.sim.requests[-1]["delay"] == ["7"]
    finally:
        gen.close()


def test_a_wrong_upload_sign_uppercase_is_refused_by_the_provider(stack: Stack) -> None:
    wrong = make_settings(
        database_url=stack.settings.database_url, bulk_url=f"{stack.sim_url}/",
        media_url=f"{stack.sim_url}/upload/", bulk_user=USER, bulk_secret_key=SECRET,
        upload_sign_uppercase=True)
    with serving_in_thread(create_app(wrong)) as url, httpx.Client(base_url=url) as api:
        r = api.post("/api/v1/images", files={"image": ("a.gif", GIF_1X1)})
    assert (r.status_code, r.json()["code"], r.json()["tech_message"]) == (502, 2,
                                                                           "Invalid sign")
    assert stack.sim.images == {}
