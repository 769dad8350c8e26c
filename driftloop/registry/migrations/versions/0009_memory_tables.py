"""the loop's memory in Iceberg tables: the SQL catalog's own tables in the registry
database, and what each scoring and monitoring run read or committed (snapshot ids,
input key)

Revision ID: 0009
Revises: 0008
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # pyiceberg's own definitions of its catalog tables (iceberg_tables,
    # iceberg_namespace_properties), made here once, under the migration lock, instead of
    # by each process that opens a catalog.
    from pyiceberg.catalog.sql import SqlCatalogBaseTable

    SqlCatalogBaseTable.metadata.create_all(op.get_bind())
    with op.batch_alter_table("scoring_runs") as batch:
        batch.add_column(sa.Column("snapshot_id", sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column("input_key", sa.Text(), nullable=True))
        batch.add_column(sa.Column("export_uri", sa.Text(), nullable=True))
    with op.batch_alter_table("monitoring_runs") as batch:
        batch.add_column(sa.Column("snapshots", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("monitoring_runs") as batch:
        batch.drop_column("snapshots")
    with op.batch_alter_table("scoring_runs") as batch:
        batch.drop_column("export_uri")
        batch.drop_column("input_key")
        batch.drop_column("snapshot_id")
    op.drop_table("iceberg_namespace_properties")
    op.drop_table("iceberg_tables")
