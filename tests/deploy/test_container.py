"""The real image, built from the Dockerfile with podman and run as a user would run it.

`make container-test` runs this module (it installs podman and mmdebstrap where missing and
makes the base image, see tests/container/base-image.sh); `make test` leaves it out. Where
podman is missing or cannot run containers, the tests skip with the reason, except under
`make container-test` (DLR_CONTAINER_TEST_REQUIRED=1), where that is a failure.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from ..helpers import free_port

ROOT = Path(__file__).resolve().parents[2]
BASE_IMAGE = "docker.io/library/python:3.11-slim"
IMAGE = "localhost/dlr-receiver:test"
KEY = "container-test-key-0123456789"
# `podman stop -t`: what compose's stop_grace_period gives; SIGKILL after it (exit code 137).
GRACE = 40
BURST = 600
CONCURRENCY = 32

# podman settings for machines where podman's own cannot start a container (this one).
OWN_CONF = ROOT / "tests" / "container" / "containers.conf"
PODMAN_ENV: dict[str, str] = {}

pytestmark = [pytest.mark.container, pytest.mark.slow]


def podman(*args: str, check: bool = True, timeout: float = 120,
           ) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["podman", *args], capture_output=True, text=True,
                            env=os.environ | PODMAN_ENV, timeout=timeout, check=False)
    if check and result.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)}: exit {result.returncode}\n"
                             f"{result.stdout}{result.stderr}")
    return result


def why_podman_cannot_run() -> str | None:
    if shutil.which("podman") is None:
        return "podman is not installed (`make container-test` installs it with apt-get)"
    if podman("image", "exists", BASE_IMAGE, check=False).returncode != 0:
        return (f"the base image {BASE_IMAGE} is missing: `podman pull python:3.11-slim`, or "
                "tests/container/base-image.sh builds a stand-in (`make container-test` does)")
    probe = podman("run", "--rm", "--pull=never", BASE_IMAGE, "true", check=False)
    if probe.returncode == 0:
        return None
    # The machine's podman configuration failed: try the project's (runc, cgroupfs, no ulimits).
    PODMAN_ENV["CONTAINERS_CONF"] = str(OWN_CONF)
    retry = podman("run", "--rm", "--pull=never", BASE_IMAGE, "true", check=False)
    if retry.returncode == 0:
        return None
    del PODMAN_ENV["CONTAINERS_CONF"]
    last = [(r.stderr.strip().splitlines() or ["no output"])[-1] for r in (probe, retry)]
    return (f"podman cannot run containers here: {last[0]}; with {OWN_CONF.name}: {last[1]}")


@pytest.fixture(scope="module")
def image() -> str:
    reason = why_podman_cannot_run()
    if reason is not None:
        if os.environ.get("DLR_CONTAINER_TEST_REQUIRED"):
            pytest.fail(reason)
        pytest.skip(reason)
    # --pull=never: the base image is the local one (pulled, or the stand-in); layers are
    # cached by podman, so an unchanged tree rebuilds in seconds.
    # Docker's image format keeps the Dockerfile's HEALTHCHECK (OCI's has none).
    podman("build", "--pull=never", "--format", "docker", "--tag", IMAGE, str(ROOT),
           timeout=1200)
    return IMAGE


@pytest.fixture
def volume() -> Iterator[str]:
    name = f"dlr-test-data-{uuid.uuid4().hex[:8]}"
    podman("volume", "create", name)
    yield name
    podman("volume", "rm", "--force", name, check=False)


@dataclass
class Container:
    name: str
    url: str

    def exit_code(self) -> int:
        out = podman("inspect", "--format", "{{.State.ExitCode}}", self.name).stdout
        return int(out.strip())

    def logs(self) -> str:
        result = podman("logs", self.name, check=False)
        return result.stdout + result.stderr


@contextmanager
def container(image: str, volume: str, **env: str) -> Iterator[Container]:
    """Run the image detached, its port published on loopback, as `docker run -p` would."""
    name = f"dlr-test-{uuid.uuid4().hex[:8]}"
    port = free_port()
    env_args = [arg for k, v in env.items() for arg in ("--env", f"{k}={v}")]
    podman("run", "--detach", "--name", name, "--publish", f"127.0.0.1:{port}:8000",
           "--volume", f"{volume}:/data", *env_args, image)
    box = Container(name, f"http://127.0.0.1:{port}")
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{box.url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            state = podman("inspect", "--format", "{{.State.Running}}", name).stdout.strip()
            if state != "true" or time.monotonic() > deadline:
                raise AssertionError(f"the container did not come up:\n{box.logs()}")
            time.sleep(0.3)
        yield box
    finally:
        podman("rm", "--force", "--time", "0", name, check=False)


def auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {KEY}"}


def test_serves_as_non_root_and_answers_the_api_with_a_key(image: str, volume: str) -> None:
    msg_id = str(uuid.uuid4())
    with container(image, volume, DLR_API_KEYS=KEY) as box:
        assert httpx.get(f"{box.url}/healthz").json() == {"status": "ok"}
        # The image's own HEALTHCHECK, as Docker and compose run it, passes.
        podman("healthcheck", "run", box.name)
        r = httpx.post(f"{box.url}/dlr", data={"type": "delivery", "msg_id": msg_id,
                                               "status": "delivered"})
        assert (r.status_code, r.text) == (200, "OK")

        # The host is not loopback to the container: without the key the API refuses.
        assert httpx.get(f"{box.url}/api/v1/messages/{msg_id}").status_code == 401
        r = httpx.get(f"{box.url}/api/v1/messages/{msg_id}", headers=auth())
        assert r.status_code == 200 and r.json()["status"] == "delivered"

        # PID 1 is `dlr serve` itself (so it gets SIGTERM), owned by a non-root uid.
        probe = podman("exec", box.name, "python", "-c",
                       "import os; print(os.stat('/proc/1').st_uid); "
                       "print(open('/proc/1/cmdline').read().replace(chr(0), ' '))").stdout
        uid, cmdline = probe.splitlines()[:2]
        assert int(uid) != 0
        assert "dlr serve" in cmdline


def test_build_context_leaves_out_the_venv_databases_and_caches(image: str) -> None:
    listing = podman("run", "--rm", "--entrypoint", "find", image, "/srv/dlr",
                     "-name", "__pycache__", "-o", "-name", "*.db", "-o", "-name", ".env",
                     "-o", "-name", ".venv", "-o", "-name", ".git").stdout
    assert listing.strip() == ""


def test_sigterm_during_a_burst_loses_no_acknowledged_callback_and_data_survives(
        image: str, volume: str) -> None:
    run = uuid.uuid4().hex[:8]
    ids = [f"burst-{run}-{i}" for i in range(BURST)]
    with container(image, volume, DLR_API_KEYS=KEY) as box:
        acked = asyncio.run(burst_then_stop(box, ids, stop_after=BURST // 4))
        # Exit 0: it stopped by itself within the grace period (SIGKILL would be 137).
        assert box.exit_code() == 0, box.logs()
        assert BURST // 4 <= len(acked) < BURST

    # A new container on the same volume: everything acknowledged is there.
    with container(image, volume, DLR_API_KEYS=KEY) as box:
        with httpx.Client(base_url=box.url, headers=auth(), timeout=10) as client:
            missing = [m for m in acked
                       if client.get(f"/api/v1/messages/{m}").status_code != 200]
            assert missing == []
            # The provider re-sends what got no 200; afterwards each id is one event.
            for msg_id in ids:
                if msg_id not in acked:
                    r = client.get("/dlr", params={"type": "delivery", "msg_id": msg_id,
                                                   "status": "delivered"})
                    assert r.status_code == 200
            stats = client.get("/api/v1/stats").json()
            assert stats["events_by_type"]["delivery"] == BURST


async def burst_then_stop(box: Container, ids: list[str], stop_after: int) -> set[str]:
    """Send one delivery per id, CONCURRENCY at a time; once stop_after are acknowledged,
    `podman stop` the container (SIGTERM, then SIGKILL after GRACE seconds) while the rest is
    still being sent. Returns the ids answered 200."""
    acked: set[str] = set()
    gate = asyncio.Semaphore(CONCURRENCY)
    stopping: list[asyncio.Task[subprocess.CompletedProcess[str]]] = []

    async def one(client: httpx.AsyncClient, msg_id: str) -> None:
        async with gate:
            try:
                r = await client.get(f"{box.url}/dlr", params={
                    "type": "delivery", "msg_id": msg_id, "status": "delivered"})
            except httpx.HTTPError:
                return  # never acknowledged: the provider re-sends it
            if r.status_code == 200:
                acked.add(msg_id)
            if len(acked) >= stop_after and not stopping:
                stopping.append(asyncio.create_task(asyncio.to_thread(
                    podman, "stop", "--time", str(GRACE), box.name, timeout=GRACE + 30)))

    limits = httpx.Limits(max_connections=CONCURRENCY)
    async with httpx.AsyncClient(timeout=GRACE + 10, limits=limits) as client:
        await asyncio.gather(*(one(client, msg_id) for msg_id in ids))
    assert stopping, "the burst ended before the container was stopped"
    await stopping[0]
    return acked


def test_a_configuration_error_exits_non_zero_with_one_clear_line(image: str) -> None:
    name = f"dlr-test-{uuid.uuid4().hex[:8]}"
    podman("run", "--detach", "--name", name, "--env", "DLR_BATCH_MAX_SIZE=lots", image)
    try:
        code = int(podman("wait", name, timeout=60).stdout.strip())
        # The container's own output (podman's messages about the host are not part of it).
        logs = podman("logs", name)
        lines = [line for line in (logs.stdout + logs.stderr).splitlines() if line.strip()]
    finally:
        podman("rm", "--force", "--volumes", name, check=False)
    assert code != 0
    assert len(lines) == 1, lines
    assert "DLR_BATCH_MAX_SIZE" in lines[0]
