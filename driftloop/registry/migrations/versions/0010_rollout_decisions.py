"""rollout decisions: shadow and guard comparisons on production rows

Revision ID: 0010
Revises: 0009
"""

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "rollout_decisions",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("model_name", sa.String(64), nullable=False, index=True),
        sa.Column("phase", sa.String(16), nullable=False),
        sa.Column("verdict", sa.String(16), nullable=False),
        sa.Column("applied", sa.Boolean(), nullable=False),
        sa.Column("served_version", sa.Integer(), nullable=False),
        sa.Column("shadow_version", sa.Integer(), nullable=False),
        sa.Column("metric", sa.String(32), nullable=False),
        sa.Column("rows_scored_by_both", sa.Integer(), nullable=False),
        sa.Column("rows_labelled", sa.Integer(), nullable=False),
        sa.Column("served_metric", sa.Float(), nullable=True),
        sa.Column("shadow_metric", sa.Float(), nullable=True),
        sa.Column("difference", sa.Float(), nullable=True),
        sa.Column("lower", sa.Float(), nullable=True),
        sa.Column("upper", sa.Float(), nullable=True),
        sa.Column("confidence", sa.Float(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("actor", sa.String(200), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("predictions_snapshot", sa.BigInteger(), nullable=True),
        sa.Column("labels_snapshot", sa.BigInteger(), nullable=True),
    )


def downgrade() -> None:
    op.drop_table("rollout_decisions")
