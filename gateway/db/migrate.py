"""Running Alembic from the gateway: `gateway db upgrade`, and the start-up check that the schema is current."""

from __future__ import annotations

import os
from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory


def _migrations_dir() -> Path:
    override = os.environ.get("GATEWAY_MIGRATIONS_DIR")
    if override:
        return Path(override)
    return Path(__file__).resolve().parents[2] / "migrations"


def alembic_config(engine: sa.Engine) -> Config:
    config = Config()
    config.set_main_option("script_location", str(_migrations_dir()))
    config.attributes["configure_logging"] = False
    config.attributes["engine"] = engine
    return config


def _with_connection(engine: sa.Engine, action: str, revision: str) -> None:
    config = alembic_config(engine)
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        getattr(command, action)(config, revision)


def upgrade(engine: sa.Engine, revision: str = "head") -> None:
    _with_connection(engine, "upgrade", revision)


def downgrade(engine: sa.Engine, revision: str) -> None:
    _with_connection(engine, "downgrade", revision)


def head_revision() -> str | None:
    return ScriptDirectory.from_config(alembic_config(sa.create_engine("sqlite://"))).get_current_head()


def current_revision(engine: sa.Engine) -> str | None:
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def schema_problem(engine: sa.Engine) -> str | None:
    """None when the database schema is at the newest migration; otherwise what to tell the operator."""
    current, head = current_revision(engine), head_revision()
    if current == head:
        return None
    if current is None:
        return "the database has no gateway schema yet: run `gateway db upgrade`"
    return f"the database schema is at revision {current}, this gateway needs {head}: run `gateway db upgrade`"
