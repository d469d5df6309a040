"""The ledger on real databases: SQLite (WAL, a file) and PostgreSQL at 127.0.0.1:5432."""

from __future__ import annotations

import concurrent.futures as cf
import uuid

import pytest

from tokenfab.ledger.store import Ledger, LedgerError, UsageRecord

PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def _pg_available() -> str | None:
    try:
        import psycopg

        with psycopg.connect("host=127.0.0.1 port=5432 user=postgres dbname=test", connect_timeout=3):
            return None
    except Exception as exc:  # noqa: BLE001
        return f"no PostgreSQL at 127.0.0.1:5432 ({type(exc).__name__}: {exc})"


@pytest.fixture(params=["sqlite", "postgresql"])
def ledger(request, tmp_path):
    if request.param == "sqlite":
        led = Ledger(f"sqlite:///{tmp_path / 'l.db'}")
    else:
        why = _pg_available()
        if why:
            pytest.skip(why)
        led = Ledger(PG_URL)
    yield led
    led.close()


def test_keys_hash_only_and_revocation(ledger):
    tenant = "t-" + uuid.uuid4().hex[:8]
    key_id, key = ledger.create_key(tenant, "fast")
    p = ledger.authenticate(key)
    assert p is not None and p.tenant == tenant and p.tier == "fast"
    rows = [r for r in ledger.list_keys() if r["key_id"] == key_id]
    assert rows and key not in str(rows)
    ledger.revoke(key_id)
    assert ledger.authenticate(key) is None
    with pytest.raises(LedgerError, match="no active key"):
        ledger.revoke(key_id)


def test_concurrent_reservations_never_overspend(ledger):
    tenant = "b-" + uuid.uuid4().hex[:8]
    ledger.create_key(tenant, "fast", budget_usd=1.0)

    def attempt(i: int) -> bool:
        rid = f"{tenant}-{i}"
        if not ledger.reserve(rid, tenant, "fast", "m", 0.15, 10):
            return False
        ledger.settle(UsageRecord(rid, tenant, "fast", "m", "completed", 10, 0, 5, price_usd=0.1))
        return True

    with cf.ThreadPoolExecutor(16) as pool:
        ok = sum(pool.map(attempt, range(50)))
    t = ledger.tenant(tenant)
    assert t["spent_usd"] <= 1.0 + 1e-9 and t["reserved_usd"] == pytest.approx(0.0, abs=1e-9)
    assert ok == len(ledger.usage_records(tenant)) >= 6  # at least floor((1.0 - 0.15) / 0.1) + 1 runs
    assert t["spent_usd"] == pytest.approx(0.1 * ok)


def test_recovery_touches_only_expired_leases_and_bills_the_last_checkpoint(ledger):
    tenant = "r-" + uuid.uuid4().hex[:8]
    ledger.create_key(tenant, "free", budget_usd=5)
    dead = Ledger(ledger.url, owner="dead-server", lease_s=-1.0)  # its leases are already over
    live = Ledger(ledger.url, owner="live-server", lease_s=60.0)
    try:
        assert dead.reserve(f"{tenant}-dead", tenant, "free", "m", 2.0, 7)
        assert live.reserve(f"{tenant}-live", tenant, "free", "m", 1.0, 3)
        dead.checkpoint({f"{tenant}-dead": (11, 0.25)})  # what it had streamed before it died
        # a newcomer on the same database (a second server started by mistake, or a replica)
        newcomer = Ledger(ledger.url, owner="newcomer")
        assert newcomer.recover() >= 1
        newcomer.close()
        recs = {r["request_id"]: r for r in ledger.usage_records(tenant)}
        assert set(recs) == {f"{tenant}-dead"}
        r = recs[f"{tenant}-dead"]
        assert (r["status"], r["prompt_tokens"], r["completion_tokens"], r["price_usd"]) == ("aborted", 7, 11, 0.25)
        assert "dead-server" in r["error"]
        t = ledger.tenant(tenant)
        assert t["reserved_usd"] == pytest.approx(1.0) and t["spent_usd"] == pytest.approx(0.25)
        assert live.in_flight(owner="live-server") == 1
        # the live server's request finishes and is charged normally
        live.settle(UsageRecord(f"{tenant}-live", tenant, "free", "m", "completed", 3, 0, 9, price_usd=0.5))
        t = ledger.tenant(tenant)
        assert t["reserved_usd"] == pytest.approx(0.0) and t["spent_usd"] == pytest.approx(0.75)
    finally:
        dead.close()
        live.close()


