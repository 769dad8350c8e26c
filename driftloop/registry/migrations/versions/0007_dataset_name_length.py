"""dataset names sized for what a spec allows plus a suffix (<name>.labels, <name>.window)

Revision ID: 0007
Revises: 0006
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("datasets") as batch:
        batch.alter_column("name", existing_type=sa.String(64), type_=sa.String(128), existing_nullable=False)


def downgrade() -> None:
    with op.batch_alter_table("datasets") as batch:
        batch.alter_column("name", existing_type=sa.String(128), type_=sa.String(64), existing_nullable=False)
