"""The lossless ledger: hourly/daily rollups, more usage columns, and monthly partitions on PostgreSQL.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23 17:13:10.992396
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from gateway.db.partitions import ensure_month_partition, ensure_partitions

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "usage_rollups",
        sa.Column("granularity", sa.String(length=4), nullable=False),
        sa.Column("bucket_start", sa.DateTime(timezone=True), nullable=False),
        sa.Column("team_id", sa.Integer(), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("key_id", sa.String(length=32), nullable=False),
        sa.Column("model", sa.String(length=128), nullable=False),
        sa.Column("requests", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("errors", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("prompt_tokens", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("cached_prompt_tokens", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("completion_tokens", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("reasoning_tokens", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("cost_nanousd", sa.BigInteger(), server_default="0", nullable=False),
        sa.PrimaryKeyConstraint(
            "granularity", "bucket_start", "team_id", "user_id", "key_id", "model", name="pk_usage_rollups"
        ),
    )
    with op.batch_alter_table("usage_rollups", schema=None) as batch_op:
        batch_op.create_index("ix_usage_rollups_team", ["team_id", "granularity", "bucket_start"], unique=False)

    op.create_table(
        "usage_tag_rollups",
        sa.Column("granularity", sa.String(length=4), nullable=False),
        sa.Column("bucket_start", sa.DateTime(timezone=True), nullable=False),
        sa.Column("team_id", sa.Integer(), nullable=False),
        sa.Column("tag", sa.String(length=128), nullable=False),
        sa.Column("model", sa.String(length=128), nullable=False),
        sa.Column("requests", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("errors", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("prompt_tokens", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("cached_prompt_tokens", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("completion_tokens", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("reasoning_tokens", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("cost_nanousd", sa.BigInteger(), server_default="0", nullable=False),
        sa.PrimaryKeyConstraint("granularity", "bucket_start", "team_id", "tag", "model", name="pk_usage_tag_rollups"),
    )
    with op.batch_alter_table("usage", schema=None) as batch_op:
        batch_op.add_column(sa.Column("tags", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("first_token_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("ended_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("queue_ms", sa.Float(), nullable=True))
    if op.get_bind().dialect.name == "postgresql":
        _partition_usage()


def _rename_usage(suffix: str) -> None:
    op.execute(f"ALTER TABLE usage RENAME TO usage_{suffix}")
    op.execute(f"ALTER TABLE usage_{suffix} RENAME CONSTRAINT pk_usage TO pk_usage_{suffix}")
    op.execute(f"ALTER INDEX ix_usage_team_started RENAME TO ix_usage_team_started_{suffix}")
    op.execute(f"ALTER INDEX ix_usage_key_started RENAME TO ix_usage_key_started_{suffix}")


def _create_usage(source: str, partitioned: bool) -> None:
    clause = " PARTITION BY RANGE (started_at)" if partitioned else ""
    op.execute(f"CREATE TABLE usage (LIKE {source} INCLUDING DEFAULTS){clause}")
    op.execute("ALTER TABLE usage ADD CONSTRAINT pk_usage PRIMARY KEY (request_id, started_at)")
    op.execute("CREATE INDEX ix_usage_team_started ON usage (team_id, started_at)")
    op.execute("CREATE INDEX ix_usage_key_started ON usage (key_id, started_at)")


def _partition_usage() -> None:
    """Rebuild the ledger as a table partitioned by month (its primary key already includes started_at)."""
    connection = op.get_bind()
    _rename_usage("unpartitioned")
    _create_usage("usage_unpartitioned", partitioned=True)
    op.execute("CREATE TABLE usage_default PARTITION OF usage DEFAULT")
    op.execute("INSERT INTO usage SELECT * FROM usage_unpartitioned")
    months = connection.execute(sa.text("SELECT DISTINCT date_trunc('month', started_at) FROM usage_default"))
    for (month,) in list(months):
        ensure_month_partition(connection, month)
    ensure_partitions(connection)
    op.execute("DROP TABLE usage_unpartitioned")


def _unpartition_usage() -> None:
    _rename_usage("partitioned")
    _create_usage("usage_partitioned", partitioned=False)
    op.execute("INSERT INTO usage SELECT * FROM usage_partitioned")
    op.execute("DROP TABLE usage_partitioned CASCADE")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        _unpartition_usage()
    with op.batch_alter_table("usage", schema=None) as batch_op:
        batch_op.drop_column("queue_ms")
        batch_op.drop_column("ended_at")
        batch_op.drop_column("first_token_at")
        batch_op.drop_column("tags")

    op.drop_table("usage_tag_rollups")
    with op.batch_alter_table("usage_rollups", schema=None) as batch_op:
        batch_op.drop_index("ix_usage_rollups_team")

    op.drop_table("usage_rollups")
