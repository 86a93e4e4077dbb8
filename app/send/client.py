"""HTTP to the provider: the bulk send API with its retry table, and the media upload.

Retries follow section 1.4.1: answers -2, -4 and -6 are repeated with exponential backoff,
the others are final. A connection that failed before the request went out is retried too;
one that failed after it may have arrived (timeout while waiting for the answer) is never
re-sent blindly: its outcome is reported as unknown.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Literal

import httpx

from app.ops import metrics
from app.send.answers import (
    BulkAnswer,
    MalformedAnswer,
    UploadAnswer,
    parse_bulk_answer,
    parse_upload_answer,
    should_retry,
)
from app.send.media import check_image
from app.send.messages import SendRequest
from app.send.signing import sign_upload

log = logging.getLogger(__name__)
# accepted: code 0; refused: a negative code; unknown: it may have arrived, no answer read;
# failed: it never reached the provider.
Outcome = Literal["accepted", "refused", "unknown", "failed"]

# Failures where the request cannot have reached the provider: safe to send again.
NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)


@dataclass
class Delivery:
    """What became of one send request."""

    outcome: Outcome
    attempts: int
    answer: BulkAnswer | None = None
    error: str | None = None
    msg_ids: dict[str, str] = field(default_factory=dict)

    @property
    def code(self) -> int | None:
        return self.answer.code if self.answer else None

    @property
    def tech_message(self) -> str | None:
        return self.answer.tech_message if self.answer else self.error


class UploadRefused(RuntimeError):
    def __init__(self, answer: UploadAnswer) -> None:
        self.answer = answer
        super().__init__(f"upload refused (status {answer.status}: {answer.meaning})"
                         + (f": {answer.error}" if answer.error else ""))


@dataclass
class ProviderClient:
    bulk_url: str
    media_url: str
    user: str
    secret_key: str
    max_retries: int = 3
    timeout: float = 30.0
    backoff: float = 1.0
    upload_sign_uppercase: bool = False
    upload_max_bytes: int = 10 * 1024 * 1024  # as DLR_UPLOAD_MAX_BYTES (the public docs)
    # Async: a provider that does not answer holds no thread, so it cannot starve the reads
    # (with a blocking client, 8 hanging sends took every read thread: /readyz took 2.8 s).
    http: httpx.AsyncClient = field(default_factory=lambda: httpx.AsyncClient())

    async def send(self, request: SendRequest) -> Delivery:
        body = request.form_body(user=self.user, secret_key=self.secret_key)
        headers = {"content-type": "application/x-www-form-urlencoded"}
        attempt = 0
        while True:
            attempt += 1
            try:
                r = await self.http.post(self.bulk_url, content=body, headers=headers,
                                         timeout=self.timeout)
            except NOT_SENT as exc:
                metrics.SENDS.labels(code="not_sent").inc()
                if attempt > self.max_retries:
                    return Delivery("failed", attempt, error=f"provider unreachable: {exc}")
                await self._wait(request, attempt, f"provider unreachable ({exc})")
                continue
            except httpx.HTTPError as exc:
                metrics.SENDS.labels(code="unknown").inc()
                log.warning("send %s: outcome unknown (%s)", request.p_transaction_id, exc)
                return Delivery("unknown", attempt, error=f"no answer after sending: {exc!r}")
            try:
                answer = parse_bulk_answer(r.content)
            except MalformedAnswer as exc:
                metrics.SENDS.labels(code="malformed").inc()
                return Delivery("unknown", attempt,
                                error=f"HTTP {r.status_code}, {exc}")
            metrics.SENDS.labels(code=str(answer.code)).inc()
            if answer.ok:
                return Delivery("accepted", attempt, answer, msg_ids=dict(answer.msg_ids))
            if should_retry(answer.code) and attempt <= self.max_retries:
                await self._wait(request, attempt,
                                 f"code {answer.code} ({answer.tech_message or 'no message'})")
                continue
            return Delivery("refused", attempt, answer)

    async def _wait(self, request: SendRequest, attempt: int, why: str) -> None:
        delay = self.backoff * 2 ** (attempt - 1)
        # Said at warning level: a send that waits seconds must not look hung.
        log.warning("send %s: %s; retrying in %g s (retry %d of %d)", request.p_transaction_id,
                    why, delay, attempt, self.max_retries)
        await asyncio.sleep(delay)

    async def upload(self, image: bytes, filename: str = "image") -> str:
        """Upload an image and return its image_id; BadImage before sending, UploadRefused
        or MalformedAnswer after."""
        mime, ext = check_image(image, max_bytes=self.upload_max_bytes)
        sign = sign_upload(login=self.user, image=image, secret_key=self.secret_key,
                           uppercase_inner=self.upload_sign_uppercase)
        name = filename if filename.lower().endswith(f".{ext}") else f"{filename}.{ext}"
        r = await self.http.post(
            self.media_url,
            data={"login": self.user, "sign": sign},
            files={"image": (name, image, mime)},
            timeout=self.timeout,
        )
        answer = parse_upload_answer(r.content)
        if not answer.ok:
            raise UploadRefused(answer)
        assert answer.image_id is not None
        return answer.image_id

    async def aclose(self) -> None:
        await self.http.aclose()
