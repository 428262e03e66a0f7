"""The process model: `gateway serve` is a supervisor of N serving workers and one ledger writer.

Each worker is its own process (SO_REUSEPORT spreads connections across them) with its own event loop and
background tasks (snapshot poller, health checks, metrics scraping); it answers requests and makes each usage
record durable (Redis stream or spool), nothing more. The ledger writer process moves the records into SQL, so
that SQL never competes with requests for a worker's event loop or GIL. All of them write metrics into a shared
Prometheus multiprocess directory the supervisor creates. The supervisor restarts a child that dies, forwards
SIGHUP (reload), and on SIGTERM stops the workers first (they stop accepting, finish in-flight requests and
streams within `server.shutdown_grace`, buffer their last records), then the writer, which drains the buffer.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import importlib.util
import logging
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import sqlalchemy as sa
from aiohttp import web

from gateway.auth.keys import load_pepper
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
    from gateway.db import migrate  # Alembic is ~10 MB: only the supervisor needs it, never a worker
    from gateway.upstream.pool import missing_api_keys

    missing = missing_api_keys(settings)
    if missing:
        raise StartupError("invalid configuration:\n  " + "\n  ".join(missing))
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
    except sa.exc.OperationalError as exc:  # an outage, not a bug: say so in one line, not a traceback
        reason = str(exc.orig or exc).strip().splitlines()[0]
        raise StartupError(f"the database is unreachable ({reason})") from exc
    finally:
        engine.dispose()
    if workers > 1 and settings.redis.url is None and (settings.limits.configured or overrides):
        raise StartupError(
            "--workers > 1 needs Redis when limits are configured (each process would otherwise enforce them "
            "alone): set redis.url, or run one worker"
        )


def _tune_gc() -> None:
    """Each request allocates a few hundred short-lived objects, nearly none of them in cycles: the default
    generation-0 threshold (700) runs the cyclic collector every couple of requests. Collect rarely instead, and
    keep the objects of start-up (modules, config, tables) out of every collection."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)


def new_event_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on every platform we ship
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def run_worker(settings: Settings, *, reuse_port: bool, label: str = "", config_path: str | None = None) -> None:
    pepper = load_pepper(settings.auth.pepper, settings.auth.pepper_file)
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        runner.run(_serve(settings, pepper, reuse_port=reuse_port, label=label, config_path=config_path))


async def _serve(settings: Settings, pepper: bytes, *, reuse_port: bool, label: str, config_path: str | None) -> None:
    from gateway import metrics
    from gateway.app import create_app
    from gateway.reload import reload_config

    loop = asyncio.get_running_loop()
    # Until it serves (start-up waits for the database during an outage), a SIGHUP is kept for then: its default
    # action would end the worker, and the file may have changed after this worker read it.
    hangups: list[int] = []
    loop.add_signal_handler(signal.SIGHUP, hangups.append, signal.SIGHUP)
    # The supervisor starts workers with SIGHUP blocked (`_Children.start`): one that came while this process
    # started up and read its configuration is pending, and is delivered, to the handler, now.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})
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
    metrics.WORKERS.set(1)  # only now: start-up may have waited for the database
    _tune_gc()  # after start-up: what it built stays out of the collector's way
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    reloads: set[asyncio.Task[bool]] = set()
    if config_path is not None:

        def on_hangup() -> None:
            task = asyncio.create_task(reload_config(app, config_path))
            reloads.add(task)
            task.add_done_callback(reloads.discard)

        loop.add_signal_handler(signal.SIGHUP, on_hangup)
        if hangups:
            on_hangup()
    port = runner.addresses[0][1] if runner.addresses else settings.listen.port
    print(f"gateway listening on http://{settings.listen.host}:{port}{label}", flush=True)
    await stop.wait()
    log.info("shutting down: no new connections; waiting up to %ss for requests", settings.server.shutdown_grace)
    await runner.cleanup()


_PR_SET_PDEATHSIG = 1


