"""Tiers end to end: keys over HTTP, budgets under concurrency, per-tier metrics and usage, admission,
the tier-aware scheduler and energy attribution."""

from __future__ import annotations

import concurrent.futures as cf
import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tokenfab.config import AdmissionConfig, LedgerConfig, Settings
from tokenfab.engine.config import EngineConfig
from tokenfab.engine.sampling import SamplingParams
from tokenfab.engine.scheduler import TierClass
from tokenfab.step_model import StepTimeModel

from conftest import LiveServer, make_engine

MODEL = "smollm2-135m-instruct"


def client(server, key):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key=key, max_retries=0, timeout=60)


def metric_sum(text: str, name: str, **labels) -> float:
    total = 0.0
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def test_key_auth_and_revocation(server):
    key_id, key = server.ledger.create_key("acme", "fast")
    c = client(server, key)
    assert c.completions.create(model=MODEL, prompt="hi", max_tokens=2).usage.completion_tokens >= 1
    server.ledger.revoke(key_id)
    with pytest.raises(openai.AuthenticationError, match="revoked"):
        c.completions.create(model=MODEL, prompt="hi", max_tokens=2)
    r = httpx.post(server.base_url + "/v1/completions", headers={"Authorization": "Basic abc"},
                   json={"model": MODEL, "prompt": "x"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


def test_budget_exhaustion_under_50_concurrent_requests(server):
    # free-tier prices are 0; use a paid tier with a budget of a few requests' worst case (~2.7e-5 each)
    budget = 0.0001
    _, key = server.ledger.create_key("budgeted", "standard", budget_usd=budget)
    c = client(server, key)
    price_in, price_out = 0.75e-6, 3.0e-6
    max_tokens = 8

    def one(i):
        try:
            r = c.completions.create(model=MODEL, prompt=f"Count {i}:", max_tokens=max_tokens,
                                     extra_body={"ignore_eos": True})
            return ("ok", r.usage.prompt_tokens, r.usage.completion_tokens)
        except openai.APIStatusError as exc:
            return (exc.status_code, exc.body.get("code"), exc.body.get("message"))

    with cf.ThreadPoolExecutor(50) as pool:
        results = list(pool.map(one, range(50)))
    oks = [r for r in results if r[0] == "ok"]
    refused = [r for r in results if r[0] == 402]
    shed = [r for r in results if r[0] == 429]  # admission may also shed some under this burst
    assert oks and refused and len(oks) + len(refused) + len(shed) == 50
    assert all(code == "budget_exhausted" and "budget" in msg for _, code, msg in refused)
    t = server.ledger.tenant("budgeted")
    worst = max(p * price_in + max_tokens * price_out for _, p, _ in oks)
    assert t["spent_usd"] <= budget + worst + 1e-12
    assert t["reserved_usd"] == pytest.approx(0.0, abs=1e-12)
    charged = sum(p * price_in + n * price_out for _, p, n in oks)
    assert t["spent_usd"] == pytest.approx(charged, rel=1e-6)


def test_a_402_says_what_is_free_and_what_the_request_could_cost(server):
    _, key = server.ledger.create_key("thrifty", "standard", budget_usd=0.0001)
    c = client(server, key)
    with pytest.raises(openai.APIStatusError) as exc:  # no max_tokens: it reserves the rest of the context
        c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}])
    err = exc.value.body
    assert exc.value.status_code == 402 and err["code"] == "budget_exhausted"
    msg = err["message"]
    assert "has $0.000100 of its $0.000100 budget free" in msg and "exhausted" not in msg
    assert "a request without max_tokens reserves the rest of the context" in msg and "Lower max_tokens" in msg
    assert c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                     max_tokens=4).usage.completion_tokens >= 1


