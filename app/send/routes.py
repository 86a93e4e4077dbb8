"""REST routes of the send module: POST /api/v1/messages and POST /api/v1/images."""

from __future__ import annotations

from typing import Annotated

import httpx
from fastapi import Depends, File, HTTPException, Request, UploadFile, status
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from app.send import (
    BadImage,
    MalformedAnswer,
    NotConfigured,
    Sender,
    SendRequest,
    UploadRefused,
)
from app.send.media import check_image
from app.web.routing import api_router
from app.web.schemas import invalid

router = api_router(tags=["send"])


class SendAccepted(BaseModel):
    code: int
    tech_message: str | None
    p_transaction_id: str
    msg_ids: dict[str, str]


class ProviderError(BaseModel):
    detail: str
    code: int | None
    tech_message: str | None


class ImageUploaded(BaseModel):
    image_id: str


async def get_sender(request: Request) -> Sender:
    sender: Sender | None = request.app.state.sender
    if sender is None:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE,
                            str(NotConfigured("set DLR_BULK_USER and DLR_BULK_SECRET_KEY to send")))
    return sender


SenderDep = Annotated[Sender, Depends(get_sender)]


# A send is JSON of at most 1,000 phones and a few texts of 2,048 characters.
SEND_MAX_BODY_BYTES = 1024 * 1024


@router.post("/messages", response_model=SendAccepted, max_body_size=SEND_MAX_BODY_BYTES,
             responses={502: {"model": ProviderError}, 504: {"model": ProviderError}})
async def send_message(body: SendRequest, sender: SenderDep) -> JSONResponse:
    """Send through the provider and record every msg_id it returns (status `accepted`).

    502: the provider answered a negative code (after the retries its table allows), or
    could not be reached. 504: the request may have arrived but no answer was read; it is
    recorded as unknown and deliberately not re-sent.
    """
    try:
        result = await sender.send(body)
    except ValueError as exc:  # from missing and no DLR_BULK_FROM
        raise invalid(("body", "from"), str(exc)) from None
    if result.outcome == "accepted":
        return JSONResponse(SendAccepted(
            code=0, tech_message=result.tech_message, p_transaction_id=result.p_transaction_id,
            msg_ids=result.msg_ids).model_dump())
    code = status.HTTP_504_GATEWAY_TIMEOUT if result.outcome == "unknown" else 502
    detail = {
        "refused": "the provider refused the request",
        "unknown": "no answer from the provider after sending; recorded as unknown, not re-sent",
        "failed": "the provider could not be reached",
    }[result.outcome]
    return JSONResponse(ProviderError(detail=detail, code=result.code,
                                      tech_message=result.tech_message).model_dump(),
                        status_code=code)


@router.post("/images", response_model=ImageUploaded, responses={502: {"model": ProviderError}})
async def upload_image(sender: SenderDep,
                       image: Annotated[UploadFile, File(description="JPG, PNG or GIF")]
                       ) -> JSONResponse:
    """Upload an image to the provider for picture messages; returns its image_id."""
    limit = sender.client.upload_max_bytes
    data = await image.read(limit + 1)
    try:
        check_image(data, max_bytes=limit)
    except BadImage as exc:
        raise invalid(("body", "image"), str(exc)) from None
    try:
        image_id = await sender.upload(data, image.filename or "image")
    except UploadRefused as exc:
        return JSONResponse(ProviderError(detail=str(exc), code=exc.answer.status,
                                          tech_message=exc.answer.error).model_dump(),
                            status_code=502)
    except (MalformedAnswer, httpx.HTTPError) as exc:
        return JSONResponse(ProviderError(detail=f"upload failed: {exc}", code=None,
                                          tech_message=None).model_dump(), status_code=502)
    return JSONResponse(ImageUploaded(image_id=image_id).model_dump())
