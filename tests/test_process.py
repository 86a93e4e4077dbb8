"""Process-wide tuning (app/process.py): chosen by the first app's database, applied once."""

from __future__ import annotations

import subprocess
import sys

import pytest


def _interval_after(*databases: str) -> float:
    """The switch interval of a fresh interpreter after tune() for each database in turn."""
    code = ["import sys", "from app import process",
            *(f"process.tune({d!r})" for d in databases), "print(sys.getswitchinterval())"]
    out = subprocess.run(
        [sys.executable, "-c", "; ".join(code)],
        capture_output=True, text=True, check=True)
    return float(out.stdout)


def test_each_database_gets_its_own_interval_and_the_first_app_decides() -> None:
    default = _interval_after()  # the interpreter's own
    sqlite, postgresql = _interval_after("sqlite"), _interval_after("postgresql")
    assert sqlite != postgresql
    assert sqlite < default and postgresql < default
    # A process that builds apps on both (the tests do) keeps the first one's setting.
    assert _interval_after("sqlite", "postgresql") == sqlite
    assert _interval_after("postgresql", "sqlite") == postgresql


def test_an_unknown_database_is_refused() -> None:
    with pytest.raises(subprocess.CalledProcessError):
        _interval_after("mysql")
