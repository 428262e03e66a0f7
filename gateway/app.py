"""The app factory: wires the stages together. No request logic lives here.

Long-lived clients each live in a cleanup context, in start-up order; aiohttp unwinds them in reverse, after it
has stopped accepting connections and waited for in-flight requests (the shutdown grace period).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator

from aiohttp import web

from gateway import access_log, admin, alerts, dashboard, health, metrics, models_api
from gateway.db.engine import SqlRunner, create_engine
from gateway.limits.checks import Periods
from gateway.limits.grants import Grants
from gateway.limits.limiter import QuotaLimiter
from gateway.limits.rebuild import slot_counters
from gateway.limits.redis_store import RedisStore
from gateway.limits.store import LimitStore, LocalStore
from gateway.metering.buffer import LedgerBuffer, check_redis_durability
from gateway.metering.cost import Price
from gateway.metering.prices import max_model_price
from gateway.metering.spool import Spool, spool_base
from gateway.middleware import errors_middleware
from gateway.proxy import Proxy
from gateway.redis_client import make_redis
from gateway.routing.dispatch import Dispatcher
from gateway.routing.monitor import RouteMonitor
from gateway.routing.slots import DeploymentSlots
from gateway.routing.table import GroupRoute, RouteTable
from gateway.settings import Settings
from gateway.snapshot import SnapshotCache
from gateway.state import STATE, GatewayState
from gateway.tally import TALLY
from gateway.tokens import TokenEstimator
from gateway.upstream.pool import UpstreamPool
from gateway.validation import UPSTREAM_PATHS

log = logging.getLogger(__name__)

PROXY = web.AppKey("proxy", Proxy)


def create_app(settings: Settings, *, pepper: bytes) -> web.Application:
    state = GatewayState(settings=settings, pepper=pepper, routes=RouteTable(settings, created=int(time.time())))
    proxy = Proxy(state)

    # The whole middleware order, in one place.
    app = web.Application(middlewares=[errors_middleware], client_max_size=settings.server.max_body_bytes)
    app[STATE] = state
    app[PROXY] = proxy
    app.cleanup_ctx.extend([_database, _limits, _ledger, _upstreams, _background])

    app.router.add_post("/v1/chat/completions", proxy.chat_completions)
    app.router.add_post("/v1/completions", proxy.completions)
    app.router.add_post("/v1/embeddings", proxy.embeddings)
    app.router.add_get("/v1/models", models_api.list_models)
    app.router.add_get("/v1/models/{model:.+}", models_api.retrieve_model)
    app.router.add_get("/health", health.health)
    app.router.add_get("/ready", health.ready)
    app.router.add_get("/metrics", health.prometheus)

    # Administration: the admin API, the dashboard, budget alerts, per-worker metrics and access log set-up.
    admin.setup(app, state)
    dashboard.setup(app, state)
    alerts.setup(app)
    metrics.configure(
        key_labels=settings.metrics.key_labels,
        deployments=[(deployment.name, deployment.model) for deployment in state.routes.deployments()],
        endpoints=tuple(UPSTREAM_PATHS),
    )
    access_log.configure(settings.logging)
    return app


async def _database(app: web.Application) -> AsyncIterator[None]:
    state = app[STATE]
    settings = state.settings
    engine = create_engine(settings.database.url, pool_size=settings.database.pool_size)
    state.sql = SqlRunner(engine)
    state.snapshot = SnapshotCache(state.sql, poll_interval=settings.auth.cache_poll_interval)
    state.estimator = await state.sql.run(TokenEstimator.load, settings.limits.prompt_estimate)
    state.snapshot.on_reload.append(lambda snapshot: state.routes.apply_drains(snapshot.drains))
    await state.snapshot.load_when_reachable()
    yield
    # Bounded: on a database that stopped answering it would wait for ever; closing the runner ends that SQL.
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(1.0):
            await state.snapshot.close()
    await asyncio.to_thread(state.sql.close)


async def _limits(app: web.Application) -> AsyncIterator[None]:
    state = app[STATE]
    settings = state.settings
    client = None
    store: LimitStore
    if settings.redis.url:
        client = make_redis(settings.redis.url, timeout=settings.redis.timeout)
        store = RedisStore(client, url=settings.redis.url, timeout=settings.redis.timeout)
        await check_redis_durability(client)
    else:
        store = LocalStore()
    engine = state.sql.engine

    # A reservation's price, per model, for up to a second: settlement charges the real price, so a price that
    # changed within the second only shifts what one second of reservations held.
    price_cache: dict[str, tuple[float, object, object, Price | None]] = {}

    def model_price(model: str) -> Price | None:
        now = time.time()
        book, routes = state.snapshot.current.prices, state.routes
        cached = price_cache.get(model)
        if cached is not None and now < cached[0] and cached[1] is book and cached[2] is routes:
            return cached[3]
        route = routes.resolve(model)
        members = [routes.models[name] for name in route.group.models] if isinstance(route, GroupRoute) else [route]
        price = max_model_price(book, members, now)
        if len(price_cache) > 10_000:  # models are a short list; anything else is a misbehaving caller
            price_cache.clear()
        price_cache[model] = (now + 1.0, book, routes, price)
        return price

    async def rebuild_source(slot: str, periods: Periods, now_ms: int) -> list[tuple[str, int, int]]:
        return await state.sql.run(slot_counters, engine, slot, periods, now_ms)

    limiter = QuotaLimiter(
        store,
        settings.limits,
        snapshot=lambda: state.snapshot.current,
        estimate_prompt=state.estimator.count_prompt,
        model_price=model_price,
        rebuild_source=rebuild_source,
        fail_open=settings.redis.fail_open,
        timeout=settings.redis.timeout,
        # In-process limits cost no round trip: nothing to save by granting ahead.
        grants=Grants() if client is not None and settings.limits.local_grants else None,
    )
    state.limiter = limiter
    state.redis = client
    tasks = [asyncio.create_task(limiter.heartbeat_forever(), name="lease-heartbeat")]
    if client is not None:
        tasks.append(asyncio.create_task(limiter.probe_forever(), name="redis-probe"))
    if limiter.grants is not None:
        tasks.append(asyncio.create_task(limiter.return_grants_forever(), name="grant-returns"))
        tasks.append(asyncio.create_task(limiter.renew_grants_forever(), name="grant-renewals"))
    yield
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await limiter.close()
    if isinstance(store, RedisStore):
        store.pipeliner.close()
    if client is not None:
        await client.aclose()


async def _ledger(app: web.Application) -> AsyncIterator[None]:
    state = app[STATE]
    metering = state.settings.metering
    if not metering.enabled:
        log.warning("metering.enabled is false: NO USAGE IS RECORDED (meant for benchmarks and dry runs)")
    spool = await asyncio.to_thread(
        Spool,
        spool_base(metering.spool_dir, state.settings.database.url),
        fsync=metering.spool_fsync,
        rotate_seconds=max(metering.flush_interval, 0.2),
    )
    state.ledger = LedgerBuffer(
        spool,
        state.limiter.store,
        redis=state.redis,
        timeout=state.settings.redis.timeout,
        max_backlog=metering.max_backlog,
        max_spool_bytes=metering.max_spool_bytes,
        enabled=metering.enabled,
    )
    tasks = [
        asyncio.create_task(spool.rotate_forever(), name="spool-rotation"),
        asyncio.create_task(state.ledger.watch_bounds_forever(), name="ledger-bounds"),
    ]
    yield
    await app[PROXY].wait_finalising()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await asyncio.to_thread(spool.close)


async def _upstreams(app: web.Application) -> AsyncIterator[None]:
    state = app[STATE]
    settings = state.settings
    state.pool = UpstreamPool()
    await state.pool.start(state.routes.deployments())
    slots = DeploymentSlots(state.redis, lease_seconds=settings.limits.lease_seconds, timeout=settings.redis.timeout)
    state.dispatcher = Dispatcher(
        routes=lambda: state.routes,
        pool=state.pool,
        slots=slots,
        prices=lambda: state.snapshot.current.prices,
        priorities=lambda: state.settings.routing.team_priorities,
    )
    state.monitor = RouteMonitor(routes=lambda: state.routes, settings=lambda: state.settings.routing)
    await state.monitor.start()
    tasks = [
        asyncio.create_task(state.monitor.scrape_forever(), name="vllm-scraper"),
        asyncio.create_task(state.monitor.health_forever(), name="health-checks"),
        asyncio.create_task(state.monitor.dns_forever(), name="dns-discovery"),
        asyncio.create_task(state.monitor.sample_forever(state.sql), name="worker-token-samples"),
        asyncio.create_task(slots.renew_forever(), name="slot-leases"),
    ]
    yield
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await state.monitor.close()
    await state.pool.close()


async def _background(app: web.Application) -> AsyncIterator[None]:
    state = app[STATE]
    tasks = [
        asyncio.create_task(state.snapshot.poll_forever(), name="snapshot-poller"),
        asyncio.create_task(TALLY.flush_forever(), name="metrics-flush"),
    ]
    yield
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    TALLY.flush()
