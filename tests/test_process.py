"""Process-wide tuning (app/process.py): chosen by the first app's database, applied once."""

from __future__ import annotations

import subprocess
import sys

import pytest


def _interval_after(*databases: str) -> float:
    """The switch interval of a fresh interpreter after tune() for each database in turn."""
    code = ["import sys", "from app import process",
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
    # (app/process.py has the measurements).
    assert sqlite < postgresql < default
    # A process that builds apps on both (the tests do) keeps the first one's setting.
    assert _interval_after("sqlite", "postgresql") == sqlite
    assert _interval_after("postgresql", "sqlite") == postgresql


def test_an_unknown_database_is_refused_and_a_later_app_is_still_tuned() -> None:
    with pytest.raises(RuntimeError, match="KeyError: 'mysql'"):
        _interval_after("mysql")
    code = ("import sys; from app import process\n"
            "try:\n    process.tune('mysql')\nexcept KeyError:\n    pass\n"
            "process.tune('sqlite'); print(sys.getswitchinterval())")
    after = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           check=True)
    assert float(after.stdout) == _interval_after("sqlite")
