"""Keeps one server's reservations alive and its streams' metering durable, on a thread of its own.

Every checkpoint interval it renews the lease on this server's reservations and writes what each
live request has delivered since the last checkpoint (so a SIGKILL loses at most one interval of
metering); every third of a lease it also recovers reservations whose own server has stopped
renewing them. A failing database is logged and retried at the next tick; requests keep running.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from tokenfab.ledger.store import Ledger

log = logging.getLogger("tokenfab.ledger")

Progress = dict[str, tuple[int, float]]  # request id -> (completion tokens delivered, price so far in USD)


class LeaseKeeper:
    def __init__(self, ledger: Ledger, progress: Callable[[], Progress], interval_s: float) -> None:
        self.ledger = ledger
        self.progress = progress
        self.interval_s = interval_s
        self.sweep_s = ledger.lease_s / 3
        self._written: dict[str, int] = {}  # request id -> tokens at its last written checkpoint
        self._next_sweep = time.monotonic() + self.sweep_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tokenfab-ledger-keeper", daemon=True)
        self._failing = False

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread and write one last checkpoint (the requests still live are about to be settled)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)
        self.tick(sweep=False)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.tick()

    def tick(self, sweep: bool = True) -> None:
        snapshot = self.progress()
        changed = {rid: v for rid, v in snapshot.items() if self._written.get(rid) != v[0]}
        try:
            self.ledger.checkpoint(changed)
            if sweep and time.monotonic() >= self._next_sweep:
                self._next_sweep = time.monotonic() + self.sweep_s
                n = self.ledger.recover()
                if n:
                    log.warning("ledger: recovered %d requests whose server stopped renewing their lease", n)
        except Exception as exc:  # noqa: BLE001 - the database may be briefly away; requests go on
            if not self._failing:
                log.error("ledger: checkpoint failed (%s: %s); retrying every %.1fs", type(exc).__name__, exc,
                          self.interval_s)
            self._failing = True
            return
        if self._failing:
            log.warning("ledger: checkpoints are being written again")
        self._failing = False
        self._written = {rid: v[0] for rid, v in snapshot.items()}
