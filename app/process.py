"""Process-wide tuning, applied once per process however many apps it builds (tests build
hundreds): each setting changes the whole interpreter, so it belongs to the process, not to
one app."""

from __future__ import annotations

import gc
import logging
import sys

# The writer threads hand the GIL back and forth with the event loop once per database call;
# at the default 5 ms switch interval each hand-off stalls the batch (measured with the
# benchmark's callback mix: about 40% lower ingest rate). 0.5 ms keeps hand-offs short.
SWITCH_INTERVAL = 0.0005

_tuned = False
_frozen = False


def tune() -> None:
    global _tuned
    if not _tuned:
        _tuned = True
        sys.setswitchinterval(SWITCH_INTERVAL)
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
