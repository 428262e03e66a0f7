"""Migration 0004 (admin keys, team-admin flag, audit log, budget alerts): up, down and up again on both
databases, and autogenerate finds no difference between the models and the migrations."""

from __future__ import annotations

from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from gateway.db import migrate
from gateway.db.schema import metadata
from tests.harness import create_database

ADMIN_TABLES = {"admin_keys", "audit_log", "budget_alerts"}


def _include_name(name: str | None, type_: str, _parents: object) -> bool:
    # The same filter as migrations/env.py: monthly ledger partitions are not in the models.
    return not (type_ == "table" and name is not None and (name.startswith("usage_y") or name == "usage_default"))


def _diff(engine: sa.Engine) -> list[object]:
    with engine.connect() as connection:
        context = MigrationContext.configure(
            connection, opts={"include_name": _include_name, "compare_type": True, "target_metadata": metadata}
        )
        return compare_metadata(context, metadata)


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_upgrade_downgrade_upgrade_and_no_autogenerate_diff(kind: str, tmp_path: Path) -> None:
    database = create_database(kind, tmp_path)  # migrated to head
    try:
        engine = database.engine
        assert set(sa.inspect(engine).get_table_names()) >= ADMIN_TABLES
        assert "team_admin" in {column["name"] for column in sa.inspect(engine).get_columns("api_keys")}
        assert _diff(engine) == []

        migrate.downgrade(engine, "0003")
        inspector = sa.inspect(engine)
        assert not ADMIN_TABLES & set(inspector.get_table_names())
        assert "team_admin" not in {column["name"] for column in inspector.get_columns("api_keys")}

        migrate.upgrade(engine)
        assert migrate.current_revision(engine) == migrate.head_revision()
        assert _diff(engine) == []
    finally:
        database.drop()
