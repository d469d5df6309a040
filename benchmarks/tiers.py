"""Tiers under overload: three tiers, open-loop Poisson load at 2x the engine's capacity, tier-aware vs FCFS.

Both servers are the same `tokenfab serve` with the same tier table and keys; one runs with tier
admission and tier-aware scheduling (the default), the other with `tier_scheduling: false` (plain
first come, first served, shedding only at the global queue bound). The first server (FCFS by
default) measures the capacity in requests/s (closed loop, 32 streams); each server then gets the
open-loop load at 2x that rate, requests spread evenly over the three tiers' keys.

    python benchmarks/tiers.py [--duration 60] [--overload 2.0]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx
import yaml

from engine import free_port, wait_ready  # benchmarks/engine.py, beside this file
from tokenfab.bench.load import Endpoint, LoadSpec, run_load_sync
from tokenfab.bench.metrics import SLOSpec, summarize
from tokenfab.bench.workload import WorkloadSpec, build
from tokenfab.tokenizer import load_tokenizer
from tokenfab.ledger.store import Ledger

ROOT = Path(__file__).resolve().parents[1]
MODEL = "smollm2-135m-instruct"
TIERS = [
    {"name": "premium", "usd_per_mtok_input": 37.5, "usd_per_mtok_output": 150.0,
     "slo": {"max_ttft_p95_ms": 2000, "min_tok_s_user": 15}, "guaranteed_share": 0.3, "max_share": 0.7},
    {"name": "standard", "usd_per_mtok_input": 0.75, "usd_per_mtok_output": 3.0,
     "slo": {"max_ttft_p95_ms": 8000, "min_tok_s_user": 6}, "guaranteed_share": 0.1, "max_share": 1.0},
    {"name": "free", "usd_per_mtok_input": 0.0, "usd_per_mtok_output": 0.0,
     "slo": {"max_ttft_p95_ms": 30000, "min_tok_s_user": 2}, "guaranteed_share": 0.15, "max_share": 1.0},
]


def start(cfg: Path, port: int, log: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "tokenfab.cli", "serve", "--config", str(cfg), "--port", str(port),
                             "--log-level", "warning"], stdout=open(log, "w"), stderr=subprocess.STDOUT, cwd=ROOT)
    wait_ready(f"http://127.0.0.1:{port}", proc, timeout=180)
    return proc


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=60.0, help="seconds of open-loop load per policy")
    ap.add_argument("--overload", type=float, default=2.0, help="offered load as a multiple of capacity")
    ap.add_argument("--policies", default="fcfs,tiered",
                    help="comma-separated, run in this order: fcfs, tiered; the first also measures capacity")
    ap.add_argument("--capacity", type=float, default=None, help="requests/s; skips the closed-loop measurement")
    ap.add_argument("--input-len", default="128")
    ap.add_argument("--output-len", default="64")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / f"tiers-{dt.date.today()}.json"))
    args = ap.parse_args()
    tok = load_tokenizer(None)
    work = Path(tempfile.mkdtemp(prefix="tokenfab-tiers-"))
    results: dict = {}
    capacity = args.capacity
    names = [t["name"] for t in TIERS]
    slos = {t["name"]: SLOSpec(t["slo"]["max_ttft_p95_ms"], t["slo"]["min_tok_s_user"]) for t in TIERS}
    for policy in args.policies.split(","):
        db = work / f"{policy}.db"
        led = Ledger(f"sqlite:///{db}")
        keys = {t: led.create_key(f"tenant-{t}", t)[1] for t in names}
        led.close()
        cfg = work / f"{policy}.yaml"
        cfg.write_text(yaml.safe_dump({
            "engine": {"max_model_len": 1024, "kv_cache_gb": 0.5, "max_num_seqs": 64},
            "ledger": {"ledger_url": f"sqlite:///{db}", "anonymous_tier": ""},
            "admission": {"tier_scheduling": policy == "tiered", "tier_queue_limit": 64},
            "tiers": TIERS,
        }))
        port = free_port()
        proc = start(cfg, port, work / f"{policy}.log")
        try:
            ep = Endpoint(f"http://127.0.0.1:{port}/v1", MODEL, keys, ignore_eos=True, timeout_s=300)
            if capacity is None:  # closed loop at 32 streams (standard tier keys) = capacity in requests/s
                jobs = build(WorkloadSpec(num_jobs=96, input_len=args.input_len, output_len=args.output_len,
                                          api="completion", tiers=["free"]), tok)
                recs = run_load_sync(ep, jobs, LoadSpec(concurrency=32, warmup=8))
                capacity = summarize(recs)["request_throughput"]
                print(f"capacity: {capacity:.2f} requests/s (closed loop, 32 streams)", flush=True)
            assert capacity is not None
            rate = args.overload * capacity
            n = int(rate * args.duration)
            jobs = build(WorkloadSpec(num_jobs=n, input_len=args.input_len, output_len=args.output_len,
                                      api="completion", tiers=names, seed=7), tok)
            print(f"{policy}: {n} requests at {rate:.2f}/s ...", flush=True)
            recs = run_load_sync(ep, jobs, LoadSpec(mode="rate", rate=rate, seed=11))
            s = summarize(recs, tier_slos=slos)
            health = httpx.get(f"http://127.0.0.1:{port}/health").json()
            print("  server /health:", health.get("step_model"), health.get("admission", {}).get("ttft_bias"), flush=True)
            good = sum(1 for r in recs if slos[r.tier].met_by(r))
            reasons: dict[str, dict[str, float]] = {}  # the server's own count of 429s, by tier and reason
            for line in httpx.get(f"http://127.0.0.1:{port}/metrics").text.splitlines():
                if line.startswith("tokenfab_rejections_total{"):
                    labels = dict(kv.split("=") for kv in line[line.index("{") + 1:line.index("}")].split(","))
                    tier, reason = labels["tier"].strip('"'), labels["reason"].strip('"')
                    reasons.setdefault(tier, {})[reason] = float(line.rsplit(" ", 1)[1])
            print("  rejections by reason:", reasons, flush=True)
            results[policy] = {"summary": s, "goodput": good / s["duration_s"], "rate": rate, "requests": n,
                               "rejections": reasons}
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    report = {"meta": {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                       "command": "python " + " ".join(sys.argv), "capacity_req_s": capacity,
                       "tiers": TIERS, "cpu": os.cpu_count()},
              "results": results}
    Path(args.out).write_text(json.dumps(report, indent=2, default=str))
    lines = ["| policy | tier | sent | completed | rejected (429) | SLO attainment (of completed) | p95 TTFT ms | "
             "p50 tok/s/user | goodput req/s | share of output tokens |", "|---|---|---|---|---|---|---|---|---|---|"]
    for policy, r in results.items():
        for name in names:
            t = r["summary"]["tiers"][name]
            rej = t["errors"].get("rate_limited", 0)
            att = t["slo_attainment"]
            lines.append(f"| {policy} | {name} | {t['requests']} | {t['completed']} | {rej} | "
                         f"{'-' if att is None else f'{att:.1%}'} | {t['ttft_ms']['p95'] or 0:.0f} | "
                         f"{t['tok_s_user']['p50'] or 0:.1f} | {t['goodput']:.2f} | {t['token_share']:.1%} |")
        lines.append(f"| {policy} | **all** | {r['requests']} | {r['summary']['completed']} | "
                     f"{r['summary']['errors'].get('rate_limited', 0)} | | | | **{r['goodput']:.2f}** | |")
    print("\n".join(lines))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
