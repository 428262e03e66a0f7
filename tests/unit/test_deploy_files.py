"""The shipped config files parse, and docker-compose accepts the compose file."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from gateway.settings import load_settings

ROOT = Path(__file__).resolve().parents[2]


def test_embedded_config_is_valid() -> None:
    settings = load_settings(ROOT / "config" / "embedded.yaml")
    assert settings.database.url.startswith("sqlite:///")
    assert settings.redis.url is None
    assert "mock-small" in settings.models


def test_production_example_is_valid(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_DATABASE_URL", "postgresql://gateway:pw@postgres:5432/gateway")
    monkeypatch.setenv("GATEWAY_REDIS_URL", "redis://redis:6379/0")
    monkeypatch.setenv("GATEWAY_KEY_PEPPER", "x" * 32)
    settings = load_settings(ROOT / "config" / "production.example.yaml")
    assert settings.redis.url == "redis://redis:6379/0"
    assert settings.server.workers == 2
    assert settings.models["gpt-4o-mini"].deployments[0].api_key_env == "OPENAI_API_KEY"


def test_docker_compose_config_accepts_the_file() -> None:
    if shutil.which("docker-compose") is None:
        pytest.skip("docker-compose is not installed (scripts/test installs it with apt where it can)")
    result = subprocess.run(
        ["docker-compose", "-f", str(ROOT / "docker-compose.yml"), "config", "-q"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
