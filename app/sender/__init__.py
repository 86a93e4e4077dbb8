"""The send module: build, sign and send the provider's message kinds, upload images, and
record every outgoing msg_id.

    sender = Sender.from_settings(settings, engine)
    result = sender.send(SendRequest(phone=["79031234567"], txt="Hello"))
    result.msg_ids  # {"79031234567": "<msg_id>"}, also stored with status "accepted"
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import Engine

from app.config import Settings
from app.sender.answers import CODES, MalformedAnswer
from app.sender.client import Delivery, Outcome, ProviderClient, UploadRefused
from app.sender.media import BadImage
from app.sender.messages import Kind, SendRequest
from app.sender.record import record_send

__all__ = [
    "CODES", "BadImage", "Kind", "MalformedAnswer", "NotConfigured", "ProviderClient",
    "SendRequest", "SendResult", "Sender", "UploadRefused",
]


class NotConfigured(RuntimeError):
    """The partner login or secret key is missing from the settings."""


@dataclass(frozen=True)
class SendResult:
    outcome: Outcome
    p_transaction_id: str
    kind: Kind
    code: int | None
    tech_message: str | None
    msg_ids: dict[str, str]
    attempts: int
    send_id: int


@dataclass
class Sender:
    client: ProviderClient
    engine: Engine
    default_sender: str | None = None

    @classmethod
    def from_settings(cls, settings: Settings, engine: Engine) -> Sender:
        if not settings.bulk_user or settings.bulk_secret_key is None:
            raise NotConfigured("set DLR_BULK_USER and DLR_BULK_SECRET_KEY to send")
        client = ProviderClient(
            bulk_url=settings.bulk_url, media_url=settings.media_url,
            user=settings.bulk_user, secret_key=settings.bulk_secret_key.get_secret_value(),
            max_retries=settings.send_max_retries, timeout=settings.send_timeout,
            backoff=settings.send_backoff, upload_sign_uppercase=settings.upload_sign_uppercase,
            upload_max_bytes=settings.upload_max_bytes,
        )
        return cls(client=client, engine=engine, default_sender=settings.bulk_from)

    def send(self, request: SendRequest) -> SendResult:
        """Send and record. ValueError (before anything is sent) for input the document
        does not allow."""
        request = request.with_defaults(default_sender=self.default_sender)
        delivery: Delivery = self.client.send(request)
        send_id = record_send(self.engine, request, delivery)
        assert request.p_transaction_id is not None
        return SendResult(
            outcome=delivery.outcome, p_transaction_id=request.p_transaction_id,
            kind=request.kind, code=delivery.code, tech_message=delivery.tech_message,
            msg_ids=delivery.msg_ids, attempts=delivery.attempts, send_id=send_id,
        )

    def upload(self, image: bytes, filename: str = "image") -> str:
        return self.client.upload(image, filename)

    def close(self) -> None:
        self.client.close()
