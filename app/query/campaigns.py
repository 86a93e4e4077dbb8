"""The campaign list: each campaign's funnel and statuses, the most recently active first,
read from the counts kept per campaign (app/store/counts.py)."""

from __future__ import annotations

from sqlalchemy.orm import Session

from app.core.notifications import Status
from app.query.common import DatabaseDep, Since, Until
from app.query.schemas import CampaignItem, Funnel
from app.store import counts
from app.web.paging import Cursor, Limit, decode_cursor
from app.web.routing import api_router
from app.web.schemas import Page

router = api_router(tags=["api"])


@router.get("/campaigns", response_model=Page[CampaignItem])
async def list_campaigns(database: DatabaseDep, since: Since = None, until: Until = None,
                         limit: Limit = 100, cursor: Cursor = None) -> Page[CampaignItem]:
    """Campaigns active in the window (first known before `until`, last active at or after
    `since`), the most recently active first, each with its messages by status and its
    funnel over its whole life. The cursor counts the campaigns already listed: a campaign
    that becomes active while a client pages moves to the front of the list."""
    offset = decode_cursor(cursor) or 0

    def read(session: Session) -> list[counts.CampaignTotals]:
        return counts.campaigns(session.connection(), since=since, until=until,
                                limit=limit + 1, offset=offset)

    rows = await database.session(read)
    more = len(rows) > limit
    return Page[CampaignItem](
        items=[CampaignItem(
            campaign=r.campaign, messages=r.values["messages"],
            by_status={s.value: r.values[s.value] for s in Status},
            funnel=Funnel(sent=r.values["messages"], delivered=r.values["reached"],
                          seen=r.values["opened"], replied=r.values["replied"]),
            first_at=r.first_at, last_at=r.last_at) for r in rows[:limit]],
        next_cursor=str(offset + limit) if more else None)
