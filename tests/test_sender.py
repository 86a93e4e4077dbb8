"""The send module's pure parts: signatures, message building, limits, answers, retry table."""

from __future__ import annotations

import hashlib
from urllib.parse import parse_qsl

import pytest
from pydantic import ValidationError

from app.sender.answers import (
    MalformedAnswer,
    parse_bulk_answer,
    parse_upload_answer,
    should_retry,
)
from app.sender.media import BadImage, check_image
from app.sender.messages import Kind, SendRequest
from app.sender.signing import sign_send, sign_upload

BULOK = "Съешь еще этих французских булок"

# ../shared/signature-vectors.md, every row.
SEND_VECTORS = [
    ("hitfm", "HitFM", ["79031234567"], BULOK, "test_key", "29def94e0f987855bbf4407e93b088d7"),
    ("hitfm", "HitFM", ["79031234567", "79165557755"], BULOK, "test_key",
     "f7d36db5c9966c6200de7c8f3dcc890a"),
    ("hitfm", "HitFM", ["79031234567"], None, "test_key", "10302fcc22e9c3a36a4f064a15695972"),
    ("onvUser", "Sender", ["79041231231"], "hello", "4Ab2ln4FEa32",
     "ac748f3290de34c2bd7aec56f3100e29"),
]


@pytest.mark.parametrize(("user", "sender", "phones", "txt", "key", "sign"), SEND_VECTORS)
def test_send_signature_vectors(user: str, sender: str, phones: list[str], txt: str | None,
                                key: str, sign: str) -> None:
    assert sign_send(user=user, sender=sender, phones=phones, txt=txt, secret_key=key) == sign


def test_vendor_get_example_body_is_reproduced() -> None:
    req = SendRequest(phone=["79031234567"], txt=BULOK, **{"from": "HitFM"},
                      p_transaction_id="x")
    pairs = parse_qsl(req.form_body(user="hitfm", secret_key="test_key").decode())
    assert ("sign", "29def94e0f987855bbf4407e93b088d7") in pairs
    assert ("txt", BULOK) in pairs


def test_upload_signature_both_spellings() -> None:
    # The document's example: md5(login + UPPER-CASE inner md5 + key).
    inner = "03806EA9F48D2A9196C1CEAAED832EC6"
    assert hashlib.md5(f"onvUser{inner}4GD2dh5FAa032".encode()).hexdigest() == \
        "442565d4f64e01ad93543fe764c0b03f"
    data = b"\x89PNG\r\n\x1a\nfake"
    lower = sign_upload(login="u", image=data, secret_key="k")
    upper = sign_upload(login="u", image=data, secret_key="k", uppercase_inner=True)
    md5 = hashlib.md5(data).hexdigest()
    assert lower == hashlib.md5(f"u{md5}k".encode()).hexdigest()
    assert upper == hashlib.md5(f"u{md5.upper()}k".encode()).hexdigest()


def build(**fields: object) -> SendRequest:
    return SendRequest.model_validate({"phone": ["79031234567"], "from": "Shop"} | fields)


