"""Alembic environment: driftloop runs migrations programmatically on a connection it
passes in ``config.attributes['connection']`` (see ``driftloop.registry.migrate``)."""

from alembic import context

from driftloop.registry.migrate import VERSION_TABLE
from driftloop.registry.tables import Base

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    version_table=VERSION_TABLE,
    render_as_batch=connection.dialect.name == "sqlite",
)
with context.begin_transaction():
    context.run_migrations()
