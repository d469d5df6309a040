"""Tables (SQLAlchemy Core) and ordered migrations; the database records which version it is at."""

from __future__ import annotations

from sqlalchemy import (
    Column,
    Float,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    inspect,
    text,
)
from sqlalchemy.engine import Connection

metadata = MetaData()

schema_version = Table("schema_version", metadata, Column("version", Integer, nullable=False))

tenants = Table(
    "tenants", metadata,
    Column("name", String(200), primary_key=True),
    Column("budget_usd", Float, nullable=True),  # None = unlimited
    Column("spent_usd", Float, nullable=False, default=0.0),
    Column("reserved_usd", Float, nullable=False, default=0.0),
    Column("created_at", Float, nullable=False),
)

api_keys = Table(
    "api_keys", metadata,
    Column("key_id", String(32), primary_key=True),  # public id, shown in listings
    Column("key_hash", String(64), nullable=False, unique=True),  # sha256 of the secret
    Column("tenant", String(200), nullable=False),
    Column("tier", String(100), nullable=False),
    Column("created_at", Float, nullable=False),
    Column("revoked_at", Float, nullable=True),
)

reservations = Table(
    "reservations", metadata,
    Column("request_id", String(100), primary_key=True),
    Column("tenant", String(200), nullable=False),
    Column("tier", String(100), nullable=False),
    Column("model", String(200), nullable=False),
    Column("amount_usd", Float, nullable=False),
    Column("prompt_tokens", Integer, nullable=False),
    Column("created_at", Float, nullable=False),
    # which server holds it, and until when (unix seconds); recovery touches only expired leases
    Column("owner", String(100), nullable=True),
    Column("lease_expires_at", Float, nullable=True),
    # the last checkpoint of what the request had delivered, billed if its server dies
    Column("delivered_tokens", Integer, nullable=False, default=0, server_default="0"),
    Column("delivered_usd", Float, nullable=False, default=0.0, server_default="0"),
)

usage = Table(
    "usage", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("request_id", String(100), nullable=False),
    Column("created_at", Float, nullable=False),  # when the record was written (unix seconds)
    Column("tenant", String(200), nullable=False),
    Column("tier", String(100), nullable=False),
    Column("model", String(200), nullable=False),
    Column("status", String(20), nullable=False),  # completed | failed | aborted
    Column("finish_reason", String(40), nullable=True),
    Column("error", Text, nullable=True),
    Column("prompt_tokens", Integer, nullable=False, default=0),
    Column("cached_tokens", Integer, nullable=False, default=0),
    Column("completion_tokens", Integer, nullable=False, default=0),
    Column("queue_ms", Float, nullable=True),
    Column("ttft_ms", Float, nullable=True),
    Column("tpot_ms", Float, nullable=True),
    Column("itl_p50_ms", Float, nullable=True),
    Column("itl_p99_ms", Float, nullable=True),
    Column("itl_max_ms", Float, nullable=True),
    Column("e2e_ms", Float, nullable=True),
    Column("joules", Float, nullable=True),
    Column("energy_source", String(100), nullable=True),
    Column("device_s", Float, nullable=True),
    Column("cost_usd", Float, nullable=True),
    Column("price_usd", Float, nullable=False, default=0.0),
    Column("backend", String(200), nullable=True),  # which engine made the tokens (a fleet's member name)
    UniqueConstraint("request_id", name="uq_usage_request_id"),
)


def _v1(conn: Connection) -> None:
    metadata.create_all(conn, tables=[tenants, api_keys, reservations, usage])


def _v2(conn: Connection) -> None:
    conn.execute(text("CREATE INDEX IF NOT EXISTS ix_usage_tenant_created ON usage (tenant, created_at)"))


def _v3(conn: Connection) -> None:
    """Reservations get an owner and a lease, and a checkpoint of what they delivered. Rows left by an
    older server have neither: recovery treats a missing lease as expired."""
    have = {c["name"] for c in inspect(conn).get_columns("reservations")}
    for name, ddl in (("owner", "VARCHAR(100)"), ("lease_expires_at", "FLOAT"),
                      ("delivered_tokens", "INTEGER NOT NULL DEFAULT 0"), ("delivered_usd", "FLOAT NOT NULL DEFAULT 0")):
        if name not in have:  # a database created at v3 already has them (v1 creates today's tables)
            conn.execute(text(f"ALTER TABLE reservations ADD COLUMN {name} {ddl}"))


def _v4(conn: Connection) -> None:
    """Usage records say which backend served them."""
    if "backend" not in {c["name"] for c in inspect(conn).get_columns("usage")}:
        conn.execute(text("ALTER TABLE usage ADD COLUMN backend VARCHAR(200)"))


MIGRATIONS = [(1, _v1), (2, _v2), (3, _v3), (4, _v4)]


def migrate(conn: Connection) -> int:
    """Bring the database to the newest version; returns the version it is at."""
    schema_version.create(conn, checkfirst=True)
    row = conn.execute(schema_version.select()).first()
    current = row.version if row else 0
    for version, step in MIGRATIONS:
        if version > current:
            step(conn)
            current = version
    if row:
        conn.execute(schema_version.update().values(version=current))
    else:
        conn.execute(schema_version.insert().values(version=current))
    return current
