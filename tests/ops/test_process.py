"""Process-wide tuning (app/ops/process.py): only `dlr serve` tunes, chosen by the first app's
database, applied once."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


def _interval_after(*databases: str) -> float:
    """The switch interval of a fresh interpreter after tune() for each database in turn."""
    code = ["import sys", "from app.ops import process",
            *(f"process.tune({d!r})" for d in databases), "print(sys.getswitchinterval())"]
    out = subprocess.run([sys.executable, "-c", "; ".join(code)], capture_output=True,
                         text=True)
    if out.returncode:
        raise RuntimeError(out.stderr.strip().splitlines()[-1])
    return float(out.stdout)


def test_each_database_gets_its_own_interval_and_the_first_app_decides() -> None:
    default = _interval_after()  # the interpreter's own
    sqlite, postgresql = _interval_after("sqlite"), _interval_after("postgresql")
    # SQLite's writer hands the GIL back more often per batch and gains from a shorter wait
    # (app/ops/process.py has the measurements).
    assert sqlite < postgresql < default
    # A process that builds apps on both (the tests do) keeps the first one's setting.
    assert _interval_after("sqlite", "postgresql") == sqlite
    assert _interval_after("postgresql", "sqlite") == postgresql


def test_an_unknown_database_is_refused_and_a_later_app_is_still_tuned() -> None:
    with pytest.raises(RuntimeError, match="KeyError: 'mysql'"):
        _interval_after("mysql")
    code = ("import sys; from app.ops import process\n"
            "try:\n    process.tune('mysql')\nexcept KeyError:\n    pass\n"
            "process.tune('sqlite'); print(sys.getswitchinterval())")
    after = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           check=True)
    assert float(after.stdout) == _interval_after("sqlite")


def test_building_and_starting_an_app_leaves_the_process_as_it_was(tmp_path: Path) -> None:
    """A library user's process is not retuned by the app; the app `dlr serve` runs is."""
    code = """
import asyncio, gc, logging, sys
from app.main import create_app, create_served_app

async def run(app):
    async with app.router.lifespan_context(app):
        pass

def state():
    return sys.getswitchinterval(), logging.logThreads, gc.get_freeze_count()

before = state()
asyncio.run(run(create_app()))
library = state()
asyncio.run(run(create_served_app()))
served = state()
print(library == before, served[0] < before[0], served[1], served[2] > before[2])
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DLR_")} | {
        "DLR_DATABASE_URL": f"sqlite:///{tmp_path}/t.db", "DLR_WRITER_PROCESS": "false"}
    subprocess.run([str(Path(sys.executable).with_name("dlr")), "migrate"], env=env,
                   check=True, capture_output=True)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "True", "False", "True"]
