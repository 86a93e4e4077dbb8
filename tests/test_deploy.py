"""The container deliverables, checked with what runs here (no Docker engine on this machine)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import httpx
import yaml

from app.config import Settings

from .server import running_server

ROOT = Path(__file__).resolve().parent.parent
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
