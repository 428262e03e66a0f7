"""Run the engine-taking helpers of `gateway.accounts` and `gateway.limits.overrides` inside one transaction.

Those helpers open their own transaction (`engine.begin()`). The admin API must commit a change together with its
audit row, so it hands them this stand-in, whose `begin()` is a savepoint of the caller's transaction and whose
`connect()` is that same connection: the helpers stay the single implementation of each change.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import cast

import sqlalchemy as sa


class _InTransaction:
    def __init__(self, connection: sa.Connection) -> None:
        self._connection = connection
        self.dialect = connection.dialect

    @contextlib.contextmanager
    def begin(self) -> Iterator[sa.Connection]:
        with self._connection.begin_nested():
            yield self._connection

    @contextlib.contextmanager
    def connect(self) -> Iterator[sa.Connection]:
        yield self._connection


def in_transaction(connection: sa.Connection) -> sa.Engine:
    """An engine look-alike bound to `connection`'s open transaction."""
    return cast(sa.Engine, _InTransaction(connection))
