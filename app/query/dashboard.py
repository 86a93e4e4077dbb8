"""GET /dashboard: one server-side page whose script reads the same REST API as everyone
else, with the same access rule. No build step, no assets from elsewhere.

A browser cannot add an API key header, so with DLR_API_KEYS set the page offers a sign-in:
the key is entered once and exchanged for a signed session cookie (app/web/security.py) that
opens reads only. Without keys, a browser that is not on this machine is told how to get in
rather than handed a bare JSON 403.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import re
from functools import lru_cache
from pathlib import Path
from urllib.parse import parse_qs

from fastapi import APIRouter, HTTPException, Request, status
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response

from app.config import Settings
from app.core.notifications import NUMERIC_STATUS_EXTENDED_MEANING, STATUS_EXTENDED_MEANING
from app.ops.bodies import BodyTooLarge, BodyTooSlow, read_body
from app.web.security import (
    SESSION_COOKIE,
    SESSION_MAX_AGE,
    arrived_over_https,
    check_api_access,
    has_valid_session,
    matching_key,
    new_session,
    token_matches,
)

router = APIRouter(tags=["dashboard"])
STATIC = Path(__file__).with_name("static")
PAGE = STATIC / "dashboard.html"
SIGN_IN_PAGE = STATIC / "sign-in.html"
NO_ACCESS_PAGE = STATIC / "no-access.html"
# A sign-in form holds one key: anything longer is not one, and is not read further.
MAX_SIGN_IN_BYTES = 4096
SIGN_IN_READ_TIMEOUT = 10.0


@lru_cache(maxsize=1)
def page() -> str:
    meanings = STATUS_EXTENDED_MEANING | NUMERIC_STATUS_EXTENDED_MEANING
    # The provider's meaning of each code goes into the page, beside the failure chart.
    return PAGE.read_text(encoding="utf-8").replace(
        "__MEANINGS__", json.dumps(meanings).replace("</", "<\\/"))


@lru_cache(maxsize=2)
def _static(path: Path) -> str:
    return path.read_text(encoding="utf-8")


# Every page of the dashboard is sent with these: never framed (no clickjacking of the
# replay button or the sign-in form), no MIME sniffing, no Referer to anyone, and a CSP that
# allows what the page is made of and nothing else: its own inline style (with style
# attributes), its own inline scripts by hash (never an injected one), fetches and forms
# to this origin only.
_SCRIPT = re.compile(r"<script>(.*?)</script>", re.DOTALL)
NONE = "'none'"


@lru_cache(maxsize=8)
def security_headers(page_html: str) -> dict[str, str]:
    hashes = " ".join(
        "'sha256-" + base64.b64encode(hashlib.sha256(body.encode()).digest()).decode() + "'"
        for body in _SCRIPT.findall(page_html))
    csp = ("default-src 'self'; "
           f"script-src {hashes or NONE}; "
           "style-src 'self' 'unsafe-inline'; img-src 'self' data:; connect-src 'self'; "
           "form-action 'self'; frame-ancestors 'none'; base-uri 'none'; object-src 'none'")
    return {"Content-Security-Policy": csp, "X-Frame-Options": "DENY",
            "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}


def html_page(page_html: str, status_code: int = 200, *, no_store: bool = False
              ) -> HTMLResponse:
    headers = dict(security_headers(page_html))
    if no_store:
        headers["Cache-Control"] = "no-store"
    return HTMLResponse(page_html, status_code=status_code, headers=headers)


def _sign_in_page(message: str = "") -> str:
    note = f'<p class="error" role="alert">{html.escape(message)}</p>' if message else ""
    return _static(SIGN_IN_PAGE).replace("__MESSAGE__", note)


def _wants_html(request: Request) -> bool:
    """A browser asks for HTML; API clients and scripts keep the JSON errors of /api/*."""
    return "text/html" in request.headers.get("accept", "")


def _settings(request: Request) -> Settings:
    return request.app.state.settings  # type: ignore[no-any-return]


@router.get("/dashboard", response_class=HTMLResponse,
            responses={401: {"description": "no API key or session (a browser gets the "
                                            "sign-in form)"},
                       403: {"description": "no API keys configured and not a loopback "
                                            "client (a browser gets an explanation)"}})
async def dashboard(request: Request) -> Response:
    """The web dashboard: funnel, failure reasons, activity, live replies, search, health."""
    try:
        check_api_access(request)
    except HTTPException as exc:
        if not _wants_html(request) or exc.status_code not in (401, 403):
            raise
        if exc.status_code == status.HTTP_401_UNAUTHORIZED:
            return html_page(_sign_in_page(), exc.status_code)
        return html_page(_static(NO_ACCESS_PAGE), exc.status_code)
    signed_in = has_valid_session(request, _settings(request).api_key_values())
    # The page never caches: it reflects whether this browser is signed in.
    return html_page(page().replace("__SIGNED_IN__", "true" if signed_in else "false"),
                     no_store=True)


async def _read_form(request: Request) -> dict[str, list[str]] | None:
    """The urlencoded form, or None when it is too large or too slow: this route is open to
    anyone, so it reads a few KB at most, within a deadline, and at most a few fields."""
    try:
        body = await read_body(request.receive, limit=MAX_SIGN_IN_BYTES,
                               timeout=SIGN_IN_READ_TIMEOUT,
                               content_length=request.headers.get("content-length"))
        return parse_qs(body.decode("utf-8", "replace"), max_num_fields=10)
    except (BodyTooLarge, BodyTooSlow, ValueError):  # ValueError: more fields than that
        return None


def _cross_site(request: Request) -> bool:
    # Browsers name where a request came from; a form posted from another site is refused
    # (SameSite=Strict already keeps the cookie from such requests; this keeps a foreign
    # page from signing a browser in or out).
    return request.headers.get("sec-fetch-site", "").lower() == "cross-site"


def _to_dashboard() -> RedirectResponse:
    return RedirectResponse("/dashboard", status_code=status.HTTP_303_SEE_OTHER)


@router.post("/dashboard/sign-in", include_in_schema=False)
async def sign_in(request: Request) -> Response:
    """Trade an API key, entered once, for a session cookie that opens reads for 12 h."""
    keys = _settings(request).api_key_values()
    if not keys:
        return _to_dashboard()  # nothing to sign in to; the page says how access works
    if _cross_site(request):
        return JSONResponse({"detail": "cross-site sign-in refused"}, status_code=403)
    form = await _read_form(request)
    if form is None:
        return html_page(_sign_in_page("The form was too large or too slow."),
                         status.HTTP_400_BAD_REQUEST)
    given = (form.get("key") or [""])[0].strip()
    matched = matching_key(keys, lambda key: token_matches(given, key))
    if matched is None:
        return html_page(_sign_in_page("That is not one of this server's API keys."),
                         status.HTTP_401_UNAUTHORIZED)
    response = _to_dashboard()
    response.set_cookie(SESSION_COOKIE, new_session(matched), max_age=SESSION_MAX_AGE,
                        path="/", httponly=True, samesite="strict",
                        secure=arrived_over_https(request, _settings(request).trusted_proxies))
    return response


@router.post("/dashboard/sign-out", include_in_schema=False)
async def sign_out(request: Request) -> Response:
    """Forget the session in this browser."""
    if _cross_site(request):
        return JSONResponse({"detail": "cross-site sign-out refused"}, status_code=403)
    response = _to_dashboard()
    response.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="strict",
                           secure=arrived_over_https(request, _settings(request).trusted_proxies))
    return response
