"""The fleet: one gateway over real engines on loopback (two `tokenfab worker` processes, llama.cpp's
llama-server), routed by prefix and load, with failover when a worker is killed under load."""

from __future__ import annotations

import concurrent.futures as cf
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from openai import OpenAI

from conftest import LiveServer, free_port
from tokenfab.config import AdmissionConfig, FleetConfig, LedgerConfig, ServerConfig, Settings
from tokenfab.engine.config import EngineConfig
from tokenfab.engine.loader import bundled_gguf_path
from tokenfab.fleet.router import Router
from tokenfab.fleet.workers import LocalWorkers, wait_healthy

ROOT = Path(__file__).resolve().parents[1]
MODEL = "smollm2-135m-instruct"
# a long shared prefix (a system prompt), and a few users' questions after it
SYSTEM_A = "You are a careful assistant for a bakery. " * 12
SYSTEM_B = "You are a terse assistant for a railway timetable office. " * 10
WORKER_ENGINE = EngineConfig(max_model_len=1024, kv_cache_gb=0.1, max_num_seqs=4)


@pytest.fixture(scope="module")
def workers(tmp_path_factory):
    w = LocalWorkers(2, WORKER_ENGINE, threads=1, log_dir=tmp_path_factory.mktemp("workers"))
    w.start()
    yield w
    w.stop()


def fleet_settings(urls: list[str], db: Path, **fleet) -> Settings:
    # admission slack: bursts here are far past a 2-core machine's SLOs on purpose; routing is under test
    return Settings(server=ServerConfig(), engine=EngineConfig(max_model_len=1024),
                    ledger=LedgerConfig(ledger_url=f"sqlite:///{db}"), admission=AdmissionConfig(admission_slack=20),
                    fleet=FleetConfig(backends=",".join(urls), metrics_interval_s=0.05, health_interval_s=0.2,
                                      **fleet))


@pytest.fixture(scope="module")
def gateway(workers, tmp_path_factory):
    urls = [w.url for w in workers.workers]
    s = LiveServer(fleet_settings(urls, tmp_path_factory.mktemp("fleet") / "ledger.db"), None)
    s.api_key = s.ledger.create_key("fleet-tests", "standard")[1]
    yield s
    s.stop()


def chat(gw: LiveServer, content: str, system: str = SYSTEM_A, max_tokens: int = 8, **kw) -> httpx.Response:
    return httpx.post(gw.base_url + "/v1/chat/completions", timeout=120, headers={"Authorization": f"Bearer {gw.api_key}"},
                      json={"model": MODEL, "messages": [{"role": "system", "content": system},
                                                         {"role": "user", "content": content}],
                            "max_tokens": max_tokens, "temperature": 0, **kw})


def record(gw: LiveServer, rid: str) -> dict:
    for _ in range(100):
        rows = [r for r in gw.ledger.usage_records("fleet-tests", None, 10_000) if r["request_id"] == rid]
        if rows:
            return rows[0]
        time.sleep(0.05)
    raise AssertionError(f"no usage record for {rid}")


def test_the_openai_client_works_through_the_fleet_streamed_or_not(gateway):
    client = OpenAI(base_url=gateway.base_url + "/v1", api_key=gateway.api_key)
    assert [m.id for m in client.models.list().data] == [MODEL]
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "What is 2+2?"}],
                                       max_tokens=16, temperature=0)
    assert "4" in r.choices[0].message.content and r.usage.completion_tokens > 0
    rec = record(gateway, r.id)
    assert rec["status"] == "completed" and rec["backend"] in {m.name for m in gateway.backend.members}
    assert rec["completion_tokens"] == r.usage.completion_tokens and rec["price_usd"] > 0
    assert rec["ttft_ms"] > 0 and rec["e2e_ms"] >= rec["ttft_ms"] and rec["joules"] > 0
    assert rec["energy_source"].startswith("worker:")
    stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Name three colors."}],
                                            max_tokens=16, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "Red" in text and chunks[-1].usage.completion_tokens == 12
    c = client.completions.create(model=MODEL, prompt="The capital of Italy is", max_tokens=4, temperature=0)
    assert c.usage.prompt_tokens == 5 and record(gateway, c.id)["completion_tokens"] == c.usage.completion_tokens
    # per-backend metrics: one label value per member, never a tenant
    text = httpx.get(gateway.base_url + "/metrics").text
    for m in gateway.backend.members:
        assert f'tokenfab_backend_up{{backend="{m.name}"}} 1.0' in text
    served = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                 if line.startswith("tokenfab_backend_requests_total{") and 'status="completed"' in line)
    assert served >= 3 and "fleet-tests" not in text


