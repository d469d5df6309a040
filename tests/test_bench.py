"""tokenfab bench: metric math by hand, timing against a scripted server, arrivals, failures, outputs, CLI."""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import subprocess
import sys

import pytest
from scipy import stats as sps

from scripted_server import Script, ScriptedServer
from tokenfab.bench.load import Endpoint, LoadSpec, arrival_times, run_load
from tokenfab.bench.metrics import RequestRecord, SLOSpec, summarize
from tokenfab.bench.workload import Job, LengthDist, Turn, WorkloadSpec, build
from tokenfab.curve import Curve, OperatingPoint, Provenance


@pytest.fixture(scope="module")
def scripted():
    s = ScriptedServer()
    yield s
    s.stop()


def rec(i, start, ttft, chunks, n=None, tier="", error=None):
    return RequestRecord(f"r{i}", start, tier=tier, ttft_s=ttft, e2e_s=chunks[-1] if chunks else ttft,
                         chunk_times_s=chunks, output_tokens=n if n is not None else len(chunks), error=error)


def test_metrics_by_hand():
    a = rec(0, 0.0, 0.1, [0.1, 0.2, 0.3, 0.5])  # TPOT = (0.5-0.1)/3
    b = rec(1, 0.5, 0.3, [0.3, 0.4])  # TPOT = 0.1
    c = rec(2, 1.0, None, [], error="http_5xx")
    s = summarize([a, b, c], SLOSpec(max_ttft_ms=200))
    assert s["requests"] == 3 and s["completed"] == 2 and s["errors"] == {"http_5xx": 1}
    assert s["duration_s"] == pytest.approx(1.0)  # first send 0.0 .. last end max(0.5, 0.9, 1.0)
    assert s["output_tokens"] == 6
    assert s["output_tok_s"] == pytest.approx(6.0)
    assert s["ttft_ms"]["mean"] == pytest.approx(200.0)
    assert s["ttft_ms"]["p50"] == pytest.approx(200.0)
    assert s["tpot_ms"]["mean"] == pytest.approx((400 / 3 + 100) / 2)
    assert s["itl_ms"]["n"] == 4 and s["itl_ms"]["max"] == pytest.approx(200.0)
    assert s["e2e_ms"]["p50"] == pytest.approx(450.0)  # median of 500 and 400
    assert s["tok_s_user"]["max"] == pytest.approx(10.0)
    assert s["goodput"] == pytest.approx(1 / 1.0)  # only `a` meets TTFT <= 200 ms; c failed
    assert s["slo_attainment"] == pytest.approx(1 / 3)


def test_per_tier_attainment_and_share():
    rs = [rec(0, 0, 0.05, [0.05, 0.1, 0.15], tier="gold"), rec(1, 0, 0.5, [0.5, 0.6], tier="gold"),
          rec(2, 0, 0.2, [0.2, 1.2], tier="free")]
    s = summarize(rs, tier_slos={"gold": SLOSpec(100, 15), "free": SLOSpec(1000, 0.5)})
    assert s["tiers"]["gold"]["slo_attainment"] == pytest.approx(0.5)
    assert s["tiers"]["free"]["slo_attainment"] == pytest.approx(1.0)
    assert s["tiers"]["gold"]["token_share"] == pytest.approx(5 / 7)


def test_timings_match_the_script(scripted):
    ep = Endpoint(scripted.url, "scripted")
    jobs = [Job([Turn("hi", 11)]) for _ in range(6)]
    records = asyncio.run(run_load(ep, jobs, LoadSpec(concurrency=3)))
    s = summarize(records)
    assert s["completed"] == 6 and s["output_tokens"] == 66
    tol = 15.0  # ms: request parsing, loopback and event-loop scheduling on a shared 2-core machine
    assert s["ttft_ms"]["p50"] == pytest.approx(Script.ttft_s * 1000, abs=tol)
    assert s["tpot_ms"]["p50"] == pytest.approx(Script.gap_s * 1000, abs=2.0)
    assert s["itl_ms"]["p50"] == pytest.approx(Script.gap_s * 1000, abs=2.0)
    assert s["e2e_ms"]["p50"] == pytest.approx((Script.ttft_s + 10 * Script.gap_s) * 1000, abs=tol)
    assert s["tok_s_user"]["p50"] == pytest.approx(1 / Script.gap_s, rel=0.1)


