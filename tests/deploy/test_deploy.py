"""The container deliverables read as files (tests/deploy/test_container.py builds and runs
the image)."""

from __future__ import annotations

import fnmatch
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from app.config import Settings

from ..helpers import running_server

ROOT = Path(__file__).resolve().parents[2]
HADOLINT = Path(sys.executable).with_name("hadolint")


def dockerfile_instruction(name: str) -> list[str]:
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    return [m.group(1).strip() for m in re.finditer(rf"^{name}\s+(.+)$", text, re.MULTILINE)]


def test_dockerfile_passes_hadolint() -> None:
    result = subprocess.run([str(HADOLINT), str(ROOT / "Dockerfile")], capture_output=True,
                            text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_image_runs_as_non_root_with_a_healthcheck() -> None:
    users = dockerfile_instruction("USER")
    assert users and users[-1].split(":")[0] not in {"root", "0"}
    assert any("/healthz" in h for h in dockerfile_instruction("HEALTHCHECK"))


def test_compose_names_image_database_and_healthchecks() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    db = next(s for s in services.values() if "postgres" in s.get("image", ""))
    app = services["dlr"]
    assert app["image"] and app["build"] == "."
    assert "postgresql://" in app["environment"]["DLR_DATABASE_URL"]
    assert db["healthcheck"]["test"] and app["healthcheck"]["test"]
    assert app["depends_on"]["db"]["condition"] == "service_healthy"
    entry = json.loads(dockerfile_instruction("ENTRYPOINT")[-1])
    assert app["entrypoint"] == entry  # one serve command for image and compose


def compose_services() -> dict[str, Any]:
    services: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    return services


def test_compose_waits_for_a_healthy_database_on_a_named_volume() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    db, app = compose["services"]["db"], compose["services"]["dlr"]
    assert app["depends_on"] == {"db": {"condition": "service_healthy"}}
    assert "pg_isready" in " ".join(db["healthcheck"]["test"])
    assert "/healthz" in " ".join(app["healthcheck"]["test"])
    # The database's files live on a named volume, so `docker compose down` keeps them.
    assert "pgdata:/var/lib/postgresql/data" in db["volumes"]
    assert "pgdata" in compose["volumes"]
    # So does the service's spool (the image keeps it at /data/spool.db): a callback
    # answered 200 during a database outage must outlive the container.
    assert "dlrdata:/data" in app["volumes"] and "dlrdata" in compose["volumes"]
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "DLR_SPOOL_PATH=/data/spool.db" in dockerfile and 'VOLUME ["/data"]' in dockerfile
    # The grace period outlasts the server's own 30 s drain of requests in flight.
    assert int(app["stop_grace_period"].removesuffix("s")) > 30


def test_compose_refuses_to_start_without_an_api_key_and_says_how() -> None:
    value = compose_services()["dlr"]["environment"]["DLR_API_KEYS"]
    # `${NAME:?message}`: compose stops with the message when NAME is unset or empty.
    match = re.fullmatch(r"\$\{DLR_API_KEYS:\?(?P<message>[^}]+)\}", value)
    assert match, value
    assert ".env" in match["message"] and "DLR_API_KEYS=" in match["message"]


def test_compose_does_not_restart_forever_on_a_configuration_error() -> None:
    policy = compose_services()["dlr"]["restart"]
    match = re.fullmatch(r"on-failure:(\d+)", policy)
    assert match and 1 <= int(match[1]) <= 10, policy


def test_dockerignore_keeps_the_venv_databases_and_secrets_out_of_the_build() -> None:
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    for path in (".venv", ".git", ".env", "dlr.db", "app/__pycache__"):
        assert any(fnmatch.fnmatch(path, p.removeprefix("**/")) or
                   fnmatch.fnmatch(path.rsplit("/", 1)[-1], p.removeprefix("**/"))
                   for p in patterns if not p.startswith("!")), path


@pytest.mark.slow  # starts `dlr serve` as a subprocess (about 2 s)
def test_the_image_entrypoint_serves_outside_a_container(tmp_path: Path) -> None:
    entry = json.loads(dockerfile_instruction("ENTRYPOINT")[-1])
    assert entry[:2] == ["dlr", "serve"]
    env = {"DLR_DATABASE_URL": f"sqlite:///{tmp_path / 'entry.db'}"}
    with running_server(env, command=entry) as (url, _):
        assert httpx.get(f"{url}/healthz").json() == {"status": "ok"}
        assert httpx.get(f"{url}/readyz").status_code == 200


def test_env_example_documents_every_setting() -> None:
    text = (ROOT / ".env.example").read_text()
    documented = set(re.findall(r"^#?\s*(DLR_[A-Z_]+)=", text, re.MULTILINE))
    assert documented == {f"DLR_{name.upper()}" for name in Settings.model_fields}
