"""Lookups asked in the same turn of the loop are read in one query (app/store/keyed_reads.py), and
each still gets exactly its own message: twins, unknown ids and messages without events
included; a failed query fails all it carried and the next one starts afresh."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, HTTPException
from sqlalchemy import Engine, Select

from app.core.notifications import msg_key
from app.query.messages import fetch_message
from app.store.db import Database

from ..helpers import UUID_A, dlr, record_send


class Queries:
    """Calls the real read through, keeping the keys each query asked for."""

    def __init__(self, database: Database, fail_next: BaseException | None = None) -> None:
        self.keys: list[list[str]] = []
        self.fail_next = fail_next
        self._read = database.keyed._read_rows
        database.keyed._read_rows = self

    async def __call__(self, statement: Select[Any], params: dict[str, Any]) -> list[Any]:
        keys = params["keys"]
        self.keys.append(sorted(keys if isinstance(keys, list) else json.loads(keys)))
        if self.fail_next is not None:
            exc, self.fail_next = self.fail_next, None
            raise exc
        return await self._read(statement, params)


async def _messages(client: httpx.AsyncClient, engine: Engine) -> None:
    await dlr(client, type="delivery", msg_id="k-1", status="delivered")
    await dlr(client, type="seen", msg_id="k-1")
    await dlr(client, type="delivery", msg_id="k-2", status="undelivered",
              status_extended="VIBER_USER_NOT_FOUND")
    await dlr(client, type="reply", msg_id="k-2", text="no thanks")
    await dlr(client, type="delivery", msg_id=UUID_A, status="delivered")
    record_send(engine, "k-sent", "79001112233", "camp-k")  # a message with no events yet


async def test_one_query_for_a_turn_of_lookups_each_answered_with_its_own(
        app: FastAPI, client: httpx.AsyncClient, engine: Engine) -> None:
    await _messages(client, engine)
    database: Database = app.state.database
    queries = Queries(database)
    asked = ["k-1", "k-2", "k-sent", "k-1", "nobody", UUID_A.upper()]
    answers = await asyncio.gather(*(fetch_message(database, m) for m in asked),
                                   return_exceptions=True)

    assert queries.keys == [sorted({msg_key(m) for m in asked})]
    first, second, sent, twin, unknown, upper = answers
    assert not isinstance(first, BaseException) and not isinstance(twin, BaseException)
    assert first.msg_id == "k-1" and first.status == "seen"
    assert [(e.type, e.status) for e in first.events] == [("delivery", "delivered"),
                                                          ("seen", None)]
    assert twin == first
    assert not isinstance(second, BaseException)
    assert (second.msg_id, second.status, second.status_extended) == (
        "k-2", "undelivered", "VIBER_USER_NOT_FOUND")
    assert [r.text for r in second.replies] == ["no thanks"]
    assert not isinstance(sent, BaseException)
    assert (sent.status, sent.phone, sent.events) == ("accepted", "79001112233", [])
    assert isinstance(unknown, HTTPException) and unknown.status_code == 404
    assert not isinstance(upper, BaseException) and upper.msg_id == UUID_A  # any letter case


async def test_ids_no_message_can_have_spoil_nothing_for_the_others_in_their_query(
        app: FastAPI, client: httpx.AsyncClient, engine: Engine) -> None:
    """A NUL (which PostgreSQL's text refuses), a lone surrogate (no UTF-8), a huge id, quotes
    and JSON syntax, an emoji: none is a stored msg_id, each is a 404, and the real lookup
    beside them is answered."""
    await _messages(client, engine)
    database: Database = app.state.database
    queries = Queries(database)
    odd = ["a\x00b", "\ud83d", "x" * 5000, "'); DROP TABLE messages; --", '["k-1"]', '"k-1"',
           "😀", ""]
    answers = await asyncio.gather(*(fetch_message(database, m) for m in [*odd, "k-1"]),
                                   return_exceptions=True)
    # One query, without the two ids no text can hold.
    assert queries.keys == [sorted({msg_key(m) for m in [*odd[2:], "k-1"]})]
    *missing, found = answers
    assert all(isinstance(a, HTTPException) and a.status_code == 404 for a in missing), answers
    assert not isinstance(found, BaseException) and found.msg_id == "k-1"


async def test_concurrent_http_lookups_get_their_own_answers(
        app: FastAPI, client: httpx.AsyncClient, engine: Engine) -> None:
    await _messages(client, engine)
    asked = ["k-2", "k-1", "nobody", "k-sent", "k-1"] * 4
    answers = await asyncio.gather(*(client.get(f"/api/v1/messages/{m}") for m in asked))
    for msg_id, answer in zip(asked, answers, strict=True):
        if msg_id == "nobody":
            assert answer.status_code == 404
            assert "nobody" in answer.json()["detail"]
        else:
            assert answer.status_code == 200
            assert answer.json()["msg_id"] == msg_id


async def test_a_failed_query_fails_every_lookup_it_carried_and_the_next_recovers(
        app: FastAPI, client: httpx.AsyncClient, engine: Engine) -> None:
    await _messages(client, engine)
    database: Database = app.state.database
    queries = Queries(database, fail_next=ConnectionError("database went away"))
    failed = await asyncio.wait_for(asyncio.gather(
        *(fetch_message(database, m) for m in ("k-1", "k-2")), return_exceptions=True),
        timeout=10)  # a waiter nobody told would hang
    assert [type(f) for f in failed] == [ConnectionError, ConnectionError]

    again = await asyncio.gather(*(fetch_message(database, m) for m in ("k-1", "k-2")))
    assert [m.msg_id for m in again] == ["k-1", "k-2"]
    assert len(queries.keys) == 2


async def test_a_key_the_database_cannot_take_fails_only_its_own_lookup(
        app: FastAPI, client: httpx.AsyncClient, engine: Engine) -> None:
    """As on a database whose encoding cannot hold a character of one id: the query of the
    turn fails on the key, and is repeated key by key."""
    await _messages(client, engine)
    database: Database = app.state.database
    refused = UnicodeEncodeError("latin-1", "😀", 0, 1, "ordinal not in range(256)")
    queries = Queries(database, fail_next=refused)
    first, second = await asyncio.wait_for(asyncio.gather(
        *(fetch_message(database, m) for m in ("k-1", "k-2"))), timeout=10)
    assert (first.msg_id, second.msg_id) == ("k-1", "k-2")
    both = sorted([msg_key("k-1"), msg_key("k-2")])
    assert queries.keys == [both, [msg_key("k-1")], [msg_key("k-2")]]

    queries.fail_next = refused  # alone, the lookup at fault gets its own error
    with pytest.raises(UnicodeEncodeError):
        await asyncio.wait_for(fetch_message(database, "k-1"), timeout=10)


async def test_no_lookup_hangs_when_its_query_is_cancelled_before_it_ran(
        app: FastAPI, client: httpx.AsyncClient, engine: Engine) -> None:
    await _messages(client, engine)
    database: Database = app.state.database
    lookups = [asyncio.create_task(fetch_message(database, m)) for m in ("k-1", "k-2", "k-1")]
    await asyncio.sleep(0)  # they have asked
    await asyncio.sleep(0)  # their query's task exists, and has not run yet
    queued = list(database.keyed._running)
    assert len(queued) == 1
    queued[0].cancel()
    done = await asyncio.wait_for(asyncio.gather(*lookups, return_exceptions=True), timeout=5)
    assert all(isinstance(d, asyncio.CancelledError) for d in done)
    # The next turn's lookups are read as usual.
    assert (await fetch_message(database, "k-2")).msg_id == "k-2"


async def test_a_lookup_whose_client_left_does_not_disturb_the_others(
        app: FastAPI, client: httpx.AsyncClient, engine: Engine) -> None:
    await _messages(client, engine)
    database: Database = app.state.database
    queries = Queries(database)
    gone = asyncio.create_task(fetch_message(database, "k-1"))
    stays = asyncio.create_task(fetch_message(database, "k-2"))
    await asyncio.sleep(0)  # both have asked; their query has not gone out yet
    gone.cancel()
    assert (await stays).msg_id == "k-2"
    with pytest.raises(asyncio.CancelledError):
        await gone
    assert queries.keys == [sorted([msg_key("k-1"), msg_key("k-2")])]
