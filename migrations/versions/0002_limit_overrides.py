"""Per-scope limit overrides (key, user, team, team x model), changeable at run time.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23 17:02:08.245118
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "limit_overrides",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("scope", sa.String(length=16), nullable=False),
        sa.Column("scope_id", sa.String(length=64), nullable=False),
        sa.Column("model", sa.String(length=128), server_default="", nullable=False),
        sa.Column("rpm", sa.BigInteger(), nullable=True),
        sa.Column("tpm", sa.BigInteger(), nullable=True),
        sa.Column("concurrency", sa.BigInteger(), nullable=True),
        sa.Column("daily_tokens", sa.BigInteger(), nullable=True),
        sa.Column("monthly_tokens", sa.BigInteger(), nullable=True),
        sa.Column("daily_cost_nanousd", sa.BigInteger(), nullable=True),
        sa.Column("monthly_cost_nanousd", sa.BigInteger(), nullable=True),
        sa.Column("budget_mode", sa.String(length=8), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_limit_overrides")),
        sa.UniqueConstraint("scope", "scope_id", "model", name="uq_limit_overrides_scope"),
    )


def downgrade() -> None:
    op.drop_table("limit_overrides")
