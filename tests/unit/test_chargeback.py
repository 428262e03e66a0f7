"""GPU chargeback (`gpu_share`, `gateway usage gpu-share`): a vLLM pool's GPU-hours split across teams by their
share of the tokens its workers processed, with what the workers did beyond the ledger as "(unattributed)".

Against real SQLite and PostgreSQL databases; ledger rows go in through the ledger writer's own insert and worker
counters through the monitor's `sample_rows`/`insert_samples`.
"""

from __future__ import annotations

import json
import secrets
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from gateway import accounts
from gateway.breaker import CircuitBreaker
from gateway.db.partitions import ensure_partitions
from gateway.metering.chargeback import UNATTRIBUTED, gpu_share
from gateway.metering.writer import insert_rows
from gateway.routing.monitor import insert_samples, sample_rows
from gateway.routing.table import DeploymentRuntime, Endpoint
from gateway.settings import Deployment, Timeouts
from tests.harness import Database, create_database, gateway_config, run_cli, write_config

START = datetime(2026, 11, 20, tzinfo=UTC)
END = START + timedelta(days=1)
HOUR = timedelta(hours=1)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Database]:
    db = create_database(request.param, Path(tmp_path_factory.mktemp("chargeback")))
    with db.engine.begin() as connection:
        ensure_partitions(connection, now=START)
    yield db
    db.drop()


def team(engine: sa.Engine, label: str) -> tuple[int, str]:
    name = f"{label}-{secrets.token_hex(3)}"
    return accounts.create_team(engine, name), name


def ledger_row(*, deployment: str, team_id: int, at: datetime, prompt: int, completion: int) -> dict[str, Any]:
    """A full ledger row, as the writer inserts it (the shape of tests/unit/test_ledger_writer.py)."""
    return {
        "request_id": uuid.uuid4(),
        "started_at": at,
        "client_request_id": None,
        "endpoint": "chat",
        "key_id": "k1",
        "team_id": team_id,
        "user_id": None,
        "end_user": None,
        "model": "pool-model",
        "deployment": deployment,
        "upstream_model": "pool-model",
        "prompt_tokens": prompt,
        "cached_prompt_tokens": prompt // 4,
        "completion_tokens": completion,
        "reasoning_tokens": 0,
        "usage_source": "backend",
        "cost_nanousd": 1000,
        "price_id": None,
        "status_code": 200,
        "error_type": None,
        "finish_reason": "stop",
        "streamed": False,
        "client_disconnected": False,
        "first_token_ms": 1.0,
        "duration_ms": 2.0,
        "tags": None,
        "first_token_at": at,
        "ended_at": at,
        "queue_ms": None,
    }


class Pool:
    """A vLLM deployment's workers, whose counters the monitor would scrape and sample."""

    def __init__(self, name: str, workers: int) -> None:
        config = Deployment(name=name, base_urls=[f"http://10.9.0.{i + 1}:8000/v1" for i in range(workers)])
        self.runtime = DeploymentRuntime(config=config, model="pool-model", timeouts=Timeouts(), upstream_model="m")
        self.runtime.set_urls(config.static_urls, (3, 5.0))
        # One worker the monitor never scraped: no sample for it.
        self.unscraped = Endpoint(self.runtime, "http://10.9.0.99:8000/v1", CircuitBreaker())

    @property
    def name(self) -> str:
        return self.runtime.name

    def sample(self, engine: sa.Engine, at: datetime, counters: dict[int, tuple[int, int]]) -> list[dict[str, Any]]:
        """Record `{worker index: (prompt_tokens_total, generation_tokens_total)}` at `at`, as `sample_forever`."""
        endpoints = []
        for index, (prompt, generation) in counters.items():
            endpoint = self.runtime.endpoints[index]
            endpoint.prompt_tokens_total = float(prompt)
            endpoint.generation_tokens_total = float(generation)
            endpoints.append(endpoint)
        rows = sample_rows([*endpoints, self.unscraped], at)
        insert_samples(engine, rows)
        return rows


def gpu_hours_total(rows: list[dict[str, Any]]) -> Decimal:
    return sum((Decimal(row["gpu_hours"]) for row in rows), Decimal(0))