def test_metrics_and_usage_add_up_to_what_clients_received(server):
    _, key = server.ledger.create_key("counted", "fast")
    _, other = server.ledger.create_key("someone-else", "free")
    c = client(server, key)
    before = httpx.get(server.base_url + "/metrics").text
    got_prompt = got_completion = 0
    for i in range(4):
        r = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": f"Say {i}"}], max_tokens=6)
        got_prompt += r.usage.prompt_tokens
        got_completion += r.usage.completion_tokens
    stream = c.completions.create(model=MODEL, prompt="Go", max_tokens=5, stream=True,
                                  stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    last = list(stream)[-1]
    got_prompt += last.usage.prompt_tokens
    got_completion += last.usage.completion_tokens
    client(server, other).completions.create(model=MODEL, prompt="x", max_tokens=2)
    text = httpx.get(server.base_url + "/metrics").text

    def grew(name, **labels):
        return metric_sum(text, name, tier="fast", **labels) - metric_sum(before, name, tier="fast", **labels)

    # no other request ran on the fast tier meanwhile, so its counters grew by exactly this client's requests
    assert grew("tokenfab_tokens_total", kind="completion") == got_completion
    assert grew("tokenfab_tokens_total", kind="prompt") == got_prompt
    assert grew("tokenfab_requests_total", status="completed") == 5
    assert grew("tokenfab_revenue_usd_total") == pytest.approx((got_prompt * 1.5 + got_completion * 6.0) / 1e6)
    assert grew("tokenfab_energy_joules_total") > 0
    assert grew("tokenfab_ttft_seconds_count") == 5
    # /metrics answers without a key: it names tiers and models, never a tenant
    assert "counted" not in text and "someone-else" not in text and "tenant" not in text
    u = httpx.get(server.base_url + "/v1/usage", headers={"Authorization": f"Bearer {key}"}).json()
    assert u["tenant"] == "counted" and len(u["data"]) == 5
    assert {r["tenant"] for r in u["data"]} == {"counted"}
    assert sum(r["completion_tokens"] for r in u["data"]) == got_completion
    rec = u["data"][0]
    assert rec["joules"] > 0 and rec["energy_source"].startswith("model:cpu-time")
    assert rec["cost_usd"] > 0 and rec["ttft_ms"] > 0 and rec["e2e_ms"] >= rec["ttft_ms"]
    assert httpx.get(server.base_url + "/v1/usage").status_code == 401


@pytest.fixture(scope="module")
def strict_server(real_model, tmp_path_factory):
    """Keys required, a tiny per-tier queue: for admission behaviour."""
    db = tmp_path_factory.mktemp("strict") / "l.db"
    s = LiveServer(Settings(engine=EngineConfig(max_model_len=1024, kv_cache_gb=0.25, max_num_seqs=8),
                            ledger=LedgerConfig(f"sqlite:///{db}", anonymous_tier=""),
                            admission=AdmissionConfig(tier_queue_limit=2)), real_model)
    yield s
    s.stop()


def test_missing_key_when_keys_are_required(strict_server):
    r = httpx.post(strict_server.base_url + "/v1/completions", json={"model": MODEL, "prompt": "x"})
    assert r.status_code == 401 and "tokenfab keys create" in r.json()["error"]["message"]


def test_full_tier_queue_answers_429_naming_the_tier(strict_server):
    _, key = strict_server.ledger.create_key("flood", "free")
    body = {"model": MODEL, "prompt": "Tell a long story.", "max_tokens": 60, "ignore_eos": True}

    def one(_):
        r = httpx.post(strict_server.base_url + "/v1/completions", json=body,
                       headers={"Authorization": f"Bearer {key}"}, timeout=120)
        return r.status_code, r.headers.get("retry-after"), r.json()

    with cf.ThreadPoolExecutor(24) as pool:
        res = list(pool.map(one, range(24)))
    rejected = [r for r in res if r[0] == 429]
    assert rejected and any(r[0] == 200 for r in res)
    status, retry, body429 = rejected[0]
    assert retry is not None and int(retry) >= 1
    assert "tier 'free'" in body429["error"]["message"] and body429["error"]["type"] == "rate_limit_error"
    text = httpx.get(strict_server.base_url + "/metrics").text
    assert metric_sum(text, "tokenfab_rejections_total", tier="free") == len(rejected)
    assert httpx.get(strict_server.base_url + "/health").json()["status"] == "ok"


POLICY = (TierClass("gold", 0.0, 1.0, 0.0), TierClass("free", 0.25, 1.0, 0.0))


class FixedStepModel(StepTimeModel):
    """Step costs fixed for the test (the live model would follow this machine's timings)."""

    def observe(self, decodes, prefill_tokens, step_s):  # noqa: ANN001
        pass


def test_scheduler_prefers_higher_tier_but_honours_guaranteed_share(real_model):
    eng = make_engine(real_model, max_num_batched_tokens=8, max_num_seqs=64)
    eng.set_policy(POLICY)
    eng.scheduler.step_model = FixedStepModel(a_s=0.01, b_dec_s=0.0005, b_pre_s=0.0005)
    sp = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    gold = [eng.add_request([100 + i, 5, 6], sp, priority=0) for i in range(12)]
    free = [eng.add_request([200 + i, 5, 6], sp, priority=1) for i in range(4)]
    tokens = {0: 0, 1: 0}  # tokens scheduled per tier while both tiers have work
    orig = eng.scheduler.schedule

    def spy():
        out = orig()
        ranks = {s.priority for s in (*eng.scheduler.running, *eng.scheduler.waiting)}
        if ranks == {0, 1}:
            for seq, n in out:
                tokens[seq.priority] += n
        return out

    eng.scheduler.schedule = spy
    first_token_step = {}
    step = 0
    while eng.has_work():
        step += 1
        for o in eng.step():
            first_token_step.setdefault(o.request_id, step)
    g = sorted(first_token_step[r] for r in gold)
    f = sorted(first_token_step[r] for r in free)
    assert g[0] <= f[0]  # the higher tier goes first
    assert f[0] < g[-1]  # free work is never starved: it starts while gold still waits
    share_free = tokens[1] / (tokens[0] + tokens[1])
    assert 0.2 <= share_free < 0.5  # free gets at least about its 25% guarantee, gold the majority


def test_slower_tier_is_paced_to_its_speed_when_the_budget_is_short(real_model):
    """A slow tier's decode that is ahead of its pace yields its place in a full step; when due, or when
    the step has room to spare, it runs."""
    policy = (TierClass("fast", 0.0, 1.0, 20.0), TierClass("slow", 0.1, 1.0, 2.0))
    eng = make_engine(real_model, max_num_batched_tokens=256, max_num_seqs=64)
    eng.set_policy(policy)
    eng.scheduler.step_model = FixedStepModel(a_s=0.01, b_dec_s=0.002, b_pre_s=0.0001)
    sp = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)
    slow = eng.add_request([500, 5, 6], sp, priority=1)
    fast = [eng.add_request([600, 5, 6], sp, priority=0)]
    for _ in range(3):
        eng.step()
    seq = eng.seqs[slow]
    assert seq.num_output >= 2

    def scheduled_ids() -> set[str]:
        eng.scheduler.budget_scale = 1.0  # the budget as the fixed model says, whatever real steps took
        return {s.seq_id for s, _ in eng.scheduler.schedule()}

    seq.first_token_s = time.monotonic()  # it has 2+ tokens already: ahead of a 2 tok/s pace
    assert slow in scheduled_ids()  # room to spare: the work-conserving pass still runs it
    fast += [eng.add_request([700 + i, 5, 6], sp, priority=0) for i in range(40)]
    while any(len(eng.seqs[r]) - eng.seqs[r].num_computed > 1 for r in fast):
        eng.step()  # prefill the 40 newcomers: afterwards fast decodes alone overfill a step
    seq.first_token_s = time.monotonic()
    ids = scheduled_ids()
    assert slow not in ids and len(ids & set(fast)) > 5  # ahead of pace: its place goes to the fast tier
    seq.first_token_s = time.monotonic() - 60.0  # far behind its pace: due
    assert slow in scheduled_ids()


