"""What a callback means: the provider's vocabulary, and turning raw fields into a notification.

Nothing here touches HTTP or the database. `interpret(fields)` takes the merged query and
body fields (strings that may carry undecodable bytes as surrogate escapes) and returns
either a `Notification` or a `Rejection` with a reason a person can act on.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum


class Status(StrEnum):
    ACCEPTED = "accepted"
    IN_PROCESS = "in_process"
    DELIVERED = "delivered"
    UNDELIVERED = "undelivered"
    SEEN = "seen"


# seen > delivered = undelivered > in_process > accepted. Equal ranks: the later one wins.
RANK = {
    Status.ACCEPTED: 0,
    Status.IN_PROCESS: 1,
    Status.DELIVERED: 2,
    Status.UNDELIVERED: 2,
    Status.SEEN: 3,
}
FINAL_RANK = 2


TYPES = ("delivery", "seen", "reply")

# Section 2.1.1 of the provider document.
STATUS_EXTENDED_MEANING = {
    "VIBER_BLOCKED_BY_USER": "The sender is blocked by the user",
    "VIBER_USER_NOT_FOUND": "Viber app is not installed on the user's device",
    "VIBER_NO_DEVICE": "Viber messages are not available on the user's device",
    "VIBER_EXPIRED": "DLR time limit expired (see dlr_timeout)",
    "VIBER_UNKNOWN_ERROR": "Unknown error",
    "INVALID_SESSION": "The session is not available",
    "PHONE_BLACKLISTED": "The number is blacklisted or messaging is not permitted",
    "SPAM_DETECTED": "Delivery is not available because of spam filters",
    "FROM_NOT_ALLOWED": "Inappropriate 'from' parameter",
    "BAD_WORDS_FOUND": "Message contains obscenity",
    "PHONE_INCORRECT": "Incorrect user's number",
    "OPERATOR_NOT_ALLOWED": "Partner's messaging is prohibited by an operator",
}

# Reports with a numeric status and no type: the provider's SMS delivery reports, which a Viber
# message that fell back to SMS gets as well. A failure code is stored as the contract names it
# (SMS_-2), and shown so for SMS messages and messages of unknown kind; a Viber message shows
# it as STATUS_-2, naming no channel (`shown_status_extended`). 1-4 are interim (2 "absent" and
# 3 "preparing" come from an older version of the public documentation); 0 and the negatives
# are final.
NUMERIC_STATUS = {
    "0": (Status.DELIVERED, None),
    "1": (Status.IN_PROCESS, None),  # buffered
    "2": (Status.IN_PROCESS, None),  # absent: the subscriber is out of reach, still queued
    "3": (Status.IN_PROCESS, None),  # preparing
    "4": (Status.IN_PROCESS, None),  # no answer from the operator yet
    "-1": (Status.UNDELIVERED, "SMS_-1"),
    "-2": (Status.UNDELIVERED, "SMS_-2"),
    "-3": (Status.UNDELIVERED, "SMS_-3"),
    "-11": (Status.UNDELIVERED, "SMS_-11"),
    "-12": (Status.UNDELIVERED, "SMS_-12"),
}
NUMERIC_STATUS_MEANING = {
    "-1": "Not delivered (delivery error)",
    "-2": "Expired (the subscriber was unreachable for 24 hours)",
    "-3": "Rejected by the operator (wrong number, reception blocked, ...)",
    "-11": "No route to the subscriber's operator",
    "-12": "HTTP request error",
}
# Both names are known and explained, whatever the channel was.
NUMERIC_STATUS_EXTENDED_MEANING = {
    f"{prefix}_{code}": meaning
    for code, meaning in NUMERIC_STATUS_MEANING.items()
    for prefix in ("STATUS", "SMS")
}
KNOWN_STATUS_EXTENDED = frozenset(STATUS_EXTENDED_MEANING) | frozenset(
    NUMERIC_STATUS_EXTENDED_MEANING)

STORED_PREFIX, SHOWN_PREFIX = "SMS_", "STATUS_"
SMS_KIND = "sms"


def shown_status_extended(value: str | None, kind: str | None) -> str | None:
    """The status_extended a message of `kind` shows: a numeric report's code names no
    channel on a Viber message (its kind is known from the send record)."""
    if value is not None and kind is not None and kind != SMS_KIND \
            and value.startswith(STORED_PREFIX):
        return SHOWN_PREFIX + value[len(STORED_PREFIX):]
    return value


WORD_STATUS = {
    "delivered": Status.DELIVERED,
    "undelivered": Status.UNDELIVERED,
    "in process": Status.IN_PROCESS,
    "in_process": Status.IN_PROCESS,
    "buffered": Status.IN_PROCESS,
}

MAX_MSG_ID = 36
_UUID = re.compile(r"^[0-9a-fA-F]{8}-([0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}$")
_SEP = b"\x1f"


def msg_key(msg_id: str) -> str:
    """The matching key: UUIDs compare without regard to letter case, other ids exactly."""
    return msg_id.lower() if _UUID.match(msg_id) else msg_id


# Surrogates that are not byte escapes (those are U+DC80..U+DCFF): a lone half of a UTF-16
# pair, which JSON can carry as "\ud83d" when a serialiser cut a reply mid-emoji.
_LONE_SURROGATE = re.compile("[\ud800-\udc7f\udd00-\udfff]")
# The same, once written as generalised UTF-8 (WTF-8) bytes: three bytes, one character.
_SURROGATE_BYTES = re.compile(b"\xed[\xa0-\xbf][\x80-\xbf]")


def _as_escaped_bytes(match: re.Match[str]) -> str:
    return match.group().encode("utf-8", "surrogatepass").decode("utf-8", "surrogateescape")


def clean_text(value: str) -> tuple[str, bytes | None]:
    """Printable text plus the original bytes when they were not clean UTF-8.

    Undecodable bytes arrive as surrogate escapes; NUL cannot be stored in PostgreSQL text.
    Both become U+FFFD in the text, and the exact bytes are kept beside it. A lone UTF-16
    surrogate is kept as its WTF-8 bytes and shown as one U+FFFD.
    """
    if value.isascii() and "\x00" not in value:
        return value, None  # nearly every field: nothing to clean
    try:
        raw = value.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        raw = _LONE_SURROGATE.sub(_as_escaped_bytes, value).encode("utf-8", "surrogateescape")
        shown = _SURROGATE_BYTES.sub("\ufffd".encode(), raw)
        return shown.decode("utf-8", "replace").replace("\x00", "\ufffd"), raw
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("utf-8", "replace").replace("\x00", "\ufffd"), raw
    if "\x00" in text:
        return text.replace("\x00", "\ufffd"), raw
    return text, None


@dataclass(slots=True)
class Notification:
    type: str
    msg_id: str
    msg_key: str
    p_transaction_id: str | None
    status: Status | None
    status_extended: str | None
    unknown_status_extended: bool
    text: str | None
    text_raw: bytes | None
    dedupe_key: str
    received_at: datetime
    campaign: str | None = None  # derived from p_transaction_id (DLR_CAMPAIGN_PATTERN)

    @property
    def message_status(self) -> Status | None:
        """The status this notification gives its message; a reply gives none."""
        if self.type == "seen":
            return Status.SEEN
        if self.type == "delivery":
            return self.status
        return None


@dataclass(slots=True)
class Rejection:
    reason: str
    method: str
    content_type: str | None
    query: bytes
    body: bytes
    source_ip: str | None
    received_at: datetime


class Invalid(ValueError):
    """The fields do not make a notification; the message is the archived reason."""


def _field(fields: dict[str, str], name: str) -> str | None:
    value = fields.get(name)
    if value is None:
        return None
    value = value.strip()
    return value or None


def _status(raw: str) -> tuple[Status, str | None]:
    if raw in NUMERIC_STATUS:
        return NUMERIC_STATUS[raw]
    word = WORD_STATUS.get(raw.lower())
    if word is None:
        raise Invalid(f"unknown status {raw!r}")
    return word, None


def dedupe_key(
    *, type_: str, key: str, status: str | None, status_extended: str | None, text: bytes | None
) -> str:
    """Two notifications are the same when type, msg_id, status, status_extended, text are."""
    h = hashlib.blake2b(digest_size=16)
    for part in (type_, key, status or "", status_extended or ""):
        h.update(part.encode("utf-8", "surrogateescape"))
        h.update(_SEP)
    h.update(b"\x01" if text is None else b"\x02" + text)
    return h.hexdigest()


MAX_CAMPAIGN = 64


def campaign_of(p_transaction_id: str | None, pattern: re.Pattern[str] | None) -> str | None:
    """The campaign label a p_transaction_id names under `pattern` (its group `campaign`,
    searched anywhere unless the pattern anchors itself), at most 64 characters; None when
    there is no pattern, no p_transaction_id, no match or an empty group."""
    if pattern is None or p_transaction_id is None:
        return None
    found = pattern.search(p_transaction_id)
    label = found.group("campaign") if found else None
    return label[:MAX_CAMPAIGN] if label else None


def interpret(fields: dict[str, str], *, received_at: datetime,
              campaign_pattern: re.Pattern[str] | None = None) -> Notification:
    """Read merged callback fields as a notification, or raise Invalid with the reason."""
    raw_type = _field(fields, "type")
    raw_status = _field(fields, "status")
    if raw_type is None:
        if raw_status is None:
            raise Invalid("missing type (and no SMS status)")
        type_ = "delivery"  # SMS reports come without a type
    else:
        type_ = clean_text(raw_type)[0].lower()
        if type_ not in TYPES:
            raise Invalid(f"unknown type {type_!r}")

    msg_id = _field(fields, "msg_id")
    if msg_id is None:
        raise Invalid("missing msg_id")
    cleaned_id, bad_bytes = clean_text(msg_id)
    if bad_bytes is not None or not cleaned_id.isprintable():
        raise Invalid("msg_id has bytes that are not printable UTF-8")
    if len(msg_id) > MAX_MSG_ID:
        raise Invalid(f"msg_id longer than {MAX_MSG_ID} characters")

    status: Status | None = None
    status_extended: str | None = None
    if raw_status is not None:
        status, status_extended = _status(clean_text(raw_status)[0])
    elif type_ == "delivery":
        raise Invalid("delivery notification without status")

    raw_ext = _field(fields, "status_extended")
    if raw_ext is not None:
        status_extended = clean_text(raw_ext)[0]
    unknown = status_extended is not None and status_extended.upper() not in KNOWN_STATUS_EXTENDED

    text: str | None = None
    text_raw: bytes | None = None
    if type_ == "reply":
        text, text_raw = clean_text(fields.get("text", ""))
    ptid = _field(fields, "p_transaction_id")
    ptid = clean_text(ptid)[0] if ptid is not None else None
    key = msg_key(msg_id)
    return Notification(
        type=type_,
        msg_id=msg_id,
        msg_key=key,
        p_transaction_id=ptid,
        status=status,
        status_extended=status_extended,
        unknown_status_extended=unknown,
        text=text,
        text_raw=text_raw,
        dedupe_key=dedupe_key(
            type_=type_,
            key=key,
            status=status,
            status_extended=status_extended,
            text=None if text is None else (text_raw or text.encode()),
        ),
        received_at=received_at,
        campaign=campaign_of(ptid, campaign_pattern),
    )
