"""The gateway's long-lived state, one per worker process, filled in by the app's cleanup contexts."""

from __future__ import annotations

from dataclasses import dataclass, field

import redis.asyncio as aioredis
from aiohttp import web

from gateway.db.engine import SqlRunner
from gateway.limits.limiter import QuotaLimiter
from gateway.metering.buffer import LedgerBuffer
from gateway.routing.dispatch import Dispatcher
from gateway.routing.monitor import RouteMonitor
from gateway.routing.table import RouteTable
from gateway.settings import Settings
from gateway.snapshot import SnapshotCache
from gateway.tokens import TokenEstimator
from gateway.upstream.pool import UpstreamPool


@dataclass(eq=False)
class GatewayState:
    settings: Settings
    pepper: bytes
    routes: RouteTable
    # Set during start-up (cleanup contexts), before the first request is served:
    limiter: QuotaLimiter = field(init=False)
    sql: SqlRunner = field(init=False)
    snapshot: SnapshotCache = field(init=False)
    pool: UpstreamPool = field(init=False)
    dispatcher: Dispatcher = field(init=False)
    monitor: RouteMonitor = field(init=False)
    ledger: LedgerBuffer = field(init=False)
    redis: aioredis.Redis | None = None
    estimator: TokenEstimator = field(init=False)


STATE = web.AppKey("state", GatewayState)
