"""Which writer the write path gets: the child process (`DLR_WRITER_PROCESS`, the default)
or a thread of this process, each with a connection of its own."""

from __future__ import annotations

from app.store.db import Database
from app.store.outbox import Outbox
from app.store.spool import spooling
from app.store.writer import HandingWriter, ThreadWriter, Writer
from app.store.writer_process import RemoteWriter


def writer_for(database: Database, *, forwarding: bool, child: bool | None = None
               ) -> HandingWriter:
    """The write path's writer: in a child process if `child` (by default as
    `DLR_WRITER_PROCESS` says), else on a thread, on the database's engine. `forwarding`: it
    fills the forwarding outbox in the same commit."""
    if child is None:
        child = database.settings.writer_process
    if child:
        return RemoteWriter(database.settings, forwarding=forwarding)
    settings = database.settings
    return ThreadWriter(spooling(Writer(database.engine, Outbox() if forwarding else None),
                                 settings.spool_file, settings.spool_max_bytes))


