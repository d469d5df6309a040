"""Routing across worker replicas on a shared-prefix workload: round-robin, least-loaded, prefix, prefix+load.

In the spirit of llm-d's benchmark (many users over a few long shared contexts): `--customers`
system prompts of about `--prefix-tokens` tokens each, `--users` users per customer, short
questions, open-loop Poisson arrivals at `--rate` requests/s for `--duration` seconds, the same
seeded schedule for every policy. Two `tokenfab worker` replicas (one engine thread each) hold
KV caches sized (`--kv-blocks`) so that one replica holds about half of the customers' contexts:
round-robin sends every context everywhere, so they evict each other and each request prefills
its whole context; prefix routing keeps each context on one replica. Two scenarios: `uniform`
(contexts picked evenly) and `skewed` (one context gets `--hot-share` of the requests, where
affinity alone piles onto one replica). The workers are restarted for every policy, so each starts
with a cold cache; the gateway is `tokenfab serve --backends`.

Reports per policy: TTFT p50/p90 (client-side, streamed), output tok/s, prefix-cache hit rate (cached
over prompt tokens, from usage), success rate, and how many requests each replica served.

    python benchmarks/fleet.py [--rate 4] [--duration 60] [--out benchmarks/results/fleet-DATE.json]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
from tokenfab.engine.config import EngineConfig  # noqa: E402
from tokenfab.fleet.workers import LocalWorkers, free_port, wait_healthy  # noqa: E402

MODEL = "smollm2-135m-instruct"
POLICIES = ("round-robin", "least-loaded", "prefix", "prefix+load")
TOPICS = ["bakery", "railway", "library", "hospital", "bank", "garden centre", "museum", "bicycle shop"]


def contexts(n: int, words: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    vocab = ("order delivery invoice refund account schedule opening hours policy member card ticket booking "
             "payment receipt address warranty return exchange discount season weekend holiday").split()
    out = []
    for i in range(n):
        body = " ".join(rng.choice(vocab) for _ in range(words))
        out.append(f"You are the assistant of customer {i}, a {TOPICS[i % len(TOPICS)]}. Their notes: {body}.")
    return out


def schedule(rate: float, duration: float, customers: int, users: int, seed: int,
             hot_share: float = 0.0) -> list[tuple[float, int, int]]:
    """(send time, customer, user) for each request: Poisson arrivals; customer 0 gets `hot_share` of them
    (a skewed load), the rest are picked uniformly."""
    rng = random.Random(seed)
    t, out = 0.0, []
    while True:
        t += rng.expovariate(rate)
        if t > duration:
            return out
        c = 0 if rng.random() < hot_share else rng.randrange(customers)
        out.append((t, c, rng.randrange(users)))


async def one(client: httpx.AsyncClient, url: str, system: str, question: str, max_tokens: int) -> dict:
    body = {"model": MODEL, "messages": [{"role": "system", "content": system}, {"role": "user", "content": question}],
            "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first = None
    usage: dict = {}
    ok = False
    rid = None
    try:
        async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                return {"ok": False, "status": r.status_code, "start": start}
            rid = r.headers.get("x-request-id")
            async for line in r.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                obj = json.loads(line[6:])
                if "error" in obj:
                    return {"ok": False, "status": 200, "start": start, "error": obj["error"]["message"]}
                if obj.get("usage"):
                    usage = obj["usage"]
                for ch in obj.get("choices") or []:
                    if ch["delta"].get("content") and first is None:
                        first = time.perf_counter()
                    if ch.get("finish_reason"):
                        ok = True
    except httpx.HTTPError as exc:
        return {"ok": False, "status": 0, "start": start, "error": repr(exc)}
    end = time.perf_counter()
    return {"ok": ok and first is not None, "status": 200, "start": start, "end": end, "rid": rid,
            "ttft_s": (first - start) if first else None, "prompt": usage.get("prompt_tokens", 0),
            "cached": (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0),
            "completion": usage.get("completion_tokens", 0)}


async def drive(url: str, plan: list[tuple[float, int, int]], ctxs: list[str], max_tokens: int) -> list[dict]:
    async with httpx.AsyncClient(timeout=httpx.Timeout(300.0), limits=httpx.Limits(max_connections=None)) as client:
        t0 = time.perf_counter()
        tasks = []
        for t, c, u in plan:
            await asyncio.sleep(max(0.0, t0 + t - time.perf_counter()))
            q = f"I am user {u}. What should I do about my {['order', 'refund', 'booking', 'card'][u % 4]}?"
            tasks.append(asyncio.create_task(one(client, url, ctxs[c], q, max_tokens)))
        return list(await asyncio.gather(*tasks))


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    s = sorted(xs)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def summarize(results: list[dict], routed: dict) -> dict:
    good = [r for r in results if r["ok"]]
    ttfts = [r["ttft_s"] for r in good]
    span = (max(r["end"] for r in good) - min(r["start"] for r in results)) if good else 0.0
    prompt = sum(r["prompt"] for r in good)
    return {
        "requests": len(results), "succeeded": len(good), "success_rate": len(good) / len(results),
        "ttft_p50_s": pct(ttfts, 0.5), "ttft_p90_s": pct(ttfts, 0.9), "ttft_mean_s": statistics.fmean(ttfts) if ttfts else None,
        "output_tok_s": sum(r["completion"] for r in good) / span if span else 0.0,
        "cache_hit_rate": sum(r["cached"] for r in good) / prompt if prompt else 0.0,
        "routed": routed, "errors": sorted({str(r.get("error") or r["status"]) for r in results if not r["ok"]})[:5],
    }


def run_policy(policy: str, args: argparse.Namespace, plan: list, ctxs: list[str], logs: Path) -> dict:
    engine = EngineConfig(max_model_len=2048, num_kv_blocks=args.kv_blocks, max_num_seqs=args.max_num_seqs)
    workers = LocalWorkers(2, engine, threads=1, log_dir=logs)
    gw = None
    try:
        urls = workers.start()
        port = free_port()
        gw = subprocess.Popen([sys.executable, "-m", "tokenfab.cli", "serve", "--port", str(port), "--backends",
                               ",".join(urls), "--route-policy", policy, "--ledger-url", f"sqlite:///{logs}/l-{port}.db",
                               "--log-level", "warning", "--admission-slack", "1000", "--tier-queue-limit", "100000"],
                              stdout=open(logs / f"gw-{port}.log", "w"), stderr=subprocess.STDOUT, cwd=ROOT)
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, gw, 60, logs / f"gw-{port}.log")
        results = asyncio.run(drive(url, plan, ctxs, args.output_tokens))
        health = httpx.get(url + "/health", timeout=5).json()
        routed = {m["name"]: m["routed"] for m in health["fleet"]["members"]}
        return summarize(results, routed)
    finally:
        if gw is not None:
            gw.terminate()
            gw.wait(20)
        workers.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate", type=float, default=4.0, help="offered requests/s (the same for every policy)")
    ap.add_argument("--duration", type=float, default=60.0, help="seconds of arrivals per policy")
    ap.add_argument("--customers", type=int, default=8, help="shared contexts")
    ap.add_argument("--users", type=int, default=5, help="users per context")
    ap.add_argument("--prefix-words", type=int, default=700, help="words of notes per context (about a token each)")
    ap.add_argument("--output-tokens", type=int, default=24)
    ap.add_argument("--kv-blocks", type=int, default=220, help="KV blocks of 16 tokens per worker")
    ap.add_argument("--max-num-seqs", type=int, default=8)
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument("--scenarios", default="uniform,skewed",
                    help="uniform: customers picked evenly; skewed: customer 0 gets --hot-share of the requests")
    ap.add_argument("--hot-share", type=float, default=0.7)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    ctxs = contexts(args.customers, args.prefix_words, args.seed)
    from tokenfab.tokenizer import load_tokenizer

    tok = load_tokenizer(None)
    ctx_tokens = [len(tok.encode_chat([{"role": "system", "content": c}])) for c in ctxs]
    out: dict = {"machine": _machine(), "date": dt.date.today().isoformat(), "command": " ".join(sys.argv),
                 "workload": {**vars(args), "context_tokens": ctx_tokens}, "scenarios": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for scenario in args.scenarios.split(","):
            hot = args.hot_share if scenario == "skewed" else 0.0
            plan = schedule(args.rate, args.duration, args.customers, args.users, args.seed, hot)
            print(f"{scenario}: {len(plan)} requests at {args.rate}/s over {args.duration:g} s"
                  f"{f' ({hot:.0%} on one context)' if hot else ''}; {args.customers} contexts of "
                  f"{min(ctx_tokens)}-{max(ctx_tokens)} tokens ({sum(ctx_tokens)} in all); each worker's KV cache "
                  f"holds {args.kv_blocks * 16} tokens", flush=True)
            res_s: dict = {"requests": len(plan), "hot_share": hot, "policies": {}}
            for policy in args.policies.split(","):
                res = run_policy(policy, args, plan, ctxs, Path(tmp))
                res_s["policies"][policy] = res
                print(f"{policy:>13}: TTFT p50 {res['ttft_p50_s']:.2f} s, p90 {res['ttft_p90_s']:.2f} s; "
                      f"{res['output_tok_s']:.1f} output tok/s; cache hits {res['cache_hit_rate']:.0%}; "
                      f"success {res['success_rate']:.0%}; routed {res['routed']}", flush=True)
            p = res_s["policies"]
            if "round-robin" in p and "prefix+load" in p and p["prefix+load"]["ttft_p90_s"]:
                res_s["ttft_p90_ratio_rr_over_prefix_load"] = p["round-robin"]["ttft_p90_s"] / p["prefix+load"]["ttft_p90_s"]
                print(f"TTFT p90: round-robin / prefix+load = {res_s['ttft_p90_ratio_rr_over_prefix_load']:.1f}x",
                      flush=True)
            out["scenarios"][scenario] = res_s
    dest = Path(args.out or ROOT / "benchmarks" / "results" / f"fleet-{out['date']}.json")
    dest.write_text(json.dumps(out, indent=1))
    print(f"wrote {dest}")
    return 0


def _machine() -> str:
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    import os

    return f"{cpu}, {os.cpu_count()} cores"


if __name__ == "__main__":
    sys.exit(main())
