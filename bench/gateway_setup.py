"""The gateway in its production-like shape: a fresh PostgreSQL ledger, 1,000 keys, a generated config, N workers."""

from __future__ import annotations

import secrets
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import sqlalchemy as sa
import yaml
from procs import BenchError, Service, cmdline, descendants, free_port
from source import source_root

from gateway import accounts
from gateway.auth import keys
from gateway.db import migrate
from gateway.db.engine import create_engine, utcnow
from gateway.db.schema import api_keys
from gateway.settings import Limits, Metering
from gateway.snapshot import bump_version

TEAM = "bench"
CHAT_MODEL = "bench-model"
STREAM_MODEL = "bench-stream"
MOCK_MODEL = "bench-mock"
PRICE = {"prompt": 0.5, "completion": 1.5}


# --- database --------------------------------------------------------------------------------------------


@contextmanager
def fresh_database(admin_url: str) -> Iterator[str]:
    """CREATE DATABASE gw_bench_<random>, migrated to head; DROP it (forcing connections closed) afterwards."""
    name = f"gw_bench_{secrets.token_hex(5)}"
    try:
        with psycopg.connect(admin_url, autocommit=True, connect_timeout=5) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
    except psycopg.Error as exc:
        raise BenchError(f"cannot create a database on {admin_url}: {exc}") from None
    url = admin_url.rsplit("/", 1)[0] + f"/{name}"
    try:
        engine = create_engine(url)
        try:
            migrate.upgrade(engine)
        finally:
            engine.dispose()
        yield url
    finally:
        with psycopg.connect(admin_url, autocommit=True, connect_timeout=5) as connection:
            connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def create_keys(database_url: str, pepper: str, count: int) -> list[str]:
    """One team and `count` keys, inserted in one batch (what `accounts.create_key` does, `count` times)."""
    engine = create_engine(database_url)
    try:
        team_id = accounts.create_team(engine, TEAM)
        now = utcnow()
        new_keys = [keys.generate() for _ in range(count)]
        rows = [
            {
                "id": key.key_id,
                "secret_hmac": keys.hash_key(pepper.encode(), key.secret),
                "name": f"bench-{index}",
                "team_id": team_id,
                "created_at": now,
            }
            for index, key in enumerate(new_keys)
        ]
        with engine.begin() as connection:
            connection.execute(api_keys.insert(), rows)
            bump_version(connection)
        return [key.secret for key in new_keys]
    finally:
        engine.dispose()


def usage_by_status(database_url: str) -> dict[int, int]:
    engine = create_engine(database_url)
    try:
        with engine.connect() as connection:
            rows = connection.execute(sa.text("SELECT status_code, count(*) FROM usage GROUP BY status_code"))
            return {int(status): int(count) for status, count in rows}
    finally:
        engine.dispose()


def duplicate_usage_rows(database_url: str) -> int:
    """Rows beyond the first per request id: each admitted request must leave exactly one."""
    engine = create_engine(database_url)
    try:
        with engine.connect() as connection:
            query = "SELECT count(*) - count(DISTINCT request_id) FROM usage"
            return int(connection.execute(sa.text(query)).scalar() or 0)
    finally:
        engine.dispose()


# --- configuration ---------------------------------------------------------------------------------------


# Far above what this machine can push, so the benchmark measures the limiter's cost and never its refusals.
_UNREACHABLE = {"rpm": 10**12, "tpm": 10**15, "concurrency": 10**6}
GENEROUS_LIMITS = {
    "key": _UNREACHABLE,
    "team": {**_UNREACHABLE, "daily_tokens": 10**15, "monthly_cost_usd": 10**9},
}


