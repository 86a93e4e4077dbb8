"""Reading callback fields as notifications: the provider's vocabulary and its variants."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from app.core.notifications import (
    NUMERIC_STATUS_EXTENDED_MEANING,
    Invalid,
    Status,
    interpret,
    msg_key,
    shown_status_extended,
)

from ..helpers import UUID_A

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def read(**fields: str):  # type: ignore[no-untyped-def]
    return interpret(fields, received_at=NOW)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("delivered", Status.DELIVERED),
        ("undelivered", Status.UNDELIVERED),
        ("in process", Status.IN_PROCESS),
        ("in_process", Status.IN_PROCESS),
        ("In Process", Status.IN_PROCESS),
        ("buffered", Status.IN_PROCESS),
        ("BUFFERED", Status.IN_PROCESS),
        ("Delivered", Status.DELIVERED),
    ],
)
def test_status_words(raw: str, expected: Status) -> None:
    n = read(type="delivery", msg_id="m1", status=raw)
    assert n.status is expected
    assert n.message_status is expected


@pytest.mark.parametrize(
    ("code", "status", "extended"),
    [
        ("0", Status.DELIVERED, None),
        ("1", Status.IN_PROCESS, None),
        ("2", Status.IN_PROCESS, None),  # absent (older documentation): still queued
        ("3", Status.IN_PROCESS, None),  # preparing (older documentation)
        ("4", Status.IN_PROCESS, None),
        ("-1", Status.UNDELIVERED, "SMS_-1"),
        ("-2", Status.UNDELIVERED, "SMS_-2"),
        ("-3", Status.UNDELIVERED, "SMS_-3"),
        ("-11", Status.UNDELIVERED, "SMS_-11"),
        ("-12", Status.UNDELIVERED, "SMS_-12"),
    ],
)
def test_sms_reports_without_type_are_deliveries(
    code: str, status: Status, extended: str | None
) -> None:
    n = read(msg_id="sms-1", status=code)
    assert (n.type, n.status, n.status_extended) == ("delivery", status, extended)
    assert not n.unknown_status_extended


def test_a_numeric_report_names_no_channel_on_a_viber_message() -> None:
    # Stored as the contract names it; a Viber message that fell back to SMS gets the numeric
    # report too, and shows it with no "SMS" label.
    for fields in ({"msg_id": "m", "status": "-2"},
                   {"type": "delivery", "msg_id": "m", "status": "-2"}):
        n = read(**fields)
        assert (n.status, n.status_extended) == (Status.UNDELIVERED, "SMS_-2")
        assert shown_status_extended(n.status_extended, "text") == "STATUS_-2"
        assert shown_status_extended(n.status_extended, "sms") == "SMS_-2"
        assert shown_status_extended(n.status_extended, None) == "SMS_-2"
    meanings = NUMERIC_STATUS_EXTENDED_MEANING
    assert all("SMS" not in meanings[f"STATUS_{code}"] for code in ("-1", "-2", "-3", "-11", "-12"))


def test_earlier_sms_labels_stay_known_and_explained() -> None:
    n = read(type="delivery", msg_id="m", status="undelivered", status_extended="SMS_-2")
    assert not n.unknown_status_extended
    assert NUMERIC_STATUS_EXTENDED_MEANING["SMS_-2"] == NUMERIC_STATUS_EXTENDED_MEANING["STATUS_-2"]


def test_the_dashboard_explains_the_neutral_codes() -> None:
    from app.query.dashboard import page

    html = page()
    assert '"STATUS_-2": "Expired' in html and '"SMS_-2": "Expired' in html


def test_known_status_extended_is_not_flagged() -> None:
    n = read(type="delivery", msg_id="m", status="undelivered",
             status_extended="VIBER_USER_NOT_FOUND")
    assert n.status_extended == "VIBER_USER_NOT_FOUND"
    assert not n.unknown_status_extended


def test_unknown_status_extended_is_kept_and_flagged() -> None:
    n = read(type="delivery", msg_id="m", status="undelivered", status_extended="NEW_CODE_2027")
    assert n.status_extended == "NEW_CODE_2027"
    assert n.unknown_status_extended


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"msg_id": "m"}, "missing type"),
        ({"type": "delivered", "msg_id": "m"}, "unknown type"),
        ({"type": "seen"}, "missing msg_id"),
        ({"type": "seen", "msg_id": "x" * 37}, "longer than 36"),
        ({"type": "delivery", "msg_id": "m"}, "without status"),
        ({"type": "delivery", "msg_id": "m", "status": "lost"}, "unknown status"),
        ({"msg_id": "m", "status": "7"}, "unknown status"),
        ({"type": "seen", "msg_id": "a\udcffb"}, "not printable"),
    ],
)
def test_invalid_fields_say_why(fields: dict[str, str], reason: str) -> None:
    with pytest.raises(Invalid, match=reason):
        interpret(fields, received_at=NOW)


def test_uuid_msg_ids_match_whatever_the_letter_case() -> None:
    upper = read(type="seen", msg_id=UUID_A.upper())
    lower = read(type="seen", msg_id=UUID_A)
    assert upper.msg_key == lower.msg_key == UUID_A
    assert upper.msg_id == UUID_A.upper()  # stored as received
    assert upper.dedupe_key == lower.dedupe_key
    assert msg_key("AbC-1") == "AbC-1"  # other ids are matched exactly


def test_same_notification_same_key_and_different_ones_differ() -> None:
    base = {"type": "delivery", "msg_id": "m", "status": "undelivered",
            "status_extended": "VIBER_EXPIRED"}
    keys = {
        read(**base).dedupe_key,
        read(**base, p_transaction_id="ignored-for-identity").dedupe_key,
    }
    assert len(keys) == 1
    assert read(**{**base, "status_extended": "SPAM_DETECTED"}).dedupe_key not in keys
    assert read(**{**base, "status": "delivered"}).dedupe_key not in keys
    assert read(type="reply", msg_id="m", text="a").dedupe_key != read(
        type="reply", msg_id="m", text="b").dedupe_key


def test_reply_text_that_is_not_utf8_is_kept_byte_for_byte() -> None:
    raw = b"caf\xe9 \x00ok"
    n = read(type="reply", msg_id="m", text=raw.decode("utf-8", "surrogateescape"))
    assert n.text_raw == raw
    assert n.text == "caf\ufffd \ufffdok"


def test_reply_text_any_unicode() -> None:
    n = read(type="reply", msg_id="m", text="Спасибо 👍")
    assert (n.text, n.text_raw) == ("Спасибо 👍", None)
    assert n.message_status is None  # a reply never changes the status
