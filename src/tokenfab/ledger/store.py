"""The ledger: keys (only hashes stored), budgets with reservations, and one usage record per request.

Budget safety under concurrency: a request reserves its worst-case price with one conditional
UPDATE (spent + reserved + amount <= budget) before it runs, and settles the actual price after,
in the same transaction that writes its usage record. A reservation row is also the request's
in-flight marker, owned by one server (`owner`) under a lease that server keeps renewing while
it checkpoints what each request has delivered. `recover` turns only reservations whose lease
has run out into `aborted` records billing their last checkpoint, so servers sharing a database
(a second one started by mistake, or replicas on one PostgreSQL) never touch each other's live
requests. Settling is idempotent: a request settled twice, or settled after it was recovered,
ends with one usage record and is charged the difference.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import secrets
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import bindparam, create_engine, event, func, or_, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError

from tokenfab.ledger.schema import api_keys, migrate, reservations, tenants, usage

KEY_PREFIX = "tf-"
DEFAULT_LEASE_S = 30.0


def new_owner_id() -> str:
    """Names one running server: host, process and a random part (a restarted process is a new owner)."""
    return f"{socket.gethostname()[:40]}:{os.getpid()}:{secrets.token_hex(4)}"


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
    backend: str | None = None  # the engine that served it (None: not routed, e.g. refused)


def _insert(conn: Connection):  # type: ignore[no-untyped-def]
    """The dialect's INSERT, which has ON CONFLICT DO NOTHING (SQLite and PostgreSQL)."""
    return postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class Ledger:
    def __init__(self, url: str, owner: str | None = None, lease_s: float = DEFAULT_LEASE_S) -> None:
        self.url = url
        self.owner = owner or new_owner_id()
        self.lease_s = lease_s
        kwargs: dict[str, Any] = {"future": True}
        path = url[len("sqlite:///"):] if url.startswith("sqlite:///") else ""
        if path and path != ":memory:":
            try:
                Path(path).parent.mkdir(parents=True, exist_ok=True)  # the default lives in a per-user folder
            except OSError as exc:
                raise LedgerError(f"cannot create the folder of ledger {url!r}: {exc}") from None
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
            return self.reserve_in(conn, request_id, tenant, tier, model, amount_usd, prompt_tokens)

    def reserve_in(self, conn: Connection, request_id: str, tenant: str, tier: str, model: str, amount_usd: float,
                   prompt_tokens: int) -> bool:
        """`reserve` inside the caller's transaction (a batch of the writer's)."""
        now = time.time()
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
                                                  created_at=now, owner=self.owner,
                                                  lease_expires_at=now + self.lease_s))
        return True

    def settle(self, rec: UsageRecord, only_if_reserved: bool = False) -> bool:
        """Write the usage record, charge its price, release its reservation: one transaction.

        Idempotent: if the request already has a record (settled before, or recovered while its
        server looked dead), the record is replaced and the tenant charged the difference. With
        `only_if_reserved` (recovery) nothing happens unless this call is the one that releases the
        reservation, so a recovery racing the owner's own settle never overwrites it. Returns
        whether it wrote.
        """
        with self.engine.begin() as conn:
            return self.settle_in(conn, rec, only_if_reserved)

    def settle_in(self, conn: Connection, rec: UsageRecord, only_if_reserved: bool = False) -> bool:
        """`settle` inside the caller's transaction (a batch of the writer's)."""
        res = conn.execute(reservations.delete().where(reservations.c.request_id == rec.request_id)
                           .returning(reservations.c.amount_usd)).first()
        if res is None and only_if_reserved:
            return False
        held = res.amount_usd if res else 0.0
        values = dataclasses.asdict(rec)
        prior = self._usage_price(conn, rec.request_id)
        if prior is None:
            ins = _insert(conn)(usage).values(created_at=time.time(), **values)
            if conn.execute(ins.on_conflict_do_nothing(index_elements=["request_id"])).rowcount == 0:
                prior = self._usage_price(conn, rec.request_id)  # a concurrent settle got there first
        if prior is not None:
            conn.execute(usage.update().where(usage.c.request_id == rec.request_id).values(**values))
        charge = rec.price_usd - (prior or 0.0)
        conn.execute(tenants.update().where(tenants.c.name == rec.tenant).values(
            spent_usd=tenants.c.spent_usd + charge, reserved_usd=tenants.c.reserved_usd - held))
        return True

    @staticmethod
    def _usage_price(conn: Connection, request_id: str) -> float | None:
        q = select(usage.c.price_usd).where(usage.c.request_id == request_id)
        if conn.dialect.name == "postgresql":
            q = q.with_for_update()
        row = conn.execute(q).first()
        return None if row is None else row.price_usd

    def checkpoint(self, progress: dict[str, tuple[int, float]]) -> None:
        """Renew the lease on this server's reservations and record what each request has delivered
        so far ({request id: (completion tokens, price in USD)}), in one transaction."""
        now = time.time()
        with self.engine.begin() as conn:
            conn.execute(reservations.update().where(reservations.c.owner == self.owner)
                         .values(lease_expires_at=now + self.lease_s))
            if progress:
                conn.execute(
                    reservations.update()
                    .where(reservations.c.request_id == bindparam("rid"), reservations.c.owner == self.owner)
                    .values(delivered_tokens=bindparam("tokens"), delivered_usd=bindparam("usd")),
                    [{"rid": rid, "tokens": n, "usd": usd} for rid, (n, usd) in progress.items()],
                )

    def recover(self) -> int:
        """Turn reservations whose lease has expired (their server died) into aborted usage records
        that bill what was last checkpointed as delivered; returns how many."""
        now = time.time()
        with self.engine.connect() as conn:
            left = [dict(r._mapping) for r in conn.execute(select(reservations).where(
                or_(reservations.c.lease_expires_at.is_(None), reservations.c.lease_expires_at < now)))]
        n = 0
        for r in left:
            n += self.settle(UsageRecord(
                request_id=r["request_id"], tenant=r["tenant"], tier=r["tier"], model=r["model"], status="aborted",
                prompt_tokens=r["prompt_tokens"], completion_tokens=r["delivered_tokens"] or 0,
                price_usd=r["delivered_usd"] or 0.0,
                error=f"server {r['owner'] or '(unknown)'} stopped while the request was in flight; billed what it "
                      "had delivered at its last checkpoint"), only_if_reserved=True)
        return n

    def in_flight(self, owner: str | None = None) -> int:
        q = select(func.count()).select_from(reservations)
        if owner is not None:
            q = q.where(reservations.c.owner == owner)
        with self.engine.connect() as conn:
            return conn.execute(q).scalar_one()

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
