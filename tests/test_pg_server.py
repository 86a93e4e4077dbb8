"""The PostgreSQL tests run on a machine without PostgreSQL (tests/helpers.py starts one)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from .helpers import listening

ROOT = Path(__file__).resolve().parent.parent
NOTHING_LISTENS = "postgresql://postgres@127.0.0.1:1/postgres"


def test_listening_tells_a_server_from_a_closed_port() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        assert listening(f"postgresql://postgres@127.0.0.1:{port}/postgres")
    assert not listening(f"postgresql://postgres@127.0.0.1:{port}/postgres")
    assert not listening(NOTHING_LISTENS)


def leftovers() -> set[Path]:
    return set(Path(tempfile.gettempdir()).glob("dlr-test-pg-*"))


@pytest.mark.slow
def test_database_tests_pass_where_nothing_listens_on_the_admin_url() -> None:
    """A handful of the suite's PostgreSQL tests, run as `make test` would run them on a
    laptop without PostgreSQL: the admin URL points at a closed port."""
    before = leftovers()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DLR_")}
    env["DLR_TEST_PG_ADMIN"] = NOTHING_LISTENS
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         "-k", "postgresql", "tests/store/test_status.py"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
    tail = result.stdout[-3000:] + result.stderr[-3000:]
    assert result.returncode == 0, tail
    summary = result.stdout.strip().splitlines()[-1]
    assert " passed" in summary and "skipped" not in summary and "failed" not in summary, tail
    # The throwaway server was stopped and its directory removed.
    assert leftovers() == before