@pytest.mark.parametrize(
    ("fields", "kind"),
    [
        ({"txt": "hi"}, Kind.TEXT),
        ({"image_id": "IMG"}, Kind.PICTURE),
        ({"txt": "hi", "button_text": "Go", "button_link": "https://e.x"}, Kind.TEXT_BUTTON),
        ({"txt": "hi", "image_id": "IMG", "button_text": "Go", "button_link": "https://e.x"},
         Kind.TEXT_PICTURE_BUTTON),
        ({"txt": "hi", "button_text": "Go"}, Kind.TEXT),  # half a button shows as text only
        ({"txt": "hi", "sending_method": "sms"}, Kind.SMS),
    ],
)
def test_message_kinds(fields: dict[str, str], kind: Kind) -> None:
    assert build(**fields).kind is kind


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"txt": "x" * 2049}, "at most 2048"),
        ({"txt": "hi", "from": "TwelveChars!"}, "at most 11"),
        ({"txt": "hi", "button_text": "b" * 31, "button_link": "l"}, "at most 30"),
        ({"txt": "hi", "button_text": "b", "button_link": "l" * 2049}, "at most 2048"),
        ({"image_id": "i" * 65}, "at most 64"),
        ({"txt": "hi", "dlr_timeout": 59}, "greater than or equal to 60"),
        ({"txt": "hi", "dlr_timeout": 86401}, "less than or equal to 86400"),
        ({"txt": "hi", "phone": ["+79031234567"]}, "digits"),
        ({"txt": "hi", "phone": ["7903 123"]}, "digits"),
        ({"txt": "hi", "phone": []}, "at least 1"),
        ({}, "needs txt, image_id"),
        ({"sending_method": "sms", "image_id": "i"}, "SMS needs txt"),
        ({"txt": "hi", "image_id": "i"}, "needs button_text and button_link"),
        ({"txt": "hi", "charset": "KOI8-R"}, "charset must be one of"),
        ({"txt": "€ ok", "charset": "CP1251"}, None),
        ({"txt": "日本", "charset": "CP1251"}, "cannot be encoded as CP1251"),
        ({"txt": "hi", "delay": 0}, "greater than or equal to 1"),
        ({"txt": "hi", "delay": 10081}, "less than or equal to 10080"),
        ({"txt": "hi", "delay": 10080}, None),
        ({"txt": "hi", "delay": 1, "sending_method": "sms"}, None),
        ({"txt": "hi", "from": "Shop-1"}, "only Latin letters, digits and spaces"),
        ({"txt": "hi", "from": "Магазин"}, "only Latin letters, digits and spaces"),
        ({"txt": "hi", "from": "Shop.ru"}, "only Latin letters, digits and spaces"),
        ({"txt": "hi", "from": "My Shop 24"}, None),
    ],
)
def test_limits_are_checked_before_sending(fields: dict[str, object], message: str | None
                                           ) -> None:
    if message is None:
        build(**fields)
        return
    with pytest.raises(ValidationError, match=message):
        build(**fields)


def test_from_falls_back_to_the_setting_and_ptid_is_generated() -> None:
    req = SendRequest(phone=["79031234567"], txt="hi").with_defaults(default_sender="Dflt")
    assert req.sender == "Dflt" and req.p_transaction_id and len(req.p_transaction_id) == 32
    with pytest.raises(ValueError, match="from is required"):
        SendRequest(phone=["79031234567"], txt="hi").with_defaults(default_sender=None)


def test_a_default_sender_is_held_to_the_same_characters() -> None:
    with pytest.raises(ValueError, match="only Latin letters"):
        SendRequest(phone=["79031234567"], txt="hi").with_defaults(default_sender="Магазин")


def test_delay_goes_out_unsigned_and_sending_method_always_goes_out() -> None:
    req = build(txt="hi", delay=90, p_transaction_id="p1")
    pairs = parse_qsl(req.form_body(user="u", secret_key="k").decode())
    assert ("delay", "90") in pairs and ("sending_method", "viber") in pairs
    assert dict(pairs)["sign"] == sign_send(user="u", sender="Shop", phones=["79031234567"],
                                            txt="hi", secret_key="k")
    no_delay = parse_qsl(build(txt="hi", sending_method="sms").form_body(
        user="u", secret_key="k").decode())
    assert "delay" not in dict(no_delay) and ("sending_method", "sms") in no_delay


def test_delay_in_a_json_body_is_minutes() -> None:
    req = SendRequest.model_validate_json(
        '{"phone": ["79031234567"], "from": "Shop", "txt": "hi", "delay": 60}')
    assert req.delay == 60
    with pytest.raises(ValidationError, match="delay"):
        SendRequest.model_validate_json(
            '{"phone": ["79031234567"], "from": "Shop", "txt": "hi", "delay": "soon"}')


def test_form_body_repeats_phones_in_order_and_asks_for_dlrs() -> None:
    req = build(txt="hi", phone=["79031234567", "79165557755"], p_transaction_id="p1")
    pairs = parse_qsl(req.form_body(user="u", secret_key="k").decode())
    assert [v for k, v in pairs if k == "phone"] == ["79031234567", "79165557755"]
    assert ("dlr", "1") in pairs and ("sending_method", "viber") in pairs
    assert dict(pairs)["sign"] == sign_send(user="u", sender="Shop",
                                            phones=["79031234567", "79165557755"], txt="hi",
                                            secret_key="k")


