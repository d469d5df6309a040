"""The ledger: keys (only hashes stored), budgets with reservations, and one usage record per request.

Budget safety under concurrency: a request reserves its worst-case price with one conditional
UPDATE (spent + reserved + amount <= budget) before it runs, and settles the actual price after,
in the same transaction that writes its usage record. A reservation row is also the request's
in-flight marker: at start-up, rows left by a crash become `aborted` usage records and release
their reservation, so no budget leaks.
"""

from __future__ import annotations

import dataclasses
import hashlib
import secrets
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import create_engine, event, func, select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError

from tokenfab.ledger.schema import api_keys, migrate, reservations, tenants, usage

KEY_PREFIX = "tf-"


class LedgerError(ValueError):
    pass


@dataclass(frozen=True)
class Principal:
    tenant: str
    tier: str
    key_id: str | None  # None for the anonymous tier


@dataclass
class UsageRecord:
    request_id: str
    tenant: str
    tier: str
    model: str
    status: str  # completed | failed | aborted
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str | None = None
    error: str | None = None
    queue_ms: float | None = None
    ttft_ms: float | None = None
    tpot_ms: float | None = None
    itl_p50_ms: float | None = None
    itl_p99_ms: float | None = None
    itl_max_ms: float | None = None
    e2e_ms: float | None = None
    joules: float | None = None
    energy_source: str | None = None
    device_s: float | None = None
    cost_usd: float | None = None
    price_usd: float = 0.0


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class Ledger:
    def __init__(self, url: str) -> None:
        self.url = url
        kwargs: dict[str, Any] = {"future": True}
        if url.startswith("sqlite"):
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
        else:
            kwargs["pool_pre_ping"] = True
        try:
            self.engine: Engine = create_engine(url, **kwargs)
        except Exception as exc:  # noqa: BLE001 - bad URL or missing driver
            raise LedgerError(f"cannot open ledger {url!r}: {exc}") from None
        if url.startswith("sqlite"):
            @event.listens_for(self.engine, "connect")
            def _pragmas(dbapi_conn, _rec):  # type: ignore[no-untyped-def]
                dbapi_conn.isolation_level = None  # SQLAlchemy's begin event below issues BEGIN itself
                cur = dbapi_conn.cursor()
                cur.execute("PRAGMA journal_mode=WAL")
                cur.execute("PRAGMA synchronous=FULL")
                cur.execute("PRAGMA busy_timeout=30000")
                cur.close()

            # serialise writers: BEGIN IMMEDIATE takes the write lock up front (no upgrade deadlocks)
            @event.listens_for(self.engine, "begin")
            def _begin(conn):  # type: ignore[no-untyped-def]
                conn.exec_driver_sql("BEGIN IMMEDIATE")
        try:
            with self.engine.begin() as conn:
                self.version = migrate(conn)
        except Exception as exc:  # noqa: BLE001
            raise LedgerError(f"cannot open ledger {url!r}: {str(exc).splitlines()[0]}") from None

    def close(self) -> None:
        self.engine.dispose()

    # --- keys ----------------------------------------------------------------------------------
    def create_key(self, tenant: str, tier: str, budget_usd: float | None = None) -> tuple[str, str]:
        """Create (or update the budget of) a tenant and a key for it; returns (key_id, secret key)."""
        if not tenant or len(tenant) > 200:
            raise LedgerError("tenant must be 1-200 characters")
        if budget_usd is not None and budget_usd < 0:
            raise LedgerError("budget must be >= 0")
        key_id = secrets.token_hex(6)
        key = KEY_PREFIX + key_id + "-" + secrets.token_urlsafe(24)
        now = time.time()
        with self.engine.begin() as conn:
            row = conn.execute(select(tenants.c.name).where(tenants.c.name == tenant)).first()
            if row is None:
                conn.execute(tenants.insert().values(name=tenant, budget_usd=budget_usd, spent_usd=0.0,
                                                     reserved_usd=0.0, created_at=now))
            elif budget_usd is not None:
                conn.execute(tenants.update().where(tenants.c.name == tenant).values(budget_usd=budget_usd))
            conn.execute(api_keys.insert().values(key_id=key_id, key_hash=hash_key(key), tenant=tenant, tier=tier,
                                                  created_at=now, revoked_at=None))
        return key_id, key

    def list_keys(self) -> list[dict[str, Any]]:
        q = select(api_keys.c.key_id, api_keys.c.tenant, api_keys.c.tier, api_keys.c.created_at,
                   api_keys.c.revoked_at, tenants.c.budget_usd, tenants.c.spent_usd, tenants.c.reserved_usd
                   ).join(tenants, tenants.c.name == api_keys.c.tenant).order_by(api_keys.c.created_at)
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(q)]

    def revoke(self, key_id: str) -> None:
        with self.engine.begin() as conn:
            n = conn.execute(api_keys.update().where(api_keys.c.key_id == key_id, api_keys.c.revoked_at.is_(None))
                             .values(revoked_at=time.time())).rowcount
        if n == 0:
            raise LedgerError(f"no active key with id {key_id!r} (see `tokenfab keys list`)")

    def authenticate(self, key: str) -> Principal | None:
        q = select(api_keys.c.key_id, api_keys.c.tenant, api_keys.c.tier).where(
            api_keys.c.key_hash == hash_key(key), api_keys.c.revoked_at.is_(None))
        with self.engine.connect() as conn:
            row = conn.execute(q).first()
        return Principal(row.tenant, row.tier, row.key_id) if row else None

    def ensure_tenant(self, tenant: str) -> None:
        with self.engine.begin() as conn:
            if conn.execute(select(tenants.c.name).where(tenants.c.name == tenant)).first() is None:
                try:
                    conn.execute(tenants.insert().values(name=tenant, budget_usd=None, spent_usd=0.0,
                                                         reserved_usd=0.0, created_at=time.time()))
                except IntegrityError:
                    pass

    def tenant(self, name: str) -> dict[str, Any] | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(tenants).where(tenants.c.name == name)).first()
        return dict(row._mapping) if row else None

    # --- budgets -------------------------------------------------------------------------------
    def reserve(self, request_id: str, tenant: str, tier: str, model: str, amount_usd: float,
                prompt_tokens: int) -> bool:
        """Hold `amount_usd` of the tenant's budget; False (nothing held) if it would overspend."""
        with self.engine.begin() as conn:
            ok = conn.execute(
                tenants.update()
                .where(tenants.c.name == tenant,
                       (tenants.c.budget_usd.is_(None))
                       | (tenants.c.spent_usd + tenants.c.reserved_usd + amount_usd <= tenants.c.budget_usd))
                .values(reserved_usd=tenants.c.reserved_usd + amount_usd)
            ).rowcount
            if not ok:
                return False
            conn.execute(reservations.insert().values(request_id=request_id, tenant=tenant, tier=tier, model=model,
                                                      amount_usd=amount_usd, prompt_tokens=prompt_tokens,
                                                      created_at=time.time()))
        return True

    def settle(self, rec: UsageRecord) -> None:
        """Write the usage record, charge its price, release its reservation: one transaction."""
        with self.engine.begin() as conn:
            res = conn.execute(select(reservations.c.amount_usd).where(reservations.c.request_id == rec.request_id)
                               ).first()
            held = res.amount_usd if res else 0.0
            conn.execute(usage.insert().values(created_at=time.time(), **dataclasses.asdict(rec)))
            conn.execute(tenants.update().where(tenants.c.name == rec.tenant).values(
                spent_usd=tenants.c.spent_usd + rec.price_usd, reserved_usd=tenants.c.reserved_usd - held))
            if res:
                conn.execute(reservations.delete().where(reservations.c.request_id == rec.request_id))

    def recover(self) -> int:
        """Turn reservations left by a crash into aborted usage records; returns how many."""
        with self.engine.connect() as conn:
            left = [dict(r._mapping) for r in conn.execute(select(reservations))]
        for r in left:
            self.settle(UsageRecord(request_id=r["request_id"], tenant=r["tenant"], tier=r["tier"], model=r["model"],
                                    status="aborted", prompt_tokens=r["prompt_tokens"],
                                    error="server stopped while the request was in flight (recovered at start-up)"))
        return len(left)

    def in_flight(self) -> int:
        with self.engine.connect() as conn:
            return conn.execute(select(func.count()).select_from(reservations)).scalar_one()

    # --- queries -------------------------------------------------------------------------------
    def usage_records(self, tenant: str | None = None, since: float | None = None,
                      limit: int | None = None) -> list[dict[str, Any]]:
        q = select(usage).order_by(usage.c.id)
        if tenant:
            q = q.where(usage.c.tenant == tenant)
        if since is not None:
            q = q.where(usage.c.created_at >= since)
        if limit:
            q = q.limit(limit)
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(q)]
