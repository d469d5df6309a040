"""Fuzzing the gateway from its own OpenAPI description: schemathesis generates valid and invalid
requests for every operation and sends them to a real server on loopback. None may get a 5xx, every
error must be OpenAI's error body, and no connection may be closed by the server after an error.

The server runs a one-layer model behind the bundled model's real tokenizer, so that generated
requests that are valid run through the whole path (template, tokenizer, engine, sampler, ledger)
in milliseconds. The count of requests sent is reported at the end of the run.
"""

from __future__ import annotations

import json

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis import GenerationMode

from tokenfab.config import LedgerConfig, Settings, ServerConfig
from tokenfab.engine.config import EngineConfig
from tokenfab.serve.openapi import openapi_document

from conftest import LiveServer

MODEL = "tiny"
# generated requests per operation (hypothesis stops earlier where an operation has fewer distinct inputs)
EXAMPLES = {"POST /v1/chat/completions": 450, "POST /v1/completions": 450, "GET /v1/usage": 150,
            "GET /v1/models/{model}": 100}
STATS = {"requests": 0, "by_status": {}}

schema = schemathesis.openapi.from_dict(openapi_document(MODEL))
schema.config.generation.update(modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE])


@pytest.fixture(scope="module")
def fuzz_server(tiny_model, tmp_path_factory):
    db = tmp_path_factory.mktemp("fuzz") / "ledger.db"
    s = LiveServer(Settings(server=ServerConfig(max_body_bytes=256 * 1024),
                            engine=EngineConfig(max_model_len=64, kv_cache_gb=0.05, max_num_seqs=8),
                            ledger=LedgerConfig(ledger_url=f"sqlite:///{db}")), tiny_model)
    s.api_key = s.ledger.create_key("fuzzer", "free")[1]
    s.session = requests.Session()  # one keep-alive connection for all of them, as a client would hold
    yield s
    s.session.close()
    s.stop()


def _check(response: requests.Response, case) -> None:
    STATS["requests"] += 1
    STATS["by_status"][response.status_code] = STATS["by_status"].get(response.status_code, 0) + 1
    where = f"{case.method} {case.formatted_path} body={str(case.body)[:300]!r} query={case.query!r}"
    assert response.status_code < 500, f"{response.status_code} for {where}: {response.text[:500]}"
    assert response.headers.get("connection", "").lower() != "close", f"connection closed after {where}"
    if response.status_code >= 400:
        err = response.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"], where
    elif response.headers.get("content-type", "").startswith("text/event-stream"):
        events = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
        assert events and events[-1] == "[DONE]", where
        assert not any('"error"' in e and json.loads(e).get("error") for e in events[:-1]), \
            f"in-band error for {where}: {response.text[-500:]}"


@schema.parametrize()
@settings(deadline=None, max_examples=max(EXAMPLES.values()), derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
def test_no_generated_request_gets_a_server_error(case, fuzz_server):
    op = f"{case.method} {case.path}"
    # hypothesis generates up to the largest budget for every operation; each sends only its own budget
    budget = EXAMPLES.get(op, 20)
    counted = STATS.setdefault("per_op", {}).setdefault(op, 0)
    if counted >= budget:
        return
    STATS["per_op"][op] = counted + 1
    # sent with our own session (schemathesis's call stops reading a stream after a few events)
    kwargs = case.as_transport_kwargs(base_url=fuzz_server.base_url,
                                      headers={"Authorization": f"Bearer {fuzz_server.api_key}"})
    response = fuzz_server.session.request(**kwargs, timeout=60)
    _check(response, case)


def test_the_fuzz_run_sent_at_least_a_thousand_requests(fuzz_server):
    h = requests.get(fuzz_server.base_url + "/health", timeout=10).json()
    assert h["in_flight"] == 0 and h["admitted"] == 0 and h["kv_cache_usage"] == 0.0
    assert STATS["requests"] >= 1000, STATS
    assert not [c for c in STATS["by_status"] if c >= 500]
