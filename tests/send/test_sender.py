"""The send module's pure parts: signatures, message building, limits, answers, retry table."""

from __future__ import annotations

import hashlib
from types import SimpleNamespace
from urllib.parse import parse_qsl

import pytest
from pydantic import ValidationError

from app.send import signing
from app.send.answers import (
    MalformedAnswer,
    parse_bulk_answer,
    parse_upload_answer,
    should_retry,
)
from app.send.media import BadImage, check_image
from app.send.messages import Kind, SendRequest
from app.send.signing import sign_send, sign_upload

BULOK = "Съешь еще этих французских булок"
PHONE, PHONE_2 = "79031234567", "79165557755"
# The vendor's account in ../shared/signature-vectors.md, and its signatures.
VENDOR = {"user": "hitfm", "secret_key": "test_key"}
SIGN_ONE_PHONE = "29def94e0f987855bbf4407e93b088d7"
SIGN_TWO_PHONES = "f7d36db5c9966c6200de7c8f3dcc890a"
SIGN_NO_TXT = "10302fcc22e9c3a36a4f064a15695972"
# The vendor's GET example, exactly as published there.
VENDOR_EXAMPLE = (
    "user=hitfm&from=HitFM&phone=79031234567&txt=%D0%A1%D1%8A%D0%B5%D1%88%D1%8C%20%D0%B5%D1%89"
    "%D0%B5%20%D1%8D%D1%82%D0%B8%D1%85%20%D1%84%D1%80%D0%B0%D0%BD%D1%86%D1%83%D0%B7%D1%81%D0%BA"
    "%D0%B8%D1%85%20%D0%B1%D1%83%D0%BB%D0%BE%D0%BA&sign=29def94e0f987855bbf4407e93b088d7")

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
    req = SendRequest.model_validate({"phone": [PHONE], "txt": BULOK, "from": "HitFM",
                                      "p_transaction_id": "x"})
    pairs = parse_qsl(req.form_body(**VENDOR).decode())
    published = parse_qsl(VENDOR_EXAMPLE)
    # Every published parameter, in the published order, with the published signature; the
    # others (sending_method, dlr, p_transaction_id) are not signed.
    names = {name for name, _ in published}
    assert [pair for pair in pairs if pair[0] in names] == published
    assert ("txt", BULOK) in pairs and dict(pairs)["sign"] == SIGN_ONE_PHONE


def test_upload_signature_matches_the_documents_example(monkeypatch: pytest.MonkeyPatch
                                                        ) -> None:
    """API §3: sign = md5(onvUser + 03806EA9F48D2A9196C1CEAAED832EC6 + 4GD2dh5FAa032), giving
    442565d4... (../shared/signature-vectors.md). The document publishes the file's md5, not
    the file, so a file whose md5 is that one stands in for it."""
    image = b"the document's example image"
    real = hashlib

    def md5(data: bytes) -> object:
        if data == image:
            return SimpleNamespace(hexdigest=lambda: "03806ea9f48d2a9196c1ceaaed832ec6")
        return real.md5(data)

    monkeypatch.setattr(signing, "hashlib", SimpleNamespace(md5=md5))
    # The document writes the inner hash in upper case: that spelling gives its signature.
    assert sign_upload(login="onvUser", image=image, secret_key="4GD2dh5FAa032",
                       uppercase_inner=True) == "442565d4f64e01ad93543fe764c0b03f"
    # The default is the vendor samples' lower case (PHP's md5_file): another signature.
    lower = sign_upload(login="onvUser", image=image, secret_key="4GD2dh5FAa032")
    assert lower != "442565d4f64e01ad93543fe764c0b03f"
    assert len(lower) == 32 and lower == lower.lower()


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
    # The vendor's example with a delay: still the example's published signature.
    req = build(txt=BULOK, delay=90, p_transaction_id="p1", **{"from": "HitFM"})
    pairs = parse_qsl(req.form_body(**VENDOR).decode())
    assert ("delay", "90") in pairs and ("sending_method", "viber") in pairs
    assert dict(pairs)["sign"] == SIGN_ONE_PHONE
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
    req = build(txt=BULOK, phone=[PHONE, PHONE_2], p_transaction_id="p1", **{"from": "HitFM"})
    pairs = parse_qsl(req.form_body(**VENDOR).decode())
    assert [v for k, v in pairs if k == "phone"] == [PHONE, PHONE_2]
    assert ("dlr", "1") in pairs and ("sending_method", "viber") in pairs
    assert dict(pairs)["sign"] == SIGN_TWO_PHONES  # the vendor's two-phone example


@pytest.mark.parametrize(("charset", "codec"), [("CP1251", "cp1251"), ("UCS-2", "utf-16-be"),
                                                ("UTF-16BE", "utf-16-be"), ("utf8", "utf-8")])
def test_charset_text_is_sent_and_signed_as_those_bytes(charset: str, codec: str) -> None:
    req = build(txt=BULOK, charset=charset, p_transaction_id="p", **{"from": "HitFM"})
    body = req.form_body(**VENDOR).decode("ascii")
    pairs = dict(parse_qsl(body, encoding="latin-1"))
    sent = pairs["txt"].encode("latin-1")
    assert sent == BULOK.encode(codec)
    # sign_send is pinned to the published vectors above; here: it signs the bytes sent.
    assert pairs["sign"] == sign_send(user="hitfm", sender="HitFM", phones=[PHONE],
                                      txt=BULOK.encode(codec), secret_key="test_key")
    # In UTF-8 those bytes are the vendor's example; in another charset they are not.
    assert (pairs["sign"] == SIGN_ONE_PHONE) is (codec == "utf-8")


def test_picture_only_is_signed_without_txt() -> None:
    req = build(image_id="IMG", p_transaction_id="p", **{"from": "HitFM"})
    pairs = dict(parse_qsl(req.form_body(**VENDOR).decode()))
    assert "txt" not in pairs
    assert pairs["sign"] == SIGN_NO_TXT  # the vectors' "formula without txt" row


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
