"""Does tokenfab bench measure what guidellm measures? Same endpoint, same load, alternating runs.

Against a tokenfab server, closed loop at 4 concurrent streams, 32 requests of 128 prompt / 64 output
tokens per run, ABAB (medians of --reps runs each). By default the script starts the server itself,
pinned to the last core with one torch thread, and pins both load generators to the first core, so a
heavier client cannot slow the server down and the comparison measures the tools, not the load they
put on a shared CPU (`--url` uses a server you started instead). Compared: TTFT mean and
median, guidellm's ITL (its (E2E - TTFT)/(n - 1), i.e. our TPOT) mean and median, output tok/s.
guidellm is benchmark-only (a separate venv, never a dependency): pass its executable and a folder
holding the model's tokenizer.json (`--processor`).

    python benchmarks/bench_agreement.py --guidellm /path/to/venv/bin/guidellm --processor DIR [--url URL]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from engine import free_port, wait_ready  # benchmarks/engine.py, beside this file

from tokenfab.bench.load import Endpoint, LoadSpec, run_load_sync
from tokenfab.bench.metrics import summarize
from tokenfab.bench.workload import WorkloadSpec, build
from tokenfab.tokenizer import load_tokenizer
from tokenfab.ledger.store import Ledger

MODEL = "smollm2-135m-instruct"


def ours(url: str, n: int, conc: int, seed: int) -> dict[str, float]:
    jobs = build(WorkloadSpec(num_jobs=n, input_len="128", output_len="64", api="completion", seed=seed),
                 load_tokenizer(None))
    s = summarize(run_load_sync(Endpoint(url + "/v1", MODEL, ignore_eos=True), jobs,
                                       LoadSpec(concurrency=conc)))
    return {"ttft_mean_ms": s["ttft_ms"]["mean"], "ttft_median_ms": s["ttft_ms"]["p50"],
            "tpot_mean_ms": s["tpot_ms"]["mean"], "tpot_median_ms": s["tpot_ms"]["p50"],
            "output_tok_s": s["output_tok_s"], "output_tokens": s["output_tokens"]}


def guidellm(exe: str, processor: str, url: str, n: int, conc: int, workers: int) -> dict[str, float]:
    out = Path(tempfile.mkdtemp()) / "gl.json"
    cmd = [exe, "benchmark", "run", "--target", url, "--model", MODEL, "--processor", processor,
           "--data", "prompt_tokens=128,output_tokens=64", "--rate-type", "concurrent", "--rate", str(conc),
           "--max-requests", str(n), "--output-path", str(out), "--disable-progress", "--disable-console-outputs"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if workers > 0:  # guidellm starts min(streams, max(cpus - 1, 10)) worker processes by default
        env["GUIDELLM__MAX_WORKER_PROCESSES"] = str(workers)
    subprocess.run(cmd, check=True, env=env, capture_output=True, timeout=900)
    b = json.loads(out.read_text())["benchmarks"][0]
    m = b["metrics"]

    def g(k: str, stat: str) -> float:
        return m[k]["successful"][stat]

    tokens = g("output_token_count", "mean") * g("output_token_count", "count")
    return {"ttft_mean_ms": g("time_to_first_token_ms", "mean"), "ttft_median_ms": g("time_to_first_token_ms", "median"),
            "tpot_mean_ms": g("inter_token_latency_ms", "mean"), "tpot_median_ms": g("inter_token_latency_ms", "median"),
            "output_tok_s": tokens / b["duration"], "output_tokens": tokens}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--guidellm", required=True)
    ap.add_argument("--processor", required=True, help="folder with tokenizer.json + tokenizer_config.json")
    ap.add_argument("--url", default=None, help="an already running server (default: start one, pinned)")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--guidellm-workers", type=int, default=1,
                    help="guidellm worker processes (default 1: the load generators get one core; 0 = its default)")
    args = ap.parse_args()
    runs: dict[str, list[dict]] = {"tokenfab bench": [], "guidellm": []}
    server = None
    ledger_url = None
    url = args.url
    seen: dict[str, list[dict]] = {"tokenfab bench": [], "guidellm": []}  # the server's own timings

    def server_side(since: float) -> dict[str, float]:
        """The ledger's record of the requests a run sent: TTFT and TPOT as the server measured them."""
        if ledger_url is None:
            return {}
        led = Ledger(ledger_url)
        try:
            recs = [r for r in led.usage_records(since=since) if r["status"] == "completed"]
        finally:
            led.close()
        ttft = [r["ttft_ms"] for r in recs if r["ttft_ms"] is not None]
        tpot = [r["tpot_ms"] for r in recs if r["tpot_ms"] is not None]
        return {"ttft_mean_ms": statistics.fmean(ttft), "ttft_median_ms": statistics.median(ttft),
                "tpot_mean_ms": statistics.fmean(tpot), "tpot_median_ms": statistics.median(tpot), "requests": len(recs)}

    cpus = sorted(os.sched_getaffinity(0))
    if url is None:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        pin = {"preexec_fn": lambda: os.sched_setaffinity(0, {cpus[-1]})} if len(cpus) > 1 else {}
        ledger_url = f"sqlite:///{tempfile.mkdtemp(prefix='tokenfab-agree-')}/ledger.db"
        server = subprocess.Popen([sys.executable, "-m", "tokenfab.cli", "serve", "--port", str(port), "--threads", "1",
                                   "--ledger-url", ledger_url, "--log-level", "warning"], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, **pin)
        wait_ready(url, server, timeout=300)
    if len(cpus) > 1:
        os.sched_setaffinity(0, {cpus[0]})  # both load generators (guidellm inherits it) share this core
    try:
        for rep in range(args.reps):
            t0 = time.time()
            runs["tokenfab bench"].append(ours(url, args.requests, args.concurrency, rep))
            seen["tokenfab bench"].append(server_side(t0))
            t0 = time.time()
            runs["guidellm"].append(guidellm(args.guidellm, args.processor, url, args.requests, args.concurrency,
                                            args.guidellm_workers))
            seen["guidellm"].append(server_side(t0))
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=30)
    med = {k: {m: statistics.median(r[m] for r in v) for m in v[0]} for k, v in runs.items()}
    print("| metric | tokenfab bench | guidellm | difference |")
    print("|---|---|---|---|")
    for m in med["guidellm"]:
        a, b = med["tokenfab bench"][m], med["guidellm"][m]
        print(f"| {m} | {a:,.1f} | {b:,.1f} | {(a - b) / b:+.1%} |")
    if ledger_url is not None:  # each tool against the server's own timing of the same requests
        print("\n| metric | server, during tokenfab bench | tokenfab bench vs server | server, during guidellm | "
              "guidellm vs server |")
        print("|---|---|---|---|---|")
        srv = {k: {m: statistics.median(r[m] for r in v) for m in v[0]} for k, v in seen.items()}
        for m in ("ttft_mean_ms", "ttft_median_ms", "tpot_mean_ms", "tpot_median_ms"):
            a, b = srv["tokenfab bench"][m], srv["guidellm"][m]
            print(f"| {m} | {a:,.1f} | {(med['tokenfab bench'][m] - a) / a:+.1%} | {b:,.1f} | "
                  f"{(med['guidellm'][m] - b) / b:+.1%} |")
    print(json.dumps({"runs": runs, "server_side": seen, "command": "python " + " ".join(sys.argv)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