def test_budgets_and_keys_hold_over_the_fleet(gateway):
    _, poor = gateway.ledger.create_key("fleet-poor", "standard", budget_usd=1e-9)
    r = httpx.post(gateway.base_url + "/v1/completions", headers={"Authorization": f"Bearer {poor}"},
                   json={"model": MODEL, "prompt": "hi", "max_tokens": 4}, timeout=30)
    assert r.status_code == 402 and r.json()["error"]["code"] == "budget_exhausted"
    r = httpx.post(gateway.base_url + "/v1/completions", headers={"Authorization": "Bearer nope"},
                   json={"model": MODEL, "prompt": "hi", "max_tokens": 4}, timeout=30)
    assert r.status_code == 401
    # a field this backend kind would not honour is refused, not dropped
    r = httpx.post(gateway.base_url + "/v1/completions", headers={"Authorization": f"Bearer {gateway.api_key}"},
                   json={"model": MODEL, "prompt": "hi", "max_tokens": 2000}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"


def test_requests_sharing_a_prefix_land_on_the_same_worker_and_hit_its_cache(gateway):
    served_a = [record(gateway, chat(gateway, f"Question {i}: do you sell rye bread?").json()["id"]) for i in range(4)]
    served_b = [record(gateway, chat(gateway, f"Q{i}: when is the last train?", SYSTEM_B).json()["id"])
                for i in range(4)]
    assert len({r["backend"] for r in served_a}) == 1, served_a
    assert len({r["backend"] for r in served_b}) == 1, served_b
    prefix_blocks = len(gateway.backend.tokenizer.encode_chat([{"role": "system", "content": SYSTEM_A}])) // 16
    for r in served_a[1:]:  # the system prompt's blocks came from the worker's prefix cache
        assert r["cached_tokens"] >= (prefix_blocks - 1) * 16, r


def _burst(gw: LiveServer, n: int, system: str, max_tokens: int = 24) -> list[dict]:
    with cf.ThreadPoolExecutor(n) as pool:
        resps = list(pool.map(lambda i: chat(gw, f"User {i} asks about the opening hours.", system, max_tokens,
                                             ignore_eos=True), range(n)))
    assert all(r.status_code == 200 for r in resps), [r.text for r in resps if r.status_code != 200]
    return [record(gw, r.json()["id"]) for r in resps]


def test_under_a_skewed_load_prefix_and_load_spreads_where_prefix_alone_piles_up(gateway):
    fleet = gateway.backend
    system = "You are the help desk of a very busy library. " * 12
    try:
        fleet.router = Router("prefix")
        chat(gateway, "warm up", system)
        piled = _burst(gateway, 14, system)
        assert len({r["backend"] for r in piled}) == 1  # affinity only: every request on the hot worker
        fleet.router = Router("prefix+load")
        spread = _burst(gateway, 14, system)
        by = {b: sum(r["backend"] == b for r in spread) for b in {m.name for m in fleet.members}}
        assert min(by.values()) >= 3, by  # the hot worker saturated (4 running + 5 waiting); the rest went on
    finally:
        fleet.router = Router("prefix+load")


def test_a_worker_killed_under_load_loses_no_request_that_had_not_started_and_comes_back(workers, gateway):
    fleet = gateway.backend
    fleet.router = Router("round-robin")  # both workers take a share of the load
    victim = workers.workers[1]
    victim_name = next(m.name for m in fleet.members if m.backend.url == victim.url)
    n = 12
    results: list[tuple[int, str, str | None]] = []

    def one(i: int) -> tuple[int, str, str | None]:
        body = {"model": MODEL, "prompt": f"Story {i}: once upon a time", "max_tokens": 160, "temperature": 0,
                "ignore_eos": True, "stream": True}
        text, err, status = "", None, 0
        try:
            with httpx.stream("POST", gateway.base_url + "/v1/completions", json=body, timeout=120,
                              headers={"Authorization": f"Bearer {gateway.api_key}"}) as r:
                status = r.status_code
                if status != 200:
                    return status, "", r.read().decode()
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        obj = __import__("json").loads(line[6:])
                        if "error" in obj:
                            err = obj["error"]["message"]
                        else:
                            text += obj["choices"][0]["text"]
                            streaming.set()
        except Exception as exc:  # noqa: BLE001 - httpcore's sync stream can trip on a connection closed under it
            err = f"client: {exc!r}"
        return status, text, err

    member = next(m for m in fleet.members if m.name == victim_name)
    streaming = threading.Event()
    rows = gateway.ledger.usage_records("fleet-tests", None, 10_000)
    completed_before = sum(r["status"] == "completed" for r in rows)
    failed_before = sum(r["status"] == "failed" for r in rows)
    try:
        with cf.ThreadPoolExecutor(n) as pool:
            futs = [pool.submit(one, i) for i in range(n)]
            deadline = time.monotonic() + 60  # kill it while it streams some and holds others in its queue
            while not (streaming.is_set() and member.backend.in_flight >= 5) and time.monotonic() < deadline:
                time.sleep(0.02)
            assert member.backend.in_flight >= 5
            os.kill(victim.proc.pid, signal.SIGKILL)
            victim.proc.wait()
            later = [pool.submit(one, 100 + i) for i in range(4)]  # sent after the kill
            results = [f.result() for f in futs + later]
        statuses = [s for s, _, _ in results]
        assert statuses == [200] * len(results), results  # nothing refused: the other worker took them
        cut = [r for r in results if r[2] is not None]
        whole = [r for r in results if r[2] is None]
        # a cut stream ends with an error event that names the dead worker (or, mid-stream, the client saw
        # its connection end); it had started, so it was not retried: nothing was sent twice
        assert all(victim_name in err or "generation failed" in err or (err.startswith("client:") and text)
                   for _, text, err in cut), cut
        assert len(whole) >= len(results) - 4  # at most the victim's running batch (4 streams) was cut
        assert fleet.retried + len(cut) >= 1  # the victim had work when it died
        assert all(len(text) > 0 for _, text, _ in whole)
        assert not fleet.members[[m.name for m in fleet.members].index(victim_name)].backend.healthy
        rows = gateway.ledger.usage_records("fleet-tests", None, 10_000)
        assert sum(r["status"] == "completed" for r in rows) - completed_before >= len(whole)
        assert sum(r["status"] == "failed" for r in rows) - failed_before == len(cut)
        # the worker comes back on its port and is used again
        back = workers.start_one(victim.port)
        workers.workers[1] = back
        workers.wait_ready(back)
        deadline = time.monotonic() + 10
        while not member.backend.healthy and time.monotonic() < deadline:
            time.sleep(0.1)
        assert member.backend.healthy
        before = fleet.routed[victim_name]
        for i in range(4):
            assert chat(gateway, f"after {i}").status_code == 200
        assert fleet.routed[victim_name] > before
    finally:
        fleet.router = Router("prefix+load")


def test_no_backend_left_is_a_503_with_retry_after(tmp_path):
    dead = f"http://127.0.0.1:{free_port()}/v1"
    s = LiveServer(fleet_settings([dead], tmp_path / "l.db", upstream_model=MODEL), None)
    try:
        r = httpx.post(s.base_url + "/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 2},
                       timeout=30)
        assert r.status_code == 503 and r.json()["error"]["code"] == "no_backend_available"
        assert int(r.headers["Retry-After"]) >= 1
        assert httpx.get(s.base_url + "/health").json()["fleet"]["members"][0]["healthy"] is False
    finally:
        s.stop()


def _llama_server_bin() -> str:
    path = os.environ.get("TOKENFAB_LLAMA_SERVER")
    if path:
        return path
    out = subprocess.run([str(ROOT / "scripts" / "llama-server.sh")], capture_output=True, text=True, check=True)
    return out.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory):
    port = free_port()
    log = open(tmp_path_factory.mktemp("llama") / "llama-server.log", "wb")
    proc = subprocess.Popen([_llama_server_bin(), "-m", str(bundled_gguf_path()), "--alias", "smollm2",
                             "--host", "127.0.0.1", "--port", str(port), "-c", "4096", "-np", "4", "-t", "1",
                             "--metrics"], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url, proc, 60)
    yield url + "/v1"
    proc.terminate()
    proc.wait(10)