def test_open_loop_arrivals_are_poisson_at_the_rate():
    rng = random.Random(1)
    t = arrival_times(4000, rate=50.0, burstiness=1.0, rng=rng)
    gaps = [b - a for a, b in zip([0.0] + t, t)]
    assert statistics.mean(gaps) == pytest.approx(1 / 50, rel=0.05)
    assert sps.kstest(gaps, "expon", args=(0, 1 / 50)).pvalue > 0.01
    bursty = arrival_times(4000, rate=50.0, burstiness=0.25, rng=rng)
    g2 = [b - a for a, b in zip([0.0] + bursty, bursty)]
    assert statistics.stdev(g2) / statistics.mean(g2) == pytest.approx(2.0, rel=0.15)  # CV = 1/sqrt(shape)


def test_open_loop_run_sends_at_the_rate(scripted):
    ep = Endpoint(scripted.url, "scripted")
    jobs = [Job([Turn("x", 2)]) for _ in range(60)]
    records = asyncio.run(run_load(ep, jobs, LoadSpec(mode="rate", rate=40.0, seed=3)))
    starts = sorted(r.start_s for r in records)
    rate = (len(starts) - 1) / (starts[-1] - starts[0])
    assert rate == pytest.approx(40.0, rel=0.35)
    # the send times follow the schedule, not the responses
    assert max(abs(r.start_s - r.scheduled_s) for r in records) < 0.05


@pytest.mark.parametrize("model,category", [("fail-500", "http_5xx"), ("truncate", "truncated"), ("needs-key", "auth")])
def test_failures_are_counted_by_category(scripted, model, category):
    ep = Endpoint(scripted.url, model)
    records = asyncio.run(run_load(ep, [Job([Turn("x", 6)]) for _ in range(3)], LoadSpec(concurrency=2)))
    s = summarize(records)
    assert s["errors"] == {category: 3} and s["completed"] == 0


def test_unreachable_and_non_streaming(scripted):
    ep = Endpoint("http://127.0.0.1:9/v1", "x", timeout_s=2)
    s = summarize(asyncio.run(run_load(ep, [Job([Turn("x", 3)])], LoadSpec())))
    assert s["errors"] == {"unreachable": 1}
    ns = summarize(asyncio.run(run_load(Endpoint(scripted.url, "nonstream"), [Job([Turn("x", 4)])], LoadSpec())))
    assert ns["completed"] == 1 and ns["output_tokens"] == 4
    assert ns["ttft_ms"]["p50"] == pytest.approx(ns["e2e_ms"]["p50"])


def test_multi_turn_carries_replies(scripted):
    ep = Endpoint(scripted.url, "scripted")
    job = Job([Turn("a", 3), Turn("b", 3), Turn("c", 3)], system="ctx")
    records = asyncio.run(run_load(ep, [job], LoadSpec()))
    assert len(records) == 3 and all(r.ok for r in records)
    assert records[1].start_s >= records[0].start_s + records[0].e2e_s - 1e-6


def test_workloads_build_lengths(real_model):
    tok = real_model.tokenizer
    jobs = build(WorkloadSpec(kind="synthetic", num_jobs=5, input_len="100", output_len="uniform:10:20"), tok)
    assert all(len(tok.encode(j.turns[0].user)) == pytest.approx(100, abs=3) for j in jobs)
    assert all(10 <= j.turns[0].max_tokens <= 20 for j in jobs)
    sp = build(WorkloadSpec(kind="shared-prefix", num_jobs=4, prefix_len=64, num_prefixes=2), tok)
    assert sp[0].system == sp[2].system != sp[1].system
    ag = build(WorkloadSpec(kind="agentic", num_jobs=2, turns=5), tok)
    assert len(ag[0].turns) == 5 and len(tok.encode(ag[0].system)) >= 1000
    with pytest.raises(ValueError, match="uniform:LO:HI"):
        LengthDist.parse("lots")