@pytest.mark.parametrize(("charset", "codec"), [("CP1251", "cp1251"), ("UCS-2", "utf-16-be"),
                                                ("UTF-16BE", "utf-16-be"), ("utf8", "utf-8")])
def test_charset_text_is_sent_and_signed_as_those_bytes(charset: str, codec: str) -> None:
    req = build(txt=BULOK, charset=charset, p_transaction_id="p")
    body = req.form_body(user="u", secret_key="k").decode("ascii")
    pairs = dict(parse_qsl(body, encoding="latin-1"))
    sent = pairs["txt"].encode("latin-1")
    assert sent == BULOK.encode(codec)
    assert pairs["sign"] == sign_send(user="u", sender="Shop", phones=["79031234567"],
                                      txt=BULOK.encode(codec), secret_key="k")


def test_picture_only_is_signed_without_txt() -> None:
    req = build(image_id="IMG", p_transaction_id="p")
    pairs = dict(parse_qsl(req.form_body(user="hitfm", secret_key="test_key").decode()))
    assert "txt" not in pairs
    assert pairs["sign"] == sign_send(user="hitfm", sender="Shop", phones=["79031234567"],
                                      txt=None, secret_key="test_key")


def test_parse_the_documents_answers() -> None:
    ok = parse_bulk_answer(b"""<?xml version="1.0"?>
<response>
  <tech_message>OK</tech_message>
  <code>0</code>
  <msg_id phone="79031234567">550e8400-e29b-41d4-a716-446655440000</msg_id>
  <msg_id phone="79165557755">550e8400-e29b-41d4-a716-446655440001</msg_id>
</response>""")
    assert ok.ok and ok.msg_ids == {"79031234567": "550e8400-e29b-41d4-a716-446655440000",
                                    "79165557755": "550e8400-e29b-41d4-a716-446655440001"}
    err = parse_bulk_answer(b'<?xml version="1.0" encoding="utf-8"?>\n<response>\n'
                            b"<code>-1</code>\n<tech_message>PARAM ERROR (phone)</tech_message>"
                            b"\n</response>")
    assert (err.code, err.tech_message, err.ok) == (-1, "PARAM ERROR (phone)", False)


@pytest.mark.parametrize("body", [
    b"",
    b"<response><code>0</code>",
    b"<html>502 Bad Gateway</html>",
    b"<response><code>zero</code></response>",
    b"<response><code>0</code><msg_id>no-phone</msg_id></response>",
    # Entity expansion (billion laughs) and an external entity: refused, never expanded.
    b'<?xml version="1.0"?><!DOCTYPE r [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;">]>'
    b"<response><code>0</code><tech_message>&b;</tech_message></response>",
    b'<?xml version="1.0"?><!DOCTYPE r [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
    b"<response><code>0</code><tech_message>&x;</tech_message></response>",
])
def test_malformed_or_hostile_answers_are_errors(body: bytes) -> None:
    with pytest.raises(MalformedAnswer):
        parse_bulk_answer(body)


def test_retry_table() -> None:
    assert [c for c in (0, -1, -2, -3, -4, -5, -6, -99) if should_retry(c)] == [-2, -4, -6]


def test_upload_answers_including_the_documents_loose_json() -> None:
    ok = parse_upload_answer(b'{"status": 0, "image_id": "AVESK8VHUQA8"}')
    assert ok.ok and ok.image_id == "AVESK8VHUQA8"
    bad = parse_upload_answer(b'{"status": 2, error: "Invalid sign"}')
    assert (bad.ok, bad.status, bad.error, bad.meaning) == (False, 2, "Invalid sign",
                                                             "Invalid signature")
    with pytest.raises(MalformedAnswer):
        parse_upload_answer(b"<html>")


def test_images_are_judged_by_content() -> None:
    assert check_image(b"GIF89a....", max_bytes=100)[1] == "gif"
    assert check_image(b"\xff\xd8\xff\xe0....", max_bytes=100)[1] == "jpg"
    with pytest.raises(BadImage, match="not a JPG, PNG or GIF"):
        check_image(b"%PDF-1.4", max_bytes=100)
    with pytest.raises(BadImage, match="limit is 10"):
        check_image(b"GIF89a" + b"0" * 10, max_bytes=10)
