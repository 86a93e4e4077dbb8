"""Point reads gathered per turn of the event loop: what the single-message lookup runs on.

A lookup is one indexed read, and on its own it paid a whole round trip through the driver:
psycopg's async execute costs ~90 µs of the loop's CPU even for `SELECT 1`, more than the
read itself. So the lookups that arrive in one turn of the loop go out as one query
(`key IN (the keys)`), and each waiter gets its own key's rows. Measured with the
benchmark's lookups at 1M messages, 64 connections: server CPU per lookup on PostgreSQL
383-400 µs one by one, 168-171 gathered; on SQLite 254 and 187-199. A lookup that arrives
alone waits no longer than before: its query goes out at the end of the turn that asked.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import Any

import psycopg
from sqlalchemy import ColumnElement, Connection, Select, bindparam, func, select


class KeyedRead:
    """A prebuilt read of the rows that belong to one key, askable for many keys at once.

    `statement` selects the rows without a condition on the key; the key column is added as
    the last column of every row, to hand each row to whoever asked for its key.
    """

    def __init__(self, statement: Select[Any], key: ColumnElement[Any]) -> None:
        keyed = statement.add_columns(key)
        values = func.json_each(bindparam("keys")).table_valued("value")
        self._by_dialect: dict[str, Select[Any]] = {
            # An array parameter: one statement, and one plan, for any number of keys.
            "postgresql": keyed.where(key == func.any(bindparam("keys"))),
            # SQLite has no arrays: the keys as one JSON text.
            "sqlite": keyed.where(key.in_(select(values.c.value))),
        }

    def bound(self, dialect: str, keys: Sequence[str]) -> tuple[Select[Any], dict[str, Any]]:
        """The statement for `dialect` and its parameters for `keys`."""
        return self._by_dialect[dialect], {
            "keys": list(keys) if dialect == "postgresql" else json.dumps(list(keys))}

    def rows(self, conn: Connection, key: str) -> list[Sequence[Any]]:
        """The rows of one key on a synchronous connection (the commands)."""
        statement, params = self.bound(conn.dialect.name, [key])
        return [row[:-1] for row in conn.execute(statement, params)]


def _bindable(key: str) -> bool:
    """Whether `key` can be bound as text on both databases: no NUL, and valid UTF-8. The write
    path stores neither (ids must be printable; NUL in text becomes U+FFFD)."""
    if "\x00" in key:
        return False
    try:
        key.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


RowReader = Callable[[Select[Any], dict[str, Any]], Awaitable[list[Any]]]
_Waiting = dict[str, list["asyncio.Future[list[Any]]"]]


# Errors a key's value causes rather than the database: a character the database's
# encoding cannot hold, a value the driver refuses. After one of these, a query of several
# keys is tried key by key, so that only the key at fault fails.
_KEY_ERRORS = (ValueError, psycopg.DataError, sqlite3.DataError)


class KeyedReads:
    """One application's keyed reads, gathered per turn of its loop (`Database.read_keyed`).

    A query that fails because the database does (down, timed out) fails every lookup it
    carried with the database's own error, so each answers as a lone lookup's failure would;
    one that fails because of a key is repeated key by key. However the query's task ends,
    even cancelled before it ran, no lookup is left waiting.
    """

    def __init__(self, read_rows: RowReader, dialect: str) -> None:
        self._read_rows = read_rows
        self._dialect = dialect
        self._waiting: dict[KeyedRead, _Waiting] = {}
        self._running: set[asyncio.Task[None]] = set()  # strong references until done

    async def rows(self, read: KeyedRead, key: str) -> list[Any]:
        """The rows of `key`, read with every other key asked for in this turn."""
        if not _bindable(key):
            # No stored key has it, and binding it would fail the query of every lookup
            # asked beside it (PostgreSQL's text refuses NUL; a lone surrogate is no UTF-8).
            return []
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[Any]] = loop.create_future()
        waiting = self._waiting.get(read)
        if waiting is None:
            waiting = self._waiting[read] = {}
            loop.call_soon(self._send, read)
        waiting.setdefault(key, []).append(future)
        return await future

    def _send(self, read: KeyedRead) -> None:
        self._start(read, self._waiting.pop(read))

    def _start(self, read: KeyedRead, waiting: _Waiting) -> None:
        task = asyncio.get_running_loop().create_task(self._answer(read, waiting))
        self._running.add(task)
        task.add_done_callback(partial(self._ended, waiting))

    def _ended(self, waiting: _Waiting, task: asyncio.Task[None]) -> None:
        """Whatever ended the query's task, every waiter still waiting hears of it."""
        self._running.discard(task)
        error = None if task.cancelled() else task.exception()
        for futures in waiting.values():
            for future in futures:
                if future.done():  # answered, or its client went away
                    continue
                if error is None:
                    future.cancel()
                else:
                    future.set_exception(error)

    async def _answer(self, read: KeyedRead, waiting: _Waiting) -> None:
        statement, params = read.bound(self._dialect, list(waiting))
        try:
            rows = await self._read_rows(statement, params)
        except _KEY_ERRORS:
            if len(waiting) == 1:
                raise  # the key at fault: its own lookup fails (see _ended)
            for key, futures in waiting.items():
                self._start(read, {key: futures})
            waiting.clear()  # theirs now: this task's end must not touch them
            return
        by_key: dict[str, list[Any]] = {}
        for row in rows:
            by_key.setdefault(row[-1], []).append(row[:-1])
        for key, futures in waiting.items():
            found = by_key.get(key, [])
            for future in futures:
                if not future.done():  # a waiter whose client went away is cancelled
                    future.set_result(found)
