"""The send module: build, sign and send the provider's message kinds, upload images, and
record every outgoing msg_id.

    async with standalone_sender(settings) as sender:
        result = await sender.send(SendRequest(phone=["79031234567"], txt="Hello"))
    result.msg_ids  # {"79031234567": "<msg_id>"}, also stored with status "accepted"
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from app.config import Settings
from app.core.times import utcnow
from app.send.answers import CODES, MalformedAnswer
from app.send.client import Delivery, Outcome, ProviderClient, UploadRefused
from app.send.media import BadImage
from app.send.messages import Kind, SendRequest
from app.store.db import Database
from app.store.ingestor import Ingestor
from app.store.write import SendRecord, StoreUnavailable
from app.store.writers import writer_for

__all__ = [
    "CODES", "BadImage", "Kind", "MalformedAnswer", "NotConfigured", "ProviderClient",
    "SendRequest", "SendResult", "Sender", "UploadRefused", "standalone_sender",
]

log = logging.getLogger(__name__)
# Recording a send the provider accepted is retried this many times (with backoff doubling
# from RECORD_BACKOFF seconds): its msg_ids exist nowhere else.
RECORD_ATTEMPTS = 6
RECORD_BACKOFF = 0.25


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
    send_id: int | None  # None only if the record could not be stored (see Sender.send)


@dataclass
class Sender:
    client: ProviderClient
    ingestor: Ingestor
    default_sender: str | None = None

    @classmethod
    def from_settings(cls, settings: Settings, ingestor: Ingestor) -> Sender:
        if not settings.bulk_user or settings.bulk_secret_key is None:
            raise NotConfigured("set DLR_BULK_USER and DLR_BULK_SECRET_KEY to send")
        client = ProviderClient(
            bulk_url=settings.bulk_url, media_url=settings.media_url,
            user=settings.bulk_user, secret_key=settings.bulk_secret_key.get_secret_value(),
            max_retries=settings.send_max_retries, timeout=settings.send_timeout,
            backoff=settings.send_backoff, upload_sign_uppercase=settings.upload_sign_uppercase,
            upload_max_bytes=settings.upload_max_bytes,
        )
        return cls(client=client, ingestor=ingestor, default_sender=settings.bulk_from)

    async def send(self, request: SendRequest) -> SendResult:
        """Send and record through the write path. ValueError (before anything is sent) for
        input the document does not allow."""
        request = request.with_defaults(default_sender=self.default_sender)
        assert request.p_transaction_id is not None
        delivery: Delivery = await self.client.send(request)
        record = SendRecord(
            p_transaction_id=request.p_transaction_id, kind=request.kind.value,
            sending_method=request.sending_method, sender=request.sender,
            phones=list(request.phone), outcome=delivery.outcome, code=delivery.code,
            tech_message=delivery.tech_message, attempts=delivery.attempts,
            created_at=utcnow(), msg_ids=dict(delivery.msg_ids), campaign=request.campaign)
        await self._record(record)
        return SendResult(
            outcome=delivery.outcome, p_transaction_id=request.p_transaction_id,
            kind=request.kind, code=delivery.code, tech_message=delivery.tech_message,
            msg_ids=delivery.msg_ids, attempts=delivery.attempts, send_id=record.send_id,
        )

    async def _record(self, record: SendRecord) -> None:
        """Commit the record, retrying while the database is away. The messages are on their
        way whatever happens here, so the caller still gets the msg_ids; if every attempt
        fails they are logged (ERROR, with `msg_ids`) so they can be recovered."""
        for attempt in range(1, RECORD_ATTEMPTS + 1):
            try:
                await self.ingestor.submit(record)
                return
            except StoreUnavailable as exc:
                if attempt == RECORD_ATTEMPTS:
                    log.error("send %s: %s, but it could not be recorded (%s); msg_ids %s",
                              record.p_transaction_id, record.outcome, exc, record.msg_ids,
                              extra={"p_transaction_id": record.p_transaction_id,
                                     "msg_ids": record.msg_ids})
                    return
                delay = RECORD_BACKOFF * 2 ** (attempt - 1)
                log.warning("send %s: recording failed (%s); retrying in %g s",
                            record.p_transaction_id, exc, delay)
                await asyncio.sleep(delay)

    async def upload(self, image: bytes, filename: str = "image") -> str:
        return await self.client.upload(image, filename)

    async def aclose(self) -> None:
        await self.client.aclose()


@asynccontextmanager
async def standalone_sender(settings: Settings) -> AsyncIterator[Sender]:
    """A Sender with its own database and write path, for commands and scripts (the server
    builds its Sender on the application's)."""
    database = Database(settings)
    await database.open()
    # A command's few records: a child process would cost more to start than it saves.
    ingestor = Ingestor(writer_for(database, forwarding=False, child=False))
    ingestor.start()
    try:
        sender = Sender.from_settings(settings, ingestor)
        try:
            yield sender
        finally:
            await sender.aclose()
    finally:
        await ingestor.close()
        await database.close()
