"""Group commit: the gateway's ledger writes (reservations, settlements) batched into shared transactions.

One thread takes every queued write, runs them in one transaction (each in a savepoint of its own,
so one that fails rolls back alone and raises to its caller), and commits once: with N requests
in flight, N writes cost one commit and one fsync instead of N, and never wait on each other for
SQLite's write lock. A write's future resolves only after the commit, so a caller that awaits it
has the same guarantee as a direct call: the record is durable. Alone, a write is committed at
once (no waiting for company).
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

from sqlalchemy.engine import Connection

from tokenfab.ledger.store import Ledger

log = logging.getLogger("tokenfab.ledger")
MAX_BATCH = 128


class LedgerWriter(cf.Executor):
    """An executor whose callables take a connection first: `submit(fn, *args)` runs `fn(conn, *args)`."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        self._q: queue.SimpleQueue[tuple[Callable[..., Any], tuple, cf.Future] | None] = queue.SimpleQueue()
        self._closed = False
        self.batches = 0
        self.writes = 0
        self._thread = threading.Thread(target=self._run, name="tokenfab-ledger-writer", daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> cf.Future:
        if self._closed:
            raise RuntimeError("the ledger writer is shut down")
        fut: cf.Future = cf.Future()
        self._q.put((fn, args, fut))
        return fut

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        if not self._closed:
            self._closed = True
            self._q.put(None)
        if wait:
            self._thread.join()

    def _run(self) -> None:
        while True:
            item = self._q.get()
            if item is None:
                return
            batch = [item]
            stop = False
            while len(batch) < MAX_BATCH:
                try:
                    nxt = self._q.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                batch.append(nxt)
            self._commit(batch)
            if stop:
                return

    def _commit(self, batch: list[tuple[Callable[..., Any], tuple, cf.Future]]) -> None:
        results: list[tuple[cf.Future, Any, BaseException | None]] = []
        try:
            with self.ledger.engine.begin() as conn:
                for fn, args, fut in batch:
                    if not fut.set_running_or_notify_cancel():
                        continue
                    results.append(self._one(conn, fn, args, fut))
        except Exception as exc:  # noqa: BLE001 - the commit itself failed: every write in it did
            log.error("ledger: a batch of %d writes failed to commit: %s", len(batch), exc)
            for fut, _, _ in results:
                fut.set_exception(exc)
            return
        self.batches += 1
        self.writes += len(results)
        for fut, value, err in results:  # resolved only once the commit is durable
            if err is not None:
                fut.set_exception(err)
            else:
                fut.set_result(value)

    @staticmethod
    def _one(conn: Connection, fn: Callable[..., Any], args: tuple, fut: cf.Future) -> tuple:
        try:
            with conn.begin_nested():
                return fut, fn(conn, *args), None
        except Exception as exc:  # noqa: BLE001 - this write alone is rolled back, and raises to its caller
            return fut, None, exc
