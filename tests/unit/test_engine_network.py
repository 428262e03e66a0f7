"""PostgreSQL connections bound how long a database that drops off the network can block SQL: the sockets the
gateway's engine opens carry TCP keepalives and a user timeout (checked on the socket itself, not the config)."""

from __future__ import annotations

import socket

from gateway.db.engine import create_engine
from tests.harness import POSTGRES_ADMIN_URL


def test_postgresql_connections_give_up_on_a_silent_network_within_about_a_minute() -> None:
    engine = create_engine(POSTGRES_ADMIN_URL)
    try:
        with engine.connect() as connection:
            raw = connection.connection.dbapi_connection
            assert raw is not None
            sock = socket.socket(fileno=raw.pgconn.socket)  # type: ignore[attr-defined]
            try:
                assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
                idle = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE)
                interval = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL)
                probes = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT)
                unacknowledged_ms = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT)
            finally:
                sock.detach()  # the connection still owns the descriptor
    finally:
        engine.dispose()
    # An idle connection (waiting for a reply that never comes) is found dead after idle + probes x interval;
    # one with data in flight after the user timeout. Linux defaults: 2 h of silence, ~15 min of retransmits.
    assert idle + probes * interval <= 90
    assert 0 < unacknowledged_ms <= 90_000
