"""The rejected archive: callbacks kept as invalid, with the reason and the raw content."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.query.common import DatabaseDep
from app.query.schemas import RejectedItem
from app.store.models import Rejected
from app.web.paging import Cursor, Limit, decode_cursor, page_of
from app.web.routing import api_router
from app.web.schemas import Page

router = api_router(tags=["api"])


def _decoded(data: bytes) -> str:
    return data.decode("utf-8", "replace")


@router.get("/rejected", response_model=Page[RejectedItem])
async def list_rejected(database: DatabaseDep, limit: Limit = 100, cursor: Cursor = None
                        ) -> Page[RejectedItem]:
    """Callbacks kept as invalid, newest first, with the reason and the content as received."""

    def read(session: Session) -> Page[RejectedItem]:
        query = select(Rejected).order_by(Rejected.id.desc()).limit(limit + 1)
        after = decode_cursor(cursor)
        if after is not None:
            query = query.where(Rejected.id < after)
        rows, next_cursor = page_of(list(session.scalars(query)), limit, lambda r: r.id)
        items = [
            RejectedItem(id=r.id, reason=r.reason, raw=_decoded(r.body or r.query), method=r.method,
                         content_type=r.content_type, query=_decoded(r.query),
                         source_ip=r.source_ip, received_at=r.received_at)
            for r in rows
        ]
        return Page[RejectedItem](items=items, next_cursor=next_cursor)

    return await database.session(read)
