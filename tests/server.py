"""Run the real `dlr serve` in a subprocess, as a user would."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

DLR = str(Path(sys.executable).with_name("dlr"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def running_server(env: dict[str, str], *args: str, command: list[str] | None = None,
                   cwd: Path | None = None) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """Start `dlr serve` (or `command`, a serve command line) on a free port; stop it after."""
    port = free_port()
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("DLR_")} | env
    base = [DLR, *command[1:]] if command else [DLR, "serve"]
    proc = subprocess.Popen(
        [*base, "--port", str(port), "--log-level", "warning", *args],
        env=full_env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                out = proc.stdout.read().decode() if proc.stdout else ""
                raise RuntimeError(f"dlr serve exited with {proc.returncode}: {out}")
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("dlr serve did not come up in 30 s")
            time.sleep(0.1)
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stdout:
            proc.stdout.close()


@contextmanager
def serving_in_thread(app: object, port: int | None = None) -> Iterator[str]:
    """Serve an ASGI app with uvicorn on a loopback port in a thread (lifespan included)."""
    import threading

    import uvicorn

    config = uvicorn.Config(app, host="127.0.0.1", port=port or free_port(), log_level="warning",  # type: ignore[arg-type]
                            proxy_headers=False, lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("in-thread server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{config.port}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)
