"""training window on model versions; one retrain lease per model

Revision ID: 0006
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("model_versions") as batch:
        batch.add_column(sa.Column("window", sa.JSON(), nullable=True))
    op.create_table(
        "retrain_leases",
        sa.Column("model_name", sa.String(64), sa.ForeignKey("models.name"), primary_key=True),
        sa.Column("holder", sa.String(200), nullable=False),
        sa.Column("acquired_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("outcome", sa.String(32), nullable=True),
    )


def downgrade() -> None:
    op.drop_table("retrain_leases")
    with op.batch_alter_table("model_versions") as batch:
        batch.drop_column("window")