def test_settling_is_idempotent_and_corrects_a_recovered_record(ledger):
    tenant = "i-" + uuid.uuid4().hex[:8]
    ledger.create_key(tenant, "free", budget_usd=5)
    rid = f"{tenant}-1"
    rec = UsageRecord(rid, tenant, "free", "m", "completed", 4, 0, 8, price_usd=0.3)
    assert ledger.reserve(rid, tenant, "free", "m", 1.0, 4)
    ledger.settle(rec)
    ledger.settle(rec)  # a retry: one record, charged once
    assert len(ledger.usage_records(tenant)) == 1
    assert ledger.tenant(tenant)["spent_usd"] == pytest.approx(0.3)
    # a stalled server's request is recovered from its checkpoint, then the server settles it for real
    stalled = Ledger(ledger.url, owner="stalled", lease_s=-1.0)
    rid2 = f"{tenant}-2"
    assert stalled.reserve(rid2, tenant, "free", "m", 1.0, 4)
    stalled.checkpoint({rid2: (5, 0.1)})
    assert Ledger(ledger.url, owner="other").recover() >= 1
    assert ledger.tenant(tenant)["spent_usd"] == pytest.approx(0.4)
    stalled.settle(UsageRecord(rid2, tenant, "free", "m", "completed", 4, 0, 20, price_usd=0.6))
    stalled.close()
    recs = [r for r in ledger.usage_records(tenant) if r["request_id"] == rid2]
    assert [(r["status"], r["completion_tokens"]) for r in recs] == [("completed", 20)]
    t = ledger.tenant(tenant)
    assert t["spent_usd"] == pytest.approx(0.9) and t["reserved_usd"] == pytest.approx(0.0)


def test_a_version_2_database_migrates_in_place(tmp_path):
    from sqlalchemy import text

    url = f"sqlite:///{tmp_path / 'old.db'}"
    led = Ledger(url)
    led.create_key("old", "free", budget_usd=3)
    with led.engine.begin() as conn:  # back to the version-2 layout, with a reservation an old server left
        for col in ("owner", "lease_expires_at", "delivered_tokens", "delivered_usd"):
            conn.execute(text(f"ALTER TABLE reservations DROP COLUMN {col}"))
        conn.execute(text("ALTER TABLE usage DROP COLUMN backend"))
        conn.execute(text("UPDATE schema_version SET version = 2"))
        conn.execute(text("INSERT INTO reservations (request_id, tenant, tier, model, amount_usd, prompt_tokens, "
                          "created_at) VALUES ('old-1', 'old', 'free', 'm', 1.5, 6, 0)"))
        conn.execute(text("UPDATE tenants SET reserved_usd = 1.5 WHERE name = 'old'"))
    led.close()
    led = Ledger(url)
    assert led.version == 4
    assert led.recover() == 1  # no lease: left by a server that predates leases
    assert [(r["status"], r["prompt_tokens"]) for r in led.usage_records("old")] == [("aborted", 6)]
    assert led.tenant("old")["reserved_usd"] == pytest.approx(0.0)
    led.close()


def test_bad_url_is_a_clear_error():
    with pytest.raises(LedgerError, match="cannot open ledger"):
        Ledger("nosuchdb://x")


def test_the_writer_commits_concurrent_writes_together_and_a_failing_one_alone(ledger):
    import threading

    from tokenfab.ledger.writer import LedgerWriter

    tenant = f"grouped-{uuid.uuid4().hex[:6]}"
    ledger.create_key(tenant, "free", budget_usd=100.0)
    writer = LedgerWriter(ledger)
    gate = threading.Event()
    # hold the writer on a slow first write, so the next ones queue up behind it and go in one batch
    first = writer.submit(lambda conn: "first" if gate.wait(5) else "timed out")
    futs = [writer.submit(ledger.reserve_in, f"{tenant}-{i}", tenant, "free", "m", 1.0, 4) for i in range(20)]
    dup = writer.submit(ledger.reserve_in, f"{tenant}-3", tenant, "free", "m", 1.0, 4)  # the same id again
    after = writer.submit(ledger.reserve_in, f"{tenant}-after", tenant, "free", "m", 1.0, 4)
    gate.set()
    assert first.result(10) == "first" and all(f.result(10) is True for f in futs) and after.result(10) is True
    with pytest.raises(Exception):  # noqa: B017 - the driver's IntegrityError, raised to its caller only
        dup.result(10)
    assert writer.writes == 23 and writer.batches <= 3  # 23 writes (the failed one rolled back alone), few commits
    assert ledger.tenant(tenant)["reserved_usd"] == pytest.approx(21.0)  # 20 + after; the duplicate held nothing
    settled = [writer.submit(ledger.settle_in, UsageRecord(request_id=f"{tenant}-{i}", tenant=tenant, tier="free",
                                                            model="m", status="completed", completion_tokens=5,
                                                            price_usd=0.5)) for i in range(20)]
    assert all(f.result(10) for f in settled)
    writer.shutdown()
    t = ledger.tenant(tenant)
    assert t["spent_usd"] == pytest.approx(10.0) and t["reserved_usd"] == pytest.approx(1.0)
    with pytest.raises(RuntimeError, match="shut down"):
        writer.submit(ledger.reserve_in, "late", tenant, "free", "m", 1.0, 4)
