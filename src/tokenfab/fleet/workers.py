"""Local `tokenfab worker` processes that a gateway starts, waits for, and stops (by PID, its own only)."""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

READY_TIMEOUT_S = 180.0


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def engine_flags(engine: Any) -> list[str]:
    """The engine settings (an EngineConfig) that differ from their defaults, as `tokenfab worker` flags."""
    out = []
    default = type(engine)()
    for f in dataclasses.fields(engine):
        if f.name == "extra":
            continue
        v = getattr(engine, f.name)
        if v != getattr(default, f.name):
            flag = "--" + f.name.replace("_", "-")
            out += [flag if v is True else f"--no-{f.name.replace('_', '-')}"] if isinstance(v, bool) else [flag, str(v)]
    return out


def wait_healthy(root_url: str, proc: subprocess.Popen, timeout_s: float = READY_TIMEOUT_S,
                 log_path: Path | None = None) -> None:
    """Wait until the server at `root_url` answers GET /health with 200; raise (with its log's tail) if
    its process exits first or the time runs out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log_path.read_text(errors="replace")[-600:] if log_path else ""
            raise RuntimeError(f"{root_url}: the server exited ({proc.returncode}) {tail}")
        try:
            if httpx.get(root_url + "/health", timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{root_url} was not ready in {timeout_s:.0f} s" + (f" (log: {log_path})" if log_path else ""))


@dataclasses.dataclass
class WorkerProcess:
    url: str  # the worker's OpenAI base URL
    port: int
    proc: subprocess.Popen
    log_path: Path


class LocalWorkers:
    """N workers on loopback, each an engine process of its own with `threads` engine threads."""

    def __init__(self, count: int, engine: Any, threads: int = 1, log_dir: Path | None = None,
                 host: str = "127.0.0.1") -> None:
        self.count = count
        self.engine = dataclasses.replace(engine, threads=threads)
        self.host = host
        self.log_dir = log_dir or Path(os.environ.get("TMPDIR", "/tmp"))
        self.workers: list[WorkerProcess] = []

    def command(self, port: int) -> list[str]:
        return [sys.executable, "-m", "tokenfab.cli", "worker", "--host", self.host, "--port", str(port),
                *engine_flags(self.engine)]

    def start_one(self, port: int | None = None) -> WorkerProcess:
        port = port or free_port(self.host)
        log_path = self.log_dir / f"tokenfab-worker-{port}.log"
        with open(log_path, "ab") as logf:
            proc = subprocess.Popen(self.command(port), stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
        return WorkerProcess(f"http://{self.host}:{port}/v1", port, proc, log_path)

    def start(self, timeout_s: float = READY_TIMEOUT_S) -> list[str]:
        """Start every worker and wait until each answers /health; their URLs."""
        self.workers = [self.start_one() for _ in range(self.count)]
        for w in self.workers:
            self.wait_ready(w, timeout_s)
        return [w.url for w in self.workers]

    def wait_ready(self, w: WorkerProcess, timeout_s: float = READY_TIMEOUT_S) -> None:
        wait_healthy(w.url[:-3], w.proc, timeout_s, w.log_path)

    def stop(self, timeout_s: float = 10.0) -> None:
        for w in self.workers:
            if w.proc.poll() is None:
                w.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for w in self.workers:
            try:
                w.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                w.proc.kill()
                w.proc.wait()
