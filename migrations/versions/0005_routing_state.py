"""Routing state shared by every process: drained deployments/workers; worker token samples for GPU chargeback.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-23 17:36:23.025097
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "deployment_drains",
        sa.Column("deployment", sa.String(length=128), nullable=False),
        sa.Column("endpoint", sa.String(length=512), server_default="", nullable=False),
        sa.Column("drained_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("actor", sa.String(length=200), nullable=True),
        sa.PrimaryKeyConstraint("deployment", "endpoint", name="pk_deployment_drains"),
    )
    op.create_table(
        "worker_token_samples",
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("deployment", sa.String(length=128), nullable=False),
        sa.Column("endpoint", sa.String(length=512), nullable=False),
        sa.Column("prompt_tokens_total", sa.BigInteger(), nullable=False),
        sa.Column("generation_tokens_total", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("at", "deployment", "endpoint", name="pk_worker_token_samples"),
    )


def downgrade() -> None:
    op.drop_table("worker_token_samples")
    op.drop_table("deployment_drains")