def test_llama_cpp_behind_the_gateway_with_a_worker_beside_it(llama_server, workers, tmp_path):
    urls = [llama_server, workers.workers[0].url]
    s = LiveServer(fleet_settings(urls, tmp_path / "l.db", route_policy="round-robin"), None)
    try:
        key = s.ledger.create_key("llama", "standard")[1]
        kinds = {m.backend.kind for m in s.backend.members}
        assert kinds == {"llamacpp", "tokenfab"}
        llama = next(m for m in s.backend.members if m.backend.kind == "llamacpp")
        assert llama.backend.info.max_model_len == 1024  # its context per slot (4096 over 4 slots)
        client = OpenAI(base_url=s.base_url + "/v1", api_key=key)
        model = client.models.list().data[0].id
        answers = []
        for _ in range(2):  # round-robin: one on each engine; greedy answers agree across engines
            r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "What is 2+2?"}],
                                               max_tokens=16, temperature=0)
            answers.append((r.choices[0].message.content, record_of(s, "llama", r.id)["backend"]))
        assert {b for _, b in answers} == {m.name for m in s.backend.members}
        assert all("4" in text for text, _ in answers), answers
        stream = client.completions.create(model=model, prompt="1, 2, 3, 4,", max_tokens=8, temperature=0,
                                           stream=True, stream_options={"include_usage": True})
        chunks = list(stream)
        assert chunks[-1].usage.completion_tokens == 8 and "5" in "".join(c.choices[0].text for c in chunks if c.choices)
        # llama-server's load comes from its /metrics; an extension it lacks is refused by name
        time.sleep(0.2)
        assert llama.backend.load().metrics_age_s is not None and llama.backend.load().metrics_age_s < 1.0
        assert llama.backend.load().prefix_cache_hit_rate is not None
        s.backend.router = Router("round-robin")
        refused = [httpx.post(s.base_url + "/v1/completions", headers={"Authorization": f"Bearer {key}"},
                              json={"model": model, "prompt": "hi", "max_tokens": 4, "min_tokens": 2}, timeout=30)
                   for _ in range(2)]
        assert [r.status_code for r in refused] == [200, 200]  # the worker honours min_tokens: routed there
        assert all(record_of(s, "llama", r.json()["id"])["backend"] != llama.name for r in refused)
    finally:
        s.stop()