def gateway_config(
    *,
    database_url: str,
    pepper: str,
    nginx_url: str,
    mock_url: str,
    redis_url: str | None,
    limits: str,
    state_dir: Path,
    metering: bool = True,
    deployments: int = 1,
    prompt_estimate: str | None = None,
    overlap_admission: bool = True,
) -> dict[str, Any]:
    chat_deployments = [
        {"name": f"nginx-chat-{index}" if index else "nginx-chat", "base_url": f"{nginx_url}/v1"}
        for index in range(deployments)
    ]
    models: dict[str, Any] = {
        CHAT_MODEL: {"price": PRICE, "deployments": chat_deployments},
        STREAM_MODEL: {"price": PRICE, "deployments": [{"name": "nginx-stream", "base_url": f"{nginx_url}/stream/v1"}]},
        MOCK_MODEL: {"price": PRICE, "deployments": [{"name": "mock", "base_url": f"{mock_url}/v1"}]},
    }
    config: dict[str, Any] = {
        "listen": {"host": "127.0.0.1", "port": 8080},  # each instance gets --port
        "database": {"url": database_url},
        "auth": {"pepper": pepper},
        "server": {"shutdown_grace": 2},
        "models": models,
    }
    if redis_url is not None:
        config["redis"] = {"url": redis_url}
    if limits == "on":
        config["limits"] = dict(GENEROUS_LIMITS)
    if prompt_estimate is not None:
        config.setdefault("limits", {})["prompt_estimate"] = prompt_estimate
    if not overlap_admission and "overlap_admission" in Limits.model_fields:  # a --ref before it had none
        config.setdefault("limits", {})["overlap_admission"] = False
    if "spool_dir" in Metering.model_fields:
        # The default (data/spool under the working directory) would be shared with every other gateway started
        # from this checkout, and the writer replays whatever it finds there into *this* database.
        config["metering"] = {"spool_dir": str(state_dir / "spool")}
        if not metering:
            config["metering"]["enabled"] = False
    return config


def write_config(path: Path, config: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


# --- processes -------------------------------------------------------------------------------------------


@dataclass
class GatewayInstance:
    workers: int
    service: Service
    name: str = ""

    @property
    def label(self) -> str:
        return self.name or f"gateway w{self.workers}"

    def processes(self) -> dict[int, str]:
        """Every process of this gateway, pid -> role: the serving workers (`--worker-process` children, or the
        `serve` process itself when it serves alone), its supervisor, and helpers such as the ledger writer."""
        leader = self.service.popen.pid
        tree = [leader, *descendants(leader)]
        lines = {pid: cmdline(pid) for pid in tree}
        workers = {pid for pid, line in lines.items() if "--worker-process" in line} or {leader}
        return {pid: "worker" if pid in workers else _role(pid == leader, lines[pid]) for pid in tree}

    def worker_pids(self) -> list[int]:
        return [pid for pid, role in self.processes().items() if role == "worker"]


def _role(leader: bool, line: str) -> str:
    if leader:
        return "supervisor"
    words = line.split()
    if "gateway" in words and words.index("gateway") + 1 < len(words):
        return words[words.index("gateway") + 1]  # the CLI command, e.g. ledger-writer
    return Path(words[0]).name if words else "?"


def start_gateway(tmp: Path, config_path: Path, workers: int, label: str = "") -> GatewayInstance:
    port = free_port()
    service = Service.start(
        f"gateway ({workers} worker{'s' if workers > 1 else ''})",
        [
            sys.executable,
            "-m",
            "gateway",
            "serve",
            "--config",
            str(config_path),
            "--workers",
            str(workers),
            "--port",
            str(port),
        ],
        log_path=tmp / f"{(label or f'gateway-w{workers}').replace(' ', '-')}.log",
        cwd=source_root(),
        url=f"http://127.0.0.1:{port}",
    )
    instance = GatewayInstance(workers=workers, service=service, name=label)
    # Connections spread over workers by the kernel; several 200s in a row make it likely all are up.
    service.wait_ready("/ready", timeout=60, successes=4 * workers)
    if len(instance.worker_pids()) != workers:
        service.stop()
        raise BenchError(f"{instance.label}: expected {workers} worker processes, found {instance.worker_pids()}")
    return instance


def start_mock(tmp: Path, tokens_per_second: float) -> Service:
    port = free_port()
    service = Service.start(
        "mock backend",
        [
            sys.executable,
            "-m",
            "backends.mock",
            "--port",
            str(port),
            "--models",
            MOCK_MODEL,
            "--tokens-per-second",
            str(tokens_per_second),
        ],
        log_path=tmp / "mock.log",
        cwd=source_root(),
        url=f"http://127.0.0.1:{port}",
    )
    service.wait_ready("/health", timeout=30)
    return service