def _prepare_child() -> None:
    """In a child, before exec: get SIGTERM if the supervisor dies, so workers and the writer shut down cleanly
    instead of living on as orphans (Linux; elsewhere a no-op)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class _Children:
    """The supervisor's processes: N serving workers and one ledger writer, each restarted if it dies."""

    def __init__(self, commands: dict[str, list[str]], env: dict[str, str], metrics_dir: Path) -> None:
        self.commands = commands
        self.env = env
        self.metrics_dir = metrics_dir
        self.running: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str) -> None:
        # Children start with SIGHUP blocked (the mask is inherited at fork and kept across exec): the supervisor
        # forwards it to a worker that may still be starting, whose default action would end it, and a worker
        # unblocks it once its handler is in place, so one sent meanwhile is delivered then, not lost (an ignored
        # signal would be). The supervisor's own SIGHUP, if one came during the fork, is delivered on unblocking.
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
        try:
            self.running[name] = subprocess.Popen(self.commands[name], env=self.env, preexec_fn=_prepare_child)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)

    def signal(self, names: list[str], signum: int) -> None:
        for name in names:
            child = self.running.get(name)
            if child is not None and child.poll() is None:
                child.send_signal(signum)

    def reap(self) -> list[tuple[str, int]]:
        """Children that exited since the last call: (name, exit code)."""
        ended = []
        for name, child in list(self.running.items()):
            code = child.poll()
            if code is not None:
                _mark_dead(self.metrics_dir, child.pid)
                del self.running[name]
                ended.append((name, code))
        return ended


def supervise(config_path: str, workers: int, settings: Settings, extra_args: list[str]) -> int:
    """Run N serving workers (sharing the port through SO_REUSEPORT) and the ledger writer as child processes.

    SIGTERM: the workers stop accepting, finish their requests and buffer their last usage records; then the
    writer drains the buffer into SQL; then the supervisor exits. SIGHUP: every worker reloads the configuration.
    """
    metrics_dir = Path(tempfile.mkdtemp(prefix="gateway-metrics-"))
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}
    base = [sys.executable, "-m", "gateway"]
    # Workers run without docstrings and asserts (-OO): ~4.5 MiB less each, mostly the libraries' docstrings. The
    # gateway's asserts only narrow types; nothing it serves reads a docstring (tests/unit/test_optimised_workers.py).
    worker = [sys.executable, "-OO", "-m", "gateway"]
    _check_optimised_bytecode()
    commands = {
        f"worker-{index}": [*worker, "serve", "--config", config_path, *extra_args, "--worker-process", str(index)]
        for index in range(workers)
    }
    commands["writer"] = [*base, "ledger-writer", "--config", config_path]
    worker_names = [name for name in commands if name != "writer"]
    children = _Children(commands, env, metrics_dir)
    stopping: dict[str, float] = {}  # phase -> when it began: "workers", then "writer"

    def on_stop(signum: int, _frame: object) -> None:
        if "workers" not in stopping:
            stopping["workers"] = time.monotonic()
            children.signal(worker_names, signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    signal.signal(signal.SIGHUP, lambda _signum, _frame: children.signal(worker_names, signal.SIGHUP))
    for name in commands:
        children.start(name)
    deadline = settings.server.shutdown_grace + 15
    try:
        while children.running:
            for name, code in children.reap():
                if not stopping:
                    log.error("%s exited with %s; restarting it", name, code)
                    time.sleep(0.5)  # back off so a process that cannot start does not spin
                    children.start(name)
            workers_left = [name for name in worker_names if name in children.running]
            if "workers" in stopping and not workers_left and "writer" not in stopping:
                stopping["writer"] = time.monotonic()  # every record is buffered now: drain them into SQL
                children.signal(["writer"], signal.SIGTERM)
            for phase, began in stopping.items():
                if time.monotonic() - began > deadline:
                    children.signal(workers_left if phase == "workers" else ["writer"], signal.SIGKILL)
            time.sleep(0.05)
        return 0
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)


def _check_optimised_bytecode() -> None:
    """-OO loads `*.opt-2.pyc` files, which pip does not write: without them every worker compiles its libraries
    from source at each start, which takes longer and leaves more memory behind than -OO saves. The image and
    scripts/test compile them; say so when they are missing (SQLAlchemy stands for all the libraries)."""
    path = importlib.util.cache_from_source(sa.__file__ or "", optimization=2)
    if not os.path.exists(path):
        log.warning(
            "no optimised bytecode for the workers (%s): each compiles its libraries from source at start-up and "
            "holds a few MiB more; compile it once with `%s -OO -m compileall -q %s`",
            path,
            sys.executable,
            sysconfig.get_path("purelib"),
        )


def _mark_dead(metrics_dir: Path, pid: int) -> None:
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid, str(metrics_dir))  # type: ignore[no-untyped-call]