def record_of(gw: LiveServer, tenant: str, rid: str) -> dict:
    for _ in range(100):
        rows = [r for r in gw.ledger.usage_records(tenant, None, 10_000) if r["request_id"] == rid]
        if rows:
            return rows[0]
        time.sleep(0.05)
    raise AssertionError(f"no usage record for {rid}")


def test_serve_with_workers_starts_routes_to_and_stops_its_own_workers(tmp_path):
    port = free_port()
    env = {**os.environ, "TOKENFAB_LEDGER_URL": f"sqlite:///{tmp_path / 'l.db'}", "TMPDIR": str(tmp_path)}
    proc = subprocess.Popen([sys.executable, "-m", "tokenfab.cli", "serve", "--port", str(port), "--workers", "2",
                             "--max-model-len", "1024", "--kv-cache-gb", "0.1", "--log-level", "warning"],
                            stdout=open(tmp_path / "gateway.log", "wb"), stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, 180, tmp_path / "gateway.log")
        members = httpx.get(url + "/health").json()["fleet"]["members"]
        assert len(members) == 2 and all(m["healthy"] and m["kind"] == "tokenfab" for m in members)
        worker_ports = [int(m["url"].rsplit(":", 1)[1].split("/")[0]) for m in members]
        r = httpx.post(url + "/v1/chat/completions", timeout=60, json={
            "model": MODEL, "messages": [{"role": "user", "content": "What is 2+2?"}], "max_tokens": 16,
            "temperature": 0})
        assert r.status_code == 200 and "4" in r.json()["choices"][0]["message"]["content"]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    for p in worker_ports:  # the gateway stopped the workers it started
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{p}/health", timeout=1)