def test_a_lone_prefill_gets_the_whole_token_budget(real_model):
    """With nothing decoding, a long prompt of the lowest tier runs in chunks of the full token budget:
    a chunk given its guaranteed share in the first pass grows in the later passes, and no tier's pace
    caps a step that holds no decodes (a 2,048-token prompt used to take 21 steps of 102 tokens)."""
    policy = (TierClass("gold", 0.2, 1.0, 20.0), TierClass("free", 0.1, 1.0, 2.0))
    eng = make_engine(real_model, max_num_batched_tokens=256, max_num_seqs=8)
    eng.set_policy(policy)
    eng.scheduler.step_model = FixedStepModel(a_s=0.01, b_dec_s=0.002, b_pre_s=0.001)
    eng.add_request(list(range(1000, 1600)), SamplingParams(max_tokens=1), priority=1)
    sizes = []
    orig = eng.scheduler.schedule

    def spy():
        out = orig()
        sizes.append(sum(n for _, n in out))
        return out

    eng.scheduler.schedule = spy
    while eng.has_work():
        eng.step()
    assert sizes[:3] == [256, 256, 88]


def test_higher_tier_preempts_lower_when_slots_run_out(real_model):
    eng = make_engine(real_model, max_num_seqs=2)
    eng.set_policy(POLICY)
    sp = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
    low = [eng.add_request([300 + i, 7], sp, priority=1) for i in range(2)]
    outs: dict[str, list[int]] = {}
    for _ in range(3):
        for o in eng.step():
            outs.setdefault(o.request_id, []).extend(o.token_ids)
    hi = eng.add_request([400, 7], SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True), priority=0)
    while eng.has_work():
        for o in eng.step():
            outs.setdefault(o.request_id, []).extend(o.token_ids)
    assert eng.scheduler.num_preemptions >= 1
    assert len(outs[hi]) == 3 and all(len(outs[r]) == 30 for r in low)


