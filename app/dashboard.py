"""GET /dashboard: one server-side page whose script reads the same REST API as everyone
else, with the same access rule. No build step, no assets from elsewhere."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from fastapi import APIRouter, Depends
from fastapi.responses import HTMLResponse

from app.notifications import SMS_STATUS_EXTENDED_MEANING, STATUS_EXTENDED_MEANING
from app.security import require_api_access

router = APIRouter(tags=["dashboard"], dependencies=[Depends(require_api_access)])
PAGE = Path(__file__).with_name("static") / "dashboard.html"


@lru_cache(maxsize=1)
def page() -> str:
    meanings = STATUS_EXTENDED_MEANING | SMS_STATUS_EXTENDED_MEANING
    # The provider's meaning of each code goes into the page, beside the failure chart.
    return PAGE.read_text(encoding="utf-8").replace(
        "__MEANINGS__", json.dumps(meanings).replace("</", "<\\/"))


@router.get("/dashboard", response_class=HTMLResponse)
async def dashboard() -> HTMLResponse:
    """The web dashboard: funnel, failure reasons, activity, live replies, search, health."""
    return HTMLResponse(page())