def test_without_a_tokenizer_prompts_pass_through_as_text_and_usage_counts_them(llama_server, workers, tmp_path):
    """`--tokenizer none`: the backends template and tokenise (what fronting someone's vLLM with a model
    the gateway has no files for looks like); routing hashes the text, the ledger takes the backend's counts."""
    urls = [llama_server, workers.workers[0].url]
    settings = fleet_settings(urls, tmp_path / "l.db", tokenizer="none", upstream_model="")
    s = LiveServer(settings, None)
    try:
        key = s.ledger.create_key("text", "standard")[1]
        assert s.backend.tokenizer is None and s.app.state.gateway.tokenizer is None
        client = OpenAI(base_url=s.base_url + "/v1", api_key=key)
        model = client.models.list().data[0].id
        system = "You answer in one short sentence. " * 8
        served = set()
        for i in range(3):  # one long shared system prompt: the same backend each time
            r = client.chat.completions.create(model=model, max_tokens=12, temperature=0, messages=[
                {"role": "system", "content": system}, {"role": "user", "content": f"What is {i}+2?"}])
            rec = record_of(s, "text", r.id)
            assert r.choices[0].message.content and rec["prompt_tokens"] == r.usage.prompt_tokens > 40
            served.add(rec["backend"])
        assert len(served) == 1
        stream = client.chat.completions.create(model=model, temperature=0, stream=True,  # no max_tokens: theirs
                                                stream_options={"include_usage": True},
                                                messages=[{"role": "user", "content": "Name three colors."}])
        chunks = list(stream)
        assert "Red" in "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert chunks[-1].usage.completion_tokens > 0
        c = client.completions.create(model=model, prompt="1, 2, 3, 4,", max_tokens=6, temperature=0)
        assert "5" in c.choices[0].text and record_of(s, "text", c.id)["prompt_tokens"] == c.usage.prompt_tokens
        too_long = httpx.post(s.base_url + "/v1/completions", headers={"Authorization": f"Bearer {key}"}, timeout=30,
                              json={"model": model, "prompt": "word " * 3000, "max_tokens": 8})
        assert too_long.status_code == 400  # the backend's own refusal, passed on as the client's error
    finally:
        s.stop()


class DeviceMeter:
    """A DCGM exporter's /metrics on loopback, its energy counter rising at WATTS (no GPU here to read)."""

    WATTS = 50.0

    def __init__(self) -> None:
        import http.server

        start = time.monotonic()
        watts = self.WATTS

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                mj = (time.monotonic() - start) * watts * 1000 + 1e9  # since "boot"
                body = (f'# TYPE DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION counter\n'
                        f'DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION{{gpu="0",UUID="GPU-x"}} {mj:.0f}\n').encode()
                self.send_response(200)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *a) -> None:  # noqa: ANN002
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/metrics"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()


def test_a_device_meter_gives_measured_joules_split_across_the_requests_in_flight(workers, tmp_path):
    meter = DeviceMeter()
    s = LiveServer(fleet_settings([workers.workers[0].url], tmp_path / "l.db", backend_energy_url=meter.url), None)
    try:
        key = s.ledger.create_key("metered", "standard")[1]
        b = s.backend.members[0].backend
        deadline = time.monotonic() + 10
        while b.measured_watts is None and time.monotonic() < deadline:  # two readings make a power
            time.sleep(0.1)
        assert b.measured_watts == pytest.approx(DeviceMeter.WATTS, rel=0.2)
        client = OpenAI(base_url=s.base_url + "/v1", api_key=key)
        with cf.ThreadPoolExecutor(2) as pool:  # two at once: each is attributed about half the power
            rs = list(pool.map(lambda i: client.completions.create(
                model=MODEL, prompt=f"Count to ten, take {i}:", max_tokens=40, temperature=0,
                extra_body={"ignore_eos": True}), range(2)))
        recs = [record_of(s, "metered", r.id) for r in rs]
        for rec in recs:
            assert rec["energy_source"] == f"dcgm:{meter.url}"
            assert 0 < rec["joules"] <= DeviceMeter.WATTS * 1.3 * rec["e2e_ms"] / 1000
        both = sum(r["joules"] for r in recs)
        span = max(r["e2e_ms"] for r in recs) / 1000
        assert both == pytest.approx(DeviceMeter.WATTS * span, rel=0.35)  # the meter's energy over the span
    finally:
        s.stop()
        meter.stop()