def seed_two_teams(engine: sa.Engine) -> tuple[Pool, str, str]:
    """Team A: 3000 tokens, team B: 1000, in the ledger; the workers processed 6000 (one restarted)."""
    pool = Pool(f"pool-{secrets.token_hex(3)}", workers=2)
    team_a, name_a = team(engine, "team-a")
    team_b, name_b = team(engine, "team-b")
    rows = [
        ledger_row(deployment=pool.name, team_id=team_a, at=START + HOUR, prompt=1000, completion=500),
        ledger_row(deployment=pool.name, team_id=team_a, at=START + 2 * HOUR, prompt=1200, completion=300),
        ledger_row(deployment=pool.name, team_id=team_b, at=START + 2 * HOUR, prompt=600, completion=400),
        # Not counted: another deployment, before the period, and at its (exclusive) end.
        ledger_row(deployment="other-pool", team_id=team_b, at=START + HOUR, prompt=10**6, completion=10**6),
        ledger_row(deployment=pool.name, team_id=team_b, at=START - HOUR, prompt=10**6, completion=10**6),
        ledger_row(deployment=pool.name, team_id=team_a, at=END, prompt=10**6, completion=10**6),
    ]
    assert insert_rows(engine, rows) == len(rows)

    pool.sample(engine, START - timedelta(minutes=1), {0: (1, 1), 1: (0, 0)})  # before the period: ignored
    pool.sample(engine, START, {0: (8000, 2000), 1: (0, 0)})
    pool.sample(engine, START + HOUR, {0: (9500, 2500), 1: (1000, 200)})  # worker 0: +2000
    pool.sample(engine, START + 2 * HOUR, {0: (400, 100), 1: (1800, 400)})  # worker 0 restarted: +500
    pool.sample(engine, START + 3 * HOUR, {0: (1200, 300), 1: (2000, 500)})  # worker 0: +1000; worker 1: 2500 in all
    pool.sample(engine, END + timedelta(minutes=1), {0: (10**7, 0), 1: (10**7, 0)})  # after the period: ignored
    return pool, name_a, name_b


def test_gpu_hours_split_by_token_share_with_unattributed_work(database: Database) -> None:
    pool, name_a, name_b = seed_two_teams(database.engine)

    rows = gpu_share(database.engine, deployment=pool.name, start=START, end=END, gpu_hours=Decimal("10"))

    # Workers: 2000 + 500 + 1000 (worker 0, across its restart) + 2500 (worker 1) = 6000 tokens; the ledger 4000.
    assert rows == [
        {"team": UNATTRIBUTED, "tokens": 2000, "share": "0.333333", "gpu_hours": "3.3333"},
        {"team": name_a, "tokens": 3000, "share": "0.500000", "gpu_hours": "5.0000"},
        {"team": name_b, "tokens": 1000, "share": "0.166667", "gpu_hours": "1.6667"},
    ]
    assert gpu_hours_total(rows) == Decimal("10")


def test_samples_written_twice_count_once(database: Database) -> None:
    """Every gateway process samples the same workers each minute: the first writer wins, nothing doubles."""
    pool, _, _ = seed_two_teams(database.engine)
    before = gpu_share(database.engine, deployment=pool.name, start=START, end=END, gpu_hours=Decimal("10"))
    # A second process with its own (slightly later) reading of the same minutes.
    pool.sample(database.engine, START + HOUR, {0: (9600, 2600), 1: (1100, 300)})
    pool.sample(database.engine, START + 3 * HOUR, {0: (1300, 400), 1: (2100, 600)})
    after = gpu_share(database.engine, deployment=pool.name, start=START, end=END, gpu_hours=Decimal("10"))
    assert after == before


def test_counter_reset_is_not_a_negative_increase(database: Database) -> None:
    pool = Pool(f"pool-{secrets.token_hex(3)}", workers=1)
    team_id, name = team(database.engine, "solo")
    insert_rows(
        database.engine, [ledger_row(deployment=pool.name, team_id=team_id, at=START, prompt=90, completion=10)]
    )
    pool.sample(database.engine, START, {0: (50_000, 50_000)})
    pool.sample(database.engine, START + HOUR, {0: (60, 20)})  # restarted: 80 tokens since
    pool.sample(database.engine, START + 2 * HOUR, {0: (100, 40)})  # +60

    rows = gpu_share(database.engine, deployment=pool.name, start=START, end=END, gpu_hours=Decimal("8"))

    assert rows == [
        {"team": UNATTRIBUTED, "tokens": 40, "share": "0.285714", "gpu_hours": "2.2857"},
        {"team": name, "tokens": 100, "share": "0.714286", "gpu_hours": "5.7143"},
    ]
    assert gpu_hours_total(rows) == Decimal("8")