def test_energy_is_attributed_to_requests(real_model):
    from tokenfab.meter.energy import CpuTimeModel

    src = CpuTimeModel(busy_w_per_core=20.0)
    from tokenfab.engine.llm_engine import LLMEngine

    eng = LLMEngine(EngineConfig(dtype="float32", linear_kernel="dense", kv_cache_gb=0.1), loaded=real_model,
                    energy=src)
    e0 = src.read_j()
    rids = [eng.add_request([10 + i, 20, 30], SamplingParams(max_tokens=5, ignore_eos=True)) for i in range(3)]
    finals = {}
    while eng.has_work():
        for o in eng.step():
            if o.finished:
                finals[o.request_id] = o.metering
    spent = src.read_j() - e0
    attributed = sum(m.joules for m in finals.values())
    assert set(finals) == set(rids) and attributed > 0
    assert attributed <= spent + 1e-6
    assert attributed >= 0.5 * spent  # most of the energy went into steps


def test_rapl_counter_wraps(tmp_path):
    from tokenfab.meter.energy import RaplEnergy

    z = tmp_path / "intel-rapl:0"
    z.mkdir()
    (z / "max_energy_range_uj").write_text("1000000\n")
    (z / "energy_uj").write_text("999000\n")
    src = RaplEnergy(str(tmp_path))
    (z / "energy_uj").write_text("4000\n")  # wrapped: +5,000 uJ
    assert src.read_j() == pytest.approx(0.005)


def test_admission_learns_how_far_its_ttft_predictions_run_short():
    from tokenfab.economics.tiers import default_tiers
    from tokenfab.serve.admission import Admission

    tiers = default_tiers()
    tier = tiers.tiers[0]
    adm = Admission(tiers, StepTimeModel(a_s=0.01, b_dec_s=0.001, b_pre_s=0.0005), max_batched_tokens=512,
                    queue_limit=64)
    raw = adm.predict_ttft_s(tier, 200)
    assert raw > 0
    for _ in range(40):  # requests keep taking 3x as long to a first token as predicted
        adm.admitted(tier.name, 200)
        adm.started(tier.name, 200, waited_s=3 * raw, predicted_s=raw)
        adm.finished(tier.name)
    assert 2.8 < adm.ttft_bias[tier.name] <= 3.0
    adm.admitted(tier.name, 200)  # one waiting, so the check runs its gates
    rej = adm.check(tier, 200)
    assert rej is not None and rej.reason == "ttft_slo"  # the waits it learned are past this tier's limit


def test_an_idle_tier_takes_a_burst_without_judging_it_by_old_starts():
    from tokenfab.economics.tiers import default_tiers
    from tokenfab.serve.admission import Admission

    tiers = default_tiers()
    free = tiers.tiers[-1]
    adm = Admission(tiers, StepTimeModel(a_s=0.01, b_dec_s=0.001, b_pre_s=0.0005), max_batched_tokens=512,
                    queue_limit=64)
    old = time.monotonic() - 9.0  # two requests started 9 s ago, then nothing until this burst
    adm.starts[free.name].extend([(old, 128), (old + 0.1, 128)])
    for _ in range(4):
        assert adm.check(free, 128) is None
        adm.admitted(free.name, 128)
    assert adm.drain_s(free.name, 128) is None  # busy for under a second: no rate to judge by yet
