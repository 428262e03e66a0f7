"""Alembic environment: the gateway's own engine factory, so SQLite gets its pragmas and PostgreSQL psycopg 3."""

from __future__ import annotations

import os
from logging.config import fileConfig

from alembic import context

from gateway.db.engine import create_engine
from gateway.db.schema import metadata

config = context.config
if config.config_file_name is not None and config.attributes.get("configure_logging", True):
    fileConfig(config.config_file_name, disable_existing_loggers=False)


def _database_url() -> str:
    url = config.get_main_option("sqlalchemy.url") or os.environ.get("GATEWAY_DATABASE_URL")
    if url:
        return url
    from gateway.settings import load_settings

    return load_settings().database.url


def run_migrations() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    engine = create_engine(_database_url())
    try:
        with engine.connect() as connection:
            _run(connection)
    finally:
        engine.dispose()


def _include_name(name: str | None, type_: str, _parents: object) -> bool:
    # Monthly ledger partitions are managed by gateway.db.partitions, not by the models.
    return not (type_ == "table" and name is not None and (name.startswith("usage_y") or name == "usage_default"))


def _run(connection: object) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        include_name=_include_name,
        render_as_batch=True,  # SQLite cannot ALTER most things; batch mode rebuilds tables instead
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    raise SystemExit("offline (--sql) migrations are not supported; run against a database")
run_migrations()