def test_without_worker_samples_the_ledger_alone_splits_the_hours(database: Database) -> None:
    pool = Pool(f"pool-{secrets.token_hex(3)}", workers=1)
    teams = [team(database.engine, f"t{i}") for i in range(3)]
    insert_rows(
        database.engine,
        [
            ledger_row(deployment=pool.name, team_id=team_id, at=START + HOUR, prompt=70, completion=30)
            for team_id, _ in teams
        ],
    )

    rows = gpu_share(database.engine, deployment=pool.name, start=START, end=END, gpu_hours=Decimal("10"))

    assert [row["team"] for row in rows] == sorted(name for _, name in teams)
    assert all(row["tokens"] == 100 and row["share"] == "0.333333" for row in rows)
    # Three equal thirds of 10 hours: the unit that rounding each down leaves over goes to one of them, so the
    # lines add up to the whole.
    assert [row["gpu_hours"] for row in rows] == ["3.3334", "3.3333", "3.3333"]
    assert gpu_hours_total(rows) == Decimal("10")


def test_a_team_named_like_the_unattributed_row_is_not_merged_into_it(database: Database) -> None:
    pool = Pool(f"pool-{secrets.token_hex(3)}", workers=1)
    team_id = accounts.create_team(database.engine, UNATTRIBUTED)
    insert_rows(
        database.engine, [ledger_row(deployment=pool.name, team_id=team_id, at=START, prompt=60, completion=40)]
    )
    pool.sample(database.engine, START, {0: (0, 0)})
    pool.sample(database.engine, START + HOUR, {0: (200, 100)})

    rows = gpu_share(database.engine, deployment=pool.name, start=START, end=END, gpu_hours=Decimal("3"))

    assert [(row["tokens"], row["gpu_hours"]) for row in rows] == [(200, "2.0000"), (100, "1.0000")]


def test_nothing_in_the_period_is_an_empty_split(database: Database) -> None:
    assert gpu_share(database.engine, deployment="no-such-pool", start=START, end=END, gpu_hours=Decimal("10")) == []


def test_cli_gpu_share_json(database: Database, tmp_path: Path) -> None:
    pool, name_a, name_b = seed_two_teams(database.engine)
    config = write_config(tmp_path, gateway_config(database.url, "http://127.0.0.1:9"))

    result = run_cli(
        "usage",
        "gpu-share",
        "--deployment",
        pool.name,
        "--gpu-hours",
        "10",
        "--from",
        "2026-11-20",
        "--to",
        "2026-11-21T00:00:00+00:00",
        "--format",
        "json",
        config=config,
    )

    rows = json.loads(result.stdout)
    assert rows == [
        {"team": UNATTRIBUTED, "tokens": 2000, "share": "0.333333", "gpu_hours": "3.3333"},
        {"team": name_a, "tokens": 3000, "share": "0.500000", "gpu_hours": "5.0000"},
        {"team": name_b, "tokens": 1000, "share": "0.166667", "gpu_hours": "1.6667"},
    ]
    assert gpu_hours_total(rows) == Decimal("10")


def test_cli_gpu_share_table(database: Database, tmp_path: Path) -> None:
    pool, name_a, _ = seed_two_teams(database.engine)
    config = write_config(tmp_path, gateway_config(database.url, "http://127.0.0.1:9"))

    result = run_cli(
        "usage", "gpu-share", "--deployment", pool.name, "--gpu-hours", "10",
        "--from", "2026-11-20", "--to", "2026-11-21", config=config,
    )  # fmt: skip

    header, *lines = result.stdout.splitlines()
    assert header.split() == ["TEAM", "TOKENS", "SHARE", "GPU_HOURS"]
    assert [line.split() for line in lines][1] == [name_a, "3000", "0.500000", "5.0000"]
