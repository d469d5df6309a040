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


def test_recover_turns_reservations_into_aborted_records(ledger):
    tenant = "r-" + uuid.uuid4().hex[:8]
    ledger.create_key(tenant, "free", budget_usd=5)
    assert ledger.reserve(f"{tenant}-x", tenant, "free", "m", 2.0, 7)
    assert ledger.tenant(tenant)["reserved_usd"] == pytest.approx(2.0)
    assert ledger.recover() >= 1
    recs = ledger.usage_records(tenant)
    assert [(r["status"], r["prompt_tokens"]) for r in recs] == [("aborted", 7)]
    assert ledger.tenant(tenant)["reserved_usd"] == pytest.approx(0.0)


def test_bad_url_is_a_clear_error():
    with pytest.raises(LedgerError, match="cannot open ledger"):
        Ledger("nosuchdb://x")
