"""Schema versions of the registry database, managed with Alembic.

``upgrade(engine)`` brings any earlier driftloop database to the current schema; it is
safe to call from many processes at once (PostgreSQL: an advisory lock; SQLite: every
transaction begins IMMEDIATE, see ``store.create_registry_engine``).
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, text

_MIGRATIONS = Path(__file__).with_name("migrations")
# Not alembic's default name: Optuna keeps its own alembic_version table in the same
# database when studies are stored in the registry.
VERSION_TABLE = "driftloop_schema_version"
# Arbitrary constant: the PostgreSQL advisory lock that serialises schema upgrades.
_UPGRADE_LOCK_ID = 0x6472696674


def _config(connection: Connection) -> Config:
    config = Config()
    config.set_main_option("script_location", str(_MIGRATIONS))
    config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    script = ScriptDirectory(str(_MIGRATIONS))
    head = script.get_current_head()
    assert head is not None
    return head


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE}).get_current_revision()


def upgrade(engine: Engine, revision: str = "head") -> None:
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _UPGRADE_LOCK_ID})
        command.upgrade(_config(conn), revision)
