"""Test harness: real processes on real sockets (mock backend, gateway), real databases, condition waits."""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import psycopg
import sqlalchemy as sa
import yaml

from gateway import accounts
from gateway.auth.store import KeyRecord
from gateway.db import migrate
from gateway.db.engine import as_utc, create_engine
from gateway.db.schema import usage as usage_table
from gateway.limits.overrides import set_override
from gateway.snapshot import read_version

ROOT = Path(__file__).resolve().parents[1]
PEPPER = "test-pepper-for-the-suite-0123456789"
POSTGRES_ADMIN_URL = os.environ.get("TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")

T = TypeVar("T")


def wait_for(predicate: Callable[[], T], *, timeout: float = 10.0, interval: float = 0.02, what: str = "") -> T:
    """Poll a condition until it holds (returns a truthy value); fail the test if it never does."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        time.sleep(interval)


@dataclass
class Process:
    """A child process that announced its address on stdout's first line."""

    popen: subprocess.Popen[bytes]
    url: str
    log_path: Path

    @classmethod
    def start(
        cls,
        command: list[str],
        *,
        log_path: Path,
        env: dict[str, str] | None = None,
        marker: str = "listening on ",
        timeout: float = 30.0,
    ) -> Process:
        log_file = open(log_path, "wb")  # noqa: SIM115 - handed to the child
        popen = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log_file, env=env, cwd=ROOT)
        log_file.close()
        assert popen.stdout is not None
        deadline = time.monotonic() + timeout
        while True:
            line = popen.stdout.readline().decode()
            if marker in line:
                url = line.split(marker, 1)[1].split()[0].strip()
                return cls(popen=popen, url=url, log_path=log_path)
            if (not line and popen.poll() is not None) or time.monotonic() > deadline:
                popen.kill()
                popen.wait()
                popen.stdout.close()
                raise RuntimeError(f"{command} did not start:\n{log_path.read_text()[-3000:]}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        if self.popen.stdout:
            self.popen.stdout.close()
        return self.popen.returncode

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (children, their children, ...)."""
    found: list[int] = []
    pending = [pid]
    while pending:
        parent = pending.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            try:
                children = [int(child) for child in (task / "children").read_text().split()]
            except OSError:
                continue
            found += children
            pending += children
    return found


class MockBackend:
    def __init__(self, process: Process) -> None:
        self.process = process
        self.url = process.url
        self.client = httpx.Client(base_url=self.url, timeout=10)

    def reset(self) -> None:
        self.client.post("/mock/reset").raise_for_status()

    def stats(self) -> dict[str, Any]:
        return self.client.get("/mock/stats").json()

    def requests(self) -> list[dict[str, Any]]:
        return self.client.get("/mock/requests").json()

    def cancelled(self) -> list[dict[str, Any]]:
        return self.client.get("/mock/cancelled").json()

    def set_faults(self, *faults: dict[str, Any]) -> None:
        self.client.post("/mock/faults", json={"faults": list(faults)}).raise_for_status()

    def close(self) -> None:
        self.client.close()
        self.process.stop()


def start_mock_backend(tmp: Path, *extra: str) -> MockBackend:
    process = Process.start(
        [sys.executable, "-m", "backends.mock", "--port", "0", *extra],
        log_path=tmp / f"mock-{secrets.token_hex(3)}.log",
    )
    return MockBackend(process)


# --- databases -------------------------------------------------------------------------------------------


@dataclass
class Database:
    url: str
    engine: sa.Engine
    drop: Callable[[], None] = field(default=lambda: None)

    def count_usage(self, **where: Any) -> int:
        clause = " AND ".join(f"{column} = :{column}" for column in where) or "1=1"
        with self.engine.connect() as connection:
            return int(connection.execute(sa.text(f"SELECT count(*) FROM usage WHERE {clause}"), where).scalar())

    def usage_rows(self) -> list[dict[str, Any]]:
        with self.engine.connect() as connection:
            rows = [dict(row) for row in connection.execute(sa.select(usage_table)).mappings()]
        for row in rows:
            row["started_at"] = as_utc(row["started_at"])
        return rows


def create_database(kind: str, tmp: Path) -> Database:
    if kind == "sqlite":
        url = f"sqlite:///{tmp / ('gw-' + secrets.token_hex(4) + '.db')}"
        engine = create_engine(url)
        migrate.upgrade(engine)
        return Database(url=url, engine=engine, drop=engine.dispose)
    name = f"gw_test_{secrets.token_hex(6)}"
    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as connection:
        connection.execute(f'CREATE DATABASE "{name}"')
    url = POSTGRES_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    engine = create_engine(url)
    migrate.upgrade(engine)

    def drop() -> None:
        engine.dispose()
        with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as connection:
            connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    return Database(url=url, engine=engine, drop=drop)


# --- failing services ------------------------------------------------------------------------------------


class ClosingServer:
    """A TCP server that counts connections and hangs up on each (a dying Redis or database, as a client
    sees it); `enough` is set once `wanted` have come."""

    def __init__(self, wanted: int) -> None:
        self.times: list[float] = []
        self.wanted = wanted
        self.enough = asyncio.Event()

    async def handle(self, _reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.times.append(asyncio.get_running_loop().time())
        if len(self.times) >= self.wanted:
            self.enough.set()
        writer.close()
        await writer.wait_closed()


# --- gateway ---------------------------------------------------------------------------------------------


def closed_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def gateway_config(database_url: str, backend_url: str, **overrides: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "listen": {"host": "127.0.0.1", "port": 0},
        "database": {"url": database_url},
        "auth": {"pepper": PEPPER, "cache_poll_interval": 0.1},
        "server": {"max_body_bytes": 64 * 1024, "shutdown_grace": 5},
        # Short, so the stall tests finish fast; the mock answers in microseconds otherwise.
        "timeouts": {"connect": 2, "first_byte": 1.5, "idle": 1.5},
        "metering": {"flush_interval": 0.05},
        # The shared gateway sees many injected faults; routing tests that exercise breakers set their own.
        "routing": {"breaker_threshold": 1000, "health_interval": 0.5, "scrape_interval": 0.5},
        "models": {
            "mock-small": {
                "price": {"prompt": 0.15, "completion": 0.6, "cached_prompt": 0.075},
                "deployments": [{"name": "mock-a", "base_url": f"{backend_url}/v1"}],
            },
            "mock-large": {
                "price": {"prompt": 2.5, "completion": 10},
                "deployments": [{"name": "mock-b", "base_url": f"{backend_url}/v1"}],
            },
            "mock-embed": {
                "price": {"prompt": 0.02, "completion": 0},
                "deployments": [{"name": "mock-e", "base_url": f"{backend_url}/v1"}],
            },
            "mock-dead": {
                "deployments": [{"name": "mock-dead", "base_url": f"http://127.0.0.1:{closed_port()}/v1"}],
            },
            "renamed": {
                "deployments": [{"name": "mock-r", "base_url": f"{backend_url}/v1", "served_model": "mock-small"}],
            },
        },
    }
    for dotted, value in overrides.items():
        node = config
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return config


class Gateway:
    def __init__(self, process: Process, config_path: Path) -> None:
        self.process = process
        self.url = process.url
        self.base_url = process.url + "/v1"
        self.config_path = config_path

    def stop(self, sig: int = signal.SIGTERM) -> int:
        return self.process.stop(sig)

    def log(self) -> str:
        return self.process.log()


def metric_value(gateway: Gateway, sample: str) -> float:
    """A sample's value in the gateway's /metrics (`name{labels}` as exposed), 0 if it is not there yet."""
    for line in httpx.get(f"{gateway.url}/metrics").text.splitlines():
        if line.startswith(sample + " "):
            return float(line.split()[-1])
    return 0.0


def write_config(tmp: Path, config: dict[str, Any]) -> Path:
    path = tmp / f"gateway-{secrets.token_hex(4)}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def start_gateway(tmp: Path, config: dict[str, Any], *extra: str) -> Gateway:
    config.setdefault("metering", {}).setdefault("spool_dir", str(tmp / "spool"))
    path = write_config(tmp, config)
    env = {**os.environ, "GATEWAY_LOG_LEVEL": "INFO"}
    process = Process.start(
        [sys.executable, "-m", "gateway", "serve", "--config", str(path), *extra],
        log_path=path.with_suffix(".log"),
        env=env,
        marker="gateway listening on ",
    )
    return Gateway(process, path)


def run_cli(*args: str, config: Path | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "gateway", *args]
    if config is not None:
        command += ["--config", str(config)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=60)
    if check and result.returncode != 0:
        raise AssertionError(f"{command} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


@dataclass
class Tenant:
    team: str
    user: str
    key: str
    key_id: str


def make_tenant(engine: sa.Engine, *, models: list[str] | None = None, expires_in: Any = None) -> Tenant:
    suffix = secrets.token_hex(4)
    team, user = f"team-{suffix}", f"user-{suffix}"
    accounts.create_team(engine, team)
    accounts.create_user(engine, user)
    created = accounts.create_key(
        engine, PEPPER.encode(), team=team, user=user, models=models, expires_in=expires_in, name="test"
    )
    return Tenant(team=team, user=user, key=created.secret, key_id=created.key_id)


# --- a Redis of the test's own -----------------------------------------------------------------------------


class RedisServer:
    """A redis-server on a free port, owned by the test: it can be stopped and started again (outage tests)."""

    def __init__(self, tmp: Path) -> None:
        self.dir = tmp / f"redis-{secrets.token_hex(3)}"
        self.dir.mkdir()
        self.port = closed_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.popen: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.popen = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.dir),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for(self.ping, timeout=10, what="redis-server to start")

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as connection:
                connection.sendall(b"PING\r\n")
                return connection.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        if self.popen is not None and self.popen.poll() is None:
            self.popen.terminate()
            self.popen.wait(10)
        self.popen = None


# --- limits --------------------------------------------------------------------------------------------------

WINDOW_S = 2.0
CHAT: list[dict[str, Any]] = [{"role": "user", "content": "Count the stars in the sky tonight."}]


@dataclass
class LimitsEnv:
    kind: str
    database: Database
    gateways: list[Gateway]
    redis: RedisServer | None

    def tenant(self, **limits: Any) -> Tenant:
        tenant = make_tenant(self.database.engine)
        if limits:
            set_override(self.database.engine, "team", tenant.team, limits)
        self.sync()
        return tenant

    def sync(self) -> None:
        """Wait until every gateway has loaded the latest snapshot (keys and overrides)."""
        with self.database.engine.connect() as connection:
            version = read_version(connection)
        for gateway in self.gateways:
            wait_for(
                lambda gateway=gateway: httpx.get(f"{gateway.url}/ready").json()["snapshot_version"] >= version,
                timeout=5,
                what="the gateway to load the snapshot",
            )


def limits_config(database_url: str, backend_url: str, redis_url: str | None, **extra: Any) -> dict[str, Any]:
    overrides = {
        "limits.window_seconds": WINDOW_S,
        "limits.buckets_per_window": 20,
        "limits.default_max_tokens": 5,
        "limits.lease_seconds": 5,
        "redis.timeout": 0.2,
        # Heavy concurrent load on a shared 2-core machine: no test here is about timeouts.
        "timeouts.first_byte": 15,
        "timeouts.idle": 15,
        **extra,
    }
    if redis_url:
        overrides["redis.url"] = redis_url
    return gateway_config(database_url, backend_url, **overrides)


def key_record(key_id: str, team_id: int, team_name: str) -> KeyRecord:
    """An active key of a team, with no user, model list or expiry: what the limiter's unit tests admit with."""
    return KeyRecord(
        key_id=key_id,
        secret_hmac=b"",
        name=None,
        team_id=team_id,
        team_name=team_name,
        user_id=None,
        user_name=None,
        allowed_models=None,
        tags=(),
        expires_at=None,
        inactive_reason=None,
    )
