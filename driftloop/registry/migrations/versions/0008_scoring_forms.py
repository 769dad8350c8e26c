"""scoring forms per version (onnx, native, tensor: sha256, parity, speed) and the form
each scoring run used

Revision ID: 0008
Revises: 0007
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("model_versions") as batch:
        batch.add_column(sa.Column("forms", sa.JSON(), nullable=True))
    with op.batch_alter_table("scoring_runs") as batch:
        batch.add_column(sa.Column("form", sa.String(16), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("scoring_runs") as batch:
        batch.drop_column("form")
    with op.batch_alter_table("model_versions") as batch:
        batch.drop_column("forms")
