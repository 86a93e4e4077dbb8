"""A message to send: its fields as the provider document names them, its limits, its kind,
and the signed form body that goes out."""

from __future__ import annotations

import re
import uuid
from enum import StrEnum
from typing import Annotated, Literal
from urllib.parse import urlencode

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from app.send.signing import sign_send

PHONE = re.compile(r"^[0-9]{7,15}$")  # international format, digits only, no "+"
# The sender name the provider's public documentation allows: Latin letters, digits, spaces.
SENDER = re.compile(r"^[A-Za-z0-9 ]+$")
SENDER_RULE = "from may contain only Latin letters, digits and spaces"
MAX_DELAY_MINUTES = 10080  # a week, the documented maximum of `delay`

# The document's charset names, and the codec each means.
CHARSETS = {
    "UTF8": "utf-8",
    "UTF-8": "utf-8",
    "UTF-16BE": "utf-16-be",
    "UCS-2": "utf-16-be",
    "CP1251": "cp1251",
}


class Kind(StrEnum):
    TEXT = "text"
    PICTURE = "picture"
    TEXT_BUTTON = "text_button"
    TEXT_PICTURE_BUTTON = "text_picture_button"
    SMS = "sms"


class SendRequest(BaseModel):
    """One request to the bulk API. Limits of the document are checked here, before sending."""

    model_config = ConfigDict(populate_by_name=True, extra="forbid")

    phone: Annotated[list[str], Field(min_length=1, max_length=1000)]
    txt: Annotated[str | None, Field(max_length=2048)] = None
    sender: Annotated[str | None, Field(alias="from", max_length=11, min_length=1)] = None
    image_id: Annotated[str | None, Field(max_length=64, min_length=1)] = None
    button_text: Annotated[str | None, Field(max_length=30, min_length=1)] = None
    button_link: Annotated[str | None, Field(max_length=2048, min_length=1)] = None
    sending_method: Literal["viber", "sms"] = "viber"
    p_transaction_id: Annotated[str | None, Field(max_length=255, min_length=1)] = None
    # Not sent to the provider: the label every message of this request is recorded with.
    campaign: Annotated[str | None, Field(
        max_length=64, min_length=1, pattern=r"^[^\x00-\x1f\x7f]+$",
        description="Campaign label recorded with every message (not sent to the provider)",
    )] = None
    dlr: Literal[0, 1] = 1
    dlr_timeout: Annotated[int | None, Field(ge=60, le=86400)] = None
    delay: Annotated[int | None, Field(ge=1, le=MAX_DELAY_MINUTES, description=(
        "Defer the send by this many minutes (SMS and Viber)"))] = None
    expiry_txt: Annotated[str | None, Field(max_length=2048)] = None
    charset: str | None = None

    @field_validator("phone")
    @classmethod
    def _digits_only(cls, phones: list[str]) -> list[str]:
        for p in phones:
            if not PHONE.match(p):
                raise ValueError(f"phone {p!r} must be 7 to 15 digits, no '+' or spaces")
        if len(set(phones)) != len(phones):
            raise ValueError("a phone appears twice in one request")
        return phones

    @field_validator("sender")
    @classmethod
    def _sender_characters(cls, value: str | None) -> str | None:
        if value is not None and not SENDER.match(value):
            raise ValueError(SENDER_RULE)
        return value

    @field_validator("charset")
    @classmethod
    def _known_charset(cls, value: str | None) -> str | None:
        if value is None:
            return None
        name = value.upper()
        if name not in CHARSETS:
            raise ValueError(f"charset must be one of {', '.join(CHARSETS)}")
        return name

    @model_validator(mode="after")
    def _a_known_kind(self) -> SendRequest:
        if self.sending_method == "sms":
            if not self.txt:
                raise ValueError("an SMS needs txt")
            if self.image_id or self.button_text or self.button_link:
                raise ValueError("an SMS carries no image or button")
        elif not self.txt and not self.image_id:
            raise ValueError("a Viber message needs txt, image_id, or both")
        elif self.image_id and self.txt and not (self.button_text and self.button_link):
            raise ValueError("txt with image_id needs button_text and button_link "
                             "(the provider has no text + picture kind without a button)")
        elif self.image_id and not self.txt and (self.button_text or self.button_link):
            raise ValueError("a button needs txt")
        if self.txt is not None:
            try:
                self.encoded_txt()
            except UnicodeEncodeError:
                raise ValueError(f"txt cannot be encoded as {self.charset}") from None
        return self

    @property
    def kind(self) -> Kind:
        if self.sending_method == "sms":
            return Kind.SMS
        if self.image_id and not self.txt:
            return Kind.PICTURE
        if self.button_text and self.button_link:
            return Kind.TEXT_PICTURE_BUTTON if self.image_id else Kind.TEXT_BUTTON
        return Kind.TEXT  # a button half-given shows as text only (section 1.1)

    def encoded_txt(self) -> bytes | None:
        if self.txt is None:
            return None
        return self.txt.encode(CHARSETS.get(self.charset or "UTF-8", "utf-8"))

    def with_defaults(self, *, default_sender: str | None) -> SendRequest:
        """Fill `from` from the settings and generate a p_transaction_id when none is given."""
        sender = self.sender or default_sender
        if not sender:
            raise ValueError("from is required (or set DLR_BULK_FROM)")
        if len(sender) > 11:
            raise ValueError("from must be at most 11 characters")
        if not SENDER.match(sender):
            raise ValueError(SENDER_RULE)
        return self.model_copy(update={
            "sender": sender,
            "p_transaction_id": self.p_transaction_id or uuid.uuid4().hex,
        })

    def form_body(self, *, user: str, secret_key: str) -> bytes:
        """The signed application/x-www-form-urlencoded body, phones repeated in order.

        `sending_method` always goes out: provider-api.txt makes it mandatory, although the
        provider reads a request without it as SMS."""
        assert self.sender is not None, "call with_defaults() first"
        txt = self.encoded_txt()
        pairs: list[tuple[str, str | bytes]] = [
            ("user", user), ("from", self.sender), ("sending_method", self.sending_method),
        ]
        pairs += [("phone", p) for p in self.phone]
        if txt is not None:
            pairs.append(("txt", txt))
        for name in ("image_id", "button_text", "button_link", "p_transaction_id",
                     "expiry_txt", "charset"):
            value = getattr(self, name)
            if value is not None:
                pairs.append((name, value))
        pairs.append(("dlr", str(self.dlr)))
        if self.dlr_timeout is not None:
            pairs.append(("dlr_timeout", str(self.dlr_timeout)))
        if self.delay is not None:
            pairs.append(("delay", str(self.delay)))
        sign = sign_send(user=user, sender=self.sender, phones=self.phone, txt=txt,
                         secret_key=secret_key)
        pairs.append(("sign", sign))
        return urlencode(pairs).encode("ascii")
