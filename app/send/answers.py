"""The provider's answers: the bulk API's XML (section 1.4) and the upload JSON (section 3)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from xml.etree.ElementTree import ParseError

from defusedxml import DefusedXmlException
from defusedxml.ElementTree import fromstring


class MalformedAnswer(ValueError):
    """The provider's answer could not be read (broken, hostile or not what the document says)."""


@dataclass(frozen=True)
class Code:
    code: int
    meaning: str
    repeat: bool


# Section 1.4.1: "Request repeat" says which answers are worth retrying.
CODES = {
    0: Code(0, "Request successfully processed", False),
    -1: Code(-1, "Invalid input data", False),
    -2: Code(-2, "Authentication failed", True),
    -3: Code(-3, "Request processing denial", False),
    -4: Code(-4, "Temporary technical error", True),
    -5: Code(-5, "The balance of SMS-messages is exhausted", False),
    -6: Code(-6, "Bandwidth limit exceeded", True),
}


def should_retry(code: int) -> bool:
    known = CODES.get(code)
    return known is not None and known.repeat


@dataclass(frozen=True)
class BulkAnswer:
    code: int
    tech_message: str
    msg_ids: dict[str, str] = field(default_factory=dict)  # phone -> msg_id

    @property
    def ok(self) -> bool:
        return self.code == 0


def parse_bulk_answer(body: bytes) -> BulkAnswer:
    try:
        root = fromstring(body, forbid_dtd=True)
    except (ParseError, DefusedXmlException, ValueError) as exc:
        raise MalformedAnswer(f"unreadable XML answer: {exc}") from exc
    if root.tag != "response":
        raise MalformedAnswer(f"unexpected XML root <{root.tag}>")
    code_text = (root.findtext("code") or "").strip()
    try:
        code = int(code_text)
    except ValueError:
        raise MalformedAnswer(f"answer without a numeric <code>: {code_text!r}") from None
    msg_ids: dict[str, str] = {}
    for el in root.findall("msg_id"):
        phone, value = el.get("phone"), (el.text or "").strip()
        if not phone or not value:
            raise MalformedAnswer("<msg_id> without phone or value")
        msg_ids[phone] = value
    return BulkAnswer(code=code, tech_message=(root.findtext("tech_message") or "").strip(),
                      msg_ids=msg_ids)


# Section 3.1.
UPLOAD_STATUS = {
    0: "Success",
    1: "The data is not correct",
    2: "Invalid signature",
    3: "The size of image is too big",
    4: "Invalid file format (valid: JPG, GIF, PNG)",
}


@dataclass(frozen=True)
class UploadAnswer:
    status: int
    image_id: str | None
    error: str | None

    @property
    def ok(self) -> bool:
        return self.status == 0 and bool(self.image_id)

    @property
    def meaning(self) -> str:
        return UPLOAD_STATUS.get(self.status, f"unknown upload status {self.status}")


# The document's own error example, {"status": 2, error: "Invalid sign"}, is not valid JSON
# (the key is unquoted); accept that shape rather than lose the provider's reason.
_LOOSE_STATUS = re.compile(rb'"?status"?\s*:\s*(\d+)')
_LOOSE_ERROR = re.compile(rb'"?error"?\s*:\s*"([^"]*)"')


def parse_upload_answer(body: bytes) -> UploadAnswer:
    try:
        doc = json.loads(body)
    except ValueError as exc:
        status, error = _LOOSE_STATUS.search(body), _LOOSE_ERROR.search(body)
        if status is None:
            raise MalformedAnswer(f"unreadable upload answer: {exc}") from exc
        return UploadAnswer(status=int(status.group(1)), image_id=None,
                            error=error.group(1).decode("utf-8", "replace") if error else None)
    if not isinstance(doc, dict) or not isinstance(doc.get("status"), int):
        raise MalformedAnswer("upload answer without a numeric status")
    image_id = doc.get("image_id")
    error = doc.get("error")
    return UploadAnswer(status=doc["status"],
                        image_id=image_id if isinstance(image_id, str) else None,
                        error=error if isinstance(error, str) else None)
