"""The process model: `gateway serve` runs one worker in-process, or N worker processes on one port.

With N > 1 each worker is its own process (SO_REUSEPORT spreads connections across them), runs its own
background tasks (snapshot poller, usage writer), and writes metrics into a shared Prometheus multiprocess
directory that the parent creates. The parent only supervises: it forwards SIGTERM/SIGINT and restarts a worker
that dies unexpectedly. On SIGTERM a worker stops accepting, lets in-flight requests and streams finish within
`server.shutdown_grace`, and flushes its usage before it exits.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import sqlalchemy as sa
from aiohttp import web

from gateway.auth.keys import load_pepper
from gateway.db import migrate
from gateway.db.engine import create_engine
from gateway.db.partitions import ensure_partitions
from gateway.db.schema import limit_overrides
from gateway.metering.prices import seed_prices
from gateway.settings import Settings
from gateway.snapshot import bump_version

log = logging.getLogger(__name__)


class StartupError(Exception):
    """The gateway cannot start; the message tells the operator why."""


def preflight(settings: Settings, workers: int) -> None:
    """Once per start (in the parent): the schema is current, the configured prices are in SQL, and the worker
    count makes sense for the limits in force."""
    engine = create_engine(settings.database.url)
    try:
        problem = migrate.schema_problem(engine)
        if problem:
            raise StartupError(problem)
        with engine.begin() as connection:
            if seed_prices(connection, settings):
                bump_version(connection)
            ensure_partitions(connection)
            overrides = connection.execute(sa.select(sa.func.count()).select_from(limit_overrides)).scalar()
    finally:
        engine.dispose()
    if workers > 1 and settings.redis.url is None and (settings.limits.configured or overrides):
        raise StartupError(
            "--workers > 1 needs Redis when limits are configured (each process would otherwise enforce them "
            "alone): set redis.url, or run one worker"
        )


def _new_event_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on every platform we ship
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def run_worker(settings: Settings, *, reuse_port: bool, label: str = "", config_path: str | None = None) -> None:
    pepper = load_pepper(settings.auth.pepper, settings.auth.pepper_file)
    with asyncio.Runner(loop_factory=_new_event_loop) as runner:
        runner.run(_serve(settings, pepper, reuse_port=reuse_port, label=label, config_path=config_path))


async def _serve(settings: Settings, pepper: bytes, *, reuse_port: bool, label: str, config_path: str | None) -> None:
    from gateway.app import create_app
    from gateway.reload import reload_config

    app = create_app(settings, pepper=pepper)
    runner = web.AppRunner(
        app,
        handler_cancellation=True,  # a client hang-up cancels its handler, and so the upstream request
        access_log=None,
        shutdown_timeout=settings.server.shutdown_grace,
        keepalive_timeout=settings.server.keepalive_timeout,
    )
    await runner.setup()
    site = web.TCPSite(
        runner,
        settings.listen.host,
        settings.listen.port,
        reuse_port=reuse_port,
        backlog=settings.server.backlog,
    )
    await site.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    reloads: set[asyncio.Task[bool]] = set()
    if config_path is not None:

        def on_hangup() -> None:
            task = asyncio.create_task(reload_config(app, config_path))
            reloads.add(task)
            task.add_done_callback(reloads.discard)

        loop.add_signal_handler(signal.SIGHUP, on_hangup)
    port = runner.addresses[0][1] if runner.addresses else settings.listen.port
    print(f"gateway listening on http://{settings.listen.host}:{port}{label}", flush=True)
    await stop.wait()
    log.info("shutting down: no new connections; waiting up to %ss for requests", settings.server.shutdown_grace)
    await runner.cleanup()


def supervise(config_path: str, workers: int, settings: Settings, extra_args: list[str]) -> int:
    metrics_dir = Path(tempfile.mkdtemp(prefix="gateway-metrics-"))
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}
    command = [
        sys.executable,
        "-m",
        "gateway",
        "serve",
        "--config",
        config_path,
        *extra_args,
        "--worker-process",
    ]
    children: dict[int, subprocess.Popen[bytes]] = {}
    stop_requested_at: float | None = None

    def start(index: int) -> None:
        children[index] = subprocess.Popen([*command, str(index)], env=env)

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stop_requested_at
        stop_requested_at = stop_requested_at or time.monotonic()
        for child in children.values():
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)

    def on_hangup(signum: int, _frame: object) -> None:
        for child in children.values():  # each worker reloads its own copy of the configuration
            if child.poll() is None:
                child.send_signal(signal.SIGHUP)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGHUP, on_hangup)
    for index in range(workers):
        start(index)
    try:
        while children:
            for index, child in list(children.items()):
                code = child.poll()
                if code is None:
                    continue
                _mark_dead(metrics_dir, child.pid)
                del children[index]
                if stop_requested_at is None:
                    log.error("worker %d exited with %s; restarting it", index, code)
                    time.sleep(0.5)  # back off so a worker that cannot start does not spin
                    start(index)
            if (
                stop_requested_at is not None
                and time.monotonic() - stop_requested_at > settings.server.shutdown_grace + 15
            ):
                for child in children.values():
                    child.kill()
            time.sleep(0.1)
        return 0
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)


def _mark_dead(metrics_dir: Path, pid: int) -> None:
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid, str(metrics_dir))
