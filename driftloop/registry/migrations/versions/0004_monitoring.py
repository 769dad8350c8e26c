"""monitoring reference on model versions; monitoring runs and results

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("model_versions") as batch:
        batch.add_column(sa.Column("reference_uri", sa.Text(), nullable=True))
        batch.add_column(sa.Column("reference_sha256", sa.String(64), nullable=True))
    op.create_table(
        "monitoring_runs",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("model_name", sa.String(64), nullable=False),
        sa.Column("model_version", sa.Integer(), nullable=False),
        sa.Column("analysis_uri", sa.Text(), nullable=False),
        sa.Column("labels_uri", sa.Text(), nullable=True),
        sa.Column("decision", sa.JSON(), nullable=False),
        sa.Column("event", sa.JSON(), nullable=True),
        sa.Column("report_uri", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_monitoring_runs_model_name", "monitoring_runs", ["model_name"])
    op.create_table(
        "monitoring_results",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("run_id", sa.String(36), sa.ForeignKey("monitoring_runs.id"), nullable=False),
        sa.Column("chunk_index", sa.Integer(), nullable=False),
        sa.Column("chunk_key", sa.String(100), nullable=False),
        sa.Column("chunk_start", sa.String(40), nullable=True),
        sa.Column("chunk_end", sa.String(40), nullable=True),
        sa.Column("kind", sa.String(20), nullable=False),
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("method", sa.String(40), nullable=False),
        sa.Column("value", sa.Float(), nullable=True),
        sa.Column("lower_threshold", sa.Float(), nullable=True),
        sa.Column("upper_threshold", sa.Float(), nullable=True),
        sa.Column("alert", sa.Boolean(), nullable=False),
    )
    op.create_index("ix_monitoring_results_run_id", "monitoring_results", ["run_id"])


def downgrade() -> None:
    op.drop_table("monitoring_results")
    op.drop_table("monitoring_runs")
    with op.batch_alter_table("model_versions") as batch:
        batch.drop_column("reference_sha256")
        batch.drop_column("reference_uri")
