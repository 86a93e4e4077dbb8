"""The promise under faults: a callback answered 200 is stored, whatever happens next.

A real `dlr serve` takes a burst of concurrent callbacks and is killed with SIGKILL in the
middle of it (or stopped with SIGTERM); every callback that got a 200 must be in the database,
and the provider's re-send of the others must then succeed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine, text

from app.config import Settings

from ..helpers import DLR, free_port

BURST = 3000
CONCURRENCY = 64
# Each test runs real servers through bursts of thousands of callbacks (15-20 s each).
pytestmark = pytest.mark.slow


@contextmanager
def server_process(database_url: str, port: int, log: Path | None = None
                   ) -> Iterator[subprocess.Popen[bytes]]:
    """`dlr serve`, its warnings and errors written to `log` if given."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DLR_")}
    env["DLR_DATABASE_URL"] = database_url
    with contextlib.ExitStack() as stack:
        out = stack.enter_context(log.open("wb")) if log is not None else subprocess.DEVNULL
        # A process group of its own, as a shell or systemd gives it: a signal may go to all.
        proc = subprocess.Popen([DLR, "serve", "--port", str(port), "--no-access-log",
                                 "--log-level", "warning"], env=env, start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=out)
        try:
            yield proc
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()


async def wait_ready(url: str) -> None:
    async with httpx.AsyncClient() as c:
        for _ in range(300):
            try:
                if (await c.get(f"{url}/readyz")).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError("server did not become ready")


def notification(i: int) -> dict[str, str]:
    kinds = [{"type": "delivery", "status": "delivered"}, {"type": "seen"},
             {"type": "reply", "text": f"ответ {i}"}]
    return {"msg_id": f"crash-{i // 3}", **kinds[i % 3]}


async def burst(url: str, indices: list[int], on_progress: Any = None) -> dict[int, str]:
    """Send the notifications concurrently, each on its own connection; index -> outcome."""
    outcome: dict[int, str] = {}
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in indices:
        queue.put_nowait(i)
    limits = httpx.Limits(max_keepalive_connections=0)

    async def worker() -> None:
        async with httpx.AsyncClient(limits=limits, timeout=20) as c:
            while not queue.empty():
                i = queue.get_nowait()
                try:
                    r = await c.post(f"{url}/dlr", data=notification(i))
                    outcome[i] = str(r.status_code)
                except httpx.ConnectError:
                    outcome[i] = "not-connected"
                except httpx.HTTPError as exc:
                    outcome[i] = f"dropped:{type(exc).__name__}"
                if on_progress:
                    on_progress(outcome)

    await asyncio.gather(*[worker() for _ in range(CONCURRENCY)])
    return outcome


async def resend(client: httpx.AsyncClient, indices: list[int]) -> dict[int, str]:
    """The provider's re-sends, to the next process: the app built in the test process on
    the same database (with the same writer child as `dlr serve`). A second real server
    here cost each test about 5 s of start-up and proved nothing more."""
    outcome: dict[int, str] = {}
    for start in range(0, len(indices), CONCURRENCY):
        part = indices[start:start + CONCURRENCY]
        answers = await asyncio.gather(*[client.post("/dlr", data=notification(i))
                                         for i in part])
        outcome |= {i: str(r.status_code) for i, r in zip(part, answers, strict=True)}
    return outcome


def stored(engine: Engine) -> set[tuple[str, str]]:
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT msg_key, type FROM events WHERE msg_key LIKE 'crash-%'"))
        return {(r[0], r[1]) for r in rows}


def key(i: int) -> tuple[str, str]:
    n = notification(i)
    return n["msg_id"], n["type"]


async def test_sigkill_mid_burst_loses_nothing_acknowledged(
    settings: Settings, engine: Engine, client: httpx.AsyncClient
) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with server_process(settings.database_url, port) as proc:
        await wait_ready(url)

        def kill_when_enough(outcome: dict[int, str]) -> None:
            acked = sum(1 for v in outcome.values() if v == "200")
            if acked >= BURST // 3 and proc.poll() is None:
                proc.send_signal(signal.SIGKILL)

        outcome = await burst(url, list(range(BURST)), kill_when_enough)
        proc.wait()
        assert proc.returncode == -signal.SIGKILL
    acked = [i for i, v in outcome.items() if v == "200"]
    unacked = [i for i, v in outcome.items() if v != "200"]
    assert len(acked) >= BURST // 3 and unacked, "the kill must land mid-burst"
    assert all(v in ("200", "not-connected") or v.startswith("dropped:")
               for v in outcome.values()), set(outcome.values())
    in_db = stored(engine)
    lost = [i for i in acked if key(i) not in in_db]
    assert lost == [], f"{len(lost)} acknowledged callbacks were lost"

    # The provider re-sends everything that was not answered 200, to the next process.
    resent = await resend(client, unacked)
    assert set(resent.values()) == {"200"}
    assert stored(engine) == {key(i) for i in range(BURST)}
    with engine.connect() as conn:
        total = conn.scalar(text("SELECT count(*) FROM events WHERE msg_key LIKE 'crash-%'"))
    assert total == BURST  # and none twice


@pytest.mark.parametrize("stop", ["SIGTERM to the server", "SIGINT to its process group",
                                  "SIGTERM to its process group"])
async def test_sigterm_finishes_what_it_took_and_loses_nothing(
    settings: Settings, engine: Engine, stop: str, tmp_path: Path, client: httpx.AsyncClient
) -> None:
    """`docker stop` signals the server alone; Ctrl-C in a terminal (SIGINT) and systemd's
    stop (SIGTERM) signal every process of the group, the writer's child process too, which
    must live on and finish what the server still hands it."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    stopping: list[bool] = []
    log = tmp_path / "serve.log"
    with server_process(settings.database_url, port, log) as proc:
        await wait_ready(url)
        sig = signal.SIGINT if stop.startswith("SIGINT") else signal.SIGTERM

        def stop_when_busy(outcome: dict[int, str]) -> None:
            if len(outcome) >= 500 and proc.poll() is None and not stopping:
                stopping.append(True)
                if stop.endswith("process group"):
                    os.killpg(proc.pid, sig)
                else:
                    proc.send_signal(sig)

        outcome = await burst(url, list(range(2000)), stop_when_busy)
        # A graceful stop: uvicorn re-raises SIGTERM after finishing, it is not killed.
        assert proc.wait(timeout=60) in (0, -signal.SIGTERM, -signal.SIGINT)
    # Every answer given was a 200 (no 5xx, no half answers). Requests still waiting in the
    # kernel's accept queue when the socket closed are reset unanswered, like refused ones.
    answered = {v for v in outcome.values() if not v.startswith(("dropped:", "not-"))}
    assert answered == {"200"}
    # The child wrote to the end: it did not die of the signal (a SIGINT would have shown
    # its KeyboardInterrupt) and none ended and was replaced on the way.
    written = log.read_bytes()
    assert b"Traceback" not in written and b"writer process ended" not in written, written
    acked = [i for i, v in outcome.items() if v == "200"]
    unacked = [i for i, v in outcome.items() if v != "200"]
    assert len(acked) >= 500 and unacked, "the stop must land mid-burst"
    in_db = stored(engine)
    assert [i for i in acked if key(i) not in in_db] == []
    # The provider re-sends the rest to the next process; then all are stored once.
    resent = await resend(client, unacked)
    assert len(resent) == len(unacked) and set(resent.values()) == {"200"}
    assert stored(engine) == {key(i) for i in range(2000)}