def test_replay_trace(tmp_path, scripted):
    trace = tmp_path / "t.jsonl"
    trace.write_text("\n".join(json.dumps({"timestamp": 10 + 0.05 * i, "input_len": 8, "output_len": 2}) for i in range(5)))
    jobs = build(WorkloadSpec(kind="replay", trace=str(trace)), None)
    assert [j.at_s for j in jobs] == pytest.approx([0, 0.05, 0.1, 0.15, 0.2])
    rs = asyncio.run(run_load(Endpoint(scripted.url, "scripted"), jobs, LoadSpec(mode="replay")))
    assert len(rs) == 5 and all(r.ok for r in rs)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"timestamp": 1}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        build(WorkloadSpec(kind="replay", trace=str(bad)), None)


def test_curve_frontier_and_throughput_at():
    pts = (OperatingPoint(1, 100, 100), OperatingPoint(4, 60, 300), OperatingPoint(8, 30, 250),
           OperatingPoint(16, 20, 500))
    c = Curve("x", pts, Provenance("measured", "t", "s", "now"))
    assert [p.concurrency for p in c.frontier().points] == [16, 4, 1]
    assert c.throughput_at(50) == 300 and c.throughput_at(200) == 0
    assert Curve.from_dict(json.loads(json.dumps(c.to_dict()))) == c


def test_cli_run_and_compare(scripted, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "tokenfab.cli", "bench", "run", "--url", scripted.url, "--model", "scripted",
           "--concurrency", "1,4", "--requests", "8", "--output-len", "5", "--input-len", "20", "--out", str(out),
           "--no-progress", "--energy", "none", "--slo-ttft-ms", "500"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert [lv["level"] for lv in summary["levels"]] == [1, 4]
    assert summary["levels"][0]["summary"]["output_tokens"] == 40
    assert (out / "chart.png").stat().st_size > 10_000 and "<svg" in (out / "chart.html").read_text()
    assert len((out / "requests.jsonl").read_text().splitlines()) == 2 * 9  # 8 measured + 1 warm-up each
    assert (out / "summary.csv").read_text().startswith("level,")
    c = subprocess.run([sys.executable, "-m", "tokenfab.cli", "bench", "compare", str(out / "summary.json"),
                        str(out / "summary.json"), "--out", str(tmp_path / "cmp")], capture_output=True, text=True)
    assert c.returncode == 0 and (tmp_path / "cmp.png").is_file()
    bad = subprocess.run([sys.executable, "-m", "tokenfab.cli", "bench", "run", "--url", scripted.url, "--model", "x",
                          "--concurrency", "0,two"], capture_output=True, text=True)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1


def test_bench_against_tokenfab_matches_its_usage_records(server, tmp_path):
    """End to end: bench tokenfab's own server; the summary's token counts equal the ledger's records."""
    _, key = server.ledger.create_key("bench-e2e", "free")
    out = tmp_path / "e2e"
    r = subprocess.run([sys.executable, "-m", "tokenfab.cli", "bench", "run", "--url", server.base_url + "/v1",
                        "--api-key", key, "--concurrency", "1,3", "--requests", "3", "--warmup", "0",
                        "--input-len", "24", "--output-len", "6", "--ignore-eos", "--out", str(out), "--no-progress"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    summary = json.loads((out / "summary.json").read_text())
    recs = server.ledger.usage_records("bench-e2e")
    assert len(recs) == 6 and all(x["status"] == "completed" for x in recs)
    assert sum(lv["summary"]["output_tokens"] for lv in summary["levels"]) == sum(x["completion_tokens"] for x in recs)
    assert sum(lv["summary"]["prompt_tokens"] for lv in summary["levels"]) == sum(x["prompt_tokens"] for x in recs)
    assert "endpoint /metrics" in summary["meta"]["energy_source"]
    assert all(lv["summary"]["energy"]["joules"] > 0 for lv in summary["levels"])
    assert (out / "chart.png").stat().st_size > 10_000
