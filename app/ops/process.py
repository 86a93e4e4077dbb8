"""Process-wide tuning, applied once per process however many apps it builds (tests build
hundreds): each setting changes the whole interpreter, so it belongs to the process, not to
one app."""

from __future__ import annotations

import gc
import logging
import sys

# The writer thread hands the GIL back and forth with the event loop at every database call
# (sqlite3 lets it go around each step and commit, psycopg around each round trip). While the
# loop is busy, each time the writer wants it back it waits for the switch interval before
# the loop is made to drop it: at the default 5 ms that stalled every batch (about 40% lower
# ingest rate with the benchmark's callback mix). A batch of 33 that takes 1.6 ms alone takes
# 5.0 ms beside a spinning thread at 0.5 ms, 3.1 ms at 0.1 ms on SQLite (PostgreSQL: 2.3 ms
# alone, 5.1 and 4.3 ms). Which interval serves more callbacks depends on the database
# (the benchmark's ingest, servers alternating on one machine, three rounds each,
# 2026-12-04): SQLite at 0.1 ms 0.46-0.48 of /healthz, at 0.5 ms 0.41-0.44, at 0.05 ms
# 0.41-0.44; PostgreSQL at 0.5 ms 0.45-0.49, at 0.1 ms 0.38-0.45, at 0.05 ms 0.41-0.50:
# shorter is no better there, where each of the writer's round trips also waits on the
# server (the last session measured the same: 0.57 at 0.5 ms, 0.52 at 0.1 ms).
# With the writing in a child process (app/store/writer_process.py, the default) the event loop
# drives the child itself and no thread of the server competes for the GIL while callbacks
# come in; the interval still matters to DLR_WRITER_PROCESS=false, and to the forwarder's
# and the read threads. (When a thread still stood between the loop and the child, it took
# the GIL back a few times a batch: at the default 5 ms, SQLite ingest 0.52-0.53 of /healthz
# against 0.55-0.76 at 0.1 ms, PostgreSQL 0.59-0.60 against 0.61-0.76 at 0.5 ms; 2026-12-06.)
SWITCH_INTERVAL = {"sqlite": 0.0001, "postgresql": 0.0005}

_tuned = False
_frozen = False


def tune(database: str) -> None:
    """Tune the interpreter for an app on `database` (its engine's dialect name). Once per
    process: a process that builds apps on both databases (the tests) keeps the first one's
    settings."""
    global _tuned
    if not _tuned:
        sys.setswitchinterval(SWITCH_INTERVAL[database])  # KeyError: not a database we run on
        _tuned = True
        # Record attributes no log line of ours prints. Looking up the caller's frame and the
        # thread and process names cost a fifth of an access line (profiled); the logging
        # HOWTO's "Optimization" section names these switches.
        logging._srcfile = None
        logging.logThreads = False
        logging.logProcesses = False
        logging.logMultiprocessing = False


def freeze_startup_objects() -> None:
    """Move what start-up built (modules, routes, pools) out of the collector's reach.

    Unfrozen, the collector's full passes walked it again and again and stalled every
    request for ~300 ms now and then (measured: p99 of lookups at 64 connections 314 ms ->
    150 ms). Only the first start-up's objects are frozen: freezing again per app would keep
    every stopped app's objects alive forever.
    """
    global _frozen
    if not _frozen:
        _frozen = True
        gc.collect()
        gc.freeze()
